"""`python -m lcjax.convert` on a tiny random transformers Llama: import -> the same logits ->
export -> `from_pretrained` gives them back; refusals as one paragraph; and the README's path
(import, fine-tune longer with a RoPE scaling, evaluate, export) end to end.

Every command runs as a real CLI in a fresh interpreter (each spends a few seconds importing).
"""

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402  (after the skips)

from lcjax.convert.hf_export import restore_params  # noqa: E402
from lcjax.convert.safetensors_io import INDEX  # noqa: E402
from lcjax.train.state import model_skeleton  # noqa: E402
from tests.convert import hf_parity  # noqa: E402  (torch threads: 1)
from tests.numerics import assert_close  # noqa: E402
from tests.train.runs import REPO  # noqa: E402

PARITY = 1e-4  # transformers float32 against lcjax float32 (as tests/convert/test_llama.py)
SEQ = 37
# vocab 320 > the byte vocabulary's 259 ids, so the demo data trains it.
CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=320, intermediate_size=96, rms_norm_eps=1e-5, max_position_embeddings=64,
              rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
              tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
DATA = [f"--gin_file={os.path.join(REPO, 'configs', f)}"
        for f in ("data/demo.gin", "train/cpu_short.gin", "mesh/single.gin")]
TINY_RUN = ["MqarConfig.num_pairs = 8", "MqarConfig.num_queries = 4", "TrainConfig.steps = 3",
            "TrainConfig.batch_size = 8", "TrainConfig.log_every = 1",
            "TrainConfig.eval_every = 3", "TrainConfig.checkpoint_every = 3",
            "TrainConfig.eval_batches = 1", "OptimConfig.warmup_steps = 1",
            "PplByPosition.documents = 2"]


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert out.returncode == 0, out.stdout + out.stderr
  return out


def one_paragraph(out: subprocess.CompletedProcess, *expected: str) -> str:
  assert out.returncode == 2, out.stdout + out.stderr
  assert "Traceback" not in out.stderr, out.stderr
  errors = [line for line in out.stderr.splitlines() if line.startswith("Error: ")]
  assert len(errors) == 1, out.stderr
  for text in expected:
    assert text in errors[0], errors[0]
  return errors[0]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """(a random transformers Llama, float32, norms away from 1; its save_pretrained dir)."""
  config = transformers.LlamaConfig(**CONFIG)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.3 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("hf") / "llama"
  model.save_pretrained(path)
  assert os.path.exists(path / "model.safetensors")
  return model, str(path)


hf_logits = hf_parity.hf_logits


def lcjax_logits(workdir: str, tokens: np.ndarray) -> np.ndarray:
  """The logits of the newest checkpoint of `workdir`, as `lcjax.convert export` reads it."""
  cfg, params, _ = restore_params(workdir)
  graphdef, _ = model_skeleton(dataclasses.replace(cfg, dtype="float32"))
  return hf_parity.lcjax_logits(nnx.merge(graphdef, nnx.State(params)), tokens)


def test_import_export_match_transformers(hf, tmp_path):
  model, path = hf
  tokens = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (2, SEQ))
  want = hf_logits(model, tokens)
  out = ok(cli("lcjax.convert", "import", f"--hf={path}", f"--workdir={tmp_path}/w"))
  assert ("will use the byte vocabulary unless DataConfig.vocabulary is set, whose ids are not "
          "the model's (320 ids)") in out.stdout
  assert_close(lcjax_logits(f"{tmp_path}/w", tokens), want, PARITY, "imported")
  # Streamed into a 2 x 4 (data x fsdp) mesh of the 8 test devices: the same parameters.
  mesh = os.path.join(REPO, "configs", "mesh", "data2_fsdp4.gin")
  ok(cli("lcjax.convert", "import", f"--hf={path}", f"--workdir={tmp_path}/sharded",
         f"--gin_file={mesh}"))
  np.testing.assert_array_equal(lcjax_logits(f"{tmp_path}/sharded", tokens),
                                lcjax_logits(f"{tmp_path}/w", tokens))
  ok(cli("lcjax.convert", "export", f"--workdir={tmp_path}/w", f"--out={tmp_path}/out"))
  back = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp_path}/out").eval()
  np.testing.assert_array_equal(hf_logits(back, tokens), want)  # float32 both ways: exact
  # bfloat16, sharded as transformers shards: loads too.
  ok(cli("lcjax.convert", "export", f"--workdir={tmp_path}/w", f"--out={tmp_path}/bf16",
         "--dtype=bfloat16", "--max_shard_size=40KB"))
  index = json.load(open(f"{tmp_path}/bf16/{INDEX}"))
  assert len(set(index["weight_map"].values())) > 2
  back = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp_path}/bf16").eval()
  assert back.dtype == torch.bfloat16
  assert_close(hf_logits(back.float(), tokens), want, 0.05, "bfloat16 export")


