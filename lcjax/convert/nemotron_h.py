"""NemotronHForCausalLM (transformers' `modeling_nemotron_h`): NVIDIA's Megatron hybrids of
Mamba-2, attention without positions and plain squared-ReLU MLPs, one mixer per layer.

    layers_block_type  "linear_attention" / "full_attention" / "mlp"  ->  lcjax "M" / "*" / "-"
    backbone.embeddings.weight, backbone.layers.N.norm.weight, backbone.norm_f.weight,
    lm_head.weight
    backbone.layers.N.mixer.*   Mamba-2 as in `mamba2.py`; q/k/v/o_proj; up_proj, down_proj

The files say "backbone." (NVIDIA's checkpoints, and transformers' save_pretrained, which
renames its in-memory "model." back); from_pretrained reads them as "model.".

The Mamba-2 mixer clamps dt at (time_step_min, inf) in the forward pass (time_step_limit is
unused), its width is mamba_num_heads * mamba_head_dim (expand is unused). transformers never
ties lm_head to the embeddings here, whatever tie_word_embeddings says.
"""

from lcjax.convert import mamba2
from lcjax.convert import pieces as P
from lcjax.convert.hf_config import check_fields, require
from lcjax.convert.pieces import Architecture, Piece
from lcjax.errors import ConvertError
from lcjax.models.attention import AttentionConfig
from lcjax.models.config import ModelConfig
from lcjax.models.mlp import ACTIVATIONS, MLPConfig

HF_CLASS = "NemotronHForCausalLM"
_SYMBOLS = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
# Legacy (Megatron-export) names NemotronHConfig still reads, and the names it saves.
_ALIASES = {
    "mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min", "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit", "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias", "mamba_chunk_size": "chunk_size",
    "layer_types": "layers_block_type"}
# Fields the model reads only in MoE ("moe") or multi-token-prediction layers, both refused
# below, or not at all in its forward pass (time_step_limit, expand: see the module doc;
# mamba_ssm_cache_dtype, use_mamba_kernels, num_logits_to_keep, hidden_dropout,
# max_position_embeddings without RoPE; residual_in_fp32 and rescale_prenorm_residual as in
# Mamba2).
_NEUTRAL = frozenset({
    "n_routed_experts", "output_router_logits", "n_shared_experts", "moe_intermediate_size",
    "moe_shared_expert_intermediate_size", "moe_latent_size", "moe_shared_expert_overlap",
    "num_experts_per_tok", "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob",
    "mtp_layers_block_type", "mtp_hybrid_override_pattern", "time_step_limit",
    "mamba_ssm_cache_dtype", "use_mamba_kernels", "num_logits_to_keep", "hidden_dropout",
    "max_position_embeddings", "residual_in_fp32", "rescale_prenorm_residual", "auto_map",
    "num_hidden_layers"})
_FIELDS = mamba2.MAMBA_FIELDS | _NEUTRAL | {
    "vocab_size", "layers_block_type", "hybrid_override_pattern", "tie_word_embeddings",
    "num_attention_heads", "num_key_value_heads", "head_dim", "attention_bias", "sliding_window",
    "intermediate_size", "mlp_hidden_act", "mlp_bias", "ssm_state_size", "mamba_num_heads",
    "mamba_head_dim", "mamba_hidden_act", "mamba_proj_bias", "num_nextn_predict_layers",
    "layer_norm_epsilon"}


def _pattern(config: dict) -> str:
  """The lcjax pattern of layers_block_type (or the legacy hybrid_override_pattern)."""
  if config.get("layers_block_type") is not None:
    unknown = sorted(set(config["layers_block_type"]) - set(_SYMBOLS))
    if unknown:
      raise ConvertError(f"{HF_CLASS}: layers_block_type has unknown layer types {unknown}; "
                         f"nothing was written.")
    pattern = "".join(_SYMBOLS[t] for t in config["layers_block_type"])
  else:
    pattern = config.get("hybrid_override_pattern", "")
  if "E" in pattern:
    raise ConvertError(f"{HF_CLASS}: the layer pattern {pattern!r} has MoE layers ('moe', "
                       f"'E'), which lcjax does not have; nothing was written.")
  if not pattern or set(pattern) - set("M*-"):
    raise ConvertError(f"{HF_CLASS}: the layer pattern {pattern!r} is empty or has symbols "
                       f"other than 'M', '*', '-' (set layers_block_type); nothing was written.")
  return pattern


def _refusals(config: dict) -> None:
  """ConvertError on the fields whose non-default values lcjax does not compute."""
  for key, allowed, default in (
      ("tie_word_embeddings", (False,), False), ("attention_bias", (False,), False),
      ("mlp_bias", (False,), False), ("mamba_proj_bias", (False,), False),
      ("sliding_window", (None,), None), ("num_nextn_predict_layers", (0,), 0)):
    require(config, key, allowed, HF_CLASS, default=default)
  act = config.get("mlp_hidden_act", "relu2")
  if act not in ACTIVATIONS:
    raise ConvertError(f"{HF_CLASS}: mlp_hidden_act={act!r} is not one of lcjax's MLP "
                       f"activations {sorted(ACTIVATIONS)}; nothing was written.")


