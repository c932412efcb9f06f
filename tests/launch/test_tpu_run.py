"""`lcjax.launch tpu` for real, against a stand-in `gcloud`: each slice's lines are printed with
its name in front and saved to --log_dir; SIGTERM (or Ctrl-C) stops lcjax.train on every
worker."""

import os
import signal
import stat
import subprocess
import sys

from tests.train.runs import REPO

# Records its arguments; "runs" lcjax.train by printing two lines (then hangs if asked to).
FAKE_GCLOUD = """#!/bin/bash
echo "$*" >> "$GCLOUD_CALLS"
case "$*" in
  *pkill*) exit 0 ;;
  *describe*) echo 10.0.0.2 ;;
  *lcjax.train*) echo "step 1 on $5"; echo "step 2 on $5"
                 if [ -n "$GCLOUD_HANG" ]; then exec sleep 60; fi ;;
esac
"""
ARGS = ["--tpu_prefix=v", "--num_slices=2", "--zone=z", "--project=p", "--code=shared",
        "--gin_file=configs/demo.gin", "--workdir=gs://b/r"]


def launch(tmp_path, hang: bool) -> subprocess.Popen:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(stat.S_IRWXU)
  env = {**os.environ, "GCLOUD_CALLS": str(tmp_path / "calls"), "PYTHONPATH": REPO,
         "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GCLOUD_HANG": "1" if hang else ""}
  return subprocess.Popen([sys.executable, "-m", "lcjax.launch", "tpu", *ARGS,
                           f"--log_dir={tmp_path / 'logs'}"], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_each_slice_is_streamed_with_its_name_and_logged(tmp_path):
  proc = launch(tmp_path, hang=False)
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode == 0, out
  for name in ("v-0", "v-1"):
    lines = out.splitlines()  # each line whole; the two slices' lines interleave
    assert f"[{name}] step 1 on {name}" in lines and f"[{name}] step 2 on {name}" in lines
    assert (tmp_path / "logs" / f"{name}.log").read_text() == (
        f"step 1 on {name}\nstep 2 on {name}\n")
  calls = (tmp_path / "calls").read_text()
  assert calls.startswith("compute tpus tpu-vm describe v-0 ") and "pkill" not in calls
  assert calls.count("MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2:8080 ") == 2


def test_sigterm_stops_every_worker(tmp_path):
  proc = launch(tmp_path, hang=True)
  seen = []
  while len(seen) < 4:  # both slices' two lines: both are running
    seen.append(proc.stdout.readline())
    assert seen[-1], "".join(seen)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode == 130, out
  stops = [c for c in (tmp_path / "calls").read_text().splitlines() if "pkill" in c]
  assert stops == [f"compute tpus tpu-vm ssh {n} --worker=all --command=pkill -f lcjax.train "
                   "--zone=z --project=p" for n in ("v-0", "v-1")]
