"""The commands of a sweep's cells and the processes that run them.

A cell is `python -m lcjax.train` in ROOT/CELL (then `python -m lcjax.eval` when the grid has
`eval`), its output appended to ROOT/CELL/sweep.log. In a grid with a base, the base trains
first in ROOT/base (not evaluated), every cell starts from it (TrainConfig.init_from), and a
cell of 0 steps is only evaluated. Up to `parallel` cells run at once, each in a slot with its
share of the host (lcjax.sweep.placement). A failed cell does not stop the
others; a rerun skips done and running cells and resumes the rest (lcjax.train resumes from
the checkpoints). Done means trained to TrainConfig.steps: lcjax.train also exits 0 when
preempted.
"""

import contextlib
import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

from lcjax import paths
from lcjax.sweep import status
from lcjax.sweep.grid import BASE, Cell, base_cell
from lcjax.sweep.placement import Placement

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = "experiments/sweep.py"  # relative to REPO, where the commands run


def cell_command(grid_path: str, root: str, index, python: str = sys.executable) -> list[str]:
  """The command that runs cell `index` of a grid (train, eval, status file), from the
  repository root: what a SLURM job array runs with index="$SLURM_ARRAY_TASK_ID"."""
  return [python, SCRIPT, "run", grid_path, f"--root={root}", f"--cell_index={index}"]


def _gin_flags(grid, cell: Cell, root) -> list[str]:
  starts_from = []
  if cell.name != BASE and base_cell(grid) is not None:
    starts_from = [f"TrainConfig.init_from = {workdir(root, base_cell(grid))!r}"]
  return ([f"--gin_file={f}" for f in grid.gin_files]
          + [f"--gin_bindings={b}" for b in (*cell.bindings, *starts_from)])


def workdir(root, cell: Cell) -> str:
  return os.fspath(status.cell_dir(root, cell.name))


def train_command(grid, cell: Cell, root, python: str = sys.executable) -> list[str]:
  return [python, "-m", "lcjax.train", f"--workdir={workdir(root, cell)}",
          *_gin_flags(grid, cell, root)]


def eval_command(grid, cell: Cell, root, python: str = sys.executable) -> list[str] | None:
  """The eval command of a cell, or None when the grid has no `eval` (or for the base)."""
  probes = grid.get("eval", None)
  if not probes or cell.name == BASE:
    return None
  cmd = [python, "-m", "lcjax.eval", f"--workdir={workdir(root, cell)}",
         *_gin_flags(grid, cell, root)]
  return cmd if probes is True else cmd + [f"--suite={','.join(probes)}"]


def commands(grid, cell: Cell, root, python: str = sys.executable,
             trains: bool = True) -> list[list[str]]:
  """Train (unless not `trains`: a cell that only evaluates the base), then evaluate."""
  return [c for c in (train_command(grid, cell, root, python) if trains else None,
                      eval_command(grid, cell, root, python)) if c]


def evaluated(root, cell: Cell, step: int) -> bool:
  return (status.cell_dir(root, cell.name) / "eval" / str(step) / "results.json").exists()


@contextlib.contextmanager
def _log(root, name: str):
  """A local binary file the cell's processes write to, ending up in ROOT/CELL/sweep.log: the
  file itself when ROOT is local, else a temporary one appended to the remote log after."""
  target = status.cell_dir(root, name) / status.LOG
  if not paths.is_remote(target):
    with open(os.fspath(target), "ab") as f:
      yield f
    return
  with tempfile.TemporaryFile() as f:
    try:
      yield f
    finally:
      f.seek(0)
      old = target.read_bytes() if target.exists() else b""
      target.write_bytes(old + f.read())


