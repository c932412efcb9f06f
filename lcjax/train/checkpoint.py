"""Checkpoints: an orbax CheckpointManager holding the train state, the data iterator and the
run's operative gin config, with a checksum manifest per checkpoint.

Layout: DIR/checkpoints/<step>/{state, data, config, lcjax.sha256.json}. Saves are
asynchronous (training continues while arrays are written) and atomic (orbax writes to
<step>.orbax-checkpoint-tmp and renames), so a crash mid-save never leaves a checkpoint that
looks complete. Right after the rename, still in orbax's background thread (process 0), the
manifest (lcjax.train.manifest) records every file's size and sha256; the save counts as finished
only then. A process killed between the rename and the manifest leaves a complete checkpoint
without one: it restores with a printed warning that it is unverified.

A restore tells three failures apart, each an lcjax.errors type:
  - CheckpointCorruptError: a file differs from its manifest, is missing or unreadable.
    `restore_latest(..., fallback=True)` moves such a checkpoint to DIR/quarantine/
    and resumes from the newest intact one.
  - CheckpointMismatchError: the bytes are intact but the arrays (paths, shapes, dtypes) are
    not the ones configured now; names the parameters and the gin bindings that changed.
  - CheckpointWriteError (`check`, `wait`, `save`): a background save failed, e.g. a full disk.
"""

import base64
import logging
import os
import re
import shutil
import sys
import time
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lcjax import paths
from lcjax.config import binding_changes
from lcjax.errors import (CheckpointCorruptError, CheckpointError,  # noqa: F401 (re-exported)
                          CheckpointMismatchError, CheckpointWriteError)
from lcjax.train import manifest
from lcjax.train.shapes import array_differences, first


