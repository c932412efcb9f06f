"""The long-context evaluation suite: named probes, each a gin-configurable dataclass.

    EvalConfig.suite = ("niah_grid", "ruler", "phonebook", "mqar", "ppl_by_position")
    NiahGrid.depths = (0.0, 0.1, ..., 1.0)        # each probe's own knobs, by gin

A probe's `run(model)` returns one entry of results.json (schema: `lcjax.eval.report`): rows of
cells (a length, a depth, a task...) with their score, the metric, and the protocol that
produced it:
  generate        greedy decoding with the caches (`lcjax.eval.generate`) on one device, scored
                  on the decoded text against the references (`lcjax.eval.scorers`);
  teacher_forced  each answer token predicted from the true previous ones, through the run's
                  eval step (sequence-sharded when the mesh has a `sequence` axis, so prompts
                  longer than one device's memory can be scored).
Lengths left as None are 1x, 2x and 4x the training length: beyond it on purpose.
Examples come from `lcjax.data.probes`, deterministic in each probe's seed.
"""

import contextlib
import dataclasses
from typing import Callable, Sequence

import gin
import numpy as np

from lcjax.config import check_positive, check_types
from lcjax.data import shakespeare
from lcjax.data import probes
from lcjax.data.converter import BOS
from lcjax.errors import ConfigError
from lcjax.eval import teacher_forced
from lcjax.eval.generate import greedy_generate
from lcjax.eval.scorers import SCORERS

PROTOCOLS = ("generate", "teacher_forced")
PROBES: dict[str, type] = {}


def register(name: str):
  """Class decorator: makes a probe dataclass available to `EvalConfig.suite` as `name`."""
  def add(cls):
    PROBES[name] = cls
    return cls
  return add


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """suite: probes `lcjax.eval` runs on a checkpoint (names in `PROBES`); in_loop: probes the
  training loop runs every `TrainConfig.eval_every` steps, configured in the gin scope
  `in_loop/` (e.g. `in_loop/NiahGrid.protocol = "teacher_forced"`), so they can stay light.
  rows: examples per batch, for generation and teacher forcing alike.
  attention: AttentionConfig fields `lcjax.eval` overrides in the model it evaluates, not in
  the one that trained: `{"rope_scaling": {"rope_type": "yarn", ...}}` scores a checkpoint
  zero-shot with a RoPE scaling it never trained with. results.json and report.md name them."""
  suite: tuple[str, ...] = ("niah_grid", "ppl_by_position")
  in_loop: tuple[str, ...] = ()
  rows: int = 8
  attention: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    check_types(self)
    check_positive(self, ("rows",))
    for field in ("suite", "in_loop"):
      unknown = [n for n in getattr(self, field) if n not in PROBES]
      if unknown:
        raise ConfigError(f"EvalConfig.{field} names unknown probes {unknown}; the registered "
                          f"ones are {sorted(PROBES)}.")


@dataclasses.dataclass(frozen=True)
class Model:
  """What a probe evaluates, and how.

  generate(prompts, max_new_tokens) -> decoded strings (greedy, one device);
  score(pairs of (prompt, target) token lists, seq_len) -> per-example teacher-forced scores
  (`lcjax.eval.teacher_forced.score_answers`); loss_by_position(documents, seq_len, buckets).
  Prompts and documents are token ids as the probes write them; the model first reads the
  input every training document starts with (`model_for`).
  """
  vocab: object  # a seqio vocabulary: encode, decode, eos_id
  train_length: int
  generate: Callable[[list, int], list[str]]
  score: Callable[[list, int], list[dict]]
  loss_by_position: Callable[[list, int, int], list[dict]]


