"""README.md's "Running on a TPU pod" and "Running on SLURM" examples: each `python -m
lcjax.launch` command (a fenced bash block) prints, as a dry run, the text block after it."""

import os
import re
import shlex

import pytest

from lcjax.launch.__main__ import main
from tests.train.runs import REPO

SECTIONS = ("Running on a TPU pod", "Running on SLURM")
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)


def section(text: str, title: str) -> str:
  """The lines under the heading `title`, up to the next heading of its level or above (lines
  in fenced blocks are never headings)."""
  lines, level, found, fenced = text.splitlines(keepends=True), None, [], False
  for line in lines:
    heading = not fenced and re.match(r"(#+) (.*)", line)
    fenced ^= line.startswith("```")
    if heading and heading.group(2).strip() == title:
      level = len(heading.group(1))
    elif heading and level and len(heading.group(1)) <= level:
      break
    elif level:
      found.append(line)
  assert level, f"README.md has no section {title!r}"
  return "".join(found)


def examples(title: str) -> list[tuple[str, str]]:
  """(command, the text block after it) for each launcher command in the section."""
  with open(os.path.join(REPO, "README.md")) as f:
    blocks = FENCE.findall(section(f.read(), title))
  found = [(body, after) for (lang, body), (after_lang, after) in zip(blocks, blocks[1:])
           if lang == "bash" and "python -m lcjax.launch" in body and after_lang == "text"]
  assert found, f"no `python -m lcjax.launch` example followed by its output in {title!r}"
  return found


@pytest.mark.parametrize("title", SECTIONS)
def test_readme_examples_print_what_the_readme_shows(title, capsys):
  for command, shown in examples(title):
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:3] == ["python", "-m", "lcjax.launch"] and "--dry_run" in argv, command
    assert main(argv[3:]) == 0
    assert capsys.readouterr().out == shown, f"README.md, {title!r}: {command}"