def _start(cmd: list[str], where: Placement, log) -> subprocess.Popen:
  env = {**os.environ, **where.env,
         "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
  log.write(f"\n$ {shlex.join(cmd)}\n".encode())
  log.flush()
  if where.cpus:
    cmd = [sys.executable, *_PINNED, ",".join(map(str, where.cpus)), *cmd]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  _RUNNING.add(proc)
  return proc


# Pins itself to the cores in argv[1], then becomes the command after them (exec keeps the
# affinity and the pid). A preexec_fn would do it in a forked copy of this multithreaded
# process (JAX's threads), which can deadlock before the exec.
_PINNED = ("-c", "import os, sys; os.sched_setaffinity(0, map(int, sys.argv[1].split(','))); "
           "os.execv(sys.argv[2], sys.argv[2:])")


_RUNNING: set = set()  # the cells' live processes, which SIGTERM is passed on to
_STOPPING = threading.Event()  # set by SIGTERM: no further cell or command starts


@contextlib.contextmanager
def passing_on_sigterm():
  """SIGTERM to the sweep (a preempted or requeued SLURM task, or a user's kill) goes to every
  cell's process: lcjax.train saves a checkpoint and exits 0, the cell is recorded as stopped
  short of its steps, no further cell starts, and the next `run` resumes them."""
  def forward(signum, frame):
    _STOPPING.set()
    for proc in list(_RUNNING):
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)

  previous = signal.signal(signal.SIGTERM, forward)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
    _STOPPING.clear()


def run_cell(grid, cell: Cell, root, steps: int, where: Placement,
             python: str = sys.executable, evaluated_step: int | None = None) -> str:
  """Trains `steps` (and evaluates) one cell in its slot; returns and records its final state.
  A cell of 0 steps only evaluates the base, done once `evaluated_step` (the base's) is."""
  started = time.time()
  base = {"cell": cell.name, "index": cell.index, "steps": steps, "started": started,
          "devices": list(where.devices)}
  status.cell_dir(root, cell.name).mkdir(parents=True, exist_ok=True)
  code = 0
  with _log(root, cell.name) as log:
    for cmd in commands(grid, cell, root, python, trains=steps > 0):
      if _STOPPING.is_set():  # e.g. the evaluation of a cell whose training just ended
        break
      proc = _start(cmd, where, log)
      status.write_status(root, cell.name, state="running", pid=proc.pid, **base)
      code = proc.wait()
      _RUNNING.discard(proc)
      if code != 0 or status.last_step(workdir(root, cell)) < steps:
        break
  step = status.last_step(workdir(root, cell))
  evaluates, eval_step = grid.get("eval", None) and cell.name != BASE, steps or evaluated_step
  done = code == 0 and step >= steps and (not evaluates or evaluated(root, cell, eval_step))
  error = None
  if code:
    error = status.last_error_line(status.read_log(root, cell.name))
  elif step < steps:
    error = f"stopped at step {step} of {steps} (preempted?): rerun the sweep to resume"
  elif not done:
    error = f"lcjax.eval wrote no eval/{eval_step}/results.json: see {status.LOG}"
  status.write_status(root, cell.name, state="done" if done else "failed", exit_code=code,
                      step=step, finished=time.time(), error=error, **base)
  return "done" if done else "failed"


def to_run(root, cells: list[Cell], explicit: bool = False) -> tuple[list[Cell], dict]:
  """(cells to start, {name: state} of those skipped: done, or running elsewhere). A cell
  chosen `explicit`ly (--cell, --cell_index: what a requeued job-array task runs) is started
  unless done: its "running" record may be the dead task it replaces, on another host."""
  start, skipped = [], {}
  for cell in cells:
    state, _ = status.state_of(root, cell.name)
    if state == "done" or (state == "running" and not explicit):
      skipped[cell.name] = state
    else:
      start.append(cell)
  return start, skipped


def run_cells(grid, cells: list[Cell], root, steps: dict, placements: list[Placement],
              python: str = sys.executable, say=print) -> dict:
  """Runs `cells`, len(placements) at once (one slot each); {name: final state}. `steps`:
  grid.validate's."""
  todo: queue.Queue = queue.Queue()
  for cell in cells:
    todo.put(cell)
  states, lock = {}, threading.Lock()

  def slot(where: Placement):
    while not _STOPPING.is_set():
      try:
        cell = todo.get_nowait()
      except queue.Empty:
        return
      say(f"[{time.strftime('%H:%M:%S')}] start {cell.name} (devices {list(where.devices)})")
      try:
        state = run_cell(grid, cell, root, steps[cell.name], where, python, steps.get(BASE))
      except Exception as e:  # a cell's failure (even the runner's) must not stop the others
        status.write_status(root, cell.name, state="failed", error=f"sweep runner: {e}")
        state = "failed"
      with lock:
        states[cell.name] = state
      say(f"[{time.strftime('%H:%M:%S')}] {state:6s} {cell.name}")

  threads = [threading.Thread(target=slot, args=(p,)) for p in placements]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return states