def model_for(setup, run, params, local_graphdef, vocab, rows: int) -> Model:
  """The Model of restored `params`: teacher forcing through the run's eval step (any mesh),
  generation through `local_graphdef` (the single-device model's graph).

  Every prompt and document is read after BOS, the input each training document starts with
  (lcjax.data.converter): a model never saw a document's first token at position 0 as an
  input, and one that leans on that first input (as an attention sink, say) would be scored out
  of distribution. It takes a position: a prompt and its target fill at most `length`
  positions, a document's first seq_len tokens are scored."""
  def generate(prompts, max_new_tokens):
    outs = greedy_generate(local_graphdef, params, [[BOS, *p] for p in prompts],
                           max_new_tokens=max_new_tokens, eos_id=vocab.eos_id, batch_size=rows)
    return [vocab.decode(list(o)) for o in outs]

  def score(pairs, seq_len):
    return teacher_forced.score_answers(setup.eval_step_at(seq_len), params,
                                        [([BOS, *p], t) for p, t in pairs], seq_len, rows)

  def loss_by_position(documents, seq_len, buckets):
    return teacher_forced.ppl_by_position(setup.eval_step_at(seq_len), params,
                                          [[BOS, *d] for d in documents], seq_len, rows, buckets)

  return Model(vocab, run.data.sequence_length, generate, score, loss_by_position)


def lengths_or_default(lengths: tuple[int, ...] | None, train_length: int) -> tuple[int, ...]:
  return tuple(lengths) if lengths else (train_length, 2 * train_length, 4 * train_length)


def check_protocol(name: str, protocol: str) -> None:
  if protocol not in PROTOCOLS:
    raise ConfigError(f"{name}.protocol={protocol!r} is not one of {PROTOCOLS}.")


def score_cells(model: Model, cells: Sequence[tuple[dict, list]], *, protocol: str,
                metric: str) -> list[dict]:
  """cells: (cell dict, its examples) -> rows {**cell, "score": mean, "n"}.

  Generation decodes every cell's prompts in one call (grouped by length bucket there), each
  with its example's budget (meta["max_new_tokens"]); teacher forcing scores each cell at its
  own length and counts an example right when every target token is.
  """
  examples = [e for _, exs in cells for e in exs]
  if protocol == "generate":
    budget = max(e.meta["max_new_tokens"] for e in examples)
    outputs = model.generate([list(e.prompt) for e in examples], budget)
    scores = [SCORERS[metric](o, e.references) for o, e in zip(outputs, examples)]
  else:
    scores = []
    for _, exs in cells:
      length = max(e.meta["length"] for e in exs)
      scored = model.score([(list(e.prompt), list(e.target)) for e in exs], length)
      scores += [s["exact_match"] for s in scored]
  rows, start = [], 0
  for cell, exs in cells:
    cell_scores = scores[start:start + len(exs)]
    start += len(exs)
    rows.append({**cell, "score": float(np.mean(cell_scores)), "n": len(exs)})
  return rows


@dataclasses.dataclass(frozen=True)
class Sampled:
  """What the example-based probes share: `samples` examples per cell, drawn from `seed`."""
  samples: int = 4
  seed: int = 0

  def __post_init__(self):
    check_types(self)
    check_positive(self, ("samples",))


def probe_result(protocol: str, metric: str, plot: str, x: str, rows: list, **axes) -> dict:
  return {"protocol": protocol, "metric": metric, "plot": plot, "x": x, **axes, "rows": rows}


@register("niah_grid")
@gin.configurable
@dataclasses.dataclass(frozen=True)
class NiahGrid(Sampled):
  """Passkey / needle in a haystack: lengths x depths, `samples` needles per cell.

  haystack: "filler" (the passkey task's sentences) or "play" (a held-out Shakespeare play);
  needle: "digits", "words" or "uuid". Scored by string_match_all (the needle's value found in
  the generated text) or, teacher-forced, by exact match of the answer tokens.
  """
  lengths: tuple[int, ...] | None = None
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  haystack: str = "filler"
  needle: str = "digits"
  digits: int = 5
  protocol: str = "generate"

  def __post_init__(self):
    super().__post_init__()
    check_positive(self, ("digits",))
    check_protocol("NiahGrid", self.protocol)

  def run(self, model: Model) -> dict:
    cells = [({"length": length, "depth": depth},
              probes.niah(model.vocab, length=length, depth=depth, num=self.samples,
                          seed=self.seed, haystack=self.haystack, needle=self.needle,
                          digits=self.digits))
             for length in lengths_or_default(self.lengths, model.train_length)
             for depth in self.depths]
    metric = "string_match_all" if self.protocol == "generate" else "exact_match"
    rows = score_cells(model, cells, protocol=self.protocol, metric=metric)
    return probe_result(self.protocol, metric, "heatmap", "length", rows, y="depth")


RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
               "variable_tracking", "common_words", "frequent_words")


def ruler_examples(task: str, vocab, *, length: int, num: int, seed: int) -> list:
  """A RULER task's examples at one length, each with its generator's answer budget."""
  if task.startswith("niah_"):
    return probes.ruler_niah(vocab, variant=task[len("niah_"):], length=length, num=num,
                             seed=seed)
  generate = {"variable_tracking": probes.variable_tracking,
              "common_words": probes.common_words,
              "frequent_words": probes.frequent_words}[task]
  return generate(vocab, length=length, num=num, seed=seed)


@register("ruler")
@gin.configurable
@dataclasses.dataclass(frozen=True)
class Ruler(Sampled):
  """NVIDIA RULER's synthetic tasks at each length (about 1024 tokens at least: their
  instructions take room), scored by string_match_all as RULER does."""
  tasks: tuple[str, ...] = RULER_TASKS
  lengths: tuple[int, ...] | None = None

  def __post_init__(self):
    super().__post_init__()
    unknown = sorted(set(self.tasks) - set(RULER_TASKS))
    if unknown:
      raise ConfigError(f"Ruler.tasks has unknown tasks {unknown}; choose from {RULER_TASKS}.")

  def run(self, model: Model) -> dict:
    cells = [({"task": task, "length": length},
              ruler_examples(task, model.vocab, length=length, num=self.samples, seed=self.seed))
             for task in self.tasks
             for length in lengths_or_default(self.lengths, model.train_length)]
    rows = score_cells(model, cells, protocol="generate", metric="string_match_all")
    return probe_result("generate", "string_match_all", "lines", "length", rows,
                        series="task")


@register("phonebook")
@gin.configurable
@dataclasses.dataclass(frozen=True)
class Phonebook(Sampled):
  """Jelassi et al.'s phonebook lookup: exact match of the number, by book size."""
  entries: tuple[int, ...] = (8, 16, 32, 64)

  def run(self, model: Model) -> dict:
    cells = []
    for entries in self.entries:
      exs = probes.phonebook(model.vocab, entries=entries, num=self.samples, seed=self.seed)
      cells.append(({"entries": entries, "length": max(e.meta["length"] for e in exs)}, exs))
    rows = score_cells(model, cells, protocol="generate", metric="exact_match")
    return probe_result("generate", "exact_match", "lines", "entries", rows, series=None)


@register("mqar")
@gin.configurable
@dataclasses.dataclass(frozen=True)
class Mqar(Sampled):
  """Zoology's multi-query associative recall by number of pairs and length, teacher-forced
  as zoology scores it: every query's value (the ones inside the prompt, at power-law gaps,
  and the last one) predicted from the true tokens before it. score: the fraction of queried
  values exactly right."""
  pairs: tuple[int, ...] = (4, 8, 16)
  lengths: tuple[int, ...] | None = None

  def run(self, model: Model) -> dict:
    rows = []
    for pairs in self.pairs:
      for length in lengths_or_default(self.lengths, model.train_length):
        exs = probes.mqar(model.vocab, length=length, num_pairs=pairs, num=self.samples,
                          seed=self.seed)
        # One (prefix, value) pair per query: the prompt up to each in-prompt value, and the
        # whole prompt before the last one.
        queries = [(e.prompt[:a], e.prompt[a:b]) for e in exs for a, b in e.meta["value_spans"]]
        queries += [(e.prompt, e.target) for e in exs]
        scored = model.score([(list(p), list(t)) for p, t in queries], length)
        rows.append({"pairs": pairs, "length": length, "n": len(scored),
                     "score": float(np.mean([s["exact_match"] for s in scored]))})
    return probe_result("teacher_forced", "exact_match", "lines", "length", rows,
                        series="pairs")


