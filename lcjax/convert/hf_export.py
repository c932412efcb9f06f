"""An lcjax checkpoint -> a Hugging Face directory (config.json, safetensors, tokenizer files)
that `AutoModelForCausalLM.from_pretrained` loads.

Tensors are gathered one at a time (`params.to_hf`) and written one shard at a time. Single
host only: a multi-host run's arrays are not all addressable from one process; export on one
host (restoring onto its devices).
"""

import json
import os

import ml_dtypes
import numpy as np

from lcjax.convert import architectures
from lcjax.convert import params as convert_params
from lcjax.convert.hf_import import TOKENIZERS
from lcjax.convert.safetensors_io import DEFAULT_MAX_SHARD_SIZE, write_checkpoint
from lcjax.errors import ConvertError
from lcjax.models.config import ModelConfig

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def saved_model_config(gin_text: str, step: int) -> ModelConfig:
  """The ModelConfig of a checkpoint's saved gin text (of the stage that trained `step`, for a
  staged run). Parses it in the global gin config, which it leaves cleared: nothing parsed
  before survives, and nothing of the checkpoint's bindings leaks into later configs."""
  import gin

  import lcjax.eval.suite  # noqa: F401  (every configurable a run's gin text binds)
  import lcjax.models.allocation  # noqa: F401
  import lcjax.train.distributed  # noqa: F401
  from lcjax.run import Run, TrainConfig
  from lcjax.train import stages

  gin.clear_config()
  try:
    try:
      gin.parse_config(gin_text)
    except (ValueError, KeyError, SyntaxError, TypeError) as e:
      raise ConvertError(f"The gin config saved with checkpoint step {step} does not parse "
                         f"({str(e).splitlines()[0]}); nothing was written. Give the model's "
                         "--gin_file instead.") from e
    if not TrainConfig().stages:
      return ModelConfig()
    return stages.run_at(Run.from_gin(), step).model
  finally:
    gin.clear_config()


def _abstract_params(cfg: ModelConfig) -> dict:
  """The params' shapes and dtypes, placed on the default device (what a restore fills)."""
  import jax
  from flax import nnx

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device),
                      nnx.to_pure_dict(convert_params.abstract_params(cfg)))


def restore_params(workdir: str, step: int | None = None, cfg: ModelConfig | None = None):
  """(ModelConfig for inference, params on the default device, step) of checkpoint `step`
  (default: the newest) of `workdir`; the model from `cfg`, else the checkpoint's saved gin
  text. Restores only the params (a trained or an imported checkpoint)."""
  from lcjax.train.checkpoint import Checkpointer
  from lcjax.train.shapes import array_differences
  from lcjax.workdir import existing_workdir

  ckpt = Checkpointer(existing_workdir(workdir), every=1, keep=1, create=False)
  try:
    steps = ckpt.all_steps()
    step = ckpt.latest_step() if step is None else step
    if step not in steps:
      raise ConvertError(f"No checkpoint {'' if step is None else step} in {ckpt.directory} "
                         f"(available steps: {steps}); nothing was written.")
    if cfg is None:
      text = ckpt.config_of(step)
      if text is None:
        raise ConvertError(f"Checkpoint step {step} in {ckpt.directory} holds no gin config: "
                           "give the model's --gin_file.")
      cfg = saved_model_config(text, step)
    cfg = cfg.for_inference()  # the same parameters; HF has no training-only attention
    abstract = {"params": _abstract_params(cfg)}

    def check(saved):
      differences = array_differences({"params": saved.get("params", {})}, abstract)
      if differences:
        raise ConvertError(f"Checkpoint step {step} in {ckpt.directory} does not hold this "
                           f"model's parameters: {'. '.join(differences)}. Give the gin "
                           "files it was trained with.")

    params = ckpt.restore_part(step, abstract, check)["params"]
  finally:
    ckpt.close()
  return cfg, params, step


def export_hf(workdir: str, out: str, *, step: int | None = None, hf_class: str | None = None,
              dtype: str = "float32", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
              cfg: ModelConfig | None = None) -> list[str]:
  """Writes checkpoint `step` (default: the newest) of `workdir` to the new directory `out`
  as `hf_class` (default: the first architecture that can express the model), tensors in
  `dtype`. `cfg`: the model (default: from the checkpoint's saved gin text). Returns the file
  names written. ConvertError (nothing written) when it cannot be expressed or `out` is not
  new."""
  if dtype not in DTYPES:
    raise ConvertError(f"dtype={dtype!r}: export writes one of {sorted(DTYPES)}.")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConvertError(f"--out={out} exists and is not an empty directory; nothing was "
                       "written. Export to a new directory (no overwriting).")
  cfg, params, step = restore_params(workdir, step, cfg)
  arch = architectures.for_model(cfg, hf_class)
  pieces = arch.pieces(cfg)
  convert_params.check_pieces(cfg, pieces, arch.hf_class)
  config = {**arch.hf_config(cfg), "torch_dtype": dtype, "dtype": dtype}
  files = {"config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}
  for name in TOKENIZERS:
    path = os.path.join(workdir, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        files[name] = f.read()
  tensors = ((name, t.astype(DTYPES[dtype])) for name, t in convert_params.to_hf(pieces, params))
  return write_checkpoint(out, tensors, files, max_shard_size)
