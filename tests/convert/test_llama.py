"""Llama, Mistral and Qwen2 against transformers: logits and greedy generation after import,
tensors back byte for byte, the export loading in transformers, config.json both ways,
refusals."""

import dataclasses
import json

import pytest

from lcjax.convert import llama
from lcjax.errors import ConvertError
from lcjax.models.attention import AttentionConfig
from lcjax.models.config import ModelConfig
from lcjax.models.mlp import MLPConfig
from tests.numerics import F32, assert_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tests.convert import hf_parity  # noqa: E402  (imports torch)

ARCH = {a.hf_class: a for a in llama.ARCHITECTURES}
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2"}
# Logits against transformers float32: F32 (seen <= 4.2e-7 relative to the largest logit; a
# case without its RoPE scaling is off by >= 1.8e-2).
SEQ, PROMPT = 37, 11
BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, intermediate_size=96, rms_norm_eps=1e-5, initializer_range=0.05,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
# rotary dim 16: 8 pairs. Original lengths below SEQ and below PROMPT + hf_parity.NEW (16 new
# tokens) where the scaling reads the current length, so dynamic and longrope switch to their
# long-context branch while decoding.
ROPES = {
    "none": ({"rope_type": "default", "rope_theta": 5000.0}, {}),
    "linear": ({"rope_type": "linear", "factor": 3.0, "rope_theta": 5000.0}, {}),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.5, "rope_theta": 5000.0},
                {"max_position_embeddings": 16}),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
              "rope_theta": 5000.0}, {"max_position_embeddings": 1024}),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                "rope_theta": 5000.0}, {}),
    # no factor: transformers derives it from max_position_embeddings / original (4)
    "longrope": ({"rope_type": "longrope", "original_max_position_embeddings": 16,
                  "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                  "long_factor": [1.0, 1.5, 2.2, 3.0, 4.5, 6.0, 8.0, 11.0],
                  "rope_theta": 5000.0}, {"max_position_embeddings": 64}),
}
# (case id, class, its config fields, rope, generate too)
CASES = [
    ("llama", "LlamaForCausalLM", {}, "none", True),
    ("llama-tied", "LlamaForCausalLM", {"tie_word_embeddings": True}, "linear", False),
    ("mistral-window", "MistralForCausalLM", {"sliding_window": 8}, "dynamic", True),
    ("qwen2", "Qwen2ForCausalLM", {"hidden_act": "gelu_pytorch_tanh"}, "longrope", True),
    ("llama-bias", "LlamaForCausalLM", {"attention_bias": True}, "llama3", False),
    ("llama-yarn", "LlamaForCausalLM", {}, "yarn", True),
]


def build(hf_class: str, fields: dict, rope: str, rng):
  """hf_parity's pair for a transformers model with every parameter random (norm weights
  around 1 by `hf_parity.perturb`, biases here), saved and imported."""
  rope_parameters, rope_fields = ROPES[rope]
  config = transformers.AutoConfig.for_model(
      MODEL_TYPES[hf_class], **BASE, **fields, **rope_fields,
      rope_parameters=dict(rope_parameters))
  torch.manual_seed(int(rng.integers(1 << 30)))
  hf = getattr(transformers, hf_class)(config).eval()
  hf_parity.perturb(hf, rng)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("bias"):
        p.copy_(torch.as_tensor(rng.normal(0, 0.3, p.shape)))
  config_json, tensors = hf_parity.saved(hf)
  return hf, config_json, tensors, hf_parity.import_model(ARCH[hf_class], config_json, tensors)


@pytest.mark.parametrize("case, hf_class, fields, rope, generate", CASES,
                         ids=[c[0] for c in CASES])
