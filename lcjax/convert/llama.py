"""Llama, Mistral and Qwen2 (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`):
one decoder, three config dialects.

A transformers layer is two lcjax blocks, "*-": input_layernorm is the attention block's norm,
post_attention_layernorm the MLP block's. The classes differ only in config.json:

  Llama    attention_bias (q/k/v/o biases: AttentionConfig.bias "qkvo"); mlp_bias refused.
  Mistral  sliding_window (AttentionConfig.window: both count the token itself).
  Qwen2    q/k/v biases always ("qkv"); its sliding window (use_sliding_window) is refused.

RoPE: transformers 5 writes `rope_parameters` ({"rope_type", "rope_theta", the scaling's keys,
maybe "partial_rotary_factor"}); older files have top-level `rope_theta` and `rope_scaling`
(with "type" or "rope_type"). Both are read, with transformers' precedence: `rope_scaling` over
`rope_parameters`, a theta inside the dict over the top-level one. `max_position_embeddings` is
neutral except where transformers' scaling reads it: dynamic NTK's original length, the default
`original_max_position_embeddings` of yarn/llama3/longrope and the default `factor` of
yarn/longrope; those values are copied into lcjax's `rope_scaling` so that its math is
transformers'.

The imported model computes in dtype "auto" (bfloat16 on accelerators, float32 on CPU);
config.json's `dtype` is the checkpoint's storage type, not a compute choice. Parity checks
set `ModelConfig.dtype = "float32"`.
"""

import dataclasses
from collections.abc import Callable

from lcjax.convert.hf_config import check_fields, require
from lcjax.convert.pieces import Architecture, Piece, heads_bias, heads_in, heads_out, linear
from lcjax.errors import ConfigError, ConvertError
from lcjax.models.attention import AttentionConfig
from lcjax.models.config import ModelConfig
from lcjax.models.mlp import ACTIVATIONS, MLPConfig
from lcjax.models.rope_scaling import ROPE_TYPES

_ORIG = "original_max_position_embeddings"
# Fields every class maps (or reads only through the RoPE scaling).
_COMMON = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "tie_word_embeddings",
    "initializer_range", "max_position_embeddings", "rope_parameters", "rope_scaling",
    "rope_theta", "partial_rotary_factor",
})


@dataclasses.dataclass(frozen=True)
class _Dialect:
  """What one class adds to the common decoder: its extra config.json fields, how they set
  AttentionConfig's window and bias, and the inverse (ConvertError when it cannot)."""
  hf_class: str
  model_type: str
  fields: frozenset[str]
  defaults: dict  # the config class's defaults that differ between the classes
  read: Callable[[dict], dict]  # config.json -> {"window": ..., "bias": ...}
  write: Callable[[AttentionConfig, int], dict]  # (attention, layers) -> its config.json fields


def _cannot(hf_class: str, what: str, fix: str) -> ConvertError:
  return ConvertError(f"{hf_class} cannot express {what}: {fix}.")


def _llama_read(c: dict) -> dict:
  require(c, "mlp_bias", (False,), "LlamaForCausalLM", default=False)
  # pretraining_tp is neutral: transformers 5 ignores it (the original code only split the
  # same matmuls into slices).
  return {"window": None, "bias": "qkvo" if c.get("attention_bias", False) else "none"}


def _llama_write(att: AttentionConfig, layers: int) -> dict:
  del layers
  if att.window is not None:
    raise _cannot("LlamaForCausalLM", f"a sliding window ({att.window})",
                  "that is MistralForCausalLM")
  if att.bias == "qkv":
    raise _cannot("LlamaForCausalLM", "q/k/v biases without an o bias",
                  "that is Qwen2ForCausalLM")
  return {"attention_bias": att.bias == "qkvo", "mlp_bias": False, "pretraining_tp": 1}


def _mistral_write(att: AttentionConfig, layers: int) -> dict:
  del layers
  if att.bias != "none":
    raise _cannot("MistralForCausalLM", f"attention biases (bias={att.bias!r})",
                  "Mistral has none (Llama: 'qkvo', Qwen2: 'qkv')")
  return {"sliding_window": att.window}


def _qwen2_read(c: dict) -> dict:
  require(c, "use_sliding_window", (False,), "Qwen2ForCausalLM", default=False)
  # With the sliding window off, sliding_window and max_window_layers are unused.
  types = c.get("layer_types") or []
  if any(t != "full_attention" for t in types):
    raise ConvertError(f"Qwen2ForCausalLM: config.json layer_types={types} is not supported "
                       f"(lcjax converts Qwen2 with full attention in every layer); nothing "
                       f"was written.")
  return {"window": None, "bias": "qkv"}


