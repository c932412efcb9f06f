"""Sweeps: a grid of `lcjax.train` runs (experiments/*.py), run concurrently and resumably, with
a status table and a results report (CSV, markdown, plots). experiments/sweep.py is its CLI.

  grid     -> the cells (name, axis values, gin bindings), validated before any runs
  placement-> each concurrent cell's share of the host (cores, GPUs or TPU chips), as env
  status   -> one small JSON file per cell: state, times, exit code, last error line
  runner   -> the commands, the cells' subprocesses, skipping done cells on a rerun
  report   -> results.csv, report.md and PNGs from each cell's metrics and eval results
  commands -> the run / status / report subcommands, assembled from the above
"""
