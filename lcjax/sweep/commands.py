"""The sweep CLI's subcommands (experiments/sweep.py parses the flags and calls these):
run, status and report of a grid in ROOT. Every grid error stops `run` before any cell starts.
"""

import dataclasses
import os
import shlex
import subprocess

from etils import epath

from lcjax.errors import ConfigError
from lcjax.launch import slurm
from lcjax.launch.common import VENV_PYTHON
from lcjax.sweep import grid as grids
from lcjax.sweep import placement, report, runner, status


def _cells(grid_path: str, cell: str | None = None, index: int | None = None):
  """(grid, its cells, the chosen ones: none when `cell` is the base)."""
  grid = grids.load_grid(grid_path)
  cells = grids.expand(grid)
  if cell == grids.BASE and grids.base_cell(grid) is not None:
    return grid, cells, []
  return grid, cells, grids.select(cells, cell, index)


def detect_backend() -> str:
  """tpu when TPU chips are visible, else gpu when nvidia-smi lists one, else cpu."""
  import shutil

  if placement.host_devices("tpu"):
    return "tpu"
  if shutil.which("nvidia-smi") and placement.host_devices("gpu"):
    return "gpu"
  return "cpu"


def run(grid_path: str, root: str, parallel: int = 1, dry_run: bool = False,
        cell: str | None = None, cell_index: int | None = None, backend: str | None = None,
        say=print) -> dict:
  """Validates every cell, then runs the chosen ones not yet done (after the grid's base,
  when it has one and it is not done); {name: state}."""
  grid, cells, chosen = _cells(grid_path, cell, cell_index)
  steps = grids.validate(grid, cells, runner.REPO)
  base = grids.base_cell(grid)
  if dry_run:
    for c in ([base] if base else []) + chosen:
      for cmd in runner.commands(grid, c, root, trains=steps[c.name] > 0):
        say(shlex.join(cmd))
    return {}
  backend = backend or detect_backend()
  devices = placement.host_devices(backend)
  explicit = cell is not None or cell_index is not None
  start, skipped = runner.to_run(root, chosen, explicit)
  slots = lambda n: [placement.placement(backend, devices, n, s,  # noqa: E731
                                         os.environ.get("XLA_FLAGS", "")) for s in range(n)]
  for name, state in skipped.items():
    say(f"skip   {name} ({state})")
  states = {}
  with runner.passing_on_sigterm():
    if base is not None and (start or cell == grids.BASE):
      states = _run_base(grid, base, cells, root, steps, slots(1), say)
    if states.get(grids.BASE, "done") == "done":
      # Fewer cells than slots (a job array's one cell) share the host between them.
      states.update(runner.run_cells(grid, start, root, steps,
                                     slots(max(1, min(parallel, len(start)))), say=say))
    else:
      say("no cell started: every cell starts from the base")
  failed = [n for n, s in states.items() if s != "done"]
  say(f"{len(states) - len(failed)} done, {len(failed)} failed, {len(skipped)} skipped"
      + (f"; failed: {', '.join(failed)} (`status` shows why; rerun to retry)" if failed else ""))
  return {**skipped, **states}


def _run_base(grid, base, cells, root, steps: dict, whole_host: list, say) -> dict:
  """{BASE: state} once the base is trained (on the whole host), or was already."""
  state, record = status.state_of(root, base.name)
  if state == "running":
    raise ConfigError(
        f"The grid's base run ({status.cell_dir(root, base.name)}) is training (process "
        f"{record.get('pid')} on {record.get('host')}), and every cell starts from it: rerun "
        "once it is done.")
  if state == "done":
    say(f"skip   {base.name} (done)")
    return {}
  # Cells start only once the base is done, so a cell that has run started from an earlier
  # base, since deleted: a new base would mix two bases in one report.
  ran = [status.cell_dir(root, c.name) for c in cells if status.read_status(root, c.name)]
  if ran:
    raise ConfigError(
        f"The grid's base run ({status.cell_dir(root, base.name)}) is not trained, but "
        f"{len(ran)} cell(s) already ran from an earlier one: delete them too "
        f"({', '.join(map(str, ran))}) to redo them from a new base, or restore the old base.")
  return runner.run_cells(grid, [base], root, steps, whole_host, say=say)