def _qwen2_write(att: AttentionConfig, layers: int) -> dict:
  if att.window is not None:
    raise _cannot("Qwen2ForCausalLM", f"a sliding window ({att.window})",
                  "lcjax exports windows as MistralForCausalLM")
  if att.bias != "qkv":
    raise _cannot("Qwen2ForCausalLM", f"bias={att.bias!r}", "Qwen2 has q/k/v biases only")
  return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": layers,
          "layer_types": ["full_attention"] * layers}


_DIALECTS = (
    _Dialect("LlamaForCausalLM", "llama",
             frozenset({"attention_bias", "mlp_bias", "pretraining_tp"}),
             {"max_position_embeddings": 2048}, _llama_read, _llama_write),
    _Dialect("MistralForCausalLM", "mistral", frozenset({"sliding_window"}),
             {"max_position_embeddings": 4096 * 32, "sliding_window": 4096},
             lambda c: {"window": c["sliding_window"], "bias": "none"}, _mistral_write),
    _Dialect("Qwen2ForCausalLM", "qwen2",
             frozenset({"use_sliding_window", "sliding_window", "max_window_layers",
                        "layer_types"}),
             {"max_position_embeddings": 32768, "num_key_value_heads": 32}, _qwen2_read,
             _qwen2_write),
)


