"""lcjax's error types. The CLIs print an `LcjaxError` as one paragraph (no traceback unless
asked for) and exit with its `exit_code`: 2 when the command or its configuration must change,
1 when the run failed while running. Imports nothing: every layer may raise these.

Configuration errors are also `ValueError`s (type errors also `TypeError`s), so code that
catches the builtin types keeps working.
"""


class LcjaxError(Exception):
  """An expected failure whose message names the cause and the fix."""
  exit_code = 1


class ConfigError(LcjaxError, ValueError):
  """A binding, flag or path the user gave is wrong; nothing was changed on disk."""
  exit_code = 2


class ConfigTypeError(ConfigError, TypeError):
  """A gin binding has the wrong type."""


class WorkdirError(ConfigError):
  """The run directory cannot be used (a file, read-only, missing for eval)."""


class CheckpointError(LcjaxError, RuntimeError):
  """A checkpoint could not be read or written."""


class CheckpointCorruptError(CheckpointError):
  """A checkpoint's bytes are damaged or incomplete (its checksums do not match)."""


class CheckpointMismatchError(CheckpointError, ConfigError):
  """An intact checkpoint was written by a different model or schedule than the one
  configured now: the configuration changed, not the checkpoint."""
  exit_code = 2


class CheckpointWriteError(CheckpointError):
  """Saving a checkpoint failed (e.g. a full disk); earlier checkpoints are intact."""


class NonFiniteLossError(LcjaxError, FloatingPointError):
  """Training diverged: the loss, gradient norm or updated parameters became non-finite."""


class ConvertError(ConfigError):
  """A checkpoint cannot be converted (an unsupported architecture or config field, a tensor of
  the wrong shape, a pickle); nothing was written."""


class DataError(ConfigError):
  """An input file cannot be used as configured (no file matches a glob, an empty file,
  undecodable bytes, a malformed JSONL line); the message names the file and the place."""
