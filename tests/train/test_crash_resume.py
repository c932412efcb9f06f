"""SIGKILL the training CLI at random moments, resume, and match an uninterrupted run exactly.

Each case kills `python -m lcjax.train` once (or twice) at a moment drawn from the `rng` fixture:
  write   - while checkpoint c's arrays are being written (its `c.orbax-checkpoint-tmp` directory
            exists; saves are asynchronous, so training has moved on);
  cleanup - just after checkpoint c is committed, when orbax deletes the oldest one past
            `keep_checkpoints` (the kill lands before or during that deletion);
  step    - anywhere, some time after step s is logged.
Where each kill actually landed (steps logged, checkpoints on disk, any half-written one) is
printed: `pytest -rP` shows it. Then the run resumes until done and must match the uninterrupted
run: every logged loss, gradient norm and learning rate bitwise, one metrics.jsonl line per
step, the same eval line, the same newest checkpoints and no half-written one. The seed is
printed; LCJAX_SEED=<seed> with `-k <case>` draws the same moments again (where they land still
varies with the machine's load).
"""

import json
import os
import signal
import time

import pytest

from tests.train.runs import bindings, read_jsonl, start_cli, train_in_process

STEPS, EVERY, KEEP = 24, 3, 2
# keep 2 with a checkpoint every 3 steps: from step 9 on, every save deletes the oldest. One eval
# task (an eval line at the last step) saves each run building two more data pipelines.
BINDINGS = bindings(TrainConfig__steps=STEPS, TrainConfig__checkpoint_every=EVERY,
                    TrainConfig__keep_checkpoints=KEEP, TrainConfig__eval_every=1000,
                    DataConfig__eval_tasks=("lcjax_mqar",))
