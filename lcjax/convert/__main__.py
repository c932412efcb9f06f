"""lcjax-convert / python -m lcjax.convert import|export: Hugging Face checkpoints in and out.

    import --hf=PATH_OR_DIR --workdir=DIR [--gin_file=MESH_CONFIG] [--verbose]
        a HF directory (config.json + safetensors) -> DIR/checkpoints/0 (params only) and
        DIR/model.gin; with a mesh config (e.g. configs/mesh/data2_fsdp4.gin) each parameter
        streams straight into its sharding.
    export --workdir=DIR [--step=N] --out=DIR2 [--dtype=bfloat16] [--max_shard_size=5GB]
        [--architecture=LlamaForCausalLM] [--gin_file=MODEL_CONFIG]
        checkpoint N (default: the newest) -> DIR2/config.json + model.safetensors (sharded
        with an index above --max_shard_size); the model from the checkpoint's saved gin
        config unless --gin_file is given.

Neither overwrites: --workdir for import and --out for export must be new (or empty). Exit
status: 0 done, 1 the conversion failed, 2 the command or its input must change (an
unsupported architecture or config field, a pickle, a shape mismatch; see lcjax/cli.py).
"""

from absl import flags, logging

from lcjax.cli import run_cli
from lcjax.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("hf", None, "import: a Hugging Face model directory or .safetensors file.")
flags.DEFINE_string("workdir", None, "The lcjax run directory (import writes it).")
flags.DEFINE_multi_string("gin_file", [], "import: mesh config; export: the model's config.")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings, applied after the files.")
flags.DEFINE_string("out", None, "export: the new Hugging Face directory.")
flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the newest).")
flags.DEFINE_string("dtype", "float32", "export: tensor dtype (float32, bfloat16, float16).")
flags.DEFINE_string("max_shard_size", "5GB", "export: shard above this size (e.g. 5GB).")
flags.DEFINE_string("architecture", None, "export: the HF class (default: the first that fits).")

COMMANDS = ("import", "export")


def _require(command: str, **values) -> None:
  missing = [f"--{name}" for name, value in values.items() if value is None]
  if missing:
    raise ConfigError(f"`{command}` needs {' and '.join(missing)}; see "
                      "`python -m lcjax.convert --help`.")


def _import() -> None:
  from lcjax.convert.hf_import import import_hf
  from lcjax.parallel.mesh import MeshConfig, make_mesh
  from lcjax.parallel.sharding import logical_rules

  _require("import", hf=FLAGS.hf, workdir=FLAGS.workdir)
  mesh = make_mesh(MeshConfig()) if FLAGS.gin_file or FLAGS.gin_bindings else None
  cfg, _ = import_hf(FLAGS.hf, FLAGS.workdir, mesh=mesh, rules=logical_rules())
  print(f"Imported {FLAGS.hf} ({cfg.num_layers} blocks, d_model {cfg.d_model}, vocabulary "
        f"{cfg.vocab_size}) into {FLAGS.workdir}: checkpoints/0 and model.gin.")


def _export() -> None:
  from lcjax.convert.hf_export import export_hf
  from lcjax.convert.safetensors_io import parse_size
  from lcjax.models.config import ModelConfig

  _require("export", workdir=FLAGS.workdir, out=FLAGS.out)
  cfg = ModelConfig() if FLAGS.gin_file or FLAGS.gin_bindings else None
  files = export_hf(FLAGS.workdir, FLAGS.out, step=FLAGS.step, hf_class=FLAGS.architecture,
                    dtype=FLAGS.dtype, max_shard_size=parse_size(FLAGS.max_shard_size), cfg=cfg)
  print(f"Exported {FLAGS.workdir} to {FLAGS.out}: {', '.join(files)}")


def main(argv):
  import lcjax.models.allocation  # noqa: F401  (gin configurables a model config may bind)
  import lcjax.run  # noqa: F401
  from lcjax.config import parse_gin

  commands = argv[1:]
  if len(commands) != 1 or commands[0] not in COMMANDS:
    raise ConfigError(f"Give one command, `import` or `export` (got {commands}); e.g. "
                      "`python -m lcjax.convert import --hf=DIR --workdir=OUT`.")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  parse_gin(FLAGS.gin_file, FLAGS.gin_bindings)
  if commands[0] == "import":
    _import()
  else:
    _export()


def run():
  run_cli(main)


if __name__ == "__main__":
  run()
