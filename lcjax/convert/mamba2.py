"""Mamba2ForCausalLM (transformers' `modeling_mamba2`), and the Mamba-2 mixer's tensors and
config fields that NemotronH (`nemotron_h.py`) shares.

    backbone.embeddings.weight            embed/embedding
    backbone.layers.N.norm.weight         blocks/N/norm/scale
    backbone.layers.N.mixer.in_proj       rows [z | x | B | C | dt]: in_z, in_x, in_B, in_C, in_dt
    backbone.layers.N.mixer.conv1d        channels [x | B | C]: conv_x, conv_B, conv_C (+ _bias)
    backbone.layers.N.mixer.{A_log, D, dt_bias, norm.weight, out_proj.weight}
    backbone.norm_f.weight                final_norm/scale
    lm_head.weight                        lm_head (absent when tie_word_embeddings)

transformers sizes in_proj as d_inner + conv_dim + num_heads with conv_dim = d_inner +
2 * n_groups * state_size: mamba_ssm's optional d_mlp part does not exist there. Its gated norm
is `norm_before_gate=False` with group size d_inner / n_groups, as lcjax's `gated_rms_norm`.
"""

from lcjax.convert import pieces as P
from lcjax.convert.hf_config import check_fields, require
from lcjax.convert.pieces import Architecture, Piece
from lcjax.errors import ConfigError, ConvertError
from lcjax.models.config import ModelConfig
from lcjax.models.mamba import MambaConfig

HF_CLASS = "Mamba2ForCausalLM"
INF = float("inf")

# Mamba2Config fields that do not change a float32 forward pass: residual_in_fp32 only rounds
# the residual stream in lower precisions, rescale_prenorm_residual and time_step_init_scheme
# are init, time_step_rank is unused by the model.
_NEUTRAL = frozenset({"residual_in_fp32", "rescale_prenorm_residual", "time_step_init_scheme",
                      "time_step_rank"})
# The fields `mamba_from_hf` reads, under Mamba2Config's names.
MAMBA_FIELDS = frozenset({
    "hidden_size", "expand", "conv_kernel", "n_groups", "chunk_size", "use_bias",
    "use_conv_bias", "time_step_min", "time_step_max", "time_step_floor"})
_FIELDS = MAMBA_FIELDS | _NEUTRAL | {
    "vocab_size", "num_hidden_layers", "layer_norm_epsilon", "tie_word_embeddings",
    "num_heads", "head_dim", "state_size", "hidden_act", "time_step_limit", "rms_norm",
    "norm_before_gate"}


def json_float(value) -> float:
  """A float of config.json: a number, or transformers' `{"__float__": "Infinity"}` for the
  values JSON has no literal for."""
  if isinstance(value, dict) and set(value) == {"__float__"}:
    return float(value["__float__"])
  return float(value)


def mamba_from_hf(config: dict, hf_class: str, *, heads: int, head_dim: int, d_state: int,
                  act: str, dt_limit: tuple[float, float]) -> MambaConfig:
  """The MambaConfig of a config.json's Mamba-2 fields (MAMBA_FIELDS, plus the values the
  architecture reads under its own names); ConvertError when lcjax's mixer cannot express them.
  """
  hidden, expand = config["hidden_size"], config.get("expand", 2)
  if not isinstance(expand, int) or expand * hidden != heads * head_dim:
    raise ConvertError(
        f"{hf_class}: the Mamba-2 heads are {heads} x {head_dim} = {heads * head_dim} channels, "
        f"but lcjax's mixer has expand * hidden_size = {expand} * {hidden} channels (an integer "
        f"expand): config.json's head count or head dim does not fit; nothing was written.")
  if act != "silu":
    raise ConvertError(f"{hf_class}: the Mamba-2 activation {act!r} is not supported (lcjax's "
                       f"mixer uses silu after the conv); nothing was written.")
  require(config, "use_bias", (False,), hf_class, default=False)
  require(config, "use_conv_bias", (True,), hf_class, default=True)
  return MambaConfig(
      d_state=d_state, d_conv=config.get("conv_kernel", 4), expand=expand, headdim=head_dim,
      ngroups=config.get("n_groups", 8), chunk_size=config.get("chunk_size", 256),
      dt_min=json_float(config.get("time_step_min", 0.001)),
      dt_max=json_float(config.get("time_step_max", 0.1)),
      dt_init_floor=json_float(config.get("time_step_floor", 1e-4)), dt_limit=dt_limit)


def mamba_to_hf(cfg: ModelConfig) -> dict:
  """MAMBA_FIELDS of `cfg`'s Mamba-2 mixer, under Mamba2Config's names."""
  m = cfg.mamba
  return {"hidden_size": cfg.d_model, "expand": m.expand, "conv_kernel": m.d_conv,
          "n_groups": m.ngroups, "chunk_size": m.chunk_size, "use_bias": False,
          "use_conv_bias": True, "time_step_min": m.dt_min, "time_step_max": m.dt_max,
          "time_step_floor": m.dt_init_floor}


