"""Mamba2ForCausalLM: transformers' model and the imported lcjax one agree in logits and greedy
decoding; tensors and config.json round-trip; what lcjax cannot express is refused."""

import dataclasses
import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from lcjax.convert import mamba2  # noqa: E402
from lcjax.errors import ConvertError  # noqa: E402
from tests.convert import hf_parity as hp  # noqa: E402

ARCH = mamba2.ARCHITECTURE
# Every value away from transformers' default; the dt clamp cuts both ends of the perturbed dt.
HF_CONFIG = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=3, num_heads=8, head_dim=16, expand=2,
    state_size=16, n_groups=2, chunk_size=16, conv_kernel=3, layer_norm_epsilon=3e-5,
    time_step_limit=(0.05, 0.5), time_step_min=0.002, time_step_max=0.2, time_step_floor=2e-4,
    initializer_range=0.05)


def build(hf_config):
  return hp.build(ARCH, transformers.Mamba2ForCausalLM, transformers.Mamba2Config, hf_config)


@pytest.fixture(scope="module")
def pair():
  return build(HF_CONFIG)


def test_logits_match_transformers(pair):
  hp.check_logits(ARCH, pair, np.random.default_rng(1).integers(0, 256, (2, hp.SEQ)))


def test_tensors_round_trip_and_export_loads_in_transformers(pair):
  tokens = np.random.default_rng(3).integers(0, 256, (2, hp.SEQ))
  hp.check_round_trip_and_export(ARCH, pair, transformers.Mamba2ForCausalLM, tokens)


@pytest.mark.parametrize("clamp", [True, False])
def test_greedy_decoding_matches_generate(pair, clamp):
  """transformers' cached Mamba-2 step (`mamba2_selective_state_update`) skips time_step_limit,
  which its chunked forward applies: with a clamp, its reference is generate without the cache
  (every token through the full forward); without one, the cached generate."""
  prompt = np.random.default_rng(2).integers(0, 256, (2, hp.PROMPT))
  case = pair if clamp else build({**HF_CONFIG, "time_step_limit": (0.0, float("inf"))})
  hp.check_greedy(case, prompt, use_cache=not clamp)


def test_config_round_trips(pair):
  config = pair[1]
  imported = ARCH.model_config(config)
  assert imported.mamba.dt_limit == (0.05, 0.5) and imported.norm_eps == 3e-5
  assert imported.mamba.d_conv == 3 and imported.pattern == "MMM"
  assert not imported.tie_embeddings
  for c in (imported, dataclasses.replace(imported, tie_embeddings=True)):
    written = json.loads(json.dumps(ARCH.hf_config(c)))
    assert ARCH.model_config(written) == c
    transformers.Mamba2Config(**written)  # transformers accepts what lcjax writes


@pytest.mark.parametrize("change, match", [
    ({"use_bias": True}, "use_bias"),
    ({"num_heads": 4}, "4 x 16 = 64"),
    ({"use_conv_bias": False}, "use_conv_bias"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"norm_before_gate": True}, "norm_before_gate"),
    ({"d_mlp": 64}, "d_mlp"),
])
def test_refuses_what_lcjax_cannot_import(pair, change, match):
  with pytest.raises(ConvertError, match=match):
    ARCH.model_config({**pair[1], **change})


def test_refuses_hybrids_on_export(pair):
  cfg = pair[3][0]
  with pytest.raises(ConvertError, match="NemotronH"):
    ARCH.hf_config(dataclasses.replace(cfg, pattern="M-M"))