def test_refusals_are_one_paragraph(hf, tmp_path):
  _, path = hf
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "config.json").write_text(open(os.path.join(path, "config.json")).read())
  (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not to be unpickled")
  rope = tmp_path / "rope"
  rope.mkdir()
  config = json.load(open(os.path.join(path, "config.json")))
  config["rope_parameters"] = {"rope_type": "warp9", "factor": 2.0, "rope_theta": 5000.0}
  (rope / "config.json").write_text(json.dumps(config))
  os.symlink(os.path.join(path, "model.safetensors"), rope / "model.safetensors")
  imported = tmp_path / "imported"
  ok(cli("lcjax.convert", "import", f"--hf={path}", f"--workdir={imported}"))
  runs = {
      "pickle": ("lcjax.convert", "import", f"--hf={pickled}", f"--workdir={tmp_path}/a"),
      "rope": ("lcjax.convert", "import", f"--hf={rope}", f"--workdir={tmp_path}/b"),
      "again": ("lcjax.convert", "import", f"--hf={path}", f"--workdir={imported}"),
      "no_command": ("lcjax.convert", f"--workdir={tmp_path}/c"),
      "resume": ("lcjax.train", f"--gin_file={imported}/model.gin", *DATA,
                 f"--workdir={imported}", *(f"--gin_bindings={b}" for b in TINY_RUN)),
  }
  with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
    outs = dict(zip(runs, pool.map(lambda args: cli(*args), runs.values())))
  one_paragraph(outs["pickle"], "pytorch_model.bin", "never unpickles", "save_pretrained")
  one_paragraph(outs["rope"], "warp9")
  one_paragraph(outs["again"], "already holds checkpoints")
  one_paragraph(outs["no_command"], "`import` or `export`")
  one_paragraph(outs["resume"], "imported by lcjax.convert", f"init_from = '{imported}'")
  for name in "abc":
    assert not os.path.exists(tmp_path / name)


@pytest.mark.slow
def test_readme_path_import_finetune_longer_evaluate_export(hf, tmp_path):
  """Import; fine-tune 3 steps at 128 tokens (twice the 64 the model was made for) with linear
  RoPE scaling from the imported checkpoint; evaluate both with the eval CLI; export the
  fine-tuned model; transformers loads it and computes what lcjax computes."""
  model, path = hf
  imported, tuned, out = f"{tmp_path}/imported", f"{tmp_path}/tuned", f"{tmp_path}/out"
  ok(cli("lcjax.convert", "import", f"--hf={path}", f"--workdir={imported}"))
  longer = ["DataConfig.sequence_length = 128",
            "AttentionConfig.rope_scaling = {'rope_type': 'linear', 'factor': 2.0}"]
  gin = [f"--gin_file={imported}/model.gin", *DATA,
         *(f"--gin_bindings={b}" for b in TINY_RUN + longer)]
  train = ok(cli("lcjax.train", *gin, f"--workdir={tuned}"))
  assert f"Initialised from {imported}/checkpoints/0" in train.stdout
  evals = [cli("lcjax.eval", *gin, f"--workdir={w}", "--suite=ppl_by_position")
           for w in (imported, tuned)]
  for w, result in zip((imported, tuned), evals):
    ok(result)
    results = json.load(open(f"{w}/eval/{0 if w == imported else 3}/results.json"))
    assert np.isfinite(results["metrics"]["eval/lcjax_shakespeare/loss"])
    assert "ppl_by_position" in results["probes"]
  ok(cli("lcjax.convert", "export", f"--workdir={tuned}", f"--out={out}"))
  config = json.load(open(f"{out}/config.json"))
  assert config["rope_parameters"]["rope_type"] == "linear"
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = np.random.default_rng(1).integers(0, CONFIG["vocab_size"], (2, 100))
  assert_close(hf_logits(back, tokens), lcjax_logits(tuned, tokens), PARITY, "fine-tuned")
  assert np.abs(hf_logits(back, tokens) - hf_logits(model, tokens)).max() > 1e-3  # it trained