def _rope_dict(c: dict, hf_class: str) -> dict:
  """config.json's RoPE settings as one flat dict, transformers' precedence (module doc)."""
  params = c.get("rope_scaling") or c.get("rope_parameters") or {}
  if any(isinstance(v, dict) for v in params.values()):
    raise ConvertError(f"{hf_class}: config.json has per-layer-type rope_parameters "
                       f"{sorted(params)}; lcjax converts one RoPE for all layers. Nothing was "
                       f"written.")
  params = dict(params)
  legacy_type = params.pop("type", None)
  params.setdefault("rope_type", legacy_type or "default")
  params.setdefault("rope_theta", c.get("rope_theta", 10000.0))
  params.setdefault("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
  return params


def _rope(c: dict, hf_class: str) -> tuple[float, dict | None]:
  """config.json -> (rope_theta, lcjax's rope_scaling): the values transformers' RoPE reads."""
  params = _rope_dict(c, hf_class)
  rope_type, theta = params.pop("rope_type"), float(params.pop("rope_theta"))
  if params.pop("partial_rotary_factor") != 1:
    # transformers' Llama/Mistral/Qwen2 rotate the whole head (apply_rotary_pos_emb).
    raise ConvertError(f"{hf_class}: config.json partial_rotary_factor != 1 is not supported "
                       f"(these classes rotate the whole head); nothing was written.")
  if rope_type not in ROPE_TYPES:
    raise ConvertError(f"{hf_class}: config.json rope type {rope_type!r} is not implemented "
                       f"by lcjax (it has {sorted(ROPE_TYPES)}); nothing was written.")
  if rope_type == "default":
    return theta, None
  max_positions = c["max_position_embeddings"]
  if rope_type in ("linear", "dynamic"):
    params.pop(_ORIG, None)  # transformers does not read it for these
  if rope_type == "dynamic":
    params[_ORIG] = max_positions
  if rope_type in ("yarn", "llama3", "longrope"):
    params.setdefault(_ORIG, max_positions)
  needs_factor = rope_type == "yarn" or (rope_type == "longrope"
                                         and params.get("attention_factor") is None)
  if needs_factor and params.get("factor") is None:
    params["factor"] = max_positions / params[_ORIG]
  return theta, {"rope_type": rope_type, **params}


def _attention(c: dict, dialect: _Dialect) -> AttentionConfig:
  heads = c["num_attention_heads"]
  theta, scaling = _rope(c, dialect.hf_class)
  return AttentionConfig(num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
                         head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                         rope_theta=theta, rope_scaling=scaling, **dialect.read(c))


def _model_config(config_json: dict, dialect: _Dialect) -> ModelConfig:
  check_fields(config_json, _COMMON | dialect.fields, dialect.hf_class)
  c = {**dialect.defaults, **config_json}  # a missing field means the class's default
  act = c.get("hidden_act", "silu")
  if act not in ACTIVATIONS:
    raise ConvertError(f"{dialect.hf_class}: config.json hidden_act={act!r} is not supported "
                       f"(lcjax has {sorted(ACTIVATIONS)}); nothing was written.")
  try:
    return ModelConfig(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"],
        pattern="*-" * c["num_hidden_layers"],
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        init_std=float(c.get("initializer_range", 0.02)),
        attention=_attention(c, dialect),
        mlp=MLPConfig(hidden_dim=c["intermediate_size"], activation=act, gated=True))
  except KeyError as e:
    raise ConvertError(f"{dialect.hf_class}: config.json misses {e.args[0]!r}; nothing was "
                       f"written.") from None
  except ConvertError:
    raise
  except ConfigError as e:
    raise ConvertError(f"{dialect.hf_class}: config.json does not give a valid lcjax model "
                       f"({e}); nothing was written.") from None


def _check_expressible(cfg: ModelConfig, hf_class: str) -> None:
  """ConvertError naming the first lcjax feature the Llama family lacks."""
  n = cfg.num_layers // 2
  att, mlp = cfg.attention, cfg.mlp
  problems = [
      (cfg.pattern != "*-" * n, f"pattern {cfg.pattern!r}", "it needs '*-' repeated (no Mamba "
       "layers)"),
      (att.position_encoding != "rope", "attention without RoPE", "set position_encoding='rope'"),
      (att.partial_rotary_factor != 1, f"partial_rotary_factor={att.partial_rotary_factor}",
       "its heads rotate whole"),
      (att.rope_dtype != "float32", f"rope_dtype={att.rope_dtype!r}", "it computes RoPE in "
       "float32"),
      (bool(att.sinks or att.anchor or att.max_distance),
       f"sinks={att.sinks}, anchor={att.anchor}, max_distance={att.max_distance}",
       "it has no attention sinks, anchor token or distance cap"),
      (not mlp.gated, "an ungated MLP", "it has gate_proj (MLPConfig.gated=True)"),
  ]
  for bad, what, fix in problems:
    if bad:
      raise _cannot(hf_class, what, fix)


def _rope_fields(att: AttentionConfig) -> dict:
  """lcjax's RoPE -> config.json's rope_parameters and max_position_embeddings (module doc)."""
  scaling = dict(att.rope_scaling or {"rope_type": "default"})
  rope_type = scaling["rope_type"]
  out = {"rope_parameters": {**scaling, "rope_theta": att.rope_theta}}
  orig = scaling.get(_ORIG)
  if rope_type == "dynamic":
    del out["rope_parameters"][_ORIG]  # transformers reads max_position_embeddings instead
    out["max_position_embeddings"] = orig
  elif orig is not None:
    factor = scaling.get("factor")
    out["max_position_embeddings"] = orig if factor is None else round(orig * factor)
  return out


def _hf_config(cfg: ModelConfig, dialect: _Dialect) -> dict:
  _check_expressible(cfg, dialect.hf_class)
  att, layers = cfg.attention, cfg.num_layers // 2
  # Token ids are the tokenizer's business: lcjax does not know them.
  return {
      "architectures": [dialect.hf_class], "model_type": dialect.model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp.hidden_dim, "num_hidden_layers": layers,
      "num_attention_heads": att.num_heads, "num_key_value_heads": att.num_kv_heads,
      "head_dim": att.head_dim, "hidden_act": cfg.mlp.activation, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
      "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
      "dtype": "float32", "attention_dropout": 0.0,
      **_rope_fields(att), **dialect.write(att, layers),
  }


def _attention_pieces(cfg: ModelConfig, block: str, layer: str) -> dict[str, Piece]:
  att, d = cfg.attention, cfg.d_model
  hd = att.head_dim
  out = {}
  for name, heads in (("q", att.num_heads), ("k", att.num_kv_heads), ("v", att.num_kv_heads)):
    out[f"{block}/mixer/{name}"] = heads_in(f"{layer}.self_attn.{name}_proj.weight", d, heads, hd)
    if att.bias != "none":
      out[f"{block}/mixer/{name}_bias"] = heads_bias(f"{layer}.self_attn.{name}_proj.bias",
                                                     heads, hd)
  out[f"{block}/mixer/o"] = heads_out(f"{layer}.self_attn.o_proj.weight", d, att.num_heads, hd)
  if att.bias == "qkvo":
    out[f"{block}/mixer/o_bias"] = Piece(f"{layer}.self_attn.o_proj.bias")
  out[f"{block}/norm/scale"] = Piece(f"{layer}.input_layernorm.weight")
  return out


def pieces(cfg: ModelConfig) -> dict[str, Piece]:
  """{lcjax path: Piece}, the HF names as transformers' state_dict has them."""
  out = {"embed/embedding": Piece("model.embed_tokens.weight"),
         "final_norm/scale": Piece("model.norm.weight")}
  if not cfg.tie_embeddings:
    out["lm_head"] = linear("lm_head.weight")
  for i in range(cfg.num_layers // 2):
    layer, mlp = f"model.layers.{i}", f"blocks/{2 * i + 1}"
    out.update(_attention_pieces(cfg, f"blocks/{2 * i}", layer))
    out[f"{mlp}/norm/scale"] = Piece(f"{layer}.post_attention_layernorm.weight")
    for name in ("gate", "up", "down"):
      out[f"{mlp}/mixer/{name}"] = linear(f"{layer}.mlp.{name}_proj.weight")
  return out


def _architecture(dialect: _Dialect) -> Architecture:
  return Architecture(dialect.hf_class, lambda c: _model_config(c, dialect),
                      lambda cfg: _hf_config(cfg, dialect), pieces)


ARCHITECTURES = [_architecture(d) for d in _DIALECTS]
