"""TrainConfig.profile_steps: a `jax.profiler` trace of some train steps in DIR/profile/
(TensorBoard's profile plugin or Perfetto read it: `*.xplane.pb`, `*.trace.json.gz`).

The trace starts before step `start` is dispatched and stops once step `stop` has finished
(its outputs are waited for), so it holds exactly those steps' host and device work. A gs://
workdir is written by the profiler itself. A run that
stops inside the range (an error, SIGTERM) still closes the trace.
"""

import contextlib

import jax

from lcjax import paths

PROFILE = "profile"  # the workdir's subdirectory


class StepProfiler:

  def __init__(self, workdir: str, steps: tuple[int, int] | None,
               cleanup: contextlib.ExitStack):
    # jax.profiler writes gs:// itself (TSL's file systems): the path is passed on as it is.
    self.directory = str(paths.resolve(workdir) / PROFILE)
    self.steps = steps
    self.active = False
    cleanup.callback(self._stop)

  def before(self, step: int) -> None:
    """Step `step` (1-based) is about to be dispatched."""
    if self.steps is not None and step == self.steps[0]:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, outputs) -> None:
    """Step `step` has been dispatched and returned `outputs`."""
    if self.active and step == self.steps[1]:
      jax.block_until_ready(outputs)
      self._stop()
      print(f"Profiled steps {self.steps[0]}-{self.steps[1]}: {self.directory}", flush=True)

  def _stop(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
