"""Sequence parallelism, compile-only: what splitting one row over N devices buys per device.

One train step of a small hybrid model (batch 1 row) is lowered and compiled for 8 fake CPU
devices; nothing runs. Four markdown tables (recorded in bench/README.md):

  1. Per-device memory at a fixed row length as the `sequence` mesh axis grows 1 -> 2 -> 4 -> 8
     (mesh data=1, sequence=N, the first N devices).
  2. The longest row (a power of two) whose step fits a per-device memory budget, on 1 device
     and on N = 8.
  3. A 1M-token row on the 8-device mesh: per-device memory and compile time.
  4. Bytes communicated per step, ring vs all-gather attention, from the compiled HLO.

Memory is XLA's `memory_analysis` of the compiled (per-device, SPMD) program: arguments (the
train state and this device's slice of the batch), outputs, temporaries, and "peak" = arguments
+ outputs + temporaries - donated aliases, as bench/step_cost.py reports it. It is the buffer
assignment's total, deterministic on CPU; a real device adds its runtime's own overhead.

One device has no sequence sharding, so its attention runs the model's own kernel: the step
sets AttentionConfig.impl = "blockwise" (the same flash-style kernel, and block size, that
ring attention runs per kv block) everywhere, rather than the CPU default "reference", whose
[seq, seq] scores would dwarf everything else; tiles are BLOCK x BLOCK tokens.

Bytes communicated are read off the compiled HLO: the result bytes of every collective on one
device, loops multiplied by their trip counts (see `collective_bytes`), split into the parts of
the model that issue them.

    python bench/sequence_parallel.py [--gin_file=configs/demo.gin
        --gin_file=configs/models/hybrid_tiny.gin] [--seq_len=32768] [--shards=1,2,4,8]
        [--budget_gib=2] [--search=8192,1048576] [--long=1048576] [--layout=zigzag]
        [--skip=...]
"""

import argparse
import collections
import dataclasses
import os
import re
import sys
import time
from unittest import mock

DEVICES = 8  # fake CPU devices: the largest sequence axis measured
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from lcjax.config import parse_gin  # noqa: E402
from lcjax.models.report import counted_params  # noqa: E402
from lcjax.parallel import mesh as mesh_lib  # noqa: E402
from lcjax import run as run_lib  # noqa: E402
from lcjax.train import state as train_state  # noqa: E402
from lcjax.train.step import make_train_step  # noqa: E402

MiB = 2**20


@dataclasses.dataclass
class Step:
  """One compiled train step: per-device bytes from memory_analysis, and its collectives."""
  shards: int
  seq_len: int
  attention: str
  arguments: int
  outputs: int
  aliased: int
  temp: int
  compile_s: float
  comm: dict  # (part, collective kind) -> bytes per device per step; see `collective_bytes`

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs + self.temp - self.aliased


BLOCK = 512  # attention tile (AttentionConfig.block_q / _kv) of every run here


