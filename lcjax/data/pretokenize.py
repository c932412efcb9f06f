"""Pre-tokenizes one of DataConfig.sources once, so that training reads ids (tokenized.py).

  python -m lcjax.data.pretokenize --gin_file=data.gin --source=books --output=DIR \
      [--num_files=64] [--gin_bindings='DataConfig.vocabulary = "tokenizer.json"']
writes DIR/{train,validation}-K-of-N.{tokens,offsets}.npy (each split that has files) and
DIR/vocabulary.json with DataConfig.vocabulary's ids, then prints the gin lines that read them.
Give at least as many files as the processes that will read them (each then reads only its own).
"""
import argparse
import sys

from lcjax.cli import report_errors
from lcjax.config import parse_gin
from lcjax.data import sources, tokenized
from lcjax.data.pipeline import DataConfig
from lcjax.errors import ConfigError


def pretokenize(cfg: DataConfig, name: str, output: str, num_files: int) -> list[str]:
  """Writes source `name` of `cfg` under `output`; returns the gin lines of its TokenSource."""
  by_name = {s.name: s for s in cfg.sources}
  if name not in by_name:
    raise ConfigError(f"--source={name!r} is not in DataConfig.sources (names: "
                      f"{sorted(by_name)}).")
  source = by_name[name]
  lines = [f"{name}/TokenSource.name = {name!r}"]
  for split, field in sources.SPLIT_FIELDS.items():
    if getattr(source, field, ()):
      tokenized.write(source, cfg.vocabulary, split, output, num_files)
      lines.append(f"{name}/TokenSource.{field} = "
                   f"{f'{output}/{split}-*{tokenized.TOKENS}'!r}")
  return lines + [f"DataConfig.vocabulary = {cfg.vocabulary!r}",
                  f"DataConfig.sources = [@{name}/TokenSource()]"]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", action="append", default=[], required=True)
  parser.add_argument("--gin_bindings", action="append", default=[])
  parser.add_argument("--source", required=True, help="the name of one of DataConfig.sources")
  parser.add_argument("--output", required=True, help="directory (local or gs://)")
  parser.add_argument("--num_files", type=int, default=64)
  args = parser.parse_args(argv)
  parse_gin(args.gin_file, args.gin_bindings)
  print("\n".join(pretokenize(DataConfig(), args.source, args.output, args.num_files)))


if __name__ == "__main__":
  report_errors(main, sys.argv[1:])  # an lcjax error: one paragraph, exit status 2