def model_config(config: dict) -> ModelConfig:
  """NemotronHConfig (config.json) -> ModelConfig; ConvertError on what lcjax cannot express."""
  config = {_ALIASES.get(k, k): v for k, v in config.items()}
  check_fields(config, _FIELDS, HF_CLASS)
  pattern = _pattern(config)
  _refusals(config)
  dt_min = mamba2.json_float(config.get("time_step_min", 0.001))
  mamba = mamba2.mamba_from_hf(
      config, HF_CLASS, heads=config.get("mamba_num_heads", 128),
      head_dim=config.get("mamba_head_dim", 64), d_state=config.get("ssm_state_size", 128),
      act=config.get("mamba_hidden_act", "silu"), dt_limit=(dt_min, mamba2.INF))
  heads = config.get("num_attention_heads", 32)
  attention = AttentionConfig(
      num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
      head_dim=config.get("head_dim", 128), position_encoding="none")
  mlp = MLPConfig(hidden_dim=config.get("intermediate_size", 21504),
                  activation=config.get("mlp_hidden_act", "relu2"), gated=False)
  return mamba2.build_model_config(
      HF_CLASS, vocab_size=config.get("vocab_size", 131072), d_model=config["hidden_size"],
      pattern=pattern, tie_embeddings=False,
      norm_eps=mamba2.json_float(config.get("layer_norm_epsilon", 1e-5)),
      init_std=mamba2.json_float(config.get("initializer_range", 0.02)), mamba=mamba,
      attention=attention, mlp=mlp)


def _inexpressible(cfg: ModelConfig) -> list[str]:
  """Why NemotronHForCausalLM cannot compute `cfg` (the mixers the pattern uses only)."""
  a, m, reasons = cfg.attention, cfg.mamba, []
  if cfg.tie_embeddings:
    reasons.append("tied embeddings (transformers' NemotronH never ties lm_head): set "
                   "ModelConfig.tie_embeddings=False")
  if "*" in cfg.pattern:
    if a.position_encoding != "none":
      reasons.append("RoPE attention (NemotronH attends without positions)")
    if a.window is not None or a.sinks or a.anchor:
      reasons.append("a sliding window, sinks or an anchor in attention")
    if a.bias != "none":
      reasons.append(f"attention biases (bias={a.bias!r})")
  if "-" in cfg.pattern and cfg.mlp.gated:
    reasons.append("a gated MLP (NemotronH's is down(act(up(x)))): MLPConfig.gated=False")
  if "M" in cfg.pattern and m.dt_limit != (m.dt_min, mamba2.INF):
    reasons.append(f"MambaConfig.dt_limit={m.dt_limit} (NemotronH clamps dt at "
                   f"(time_step_min, inf) with time_step_min = dt_min = {m.dt_min})")
  return reasons


def hf_config(cfg: ModelConfig) -> dict:
  """ModelConfig -> NemotronHConfig's config.json; ConvertError naming what it cannot express."""
  reasons = _inexpressible(cfg)
  if reasons:
    raise ConvertError(f"{HF_CLASS} cannot express this model: {'; '.join(reasons)}.")
  a, m = cfg.attention, cfg.mamba
  types = {s: t for t, s in _SYMBOLS.items()}
  return {
      "architectures": [HF_CLASS], "model_type": "nemotron_h", "vocab_size": cfg.vocab_size,
      "layers_block_type": [types[s] for s in cfg.pattern], "tie_word_embeddings": False,
      "layer_norm_epsilon": cfg.norm_eps, "initializer_range": cfg.init_std,
      "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads,
      "head_dim": a.head_dim, "attention_bias": False, "sliding_window": None,
      "intermediate_size": cfg.mlp.hidden_dim, "mlp_hidden_act": cfg.mlp.activation,
      "mlp_bias": False, "ssm_state_size": m.d_state, "mamba_num_heads": m.nheads(cfg.d_model),
      "mamba_head_dim": m.headdim, "mamba_hidden_act": "silu", "mamba_proj_bias": False,
      "time_step_limit": [m.dt_min, mamba2.INF], "num_nextn_predict_layers": 0,
      "dtype": "float32", **mamba2.mamba_to_hf(cfg)}


def pieces(cfg: ModelConfig) -> dict[str, Piece]:
  out = mamba2.trunk_pieces(cfg, "backbone")
  a, d = cfg.attention, cfg.d_model
  for i, symbol in enumerate(cfg.pattern):
    block, hf = f"blocks/{i}/mixer", f"backbone.layers.{i}.mixer"
    if symbol == "M":
      out.update(mamba2.mixer_pieces(block, hf, cfg))
    elif symbol == "*":
      for name, heads in (("q", a.num_heads), ("k", a.num_kv_heads), ("v", a.num_kv_heads)):
        out[f"{block}/{name}"] = P.heads_in(f"{hf}.{name}_proj.weight", d, heads, a.head_dim)
      out[f"{block}/o"] = P.heads_out(f"{hf}.o_proj.weight", d, a.num_heads, a.head_dim)
    else:
      out[f"{block}/up"] = P.linear(f"{hf}.up_proj.weight")
      out[f"{block}/down"] = P.linear(f"{hf}.down_proj.weight")
  return out


ARCHITECTURE = Architecture(HF_CLASS, model_config, hf_config, pieces)
