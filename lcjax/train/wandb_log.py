"""Optional Weights & Biases logging: `TrainConfig.wandb_project`. TensorBoard and metrics.jsonl
stay the record of a run; wandb gets a copy of the same scalars from process 0.

The wandb run's id is derived from the work directory, so a resumed run continues the same wandb
run. wandb keeps only increasing steps: a run resumed after a crash logs to wandb from the first
step past the last one wandb saw (metrics.jsonl and TensorBoard hold the replayed steps too).
`WANDB_MODE=offline` (or `wandb offline`) keeps everything local under DIR/wandb/.
"""

import hashlib
import os

from lcjax import paths
from lcjax.config import operative_bindings
from lcjax.errors import ConfigError


def run_id(workdir: str) -> str:
  """A wandb run id that names this work directory (one wandb run per lcjax run)."""
  return hashlib.sha256(workdir.encode()).hexdigest()[:16]


class WandbLog:
  """Sends scalar metrics to wandb; the gin config's bindings become the run's config."""

  def __init__(self, project: str, workdir: str, config_text: str):
    try:
      import wandb  # optional: imported only when a project is set
    except ImportError as e:
      raise ConfigError(f"TrainConfig.wandb_project = {project!r} needs the wandb package: "
                        "`pip install wandb`, or unset TrainConfig.wandb_project.") from e
    local = not paths.is_remote(workdir)  # wandb writes locally; a bucket workdir uses ./wandb
    self._run = wandb.init(
        project=project, name=os.path.basename(workdir.rstrip("/")), id=run_id(workdir),
        resume="allow", dir=workdir if local else None,
        config=operative_bindings(config_text))

  def write(self, step: int, metrics: dict) -> None:
    self._run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

  def close(self) -> None:
    self._run.finish()
