"""Launchers: one `lcjax.train` command run on a TPU pod (`tpu.py`) or under SLURM
(`slurm.py`), each with a dry run that prints what it would execute. Imports no JAX: it runs on
the machine you launch from, which may have none."""