class Checkpointer:

  def __init__(self, workdir: str, every: int, keep: int, async_save: bool = True,
               create: bool = True):
    """`create=False` (read-only users such as eval) creates nothing: a missing checkpoints
    directory just has no steps."""
    self.workdir = paths.absolute(workdir)
    self.directory = str(paths.resolve(workdir) / "checkpoints")
    _quiet_orbax_failures()
    self._manager = ocp.CheckpointManager(
        orbax_path(self.directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=async_save,
            create=create, temporary_path_class=_ManifestedRename),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
    )
    self._in_flight, self._state_bytes, self._failure_reported = None, 0, False
    if create:  # an unfinished save of a killed run is never resumed from: drop its files
      self._remove_tmp("*")

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: bytes, config: str, force: bool = False,
           record: dict | None = None) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether a save started. A step
    already saved (or being saved) is not saved again: False, no error.

    `config` is the run's operative gin text, saved with the checkpoint with `record` (JSON
    data the loop reads back on resume: the stages, and which one the data state is of; see
    `record_of`). Every process's
    data-iterator state is kept (each reads its own share of the data); all processes must call
    this together, as they must for the arrays.
    """
    if step in self._manager.all_steps() or not (force or self._manager.should_save(step)):
      return False
    self.wait()  # a failed previous save is reported as itself, before this one starts
    data = {f"iterator_{i}": base64.b64encode(s).decode("ascii")
            for i, s in enumerate(_gather_bytes(data_state))}
    self._in_flight, self._failure_reported = step, False
    self._state_bytes = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))
    try:
      return self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
          config=ocp.args.JsonSave({**(record or {}), "gin": config})), force=force)
    except Exception as e:
      if _os_error(e) is None:
        raise
      raise self._write_failed(step, e) from e

  def config_of(self, step: int) -> str | None:
    """The operative gin text saved with checkpoint `step` (None: it holds none)."""
    return (self.record_of(step) or {}).get("gin")

  def record_of(self, step: int) -> dict | None:
    """The `record` saved with checkpoint `step`, and its gin text as "gin" (None: it holds
    neither)."""
    if not (self._step_dir(step) / "config").is_dir():
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]

  def restore(self, step: int, abstract_state, config: str) -> tuple[object, bytes]:
    """(state, this process's data-iterator state) of checkpoint `step`, restored into the
    shapes, dtypes and shardings of `abstract_state`. `config` is the current operative gin
    text (named in a mismatch). Checks the manifest before reading any array."""
    verified, saved = self._saved_tree(step)
    self.check_fits(step, saved, abstract_state, config)
    restored = self._read(step, verified, state=ocp.args.StandardRestore(abstract_state),
                          data=ocp.args.JsonRestore())
    try:
      data_state = base64.b64decode(restored["data"][f"iterator_{jax.process_index()}"])
    except Exception as e:
      raise self._unreadable(step, verified, e) from e
    return restored["state"], data_state

  def restore_part(self, step: int, abstract_part: dict, check) -> dict:
    """Some of checkpoint `step`'s state: the top-level items of `abstract_part` (e.g. only
    {"params": ...}), into its shapes and shardings. `check(saved)` gets the saved tree's
    metadata (`array_differences` compares it) and raises on a mismatch before any array is
    read. Checks the manifest first."""
    verified, saved = self._saved_tree(step)
    check(getattr(saved, "tree", saved))
    try:  # the manager's handler restores whole trees only
      with ocp.PyTreeCheckpointer() as reader:
        return reader.restore(orbax_path(self._step_dir(step)) / "state",
                              args=ocp.args.PyTreeRestore(
                                  abstract_part, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(
                                      abstract_part)))
    except Exception as e:
      raise self._unreadable(step, verified, e) from e

  def _saved_tree(self, step: int):
    """(verified, the state item's orbax metadata) of checkpoint `step`."""
    verified = self._verify(step)
    try:
      saved = self._manager.item_metadata(step)["state"]
      if saved is None:
        raise FileNotFoundError(f"no readable state item in {self._step_dir(step)}")
    except Exception as e:  # orbax raises many types for unreadable metadata
      raise self._unreadable(step, verified, e) from e
    return verified, saved

  def _read(self, step: int, verified: bool, **items):
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise self._unreadable(step, verified, e) from e

  def restore_latest(self, abstract_state, config: str,
                     fallback: bool = False) -> tuple[object, bytes, int] | None:
    """(state, data state, step) of the newest checkpoint, or None when there is none.

    A damaged newest checkpoint raises CheckpointCorruptError; with `fallback`, it is moved to
    DIR/quarantine/ (one printed line: which, why, where) and the next newest is tried. A
    mismatch always raises: it is a configuration problem, not damage.
    """
    for step in reversed(self.all_steps()):
      try:
        return (*self.restore(step, abstract_state, config), step)
      except CheckpointCorruptError as e:
        if not fallback:
          raise
        moved = self.quarantine(step, "corrupt")
        print(f"Skipped damaged checkpoint step {step} ({e.damage}); moved it to {moved}.",
              flush=True)
    return None

  def quarantine(self, step: int, reason: str) -> str:
    """Moves checkpoint `step` to DIR/quarantine/<step>-<reason> (nothing is deleted; orbax no
    longer sees it) and returns its new path."""
    self.wait()
    slug = re.sub(r"[^\w.-]+", "-", reason).strip("-") or "quarantined"
    base = epath.Path(self.workdir) / "quarantine" / f"{step}-{slug}"
    target, n = base, 1
    while target.exists():
      n += 1
      target = base.with_name(f"{base.name}.{n}")
    _sync_processes(f"lcjax_quarantine_{step}_named")  # every process names the same target
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      self._step_dir(step).rename(target)
    _sync_processes(f"lcjax_quarantine_{step}_moved")
    self._manager.reload()
    return str(target)

  def check(self) -> None:
    """Raises CheckpointWriteError if a background save has failed; returns at once while one
    is still being written. Cheap: call it after every train step."""
    if not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until the background save is written; CheckpointWriteError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      if self._failure_reported:
        return
      raise self._write_failed(self._in_flight, e) from e

  def close(self) -> None:
    """Waits for the background save (raising its failure unless `check`/`wait` already did)."""
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:
        if not self._failure_reported:
          raise
      if self._failure_reported:
        self._remove_tmp(self._in_flight, settle=True)

  # ---- Messages.

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def _remove_tmp(self, step: int | str, settle: bool = False) -> None:
    """Removes the temporary directories of a failed save of `step` ("*": of any save, left by
    a killed process) on process 0. `settle`: tensorstore finishes writes that orbax gave up
    on in its own threads, re-creating files; remove until none reappears for 0.2 s (2 s at
    most)."""
    if jax.process_index() != 0:
      return
    directory, pattern = epath.Path(self.directory), f"{step}.orbax-checkpoint-tmp*"
    if not directory.exists():  # create=False: nothing to clean
      return
    for _ in range(10 if settle else 1):
      for tmp in directory.glob(pattern):
        _remove_tree(tmp)
      if not settle:
        return
      time.sleep(0.2)
      if not list(directory.glob(pattern)):
        return

  def _verify(self, step: int) -> bool:
    """Checks `step`'s files against its manifest: True if verified, False (a warning printed)
    when it has none; CheckpointCorruptError when a file differs."""
    path = self._step_dir(step)
    if not path.is_dir():
      raise CheckpointError(f"No checkpoint at step {step} in {self.directory} (available: "
                            f"{self.all_steps()}).")
    found = manifest.problems(path)
    if found is None:
      print(f"Warning: checkpoint step {step} ({path}) has no {manifest.NAME} (written before "
            "lcjax kept one, or the run stopped while writing it): restoring it unverified.",
            flush=True)
      return False
    if found:
      raise self._corrupt(step, "; ".join(first(found)))
    return True

  def _corrupt(self, step: int, damage: str) -> CheckpointCorruptError:
    others = [s for s in self.all_steps() if s != step]
    fallback = (f"the newest intact one of the other checkpoints ({others})" if others else
                "step 0 (no other checkpoint exists)")
    err = CheckpointCorruptError(
        f"Checkpoint step {step} in {self._step_dir(step)} is damaged: {damage}. Nothing was "
        f"restored from it. Set TrainConfig.on_corrupt_checkpoint = \"fallback\" to move it "
        f"to {epath.Path(self.workdir) / 'quarantine'}/ (kept for inspection) and resume from "
        f"{fallback}.")
    err.damage = damage
    return err

  def _unreadable(self, step: int, verified: bool, e: Exception) -> CheckpointError:
    """orbax could not read checkpoint `step`: damage unless its manifest vouched for it."""
    cause = f"{type(e).__name__}: {str(e)[:300]}"
    if not verified:
      return self._corrupt(step, f"orbax could not read it ({cause})")
    return CheckpointError(
        f"Checkpoint step {step} in {self._step_dir(step)} matches its checksums, but orbax "
        f"could not restore it ({cause}). Nothing was changed on disk.")

  def check_fits(self, step: int, saved, abstract_state, config: str) -> None:
    """CheckpointMismatchError when `step`'s arrays are not those of `abstract_state`."""
    differences = array_differences(saved, abstract_state)
    if not differences:
      return
    old = self.config_of(step)
    config_file = self._step_dir(step) / "config" / "metadata"
    if old is None:
      changed = (f"the checkpoint holds no config record; compare with the config*.gin files "
                 f"in {self.workdir}")
    else:
      changes = binding_changes(old, config)
      changed = ("gin bindings changed since it was written: " + "; ".join(first(changes))
                 if changes else "no gin binding changed (did the model code change?)")
    raise CheckpointMismatchError(
        f"Checkpoint step {step} in {self._step_dir(step)} is intact but holds a different "
        f"model or optimizer state than the one configured now. {'. '.join(differences)}. "
        f"{changed[0].upper() + changed[1:]}. Nothing was restored or changed on disk. Fix: "
        f"set those bindings back (the config that wrote it is the \"gin\" text in "
        f"{config_file}), or train the new model in a new --workdir.")

  def _write_failed(self, step: int | None, e: Exception) -> CheckpointWriteError:
    """Cleans up after the failed save of `step` and says what failed and what is intact."""
    self._failure_reported = True
    self._remove_tmp(step)
    self._manager.reload()
    status = {s: manifest.problems(self._step_dir(s)) for s in self.all_steps() if s != step}
    intact = [s for s, found in status.items() if found == []]
    needed = (f"{_size(manifest.size(self._step_dir(intact[-1])))} (the size of step "
              f"{intact[-1]})" if intact else f"{_size(self._state_bytes)} (the state's size)")
    free = ("unknown (an object store)" if paths.is_remote(self.directory) else
            _size(shutil.disk_usage(self.directory).free))
    kept = ", ".join(f"step {s} ({_status(found)})" for s, found in status.items()) or "none"
    left = ("its directory is complete but unverified (its manifest could not be written)"
            if self._step_dir(step).is_dir() else
            "nothing of it was kept (its temporary directory was removed)")
    return CheckpointWriteError(
        f"Saving checkpoint step {step} to {self._step_dir(step)} failed: "
        f"{_os_error(e) or str(e)[:300]}; {left}. A checkpoint needs about {needed}; free now "
        f"in {self.directory}: {free}. Earlier checkpoints: {kept}. Fix: free space there (or "
        f"lift the limit named) and run the same command again; it resumes from the newest "
        f"intact checkpoint.")


def orbax_path(path: str) -> epath.Path:
  """The path orbax is given for `path` (a checkpoints/ directory or one of its steps): the
  same one, local or remote (orbax writes gs:// itself). The one place orbax learns where
  checkpoints are: tests of remote workdirs map it onto a local directory here."""
  return epath.Path(path)


def _remove_tree(path: epath.Path) -> None:
  """Removes a directory tree, ignoring errors (tensorstore may still be writing into it)."""
  if paths.is_remote(path):
    path.rmtree(missing_ok=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


class _ManifestedRename(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """orbax's atomic rename, then (same background thread, process 0) the step's manifest."""

  async def finalize(self, *args, **kwargs):
    await super().finalize(*args, **kwargs)
    final = self.get_final()
    if final.name.isdigit():  # the step directory, not one of its items
      manifest.write(str(final))


def _status(problems: list[str] | None) -> str:
  if problems is None:
    return "complete, no manifest: unverified"
  return "intact, checksums verified" if not problems else f"damaged: {problems[0]}"


def _os_error(e: BaseException) -> str | None:
  """The operating-system error behind `e` ("File too large", "No space left on device"), if
  any: an OSError in its chain, or tensorstore's os_error_code in its message."""
  while e is not None:
    if isinstance(e, OSError) and e.strerror:
      return e.strerror
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
      return os.strerror(int(code.group(1)))
    e = e.__cause__ or e.__context__
  return None


def _size(n: float) -> str:
  if n < 1024:
    return f"{n:.0f} bytes"
  for unit in ("KiB", "MiB", "GiB", "TiB"):
    n /= 1024
    if n < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}"


class _OrbaxFailureFilter(logging.Filter):
  """Drops error logs whose traceback comes from orbax: a failed background save is logged four
  times by orbax, and once per pending array write by asyncio ("Task exception was never
  retrieved"); `check` reports the failure once, with the original exception chained."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or not record.exc_info:
      return True
    orbax = f"{os.sep}orbax{os.sep}"
    frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info[2] else []
    return not (orbax in record.pathname or any(orbax in f.filename for f in frames))


def _quiet_orbax_failures() -> None:
  """Installs, once per process, the log filter above and an unraisable-exception hook
  that drops tensorstore's late callbacks: when a save fails, each array write still pending
  reports "Event loop is closed" (orbax closed its loop): one traceback per array."""
  for logger in (logging.getLogger("absl"), logging.getLogger("asyncio")):
    if not any(isinstance(f, _OrbaxFailureFilter) for f in logger.filters):
      logger.addFilter(_OrbaxFailureFilter())
  if getattr(sys.unraisablehook, "lcjax_quiet", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    late = (unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == "Event loop is closed"
            and any(frame.name == "call_soon_threadsafe"
                    for frame in traceback.extract_tb(unraisable.exc_traceback)))
    if not late:
      previous(unraisable)

  hook.lcjax_quiet = True
  sys.unraisablehook = hook


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


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