def test_matches_transformers(rng, case, hf_class, fields, rope, generate):
  """Import: logits, tensors back byte for byte (a tied lm_head is not saved), greedy decoding
  (prompt + new tokens cross the window and the original lengths); export: config.json maps
  back to the same ModelConfig and the files load in transformers as the same model."""
  arch = ARCH[hf_class]
  pair = build(hf_class, fields, rope, rng)
  hf, _, _, (cfg, _, _, model) = pair
  tokens = rng.integers(0, cfg.vocab_size, (2, SEQ))
  assert_close(hf_parity.lcjax_logits(model, tokens), hf_parity.hf_logits(hf, tokens), F32,
               f"{case}: logits")
  hf_parity.check_round_trip_and_export(arch, pair, getattr(transformers, hf_class), tokens[:1])
  assert arch.model_config(arch.hf_config(cfg)) == dataclasses.replace(cfg, dtype="auto")
  if generate:
    hf_parity.check_greedy(pair, tokens[:, :PROMPT], use_cache=True)


ROUND_TRIPS = [
    ModelConfig(vocab_size=300, d_model=96, pattern="*-" * 3, tie_embeddings=False,
                norm_eps=1e-5, init_std=0.03,
                attention=AttentionConfig(num_heads=6, num_kv_heads=3, head_dim=32,
                                          rope_theta=123.0, window=7),
                mlp=MLPConfig(hidden_dim=100, activation="gelu")),
    ModelConfig(pattern="*-", attention=AttentionConfig(bias="qkv", rope_scaling={
        "rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 100})),
    ModelConfig(pattern="*-*-", attention=AttentionConfig(bias="qkvo", rope_scaling={
        "rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 64,
        "beta_fast": 16, "truncate": False, "mscale": 1.0, "mscale_all_dim": 0.5})),
    ModelConfig(pattern="*-", attention=AttentionConfig(head_dim=8, rope_scaling={
        "rope_type": "longrope", "attention_factor": 1.2, "original_max_position_embeddings": 8,
        "short_factor": [1.0, 2.0, 2.5, 3.0], "long_factor": [3.0, 4.0, 5.0, 6.5]})),
]


@pytest.mark.parametrize("cfg, first", zip(ROUND_TRIPS, ["MistralForCausalLM",
    "Qwen2ForCausalLM", "LlamaForCausalLM", "LlamaForCausalLM"]),
                         ids=["mistral", "qwen2", "llama", "longrope"])
def test_config_round_trip(cfg, first):
  """ModelConfig -> config.json (through JSON) -> ModelConfig is exact through every class
  that expresses the model; the first of them (the exporter's choice) is the expected one.
  A model without window and biases is also a Mistral (sliding_window null)."""
  fits = []
  for arch in llama.ARCHITECTURES:
    try:
      config_json = json.loads(json.dumps(arch.hf_config(cfg)))
    except ConvertError:
      continue
    fits.append(arch.hf_class)
    assert arch.model_config(config_json) == cfg
  assert fits and fits[0] == first, fits


def test_reads_a_released_config():
  """Llama-3.1-8B's config.json fields (transformers 4.x form: top-level rope_theta and
  rope_scaling), sizes made tiny: every field is mapped or neutral."""
  config = {
      "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
      "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 64,
      "initializer_range": 0.02, "intermediate_size": 96, "max_position_embeddings": 131072,
      "mlp_bias": False, "model_type": "llama", "num_attention_heads": 4,
      "num_hidden_layers": 2, "num_key_value_heads": 2, "pretraining_tp": 1,
      "rms_norm_eps": 1e-05, "rope_scaling": {
          "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
      "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 256}
  cfg = ARCH["LlamaForCausalLM"].model_config(config)
  assert cfg.pattern == "*-*-" and cfg.attention.head_dim == 16 and cfg.norm_eps == 1e-5
  assert cfg.attention.rope_theta == 500000.0 and cfg.attention.bias == "none"
  assert cfg.attention.rope_scaling == config["rope_scaling"]


def test_reads_both_rope_forms():
  """Older files: top-level rope_theta and rope_scaling (with "type"), which wins over
  rope_parameters as in transformers; a missing original length is max_position_embeddings."""
  base = {**BASE, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
  old = llama.ARCHITECTURES[0].model_config(
      {**base, "rope_theta": 321, "max_position_embeddings": 50,
       "rope_parameters": {"rope_type": "linear", "factor": 9.0},
       "rope_scaling": {"type": "yarn", "factor": 2.0}})
  assert old.attention.rope_theta == 321.0
  assert old.attention.rope_scaling == {"rope_type": "yarn", "factor": 2.0,
                                        "original_max_position_embeddings": 50}
  for legacy in (True, False):
    rope = {"type" if legacy else "rope_type": "dynamic", "factor": 2.0, "rope_theta": 7.0}
    key = "rope_scaling" if legacy else "rope_parameters"
    cfg = llama.ARCHITECTURES[0].model_config({**base, key: rope,
                                               "max_position_embeddings": 40})
    assert cfg.attention.rope_theta == 7.0
    assert cfg.attention.rope_scaling == {"rope_type": "dynamic", "factor": 2.0,
                                          "original_max_position_embeddings": 40}




@pytest.mark.parametrize("hf_class, fields, message", [
    ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "proportional", "rope_theta": 1.0}},
     "'proportional'"),
    ("LlamaForCausalLM", {"rope_scaling": {"type": "su", "factor": 2.0}}, "'su'"),
    ("LlamaForCausalLM", {"mlp_bias": True}, "mlp_bias=True"),
    ("LlamaForCausalLM", {"qk_layernorm": True}, "qk_layernorm"),
    ("LlamaForCausalLM", {"hidden_act": "gelu_new"}, "gelu_new"),
    ("LlamaForCausalLM", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                              "rope_theta": 1e4, "low_freq_factor": 1.0}},
     "low_freq_factor"),
    ("MistralForCausalLM", {"attention_bias": True}, "attention_bias"),
    ("Qwen2ForCausalLM", {"use_sliding_window": True}, "use_sliding_window=True"),
    ("Qwen2ForCausalLM", {"layer_types": ["full_attention", "sliding_attention"]},
     "layer_types"),
    ("LlamaForCausalLM", {"num_hidden_layers": None}, "num_hidden_layers"),  # None: absent
])
def test_import_refuses(hf_class, fields, message):
  config = {**BASE, "architectures": [hf_class], "model_type": MODEL_TYPES[hf_class], **fields}
  config = {k: v for k, v in config.items() if v is not None or k not in fields}
  with pytest.raises(ConvertError, match=message):
    ARCH[hf_class].model_config(config)


@pytest.mark.parametrize("hf_class, cfg, message", [
    ("LlamaForCausalLM", ModelConfig(pattern="*-M-"), "pattern"),
    ("LlamaForCausalLM", ModelConfig(pattern="*-*"), "pattern"),
    ("LlamaForCausalLM", ModelConfig(pattern="*-", mlp=MLPConfig(gated=False)), "ungated"),
    ("LlamaForCausalLM", ModelConfig(pattern="*-", attention=AttentionConfig(
        position_encoding="none")), "without RoPE"),
    ("MistralForCausalLM", ModelConfig(pattern="*-", attention=AttentionConfig(
        window=4, sinks=1)), "sinks"),
    ("LlamaForCausalLM", ModelConfig(pattern="*-", attention=AttentionConfig(window=4)),
     "MistralForCausalLM"),
    ("LlamaForCausalLM", ModelConfig(pattern="*-", attention=AttentionConfig(bias="qkv")),
     "Qwen2ForCausalLM"),
    ("Qwen2ForCausalLM", ModelConfig(pattern="*-"), "bias='none'"),
    ("LlamaForCausalLM", ModelConfig(pattern="*-", attention=AttentionConfig(
        partial_rotary_factor=0.5)), "partial_rotary_factor"),
])
def test_export_refuses(hf_class, cfg, message):
  with pytest.raises(ConvertError, match=message):
    ARCH[hf_class].hf_config(cfg)
