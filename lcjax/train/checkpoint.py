"""Checkpoints: an orbax CheckpointManager holding the train state and the data iterator.

Layout: DIR/checkpoints/<step>/{state, data}. Saves are asynchronous (training continues while
arrays are written) and atomic (orbax writes to a temporary directory and renames), so a
crash mid-save never leaves a checkpoint that looks complete.
"""

import base64
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  pass


class Checkpointer:

  def __init__(self, workdir: str, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            enable_async_checkpointing=async_save,
            create=True,
        ),
    )

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: bytes, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether a save started.

    Every process's data-iterator state is kept (each reads its own share of the data); all
    processes must call this together, as they must for the arrays.
    """
    if not (force or self._manager.should_save(step)):
      return False
    data = {f"iterator_{i}": base64.b64encode(s).decode("ascii")
            for i, s in enumerate(_gather_bytes(data_state))}
    return self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
        force=force,
    )

  def restore(self, step: int, abstract_state) -> tuple[object, bytes]:
    """Restores `step` into the shapes, dtypes and shardings of `abstract_state`."""
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
      )
      data_state = base64.b64decode(restored["data"][f"iterator_{jax.process_index()}"])
    except Exception as e:  # orbax raises many types for a damaged checkpoint
      others = [s for s in self.all_steps() if s != step]
      fallback = (
          f"To fall back to an earlier checkpoint (available: {others}), move or delete "
          f"{os.path.join(self.directory, str(step))} and start again; training resumes from "
          f"the newest checkpoint left." if others else
          f"No other checkpoint exists; move {self.directory} away to start from scratch.")
      raise CheckpointError(
          f"Could not restore checkpoint step {step} from {self.directory}: it is corrupt or "
          f"incomplete ({type(e).__name__}: {str(e)[:300]}). {fallback}") from e
    return restored["state"], data_state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _gather_bytes(value: bytes) -> list[bytes]:
  """Every process's `value`, in process order (on one process: [value])."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(value, np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([raw.size]))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:raw.size] = raw
  gathered = multihost_utils.process_allgather(padded)
  return [bytes(row[:int(n)]) for row, n in zip(gathered, lengths.reshape(-1))]