def held_out_documents(vocab, length: int, num: int) -> list[list[int]]:
  """Up to `num` windows of length + 1 tokens from the held-out plays (never trained on),
  taken in turn from each play's start onwards."""
  plays = [vocab.encode(text) for text in shakespeare.split_texts("validation")]
  windows = [play[i:i + length + 1] for i in range(0, max(map(len, plays)), length + 1)
             for play in plays]
  return [w for w in windows if len(w) == length + 1][:num]


@register("ppl_by_position")
@gin.configurable
@dataclasses.dataclass(frozen=True)
class PplByPosition:
  """Loss by token position (log-spaced buckets) over held-out Shakespeare at each length:
  flat or falling beyond the training length means the model extrapolates."""
  lengths: tuple[int, ...] | None = None
  documents: int = 8
  buckets: int = 12

  def __post_init__(self):
    check_types(self)
    check_positive(self, ("documents", "buckets"))

  def run(self, model: Model) -> dict:
    rows = []
    for length in lengths_or_default(self.lengths, model.train_length):
      docs = held_out_documents(model.vocab, length, self.documents)
      if not docs:
        raise ConfigError(f"PplByPosition: no held-out play has {length + 1} tokens; lower "
                          f"PplByPosition.lengths.")
      rows += model.loss_by_position(docs, length, self.buckets)
    return probe_result("teacher_forced", "loss", "curve", "position", rows, series="length")


def run_suite(model: Model, names: Sequence[str], scope: str | None = None) -> dict:
  """{name: probe result} for each named probe, configured from gin (within `scope` if given:
  the in-loop probes read `in_loop/...` bindings). A cell its generator cannot build (a length
  too short for the task's text) is a ConfigError naming the probe."""
  results = {}
  for name in names:
    with gin.config_scope(scope) if scope else contextlib.nullcontext():
      probe = PROBES[name]()
    try:
      results[name] = probe.run(model)
    except probes.CellError as e:
      raise ConfigError(f"Probe {name!r} ({type(probe).__name__}): {e}. Fix: set "
                        f"{'in_loop/' if scope else ''}{type(probe).__name__}.lengths (or its "
                        f"other cell sizes) to ones the task fits.") from e
  return results


class InLoop:
  """The probes of `EvalConfig.in_loop`, run by the training loop on the current parameters:
  `__call__(params) -> (scalars for metrics.jsonl / TensorBoard, {tag: heatmap image})`.
  Their settings come from the gin scope `in_loop/` (e.g. `in_loop/NiahGrid.lengths`)."""

  def __init__(self, setup, run, eval_cfg: EvalConfig):
    from lcjax.data.vocab import vocabulary
    from lcjax.train.state import model_skeleton

    self.names, self.rows = eval_cfg.in_loop, eval_cfg.rows
    self.setup, self.run = setup, run
    self.vocab = vocabulary(run.data)
    self.local_graphdef = model_skeleton(run.model.for_inference())[0] if self.names else None

  def __call__(self, params) -> tuple[dict, dict]:
    from lcjax.eval import plots, report

    if not self.names:
      return {}, {}
    model = model_for(self.setup, self.run, params, self.local_graphdef, self.vocab, self.rows)
    probes = run_suite(model, self.names, scope="in_loop")
    train_length = self.run.data.sequence_length
    images = {f"suite/{name}": plots.heatmap_image(p, train_length, name=name)
              for name, p in probes.items() if p["plot"] == "heatmap"}
    return report.scalars(probes), images