def compile_step(base: run_lib.Run, seq_len: int, shards: int, attention: str,
                 layout: str) -> Step:
  """Lowers and compiles the loop's train step for one row of `seq_len` tokens split over the
  first `shards` devices (mesh data=1, sequence=shards)."""
  run = dataclasses.replace(
      base,
      model=dataclasses.replace(base.model, attention=dataclasses.replace(
          base.model.attention, impl="blockwise", block_q=BLOCK, block_kv=BLOCK)),
      data=dataclasses.replace(base.data, sequence_length=seq_len),
      train=dataclasses.replace(base.train, batch_size=1, grad_accum_steps=1),
      mesh_config=mesh_lib.MeshConfig(data=1, fsdp=1, tensor=1, sequence=shards))
  # build() reads SequenceConfig from gin and makes its mesh over every device: give it these.
  gin.bind_parameter("SequenceConfig.attention", attention)
  gin.bind_parameter("SequenceConfig.layout", layout)
  devices = jax.devices()[:shards]
  with mock.patch.object(run_lib, "make_mesh", lambda cfg: mesh_lib.make_mesh(cfg, devices)):
    b = run_lib.build(run)
  # As the train loop jits it.
  step_fn = jax.jit(
      make_train_step(b.graphdef, b.optimizer, b.schedule, 1),
      in_shardings=(b.shardings, b.batch_sharding),
      out_shardings=(b.shardings, NamedSharding(b.mesh, PartitionSpec())),
      donate_argnums=0)
  abstract = train_state.abstract_state(b.abstract_params, b.optimizer)
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  batch = {k: tokens for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["loss_weights"] = jax.ShapeDtypeStruct((1, seq_len), jnp.float32)
  start = time.perf_counter()
  compiled = step_fn.lower(abstract, batch).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  return Step(shards, seq_len, attention, mem.argument_size_in_bytes, mem.output_size_in_bytes,
              mem.alias_size_in_bytes, mem.temp_size_in_bytes, compile_s,
              collective_bytes(compiled.as_text()) if shards > 1 else {})


# --- bytes communicated, from the compiled HLO text ---

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s*\(.*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(\S+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_CALLED = re.compile(r"\b(?:body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_SOURCE = re.compile(r'source_file="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_GROUPS = re.compile(r"replica_groups=(\{[{}0-9,]*\}|\[\d+,(\d+)\]<=)")
# Which part of the model a collective belongs to, by the file of its innermost source frame.
PARTS = {"ring_attention.py": "attention", "blockwise_attention.py": "attention",
         "ssd_sharded.py": "Mamba-2", "ssd.py": "Mamba-2", "conv.py": "Mamba-2"}


def _split_shape(rest: str) -> tuple[str, str]:
  """'(f32[2]{0}, s32[]) op(...), ...' -> (the shape, 'op(...), ...'); tuples may nest."""
  if not rest.startswith("("):
    shape, _, tail = rest.partition(" ")
    return shape, tail
  depth = 0
  for i, c in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(c, 0)
    if depth == 0:
      return rest[:i + 1], rest[i + 1:].lstrip()
  raise ValueError(f"Unbalanced shape in HLO line: {rest[:200]}")


def _arrays(shape: str) -> list[int]:
  """Bytes of each array in a (possibly tuple) HLO shape, in order."""
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in DTYPE_BYTES:
      continue  # token[] and the like
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    out.append(n * DTYPE_BYTES[dtype])
  return out


def _result_bytes(opcode: str, shape: str) -> int:
  """Bytes a collective leaves on one device. A `-start` op's tuple holds its operands, then
  its results, then (collective-permute) u32 context scalars: count the results only."""
  sizes = _arrays(shape)
  if not opcode.endswith("-start") or not shape.startswith("("):
    return sum(sizes)
  if opcode.startswith("collective-permute"):
    sizes = sizes[:len(sizes) - 2] if len(sizes) > 2 else sizes
  return sum(sizes[len(sizes) // 2:])


def _frame_files(hlo: str) -> dict[int, str]:
  """{stack frame id: source file} from the tables that head newer HLO text (FileNames,
  FileLocations, StackFrames; metadata then names a frame instead of a file)."""
  tables, section = collections.defaultdict(dict), None
  for line in hlo.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = line
    elif section and (row := re.match(r"^(\d+) (.*)$", line)):
      tables[section][int(row.group(1))] = row.group(2)
    elif section and line.strip():
      break  # the first computation
  files = {i: name.strip('"') for i, name in tables["FileNames"].items()}
  location_file = {i: int(re.search(r"file_name_id=(\d+)", v).group(1))
                   for i, v in tables["FileLocations"].items()}
  return {i: files.get(location_file.get(int(re.search(r"file_location_id=(\d+)", v).group(1))),
                       "")
          for i, v in tables["StackFrames"].items()}


def _part(opcode: str, line: str, frame_files: dict[int, str]) -> str:
  """'gradients' for all-reduces, else 'attention', 'Mamba-2' or 'rest' by the collective's
  innermost source file. With data=1 every all-reduce sums parameter gradients (and the loss)
  over the sequence shards; XLA combines them into one op that keeps one member's metadata, so
  their source file says nothing."""
  if opcode.startswith("all-reduce"):
    return "gradients"
  source = _SOURCE.search(line)
  frame = _FRAME.search(line)
  path = source.group(1) if source else frame_files.get(int(frame.group(1)), "") if frame else ""
  return PARTS.get(os.path.basename(path), "rest")


def _moves_data(line: str) -> bool:
  """False for a collective over groups of one device (e.g. the psum of a size-1 mesh axis that
  shard_map's transpose emits): XLA keeps them as copies, nothing leaves the device."""
  groups = _GROUPS.search(line)
  if groups is None:
    return True  # collective-permute, or every device in one group
  if groups.group(2) is not None:  # iota form [groups, size]<=[...]
    return int(groups.group(2)) > 1
  return any("," in g for g in re.findall(r"\{([0-9,]*)\}", groups.group(1)))


def collective_bytes(hlo: str) -> dict:
  """{(part, kind): bytes per device per step} over the entry computation of compiled HLO text.

  A collective counts its result shape's bytes (for all-gather the whole gathered buffer, own
  shard included; for reduce-scatter the shard); collectives over one-device groups count
  nothing. Collectives in a while loop count once per iteration (XLA's known_trip_count; an
  unknown count is taken as 1 and reported on stderr), nested loops multiply, a conditional
  counts its costliest branch, and other called computations (fusions, calls, async wrappers)
  count once per call. Loop conditions only compare the counter: they are not walked.
  """
  frame_files = _frame_files(hlo)
  computations, entry, current = {}, None, None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(1), [])
      if line.startswith("ENTRY"):
        entry = header.group(1)
    elif line.strip() == "}":
      current = None
    elif current is not None and _INSTRUCTION.match(line):
      current.append(line)
  if entry is None:
    raise ValueError("No ENTRY computation in the HLO text.")
  memo = {}

  def cost(name: str) -> collections.Counter:
    if name in memo:
      return memo[name]
    total = collections.Counter()
    for line in computations.get(name, ()):
      shape, rest = _split_shape(_INSTRUCTION.match(line).group(2))
      opcode = rest.partition("(")[0].strip()
      base = opcode.removesuffix("-start")
      if base in COLLECTIVES:
        if _moves_data(line):
          total[(_part(opcode, line, frame_files), base)] += _result_bytes(opcode, shape)
        continue
      if opcode == "while":
        trips = _TRIP_COUNT.search(line)
        if trips is None:
          print(f"warning: a while loop without known_trip_count, counted once: {line[:120]}",
                file=sys.stderr)
        n = int(trips.group(1)) if trips else 1
        for called in _CALLED.findall(line):  # the body
          total.update({k: n * v for k, v in cost(called).items()})
        continue
      if opcode == "conditional":
        branches = _BRANCHES.search(line)
        names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches
                 else _CALLED.findall(line))
        total.update(max((cost(b) for b in names), key=lambda c: sum(c.values()),
                         default=collections.Counter()))
        continue
      for called in _CALLED.findall(line):
        total.update(cost(called))
    memo[name] = total
    return total

  return dict(cost(entry))


# --- the tables ---


def mib(x: float) -> str:
  return f"{x / MiB:.0f}" if x >= 10 * MiB else f"{x / MiB:.1f}"


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--gin_file", action="append", default=None,
                 help="gin files (default: configs/demo.gin, then\n"
                      "configs/models/hybrid_tiny.gin for the model)")
  p.add_argument("--gin_bindings", action="append", default=[],
                 help="extra gin bindings, e.g. \"ModelConfig.remat = 'full'\"")
  p.add_argument("--seq_len", type=int, default=32768,
                 help="row length of tables 1 and 4 (default 32768)")
  p.add_argument("--shards", default="1,2,4,8",
                 help=f"sequence axis sizes of table 1 (at most {DEVICES}); the largest is\n"
                      "also tables 2-4's N (default 1,2,4,8)")
  p.add_argument("--budget_gib", type=float, default=2.0,
                 help="table 2's per-device budget on peak memory, GiB (default 2)")
  p.add_argument("--search", default="8192,1048576",
                 help="table 2's lowest and highest power-of-two lengths (default 8192,1048576)")
  p.add_argument("--long", type=int, default=1048576,
                 help="table 3's row length on the largest mesh (default 1048576)")
  p.add_argument("--layout", default="zigzag", help="SequenceConfig.layout (default zigzag)")
  p.add_argument("--skip", default="", help="tables to leave out, e.g. --skip=2,3")
  args = p.parse_args()
  start = time.perf_counter()
  shard_counts = [int(s) for s in args.shards.split(",")]
  if max(shard_counts) > DEVICES:
    raise SystemExit(f"--shards: at most {DEVICES} devices (this script fakes {DEVICES}).")
  n_max = max(shard_counts)
  skip = set(filter(None, args.skip.split(",")))
  parse_gin(args.gin_file or ["configs/demo.gin", "configs/models/hybrid_tiny.gin"],
            args.gin_bindings)
  base = run_lib.Run.from_gin()
  m, att, mamba = base.model, base.model.attention, base.model.mamba
  print(f"model: pattern={m.pattern} d_model={m.d_model} attention heads={att.num_heads}/"
        f"{att.num_kv_heads}x{att.head_dim} mamba d_state={mamba.d_state} "
        f"headdim={mamba.headdim} chunk={mamba.chunk_size} dtype={m.compute_dtype} "
        f"remat={m.remat} params={counted_params(m):,}; batch 1 row; layout {args.layout}; "
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; jax {jax.__version__}\n")

  steps = {}

  def step(seq_len, shards, attention="ring") -> Step:
    key = (seq_len, shards, attention if shards > 1 else "-")
    if key not in steps:
      steps[key] = compile_step(base, seq_len, shards, attention, args.layout)
      s = steps[key]
      print(f"  compiled {seq_len} tokens / {shards} devices / {key[2]}: peak {mib(s.peak)} "
            f"MiB, {s.compile_s:.0f} s", file=sys.stderr, flush=True)
    return steps[key]

  if "1" not in skip:
    print(f"### 1. Per-device memory, {args.seq_len} tokens, ring attention\n")
    print("| sequence shards | tokens/device | arguments MiB | outputs MiB | aliased MiB "
          "| temp MiB | peak MiB | peak x N / peak(1) | compile s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    one = step(args.seq_len, 1).peak if 1 in shard_counts else None
    for n in shard_counts:
      s = step(args.seq_len, n)
      ratio = f"{s.peak * n / one:.2f}" if one else "-"
      print(f"| {n} | {args.seq_len // n} | {mib(s.arguments)} | {mib(s.outputs)} "
            f"| {mib(s.aliased)} | {mib(s.temp)} | {mib(s.peak)} | {ratio} "
            f"| {s.compile_s:.0f} |", flush=True)
    print()

  if "2" not in skip:
    budget = args.budget_gib * 2**30
    lo, hi = (int(x).bit_length() - 1 for x in args.search.split(","))
    print(f"### 2. Longest power-of-two row with peak <= {args.budget_gib:g} GiB per device\n")
    print("| sequence shards | longest row | its peak MiB | next power of two: peak MiB "
          "| compiles |")
    print("|---:|---:|---:|---:|---:|")
    for n in sorted({1, n_max}):
      before = len(steps)
      # Binary search over the exponent: peak memory grows with the row length (it is linear
      # in it here; table 1's rows and the search's own compiles show it).
      fits = lambda e: step(2**e, n).peak <= budget  # noqa: E731
      a, b = lo - 1, hi + 1  # fits(a) assumed, fits(b) assumed false
      while b - a > 1:
        mid = (a + b) // 2
        a, b = (mid, b) if fits(mid) else (a, mid)
      best = f"{2**a}" if a >= lo else f"< {2**lo}"
      its = mib(step(2**a, n).peak) if a >= lo else "-"
      over = mib(step(2**b, n).peak) if b <= hi else f"(> {2**hi} not tried)"
      print(f"| {n} | {best} | {its} | {over} | {len(steps) - before} |", flush=True)
    print()

  if "3" not in skip:
    s = step(args.long, n_max)
    print(f"### 3. {args.long} tokens on {n_max} devices, ring attention\n")
    print("| tokens/device | arguments MiB | outputs MiB | aliased MiB | temp MiB | peak MiB "
          "| compile s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.long // n_max} | {mib(s.arguments)} | {mib(s.outputs)} | {mib(s.aliased)} "
          f"| {mib(s.temp)} | {mib(s.peak)} | {s.compile_s:.0f} |\n", flush=True)

  if "4" not in skip and n_max > 1:
    methods = {a: step(args.seq_len, n_max, a) for a in ("ring", "allgather")}
    print(f"### 4. Bytes communicated per step per device, {args.seq_len} tokens on {n_max} "
          "devices (MiB of collective results)\n")
    kinds = sorted({k for s in methods.values() for k in s.comm})
    print("| part | collective | ring MiB | allgather MiB |")
    print("|---|---|---:|---:|")
    for part, kind in kinds:
      print(f"| {part} | {kind} | "
            + " | ".join(f"{s.comm.get((part, kind), 0) / MiB:.1f}" for s in methods.values())
            + " |")
    print("| **total** | | "
          + " | ".join(f"**{sum(s.comm.values()) / MiB:.1f}**" for s in methods.values()) + " |")
    print("\npeak per device: " + ", ".join(f"{a} {mib(s.peak)} MiB" for a, s in methods.items())
          + "\n")
  print(f"{len(steps)} compiles, {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
  main()