def build_model_config(hf_class: str, **fields) -> ModelConfig:
  """ModelConfig(**fields), its own validation errors reported as the checkpoint's."""
  try:
    return ModelConfig(**fields)
  except ConfigError as e:
    raise ConvertError(f"{hf_class}: config.json does not give a valid lcjax model: {e} "
                       f"Nothing was written.") from e


def mixer_pieces(block: str, hf: str, cfg: ModelConfig) -> dict[str, Piece]:
  """The Pieces of a Mamba-2 mixer: lcjax path prefix `block` ("blocks/3/mixer"), HF module
  `hf` ("backbone.layers.3.mixer")."""
  m = cfg.mamba
  inner, heads, bc = m.d_inner(cfg.d_model), m.nheads(cfg.d_model), m.ngroups * m.d_state
  out = {}
  start = 0
  for part, width in (("z", inner), ("x", inner), ("B", bc), ("C", bc), ("dt", heads)):
    out[f"{block}/in_{part}"] = P.linear(f"{hf}.in_proj.weight", (start, start + width))
    start += width
  start = 0
  for part, width in (("x", inner), ("B", bc), ("C", bc)):
    rows = (start, start + width)
    out[f"{block}/conv_{part}"] = P.conv(f"{hf}.conv1d.weight", rows, m.d_conv)
    out[f"{block}/conv_{part}_bias"] = Piece(f"{hf}.conv1d.bias", rows)
    start += width
  for name in ("A_log", "D", "dt_bias"):
    out[f"{block}/{name}"] = Piece(f"{hf}.{name}")
  out[f"{block}/norm_scale"] = Piece(f"{hf}.norm.weight")
  out[f"{block}/out"] = P.linear(f"{hf}.out_proj.weight")
  return out


def trunk_pieces(cfg: ModelConfig, prefix: str) -> dict[str, Piece]:
  """The Pieces outside the mixers, the same in both architectures: embeddings, each block's
  pre-norm, norm_f and the untied head, under the HF base model `prefix` ("backbone")."""
  out = {"embed/embedding": Piece(f"{prefix}.embeddings.weight"),
         "final_norm/scale": Piece(f"{prefix}.norm_f.weight")}
  for i in range(cfg.num_layers):
    out[f"blocks/{i}/norm/scale"] = Piece(f"{prefix}.layers.{i}.norm.weight")
  if not cfg.tie_embeddings:
    out["lm_head"] = P.linear("lm_head.weight")
  return out


def model_config(config: dict) -> ModelConfig:
  """Mamba2Config (config.json) -> ModelConfig; ConvertError on what lcjax cannot express."""
  check_fields(config, _FIELDS, HF_CLASS)
  require(config, "rms_norm", (True,), HF_CLASS, default=True)
  # transformers' Mamba2 always gates before the norm (norm_before_gate=False) whatever this says;
  # a checkpoint trained with True is not what transformers (or lcjax) computes.
  require(config, "norm_before_gate", (False,), HF_CLASS, default=False)
  lo, hi = (json_float(v) for v in config.get("time_step_limit", (0.0, INF)))
  mamba = mamba_from_hf(config, HF_CLASS, heads=config.get("num_heads", 128),
                        head_dim=config.get("head_dim", 64), d_state=config.get("state_size", 128),
                        act=config.get("hidden_act", "silu"), dt_limit=(lo, hi))
  return build_model_config(
      HF_CLASS, vocab_size=config.get("vocab_size", 32768), d_model=config["hidden_size"],
      pattern="M" * config.get("num_hidden_layers", 64),
      tie_embeddings=config.get("tie_word_embeddings", False),
      norm_eps=json_float(config.get("layer_norm_epsilon", 1e-5)),
      init_std=json_float(config.get("initializer_range", 0.1)), mamba=mamba)


def hf_config(cfg: ModelConfig) -> dict:
  """ModelConfig -> Mamba2Config's config.json; ConvertError unless every block is Mamba-2."""
  if set(cfg.pattern) != {"M"}:
    raise ConvertError(
        f"Mamba2ForCausalLM has only Mamba-2 blocks; the pattern {cfg.pattern!r} has others: "
        f"export it as NemotronHForCausalLM (Mamba-2, attention without RoPE, plain MLP).")
  m = cfg.mamba
  return {
      "architectures": [HF_CLASS], "model_type": "mamba2", "vocab_size": cfg.vocab_size,
      "num_hidden_layers": cfg.num_layers, "layer_norm_epsilon": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
      "num_heads": m.nheads(cfg.d_model), "head_dim": m.headdim, "state_size": m.d_state,
      "hidden_act": "silu", "time_step_limit": [float(v) for v in m.dt_limit],
      "residual_in_fp32": True, "rescale_prenorm_residual": False, "dtype": "float32",
      **mamba_to_hf(cfg)}


def pieces(cfg: ModelConfig) -> dict[str, Piece]:
  out = trunk_pieces(cfg, "backbone")
  for i in range(cfg.num_layers):
    out.update(mixer_pieces(f"blocks/{i}/mixer", f"backbone.layers.{i}.mixer", cfg))
  return out


ARCHITECTURE = Architecture(HF_CLASS, model_config, hf_config, pieces)
