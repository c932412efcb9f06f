"""A Hugging Face checkpoint -> an lcjax workdir: DIR/checkpoints/0 (params only) and
DIR/model.gin.

Each parameter streams from the safetensors files into its target sharding (`params.from_hf`):
the host holds one HF tensor at a time, never the model. The workdir is then a starting
point: `python -m lcjax.train --gin_file=DIR/model.gin ... --workdir=NEW` fine-tunes it
(model.gin sets TrainConfig.init_from = DIR), `python -m lcjax.eval --gin_file=DIR/model.gin
--workdir=DIR` evaluates it.
"""

import dataclasses
import json
import os
import shutil

from lcjax.convert import architectures, model_gin
from lcjax.convert import params as convert_params
from lcjax.convert.safetensors_io import SafetensorsReader
from lcjax.errors import ConvertError
from lcjax.models.config import ModelConfig
from lcjax.workdir import CHECKPOINTS, prepare_workdir

TOKENIZERS = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json")
# How the data pipeline uses a checkpoint's tokenizer, written into model.gin above the binding.
_TOKENIZER_NOTE = """\
# The data pipeline tokenizes with the checkpoint's own tokenizer, {which}, and ends every
# document with its EOS token. It adds no BOS: as in every lcjax batch, a document's first input
# is id 0 (lcjax.data.converter), which upstream models did not see in that place. Fine-tuning
# works with it; a model that must see BOS needs data whose documents start with it."""


def _read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ConvertError(f"No config.json in {hf_dir}: a Hugging Face model directory has one "
                       "beside its safetensors files.")
  with open(path) as f:
    return json.load(f)


def _check_new_workdir(workdir: str) -> None:
  """ConvertError when `workdir` holds checkpoints; creates nothing (a failed import leaves
  no directory behind)."""
  ckpts = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
  if os.path.isdir(ckpts) and os.listdir(ckpts):
    raise ConvertError(f"--workdir={workdir} already holds checkpoints ({ckpts}); nothing was "
                       "written. Import into a new --workdir (no overwriting).")


def read_hf(hf_path: str, *, mesh=None, rules=None, dtype: str | None = None):
  """(ModelConfig, params, HF class name) of a HF directory (or its .safetensors file): params
  a pure dict of float32 arrays, each placed by `rules` on `mesh` (None: one device). `dtype`
  sets ModelConfig.dtype, the compute dtype (None: the architecture's choice)."""
  from lcjax.parallel import sharding

  hf_dir = hf_path if os.path.isdir(hf_path) else os.path.dirname(os.path.abspath(hf_path))
  with SafetensorsReader(hf_path) as reader:  # refuses pickles before anything else
    config = _read_config(hf_dir)
    arch = architectures.for_hf(config)
    cfg = arch.model_config(config)
    if dtype is not None:
      cfg = dataclasses.replace(cfg, dtype=dtype)
    pieces = arch.pieces(cfg)
    convert_params.check_pieces(cfg, pieces, arch.hf_class)
    reader.check_used({piece.name for piece in pieces.values()})
    shardings = None
    if mesh is not None:
      rules = sharding.logical_rules() if rules is None else rules
      shardings = sharding.param_shardings(convert_params.abstract_params(cfg), mesh, rules)
    params = convert_params.from_hf(cfg, pieces, reader.read, shardings)
  return cfg, params, arch.hf_class


def import_hf(hf_path: str, workdir: str, *, mesh=None, rules=None,
              dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """Imports `hf_path` into the new lcjax workdir `workdir` (see the module doc); returns
  (ModelConfig, params) as `read_hf`. ConvertError (nothing written) when the architecture,
  a config field or a tensor does not fit, or `workdir` already holds checkpoints."""
  from lcjax.train.checkpoint import Checkpointer

  _check_new_workdir(workdir)
  cfg, params, hf_class = read_hf(hf_path, mesh=mesh, rules=rules, dtype=dtype)
  root = prepare_workdir(workdir)
  hf_dir = os.path.abspath(hf_path if os.path.isdir(hf_path) else os.path.dirname(hf_path))
  extra = _copy_tokenizer(hf_dir, root, cfg.vocab_size)
  text = model_gin.model_gin(cfg, _header(hf_path, hf_class),
                             [*extra, f"TrainConfig.init_from = {root!r}"])
  ckpt = Checkpointer(root, every=1, keep=1, async_save=False)
  try:
    ckpt.save(0, {"params": params}, b"", text, force=True,
              record={"params_only": True, "imported_from": os.path.abspath(hf_path),
                      "hf_class": hf_class})
  finally:
    ckpt.close()
  with open(os.path.join(root, "model.gin"), "w") as f:
    f.write(text)
  return cfg, params


def _header(hf_path: str, hf_class: str) -> str:
  return (f"# Imported by `python -m lcjax.convert import` from {os.path.abspath(hf_path)} "
          f"({hf_class}).\n# Fine-tune: python -m lcjax.train --gin_file=<this file> "
          "--gin_file=<train/data configs> --workdir=NEW\n# Evaluate: python -m lcjax.eval "
          "--gin_file=<this file> --workdir=<this directory>\n# It binds only what differs from "
          "lcjax's defaults: combine it with train, data and mesh configs, not with a\n# model "
          "config (configs/models/*.gin), whose bindings would change this model.")


def _copy_tokenizer(hf_dir: str, root: str, vocab_size: int) -> list[str]:
  """Copies the tokenizer files of `hf_dir` to `root` (export copies them back); returns the
  gin lines that make the data pipeline use them: tokenizer.json (ids exactly as upstream's
  `tokenizers`) when there is one, else a SentencePiece tokenizer.model. Prints one line when
  the data pipeline's vocabulary is not the model's."""
  from lcjax.data.vocab import from_name

  for name in TOKENIZERS:
    if os.path.isfile(os.path.join(hf_dir, name)):
      shutil.copyfile(os.path.join(hf_dir, name), os.path.join(root, name))
  for name, which in (("tokenizer.json", "tokenizer.json through `tokenizers`"),
                      ("tokenizer.model", "the SentencePiece tokenizer.model")):
    path = os.path.join(root, name)
    if os.path.isfile(path):
      from_name(path)  # a tokenizer the pipeline cannot use fails now, not at training
      return [_TOKENIZER_NOTE.format(which=which), f"DataConfig.vocabulary = {path!r}"]
  print("No tokenizer.json or tokenizer.model in the checkpoint: the data pipeline will use the "
        "byte vocabulary unless DataConfig.vocabulary is set"
        + (f", whose ids are not the model's ({vocab_size} ids)." if vocab_size
           > from_name("byte").vocab_size else "."), flush=True)
  return []
