"""NemotronHForCausalLM: a hybrid of all three mixers agrees with transformers in logits and
greedy decoding; tensors and config.json round-trip; what lcjax cannot express is refused."""

import dataclasses
import json

import jax
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from lcjax.convert import nemotron_h  # noqa: E402
from lcjax.errors import ConvertError  # noqa: E402
from lcjax.models.attention import AttentionConfig  # noqa: E402
from lcjax.models.mlp import MLPConfig  # noqa: E402
from tests.convert import hf_parity as hp  # noqa: E402

ARCH = nemotron_h.ARCHITECTURE
# Every value away from transformers' default; time_step_min (NemotronH's dt clamp) cuts the
# lower end of the perturbed dt.
HF_CONFIG = dict(
    vocab_size=256, hidden_size=64, layers_block_type=[
        "linear_attention", "full_attention", "linear_attention", "mlp", "linear_attention",
        "full_attention", "mlp"],
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
    mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16,
    conv_kernel=3, expand=2, layer_norm_epsilon=3e-5, time_step_min=0.05, time_step_max=0.2,
    time_step_floor=2e-4, initializer_range=0.05)


def build(hf_config):
  return hp.build(ARCH, transformers.NemotronHForCausalLM, transformers.NemotronHConfig,
                  hf_config)


@pytest.fixture(scope="module")
def pair():
  return build(HF_CONFIG)


@pytest.mark.slow  # ~20 s: two lcjax models compile (with and without the dt clamp)
def test_logits_match_transformers(pair):
  assert pair[3][0].pattern == "M*M-M*-"
  assert pair[3][0].mamba.dt_limit == (0.05, float("inf"))
  hp.check_logits(ARCH, pair, np.random.default_rng(1).integers(0, 256, (2, hp.SEQ)))


def test_tensors_round_trip_and_export_loads_in_transformers(pair):
  tokens = np.random.default_rng(3).integers(0, 256, (2, hp.SEQ))
  hp.check_round_trip_and_export(ARCH, pair, transformers.NemotronHForCausalLM, tokens)


def test_sharded_import_of_saved_checkpoint_equals_single_device(pair, tmp_path):
  """Through the CLI's reader (registry, safetensors, config.json as saved) onto 8 devices
  (fsdp x tensor): the Mamba-2 heads split over tensor."""
  from lcjax.convert.hf_import import read_hf
  from lcjax.parallel.mesh import MeshConfig, make_mesh
  from lcjax.parallel.sharding import DEFAULT_RULES

  pair[0].save_pretrained(tmp_path)
  cfg, single, hf_class = read_hf(str(tmp_path), dtype="float32")
  assert hf_class == nemotron_h.HF_CLASS and cfg == pair[3][0]
  mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  _, sharded, _ = read_hf(str(tmp_path), mesh=mesh, rules=DEFAULT_RULES, dtype="float32")
  in_x = sharded["blocks"][0]["mixer"]["in_x"]
  assert len(in_x.sharding.device_set) == 8 and not in_x.sharding.is_fully_replicated
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               single, sharded)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               single, pair[3][2])


@pytest.mark.slow  # ~15 s each: the hybrid's prefill and decode step compile
@pytest.mark.parametrize("clamp", [True, False])
def test_greedy_decoding_matches_generate(pair, clamp):
  """As Mamba2's (tests/convert/test_mamba2.py): transformers' cached step skips the dt clamp,
  so a clamped model is checked against generate without the cache, an unclamped one (a
  time_step_min below every dt) against the cached generate."""
  prompt = np.random.default_rng(2).integers(0, 256, (2, hp.PROMPT))
  case = pair if clamp else build({**HF_CONFIG, "time_step_min": 1e-7})
  hp.check_greedy(case, prompt, use_cache=not clamp)


def test_config_round_trips(pair):
  config = pair[1]
  imported = ARCH.model_config(config)
  assert imported.mlp == MLPConfig(hidden_dim=96, activation="relu2", gated=False)
  assert imported.attention.position_encoding == "none" and imported.mamba.d_conv == 3
  written = json.loads(json.dumps(ARCH.hf_config(imported)))
  assert ARCH.model_config(written) == imported
  assert transformers.NemotronHConfig(**written).hybrid_override_pattern == "M*M-M*-"
  # The legacy Megatron names read the same.
  legacy = {k: v for k, v in config.items() if k not in ("layers_block_type", "chunk_size")}
  legacy.update(hybrid_override_pattern="M*M-M*-", mamba_chunk_size=16)
  assert ARCH.model_config(legacy) == imported


@pytest.mark.parametrize("change, match", [
    ({"layers_block_type": ["linear_attention", "moe"]}, "MoE"),
    ({"hybrid_override_pattern": "M*E", "layers_block_type": None}, "MoE"),
    ({"use_bias": True}, "use_bias"),
    ({"mamba_num_heads": 6}, "6 x 16 = 96"),
    ({"expand": 3}, "3 \\* 64"),
    ({"mamba_hidden_act": "relu"}, "relu"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "attention_bias"),
    ({"sliding_window": 8}, "sliding_window"),
    ({"num_nextn_predict_layers": 1}, "num_nextn_predict_layers"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"rope_theta": 10000.0}, "rope_theta"),
])
def test_refuses_what_lcjax_cannot_import(pair, change, match):
  with pytest.raises(ConvertError, match=match):
    ARCH.model_config({**pair[1], **change})


@pytest.mark.parametrize("change, match", [
    ({"tie_embeddings": True}, "tied"),
    ({"mlp": MLPConfig(hidden_dim=96)}, "gated MLP"),
    ({"attention": AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16)}, "RoPE"),
    ({"attention": AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16,
                                   position_encoding="none", window=8)}, "window"),
    ({"attention": AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16,
                                   position_encoding="none", bias="qkv")}, "biases"),
])
def test_refuses_what_nemotron_h_cannot_express(pair, change, match):
  cfg = pair[3][0]
  with pytest.raises(ConvertError, match=match):
    ARCH.hf_config(dataclasses.replace(cfg, **change))


def test_refuses_a_dt_clamp_other_than_time_step_min(pair):
  cfg = pair[3][0]
  for dt_limit in ((0.0, float("inf")), (0.05, 1.0)):
    mamba = dataclasses.replace(cfg.mamba, dt_limit=dt_limit)
    with pytest.raises(ConvertError, match="dt_limit"):
      ARCH.hf_config(dataclasses.replace(cfg, mamba=mamba))
