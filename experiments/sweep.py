"""Run (or print) every cell of an experiment grid.

A grid is a Python file in experiments/ whose `get_config()` returns an ml_collections
ConfigDict with:
  gin_files: gin files every cell uses
  bindings:  gin bindings every cell uses
  axes:      list of (gin parameter, list of values); the grid is their product
Each cell becomes one `python -m lcjax.train` run with the cell's values as extra bindings,
in ROOT/<cell name>. Re-running the sweep resumes every cell from its checkpoints.

    python experiments/sweep.py experiments/lr_x_pattern.py --root=runs/sweep [--dry_run]
"""

import argparse
import importlib.util
import itertools
import os
import re
import shlex
import subprocess
import sys


def load_grid(path: str):
  spec = importlib.util.spec_from_file_location("grid", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def cells(grid) -> list[tuple[str, list[str]]]:
  """[(cell name, gin bindings)] for the product of the grid's axes."""
  names = [name for name, _ in grid.axes]
  cells = []
  for values in itertools.product(*(values for _, values in grid.axes)):
    bindings = list(grid.bindings) + [f"{n} = {v!r}" for n, v in zip(names, values)]
    # Directory-safe names: "*" (attention in a layer pattern) becomes "A".
    label = "_".join(f"{n.split('.')[-1]}={v}" for n, v in zip(names, values)).replace("*", "A")
    cells.append((re.sub(r"[^A-Za-z0-9_.=-]+", "", label) or "base", bindings))
  return cells


def command(grid, bindings: list[str], workdir: str) -> list[str]:
  cmd = [sys.executable, "-m", "lcjax.train", f"--workdir={workdir}"]
  cmd += [f"--gin_file={f}" for f in grid.gin_files]
  return cmd + [f"--gin_bindings={b}" for b in bindings]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("grid")
  p.add_argument("--root", default="runs/sweep")
  p.add_argument("--dry_run", action="store_true", help="print the commands only")
  args = p.parse_args()
  grid = load_grid(args.grid)
  for name, bindings in cells(grid):
    cmd = command(grid, bindings, os.path.join(args.root, name))
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      subprocess.run(cmd, check=True)


if __name__ == "__main__":
  main()
