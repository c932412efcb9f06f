"""A non-editable install ships configs/ as package data: gin `include`s resolve without the
repository."""

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib

from tests.train.runs import REPO

SOURCES = ("pyproject.toml", "README.md", "requirements.txt", "lcjax", "configs")


def test_every_package_is_listed_in_pyproject():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
  found = {os.path.relpath(d, REPO).replace(os.sep, ".")
           for d, _, files in os.walk(os.path.join(REPO, "lcjax")) if "__init__.py" in files}
  assert found | {"lcjax.configs"} == listed


def test_non_editable_install_finds_packaged_configs(tmp_path):
  # Build from a copy, so that the build leaves nothing in the checkout.
  source, target, elsewhere = tmp_path / "source", tmp_path / "site", tmp_path / "elsewhere"
  source.mkdir()
  for name in SOURCES:
    path = os.path.join(REPO, name)
    if os.path.isdir(path):
      shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(path, source / name)
  install = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
       "--no-index", "--target", str(target), str(source)], capture_output=True, text=True)
  assert install.returncode == 0, install.stderr[-3000:]

  elsewhere.mkdir()
  (elsewhere / "mine.gin").write_text("include 'models/transformer_tiny.gin'\n"
                                      "ModelConfig.d_model = 64\n")
  code = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(target)!r})
      import lcjax
      assert lcjax.__file__.startswith({str(target)!r}), lcjax.__file__
      import lcjax.models.config
      from lcjax.config import parse_gin
      parse_gin(['mine.gin'], [])
      from lcjax.models.config import ModelConfig
      print('parsed', ModelConfig().d_model, ModelConfig().pattern)
      """)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "parsed 64 *-*-*-*-" in out.stdout
