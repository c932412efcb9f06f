"""python -m lcjax.launch {tpu,slurm} [flags] [--dry_run]: run one `lcjax.train` command on a
TPU pod or under SLURM (`--help` after the target lists its flags). Exit status: the launched
command's; 2 for bad flags (one line, `Error: ...`)."""

import argparse
import sys

from lcjax.cli import error_paragraph
from lcjax.errors import LcjaxError
from lcjax.launch import common, slurm, tpu

TARGETS = {"tpu": tpu, "slurm": slurm}


def main(argv: list[str]) -> int:
  parser = common.Parser(prog="python -m lcjax.launch", description=__doc__.split("\n\n")[0])
  targets = parser.add_subparsers(dest="target", required=True, parser_class=common.Parser)
  for name, module in TARGETS.items():
    module.add_flags(targets.add_parser(name, help=module.__doc__.split("\n\n")[0],
                                        description=module.__doc__,
                                        formatter_class=argparse.RawDescriptionHelpFormatter))
  args = parser.parse_args(argv)
  try:
    return TARGETS[args.target].main(args)
  except LcjaxError as e:
    print(error_paragraph(e), file=sys.stderr)
    return e.exit_code


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
