"""What the converter's parity tests share: a transformers model with every parameter away
from its init (`perturb` knows Mamba-2's and the norms'), its tensors imported into lcjax, both
models' logits and greedy continuations, and the checks on them.

HF_HUB_OFFLINE keeps transformers on its pure-torch Mamba-2 path (mamba_ssm is not installed
and no hub kernel is requested).
"""

import dataclasses
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp  # noqa: E402  (after the environment is set)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from lcjax.convert.params import check_pieces, from_hf, to_hf  # noqa: E402
from lcjax.convert.safetensors_io import write_checkpoint  # noqa: E402
from lcjax.train.state import model_skeleton  # noqa: E402
from tests.numerics import F32, assert_close  # noqa: E402

torch.set_num_threads(1)

SEQ = 37  # not a multiple of the SSD chunk (16)
PROMPT, NEW = 21, 16


def perturb(model: torch.nn.Module, rng: np.random.Generator) -> None:
  """Every parameter that init leaves at a constant (A_log, D, dt_bias, norm weights, conv
  biases) drawn at random. dt_bias ~ N(-1.5, 1.5) puts softplus(dt) on both sides of the
  tests' dt clamps."""
  draws = {"A_log": lambda n: np.log(rng.uniform(1, 16, n)), "D": lambda n: rng.normal(1, .5, n),
           "dt_bias": lambda n: rng.normal(-1.5, 1.5, n),
           "norm.weight": lambda n: rng.uniform(.5, 1.5, n),
           "norm_f.weight": lambda n: rng.uniform(.5, 1.5, n),
           "conv1d.bias": lambda n: rng.normal(0, .3, n)}
  with torch.no_grad():
    for name, param in model.named_parameters():
      for suffix, draw in draws.items():
        if name.endswith(suffix):
          param.copy_(torch.as_tensor(draw(param.numel()).reshape(param.shape)))


def saved(model) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json, tensors) as save_pretrained writes them (the names on disk, which may not
  be the state_dict's: NemotronH saves "model." as "backbone.")."""
  with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    with open(os.path.join(d, "config.json")) as f:
      config = json.load(f)
    tensors = {}
    for name in sorted(os.listdir(d)):
      if name.endswith(".safetensors"):
        tensors.update(load_file(os.path.join(d, name)))
  return config, tensors


def build(arch, model_class, config_class, hf_config: dict, seed: int = 0):
  """(transformers model (eval, perturbed), its config.json, its tensors, `import_model`)."""
  torch.manual_seed(seed)
  hf = model_class(config_class(**hf_config)).eval()
  perturb(hf, np.random.default_rng(seed))
  config, tensors = saved(hf)
  return hf, config, tensors, import_model(arch, config, tensors)


def import_model(arch, config: dict, tensors: dict[str, np.ndarray]):
  """(cfg, pieces, params, lcjax model) of an HF checkpoint, in float32."""
  return import_as(arch, dataclasses.replace(arch.model_config(config), dtype="float32"),
                   tensors)


def import_as(arch, cfg, tensors: dict[str, np.ndarray]):
  """As `import_model`, into the model of `cfg` whatever the config.json says."""
  pieces = arch.pieces(cfg)
  check_pieces(cfg, pieces, arch.hf_class)

  def read(name, rows):
    return tensors[name] if rows is None else tensors[name][rows[0]:rows[1]]

  params = from_hf(cfg, pieces, read)
  graphdef, _ = model_skeleton(cfg)
  return cfg, pieces, params, nnx.merge(graphdef, nnx.State(params))


def check_logits(arch, pair, tokens: np.ndarray) -> None:
  """lcjax's logits are transformers' (F32), and the dt clamp is live (`assert_clamp_matters`)."""
  hf, _, tensors, (cfg, _, _, model) = pair
  want = hf_logits(hf, tokens)
  assert_close(lcjax_logits(model, tokens), want, F32, "logits")
  assert_clamp_matters(arch, cfg, tensors, tokens, want)


def check_round_trip_and_export(arch, pair, model_class, tokens: np.ndarray) -> None:
  """`to_hf` of the imported params gives back exactly the checkpoint's tensors, and the
  export (`hf_config`, safetensors) loads in transformers with the original's logits."""
  hf, _, tensors, (cfg, pieces, params, _) = pair
  back = dict(to_hf(pieces, params))
  assert set(back) == set(tensors)
  for name, value in back.items():
    np.testing.assert_array_equal(value, tensors[name], err_msg=name)
  config = json.dumps(arch.hf_config(cfg))  # as the exporter writes it: inf as Infinity
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "hf")
    write_checkpoint(out, back.items(), {"config.json": config})
    exported = model_class.from_pretrained(out).eval()
  assert_close(hf_logits(exported, tokens), hf_logits(hf, tokens), F32, "exported logits")


def check_greedy(pair, prompt: np.ndarray, *, use_cache: bool) -> None:
  """lcjax's prefill + decode steps continue `prompt` as transformers' greedy generate."""
  hf, _, _, (_, _, _, model) = pair
  want = hf_greedy(hf, prompt, NEW, use_cache=use_cache)
  np.testing.assert_array_equal(lcjax_greedy(model, prompt, NEW), want)


def assert_clamp_matters(arch, cfg, tensors, tokens, want) -> None:
  """The same tensors without the dt clamp give other logits than `want`: the model's clamp
  cuts some dt, so a converter that dropped it would fail the parity test."""
  mamba = dataclasses.replace(cfg.mamba, dt_limit=(0.0, float("inf")))
  model = import_as(arch, dataclasses.replace(cfg, mamba=mamba), tensors)[3]
  err = np.abs(lcjax_logits(model, tokens) - want).max() / np.abs(want).max()
  assert err > 1e-3, f"dt clamp inactive (relative change {err:.2g})"


@nnx.jit
def _forward(model, tokens):
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return model(tokens, jnp.ones_like(tokens), positions)


def lcjax_logits(model, tokens: np.ndarray) -> np.ndarray:
  return np.asarray(_forward(model, jnp.asarray(tokens, jnp.int32)))


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens), use_cache=False).logits.numpy()


@nnx.jit(static_argnums=2)
def _prefill(model, tokens, max_len):
  return model.prefill(tokens, model.init_cache(tokens.shape[0], max_len))


@nnx.jit
def _step(model, token, cache):
  return model.decode_step(token, cache)


def lcjax_greedy(model, prompt: np.ndarray, new: int) -> np.ndarray:
  """`[batch, new]` greedy tokens after `prompt` through prefill and decode steps."""
  logits, cache = _prefill(model, jnp.asarray(prompt, jnp.int32), prompt.shape[1] + new)
  token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  out = [token]
  for _ in range(new - 1):
    logits, cache = _step(model, token, cache)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out.append(token)
  return np.stack([np.asarray(t) for t in out], axis=1)


def hf_greedy(model, prompt: np.ndarray, new: int, **kwargs) -> np.ndarray:
  """transformers' greedy `generate` continuation (no end-of-sequence stop)."""
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  with torch.no_grad():
    out = model.generate(torch.as_tensor(prompt), attention_mask=torch.ones(prompt.shape,
                         dtype=torch.long), do_sample=False, max_new_tokens=new, **kwargs)
  return out[:, prompt.shape[1]:].numpy()
