"""What the CLIs (`lcjax.train`, `lcjax.eval`) share: how an lcjax error reaches the user.

An `lcjax.errors.LcjaxError` is printed as one paragraph, `Error: <what happened, the path or
step involved, what was kept, the fix>`, on stderr, without a traceback, and the process exits
with the error's `exit_code`:

    status  meaning                                   e.g.
    0       success, including a preempted run        SIGTERM: the state was saved; run the
            (SIGTERM) whose state was saved           same command again to resume
    1       the run failed while running              the loss diverged (NonFiniteLossError); a
                                                      checkpoint is damaged or cannot be written
                                                      (CheckpointCorruptError, ...WriteError)
    2       the command or its configuration must     a misspelt or wrongly typed binding, a
            change; no checkpoint or record of the    missing --gin_file, an impossible mesh
            run was changed (ConfigError and its      (MeshConfig), a workdir that is a file or
            subclasses)                               read-only, eval of a mistyped workdir or
                                                      of a --step with no checkpoint, a
                                                      checkpoint written by another model
                                                      (CheckpointMismatchError)

`--verbose` (or the environment variable LCJAX_TRACEBACK=1) prints the traceback above the
paragraph; the exit status stays the same. Any other exception is a bug in lcjax: Python prints
its traceback and exits 1.
"""

import os
import sys
import traceback
from typing import Callable

from absl import app, flags

from lcjax.errors import LcjaxError

flags.DEFINE_bool("verbose", False, "On an error, print the traceback too (or LCJAX_TRACEBACK=1).")


def run_cli(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)`, with every LcjaxError `main` raises reported as above."""
  app.run(lambda argv: report_errors(main, argv))


def report_errors(main: Callable[[list[str]], None], argv: list[str]) -> None:
  """Runs `main(argv)`; an LcjaxError it raises is printed as above and exits the process."""
  try:
    main(argv)
  except LcjaxError as e:
    # The flag's value, parsed or (called outside app.run) its default.
    if flags.FLAGS["verbose"].value or os.environ.get("LCJAX_TRACEBACK") == "1":
      traceback.print_exc()
    print(error_paragraph(e), file=sys.stderr)
    sys.exit(e.exit_code)


def error_paragraph(error: BaseException) -> str:
  """`Error: <message>` on one line: the message's own line breaks (and gin's appended
  "In call to configurable ..." context) joined with spaces, so the paragraph reads as one."""
  lines = (line.strip() for line in str(error).splitlines())
  return "Error: " + " ".join(line for line in lines if line)
