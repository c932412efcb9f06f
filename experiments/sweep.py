"""Run a grid of lcjax.train runs concurrently, see where it stands, and report its results.

    python experiments/sweep.py run GRID --root=DIR [--parallel=N] [--dry_run] [--report=OUT]
                                         [--cell=NAME | --cell_index=I] [--backend=cpu|gpu|tpu]
    python experiments/sweep.py run GRID --root=DIR --slurm [--gpus_per_node=G] [--partition=P]
                                         [--time=T] [--out=F] [--submit] [--dry_run]
    python experiments/sweep.py status GRID --root=DIR
    python experiments/sweep.py report GRID --root=DIR [--metric=NAME] [--out=OUT]

GRID is a Python file with get_config() (lcjax/sweep/grid.py documents it; e.g.
experiments/lr_x_pattern.py). Each cell trains in DIR/<cell> (then is evaluated when the grid
has `eval`), its output in DIR/<cell>/sweep.log (a grid's `base` trains first, in DIR/base,
and every cell starts from it); up to N at once, each pinned to its share of
the host's cores, GPUs or TPU chips. Every cell is validated before any starts. A failed cell
does not stop the others; running again skips done cells and resumes the rest. With --slurm,
the cells become a SLURM job array instead (ROOT on a file system every node sees, or gs://). `report` writes
DIR/results.csv, DIR/report.md and PNGs (into OUT instead with --out; `run --report=OUT`
writes them once the cells have run: one command from grid to report). DIR may be gs://. Run
from the repository root.
Exit status: 0 every cell done (or nothing to do), 1 some cell failed, 2 a grid or flag error.
"""

import argparse
import sys

from lcjax.cli import report_errors
from lcjax.launch.slurm import SlurmSettings
from lcjax.sweep import commands


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  for name in ("run", "status", "report"):
    s = sub.add_parser(name)
    s.add_argument("grid", help="grid file, e.g. experiments/lr_x_pattern.py")
    s.add_argument("--root", required=True, help="the sweep's directory (local or gs://)")
    if name == "run":
      s.add_argument("--parallel", type=int, default=1, help="cells at once (default 1)")
      s.add_argument("--dry_run", action="store_true", help="print the commands only")
      s.add_argument("--report", metavar="OUT",
                     help="then write the report into OUT (e.g. experiments/results/NAME)")
      which = s.add_mutually_exclusive_group()
      which.add_argument("--cell", help="run only the cell of this name (base: the grid's base)")
      which.add_argument("--cell_index", type=int, help="run only cell I (a job array's task)")
      s.add_argument("--backend", choices=("cpu", "gpu", "tpu"),
                     help="how to split the host (default: detected)")
      slurm = s.add_argument_group("as a SLURM job array (one task per cell, one node each)")
      slurm.add_argument("--slurm", action="store_true",
                         help="write (with --submit: submit) the array's sbatch script")
      slurm.add_argument("--gpus_per_node", type=int, default=8, help="GPUs per cell")
      slurm.add_argument("--partition", help="sbatch --partition")
      slurm.add_argument("--account", help="sbatch --account")
      slurm.add_argument("--time", help="sbatch --time per cell, e.g. 04:00:00")
      slurm.add_argument("--job_name", default="sweep", help="sbatch --job-name")
      slurm.add_argument("--out", help="the script's path (default: JOB_NAME.sbatch)")
      slurm.add_argument("--submit", action="store_true", help="run sbatch on it")
    if name == "report":
      s.add_argument("--metric", default=None,
                     help="metric to plot (default: the grid's `metric`, else loss)")
      s.add_argument("--out", help="write the report here (default: --root)")
  return p.parse_args(argv)


def main(argv: list[str]) -> None:
  args = parse(argv)
  if args.command == "run" and args.slurm:
    settings = SlurmSettings(gpus_per_node=args.gpus_per_node, partition=args.partition,
                             account=args.account, time=args.time, job_name=args.job_name)
    sys.exit(commands.slurm_array(args.grid, args.root, settings, args.out, args.submit,
                                  args.dry_run))
  if args.command == "run":
    states = commands.run(args.grid, args.root, args.parallel, args.dry_run, args.cell,
                          args.cell_index, args.backend)
    if args.report and not args.dry_run:
      for path in commands.make_report(args.grid, args.root, out=args.report):
        print(path)
    sys.exit(1 if any(s == "failed" for s in states.values()) else 0)
  if args.command == "status":
    print(commands.status_table(commands.status_rows(args.grid, args.root)))
    return
  for path in commands.make_report(args.grid, args.root, args.metric, args.out):
    print(path)


if __name__ == "__main__":
  report_errors(main, sys.argv[1:])