def slurm_array(grid_path: str, root: str, settings, out: str | None = None,
                submit: bool = False, dry_run: bool = False, python: str = VENV_PYTHON,
                say=print) -> int:
  """A SLURM job array with one task per cell (validated first): task i runs
  `sweep.py run GRID --root=ROOT --cell_index=i` on one node, one process driving that node's
  GPUs. Written to `out` (default JOB_NAME.sbatch) and, with `submit`, submitted; `dry_run`
  prints the script. Returns sbatch's exit status (0 when not submitting)."""
  grid, cells, _ = _cells(grid_path)
  grids.validate(grid, cells, runner.REPO)
  if grids.base_cell(grid) is not None and status.state_of(root, grids.BASE)[0] != "done":
    raise ConfigError(
        f"Every cell of {grid_path} starts from its base run, not yet trained in {root} (the "
        "array's tasks would each train it at once): train it first with `python "
        f"experiments/sweep.py run {grid_path} --root={root} --cell={grids.BASE}` (e.g. in one "
        "SLURM job), then write the array.")
  settings = dataclasses.replace(settings, nodes=1, tasks_per_node=1)
  command = runner.cell_command(grid_path, root, slurm.ARRAY_TASK_ID, python)
  script = slurm.sbatch_script(command, settings, array_size=len(cells))
  out = out or f"{settings.job_name}.sbatch"
  submit_cmd = shlex.join(["sbatch", out])
  if dry_run:
    say(f"# {out}\n{script}\n# submit:\n{submit_cmd}")
    return 0
  epath.Path(out).write_text(script)
  if not submit:
    say(f"wrote {out} ({len(cells)} cells); submit it from the repository root: {submit_cmd}")
    return 0
  return subprocess.run(["sbatch", out]).returncode


def status_rows(grid_path: str, root: str) -> list[dict]:
  """One row per cell: name, state, step / steps, seconds, exit code, error."""
  grid, cells, _ = _cells(grid_path)
  base = grids.base_cell(grid)
  rows = []
  for c in ([base] if base else []) + cells:
    state, record = status.state_of(root, c.name)
    error = record.get("error") or ""
    if state == "failed" and not error:
      error = status.last_error_line(status.read_log(root, c.name))
    end = record.get("finished") or record.get("updated")
    rows.append({"index": c.index, "cell": c.name, "state": state,
                 "step": status.last_step(status.cell_dir(root, c.name)),
                 "steps": record.get("steps", ""),
                 "seconds": round(end - record["started"]) if record.get("started") else "",
                 "exit": record.get("exit_code", ""), "error": error})
  return rows


def status_table(rows: list[dict]) -> str:
  keys = ["index", "cell", "state", "step", "steps", "seconds", "exit", "error"]
  text = [[str(r[k]) for k in keys] for r in rows]
  widths = [max(len(k), *(len(t[i]) for t in text)) for i, k in enumerate(keys)]
  line = lambda cols: "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()  # noqa: E731
  counts = {s: sum(r["state"] == s for r in rows) for s in status.STATES}
  return "\n".join([line(keys), *map(line, text),
                    ", ".join(f"{n} {s}" for s, n in counts.items())])


def make_report(grid_path: str, root: str, metric: str | None = None,
                out: str | None = None) -> list[str]:
  """The sweep's report, in `out` (default ROOT); `metric` defaults to the grid's own (else
  the train loss)."""
  grid, cells, _ = _cells(grid_path)
  if not any(status.cell_dir(root, c.name).exists() for c in cells):
    raise ConfigError(f"No cell of {grid_path} has run in {root}: run the sweep first "
                      f"(python experiments/sweep.py run {grid_path} --root={root}).")
  return report.write_report(grid, cells, root, metric or grid.get("metric", "loss"), out)

