"""Each cell's state in ROOT/CELL/sweep_status.json (written atomically), and what a cell's
files say: the last step its metrics reached, the last error line of its log.

States: "done" (trained to TrainConfig.steps, and evaluated when the grid asks), "running"
(its process is alive), "failed" (with the last error line), "pending" (never started).
Every path goes through etils.epath, so ROOT may be gs://.
"""

import json
import os
import re
import socket
import time

from etils import epath

from lcjax import paths
from lcjax.train.metrics import read_metrics

STATUS = "sweep_status.json"
LOG = "sweep.log"
STATES = ("done", "running", "failed", "pending")
_ERROR = re.compile(r"error|exception|traceback|killed|failed", re.IGNORECASE)


def cell_dir(root, name: str) -> epath.Path:
  return epath.Path(root) / name


def write_status(root, name: str, **record) -> dict:
  """Replaces the cell's status file with `record` (plus host and time), atomically."""
  record = {"host": socket.gethostname(), "updated": time.time(), **record}
  directory = cell_dir(root, name)
  directory.mkdir(parents=True, exist_ok=True)
  paths.write_atomic(directory / STATUS, json.dumps(record, indent=1))
  return record


def read_status(root, name: str) -> dict | None:
  path = cell_dir(root, name) / STATUS
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _alive(record: dict) -> bool:
  if record.get("host") != socket.gethostname():
    return True  # another host's process: trust its record
  try:
    os.kill(int(record["pid"]), 0)
  except (ProcessLookupError, KeyError, TypeError, ValueError):
    return False
  except PermissionError:
    return True
  return True


def state_of(root, name: str) -> tuple[str, dict]:
  """(state, status record): a "running" record whose process is gone reads as failed."""
  record = read_status(root, name)
  if record is None:
    return "pending", {}
  state = record.get("state", "pending")
  if state == "running" and not _alive(record):
    return "failed", {**record, "error": f"interrupted: process {record.get('pid')} is gone "
                                          "(rerun the sweep to resume it)"}
  return state, record


def last_step(workdir) -> int:
  """The last step metrics.jsonl logged (0 when there is none)."""
  return max((r["step"] for r in read_metrics(workdir)), default=0)


def last_error_line(log_text: str) -> str:
  """The last line of a log that names an error, else its last line (progress bars' carriage
  returns split lines too)."""
  lines = [line.strip() for line in re.split(r"[\r\n]+", log_text) if line.strip()]
  errors = [line for line in lines if _ERROR.search(line)]
  return (errors or lines or [""])[-1][:300]


def read_log(root, name: str) -> str:
  path = cell_dir(root, name) / LOG
  return path.read_bytes().decode(errors="replace") if path.exists() else ""