TMP = ".orbax-checkpoint-tmp"
EXACT = ("loss", "grad_norm", "lr")  # deterministic; throughput metrics are timings
# Seconds to wait after the kind's event: about one step (~40 ms) for `write` and `step`, within
# the few ms orbax takes to delete an old checkpoint for `cleanup`.
DELAY = {"write": 0.05, "cleanup": 0.005, "step": 0.05}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_compile_cache):
  """The uninterrupted run's directory, shared by every case."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  train_in_process(workdir, BINDINGS)
  return workdir


@pytest.mark.parametrize("kinds", [
    ("write",), ("write",), ("cleanup",), ("cleanup",), ("step",), ("write", "cleanup")],
    ids=["write-1", "write-2", "cleanup-1", "cleanup-2", "step", "twice"])
def test_sigkill_and_resume_matches_uninterrupted_run(kinds, reference, rng, tmp_path):
  after = 0  # the newest step logged so far: a later kill waits for an event past it
  for n, kind in enumerate(kinds, 1):
    # A kill with another after it lands in the first half, leaving the second room.
    step, delay = _draw(rng, kind, after, STEPS if n == len(kinds) else STEPS // 2)
    began = time.perf_counter()
    proc = start_cli(tmp_path, BINDINGS)
    _wait_until(proc, lambda: _reached(tmp_path, kind, step))
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    after = _newest_logged(tmp_path)
    print(f"kill {n}: {kind} at step {step} + {delay * 1000:.1f} ms, "
          f"{time.perf_counter() - began:.0f} s after the CLI started -> {_landing(tmp_path)}")
    # Only a kill in the last save's cleanup can come after the run has finished on its own.
    if proc.returncode == 0 and step == STEPS:
      print(f"kill {n}: the run finished first")
    else:
      assert proc.returncode == -signal.SIGKILL, f"kill {n} ({kind} {step}) came too late:\n{out}"
  began = time.perf_counter()
  train_in_process(tmp_path, BINDINGS)  # resumes from the newest checkpoint
  print(f"resumed in-process in {time.perf_counter() - began:.0f} s")
  _assert_matches(tmp_path, reference)


def _draw(rng, kind: str, after: int, last: int) -> tuple[int, float]:
  """(step, delay in seconds) of a `kind` kill whose event comes after step `after`, by `last`."""
  if kind == "step":
    step = int(rng.integers(after + 1, last))
  else:  # a checkpoint step past `after`; for cleanup, one whose save deletes the oldest
    first = max(after + 1, (KEEP + 1) * EVERY if kind == "cleanup" else EVERY)
    step = int(rng.choice(range(-(-first // EVERY) * EVERY, last + 1, EVERY)))
  return step, float(rng.uniform(0, DELAY[kind]))


def _reached(workdir, kind: str, step: int) -> bool:
  """Whether the event of a `kind` kill at `step` has happened (or is already past)."""
  if kind == "step":
    return _newest_logged(workdir) >= step
  names = _listdir(workdir / "checkpoints")
  return str(step) in names or (kind == "write" and any(
      n.startswith(f"{step}{TMP}") for n in names))


def _wait_until(proc, condition, timeout: float = 300.0) -> None:
  deadline = time.time() + timeout
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
    if time.time() > deadline:
      raise TimeoutError(f"no kill moment within {timeout}s")
    time.sleep(0.001)


def _landing(workdir) -> str:
  """What the kill interrupted, read from the files it left (the process is dead: exact)."""
  names = _listdir(workdir / "checkpoints")
  kept = _steps(names)
  files = {s: sum(len(f) for _, _, f in os.walk(workdir / "checkpoints" / str(s))) for s in kept}
  what = [f"after step {_newest_logged(workdir)} logged", f"checkpoints on disk (files) {files}"]
  writing = sorted(n for n in names if TMP in n)
  what.append(f"mid-write: {writing}" if writing else "no write in flight")
  if len(kept) > KEEP:  # the newest is committed; orbax had not finished deleting the oldest
    what.append(f"mid-cleanup: step {kept[0]} not yet deleted")
  return "; ".join(what)


def _assert_matches(workdir, reference) -> None:
  rows, expected_rows = read_jsonl(workdir / "metrics.jsonl"), read_jsonl(
      reference / "metrics.jsonl")
  expected = {r["step"]: [r[k] for k in EXACT] for r in expected_rows if "loss" in r}
  train = [r for r in rows if "loss" in r]
  # Same program, same inputs, same restored bits: identical on CPU, not merely close. Lines
  # written before a kill are checked too.
  for r in train:
    assert [r[k] for k in EXACT] == expected[r["step"]], f"step {r['step']}: {r}"
  # The same newest checkpoints, nothing half-written left. An old checkpoint whose deletion a
  # kill interrupted stays until the next save deletes it: after the last save, for good.
  names, expected_names = _listdir(workdir / "checkpoints"), _listdir(reference / "checkpoints")
  kept, expected_kept = _steps(names), _steps(expected_names)
  assert kept[-len(expected_kept):] == expected_kept and not any(TMP in n for n in names), names
  steps = [r["step"] for r in train]
  repeated = sorted({s for s in steps if steps.count(s) > 1})
  missing = sorted(set(expected) - set(steps))
  assert steps == sorted(expected), (
      f"metrics.jsonl has one training line per step: repeated {repeated}, missing {missing}")
  evals = [r["step"] for r in rows if "loss" not in r]
  assert [r for r in rows if "loss" not in r] == [r for r in expected_rows if "loss" not in r], (
      f"metrics.jsonl has the uninterrupted run's eval lines: eval lines at steps {evals}")


def _newest_logged(workdir) -> int:
  """The newest training step in metrics.jsonl, skipping a line still being written."""
  path = workdir / "metrics.jsonl"
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    done = [json.loads(line) for line in f if line.endswith("\n")]
  return max([r["step"] for r in done if "loss" in r], default=0)


def _listdir(path) -> list[str]:
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def _steps(names: list[str]) -> list[int]:
  """The committed checkpoint steps among a checkpoints directory's `names`."""
  return sorted(int(n) for n in names if n.isdigit())
