"""safetensors reading and writing, streaming (sharded) import, export and model.gin, on a tiny
made-up architecture of this file (real architectures: test_cli.py and their own tests)."""

import json
import os

import gin
import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lcjax.convert import architectures, model_gin
from lcjax.convert.hf_export import export_hf
from lcjax.convert.hf_import import import_hf, read_hf
from lcjax.convert.pieces import Piece, heads_in, heads_out, linear
from lcjax.convert.safetensors_io import (INDEX, SINGLE, SafetensorsReader, parse_size,
                                          write_checkpoint)
from lcjax.errors import ConvertError
from lcjax.models.attention import AttentionConfig
from lcjax.models.config import ModelConfig
from lcjax.models.mamba import MambaConfig
from lcjax.models.mlp import MLPConfig

D, HEADS, KV, HEAD_DIM, FFN, VOCAB, LAYERS = 64, 4, 2, 16, 96, 256, 2
TINY = {"architectures": ["TinyForTest"], "vocab": VOCAB, "layers": LAYERS}


def _tiny_config(config: dict) -> ModelConfig:
  return ModelConfig(vocab_size=config["vocab"], d_model=D, pattern="*-" * config["layers"],
                     tie_embeddings=False, dtype="float32", norm_eps=1e-5,
                     attention=AttentionConfig(num_heads=HEADS, num_kv_heads=KV,
                                               head_dim=HEAD_DIM),
                     mlp=MLPConfig(hidden_dim=FFN))


def _tiny_pieces(cfg: ModelConfig) -> dict[str, Piece]:
  """Llama-like names, with gate and up fused in one tensor (rows read separately)."""
  pieces = {"embed/embedding": Piece("embed.weight"), "final_norm/scale": Piece("norm.weight"),
            "lm_head": linear("head.weight")}
  for i in range(cfg.num_layers // 2):
    a, m, p = 2 * i, 2 * i + 1, f"layers.{i}."
    pieces[f"blocks/{a}/norm/scale"] = Piece(p + "norm1.weight")
    pieces[f"blocks/{m}/norm/scale"] = Piece(p + "norm2.weight")
    for name, heads in (("q", HEADS), ("k", KV), ("v", KV)):
      pieces[f"blocks/{a}/mixer/{name}"] = heads_in(f"{p}{name}.weight", D, heads, HEAD_DIM)
    pieces[f"blocks/{a}/mixer/o"] = heads_out(p + "o.weight", D, HEADS, HEAD_DIM)
    pieces[f"blocks/{m}/mixer/gate"] = linear(p + "gate_up.weight", (0, FFN))
    pieces[f"blocks/{m}/mixer/up"] = linear(p + "gate_up.weight", (FFN, 2 * FFN))
    pieces[f"blocks/{m}/mixer/down"] = linear(p + "down.weight")
  return pieces


def _tiny_hf_config(cfg: ModelConfig) -> dict:
  return {**TINY, "vocab": cfg.vocab_size, "layers": cfg.num_layers // 2}


TINY_ARCH = architectures.Architecture("TinyForTest", _tiny_config, _tiny_hf_config,
                                       _tiny_pieces)


@pytest.fixture(autouse=True)
def tiny_registry(monkeypatch):
  monkeypatch.setattr(architectures, "_registry", lambda: {"TinyForTest": TINY_ARCH})
  yield
  gin.clear_config()


def _hf_tensors(rng, layers=LAYERS) -> dict[str, np.ndarray]:
  """Random tensors of the tiny architecture, HF layout."""
  shapes = {"embed.weight": (VOCAB, D), "norm.weight": (D,), "head.weight": (VOCAB, D)}
  for i in range(layers):
    p = f"layers.{i}."
    shapes.update({p + "norm1.weight": (D,), p + "norm2.weight": (D,),
                   p + "q.weight": (HEADS * HEAD_DIM, D), p + "k.weight": (KV * HEAD_DIM, D),
                   p + "v.weight": (KV * HEAD_DIM, D), p + "o.weight": (D, HEADS * HEAD_DIM),
                   p + "gate_up.weight": (2 * FFN, D), p + "down.weight": (D, FFN)})
  return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def _hf_dir(path, tensors, max_shard_size="5GB", config=None) -> str:
  write_checkpoint(str(path), tensors.items(),
                   {"config.json": json.dumps(config or TINY)}, max_shard_size)
  return str(path)


def test_reader_single_file_rows_and_bf16(tmp_path, rng):
  a = rng.standard_normal((6, 3)).astype(np.float32)
  save_file({"a": a, "b": a.astype(ml_dtypes.bfloat16), "h": a.astype(np.float16)},
            str(tmp_path / "x.safetensors"))
  with SafetensorsReader(str(tmp_path / "x.safetensors")) as reader:
    assert reader.shapes() == {"a": (6, 3), "b": (6, 3), "h": (6, 3)}
    np.testing.assert_array_equal(reader.read("a", (2, 5)), a[2:5])
    np.testing.assert_array_equal(reader.read("a"), a)
    b = reader.read("b", (1, 4))
    assert b.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(b, a[1:4].astype(ml_dtypes.bfloat16))
    assert reader.read("h", (0, 2)).dtype == np.float16
    with pytest.raises(ConvertError, match="'nope' is missing"):
      reader.read("nope")


def test_shard_writer_index_and_sizes(tmp_path, rng):
  tensors = {f"t{i}": rng.standard_normal((10, 10)).astype(np.float32) for i in range(5)}
  tensors["big"] = rng.standard_normal((30, 10)).astype(np.float32)  # 1200 bytes alone
  files = write_checkpoint(str(tmp_path / "out"), tensors.items(), max_shard_size=900)
  # 400-byte tensors, 900 bytes a shard: two per shard; the oversized one alone.
  assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + [INDEX]
  index = json.load(open(tmp_path / "out" / INDEX))
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
  assert index["weight_map"]["t0"] == index["weight_map"]["t1"] != index["weight_map"]["t2"]
  assert index["weight_map"]["big"] == "model-00004-of-00004.safetensors"
  for name, shard in index["weight_map"].items():
    np.testing.assert_array_equal(load_file(str(tmp_path / "out" / shard))[name], tensors[name])
  with SafetensorsReader(str(tmp_path / "out")) as reader:
    np.testing.assert_array_equal(reader.read("t3", (4, 7)), tensors["t3"][4:7])
  assert write_checkpoint(str(tmp_path / "one"), tensors.items()) == [SINGLE]
  assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2**31
  with pytest.raises(ConvertError, match="not a size"):
    parse_size("lots")
  with pytest.raises(ConvertError, match="not an empty directory"):
    write_checkpoint(str(tmp_path / "one"), tensors.items())


def test_failed_write_leaves_nothing(tmp_path):
  def tensors():
    yield "a", np.zeros((100,), np.float32)
    raise OSError(28, "No space left on device")

  with pytest.raises(OSError, match="No space"):
    write_checkpoint(str(tmp_path / "out"), tensors(), max_shard_size=100)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickles_refused(tmp_path, name):
  (tmp_path / name).write_bytes(b"\x80\x04not to be unpickled")
  (tmp_path / "config.json").write_text(json.dumps(TINY))
  for path in (tmp_path, tmp_path / name):
    with pytest.raises(ConvertError, match="save_pretrained") as e:
      read_hf(str(path))
    assert "never unpickles" in str(e.value)


def test_unused_missing_and_misshapen_tensors(tmp_path, rng):
  tensors = _hf_tensors(rng)
  extra = _hf_dir(tmp_path / "extra", {**tensors, "layers.0.rotary.inv_freq": np.ones(8)})
  with pytest.raises(ConvertError, match="layers.0.rotary.inv_freq"):
    read_hf(extra)
  missing = _hf_dir(tmp_path / "missing",
                    {k: v for k, v in tensors.items() if k != "layers.1.down.weight"})
  with pytest.raises(ConvertError, match="'layers.1.down.weight' is missing"):
    read_hf(missing)
  bad = _hf_dir(tmp_path / "bad", {**tensors, "layers.1.k.weight": np.ones((8, D), np.float32)})
  with pytest.raises(ConvertError, match="'layers.1.k.weight'.*shape \\(8, 64\\)"):
    read_hf(bad)
  assert not os.path.exists(tmp_path / "work")


def test_sharded_import_equals_single_device(tmp_path, rng):
  from lcjax.parallel.mesh import MeshConfig, make_mesh
  from lcjax.parallel.sharding import DEFAULT_RULES

  hf = _hf_dir(tmp_path / "hf", _hf_tensors(rng), max_shard_size=100_000)
  assert os.path.exists(tmp_path / "hf" / INDEX)  # several shards
  _, single, _ = read_hf(hf)
  mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  _, sharded, _ = read_hf(hf, mesh=mesh, rules=DEFAULT_RULES)
  q = sharded["blocks"][0]["mixer"]["q"]
  assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               single, sharded)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_byte_identical(tmp_path, rng, dtype):
  tensors = {k: v.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
             for k, v in _hf_tensors(rng).items()}
  hf = _hf_dir(tmp_path / "hf", tensors, max_shard_size=100_000)
  cfg, _ = import_hf(hf, str(tmp_path / "work"))
  with pytest.raises(ConvertError, match="already holds checkpoints"):
    import_hf(hf, str(tmp_path / "work"))
  files = export_hf(str(tmp_path / "work"), str(tmp_path / "out"), dtype=dtype,
                    max_shard_size=100_000)
  assert INDEX in files
  config = json.load(open(tmp_path / "out" / "config.json"))
  assert config == {**TINY, "torch_dtype": dtype, "dtype": dtype}
  with SafetensorsReader(str(tmp_path / "out")) as out:
    assert out.shapes() == {k: v.shape for k, v in tensors.items()}
    for name, tensor in tensors.items():
      exported = out.read(name)
      assert exported.dtype == tensor.dtype and exported.tobytes() == tensor.tobytes(), name
  with pytest.raises(ConvertError, match="not an empty directory"):
    export_hf(str(tmp_path / "work"), str(tmp_path / "out"))


def test_import_writes_model_gin_that_reproduces_the_config(tmp_path, rng):
  from lcjax.config import parse_gin
  from lcjax.run import DataConfig, TrainConfig

  hf = _hf_dir(tmp_path / "hf", _hf_tensors(rng))
  cfg, _ = import_hf(hf, str(tmp_path / "work"))
  parse_gin([str(tmp_path / "work" / "model.gin")], [])
  assert ModelConfig() == cfg
  assert TrainConfig().init_from == str(tmp_path / "work")
  assert DataConfig().vocabulary == "byte"  # no tokenizer.json or tokenizer.model


def test_model_gin_round_trip_of_non_defaults(tmp_path):
  from lcjax.config import parse_gin

  cfg = ModelConfig(
      vocab_size=300, d_model=64, pattern="*-M-", tie_embeddings=False, norm_eps=1e-5,
      dtype="float32",
      attention=AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=32, rope_theta=5e5,
                                rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 64},
                                partial_rotary_factor=0.5, window=16, bias="qkv"),
      mamba=MambaConfig(d_state=16, headdim=16, ngroups=2, chunk_size=8,
                        dt_limit=(0.01, float("inf"))),
      mlp=MLPConfig(hidden_dim=128, activation="relu2", gated=False))
  text = model_gin.model_gin(cfg, "# a header", ["TrainConfig.init_from = '/x'"])
  assert "MambaConfig.dt_limit = (0.01, 1e999)" in text
  assert "AttentionConfig.block_q" not in text  # defaults are not written
  (tmp_path / "model.gin").write_text(text)
  import lcjax.run  # noqa: F401  (TrainConfig)
  parse_gin([str(tmp_path / "model.gin")], [])
  assert ModelConfig() == cfg


def test_sentencepiece_tokenizer_is_bound_and_exported(tmp_path, rng):
  import sentencepiece as spm

  from lcjax.config import parse_gin
  from lcjax.run import DataConfig

  hf = _hf_dir(tmp_path / "hf", _hf_tensors(rng))
  lines = ["to be or not to be that is the question", "whether tis nobler in the mind"] * 20
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=f"{hf}/tokenizer",
                                 vocab_size=40, model_type="bpe")
  import_hf(hf, str(tmp_path / "work"))
  spm_path = str(tmp_path / "work" / "tokenizer.model")
  assert open(spm_path, "rb").read() == open(f"{hf}/tokenizer.model", "rb").read()
  text = (tmp_path / "work" / "model.gin").read_text()
  assert "It adds no BOS" in text
  parse_gin([str(tmp_path / "work" / "model.gin")], [])
  assert DataConfig().vocabulary == spm_path
  files = export_hf(str(tmp_path / "work"), str(tmp_path / "out"))
  assert "tokenizer.model" in files
  assert open(tmp_path / "out" / "tokenizer.model", "rb").read() == open(spm_path, "rb").read()


def test_tokenizer_json_is_bound_with_upstream_ids(tmp_path, rng):
  import tokenizers
  from tokenizers import models, pre_tokenizers

  from lcjax.config import parse_gin
  from lcjax.data.vocab import from_name
  from lcjax.run import DataConfig

  hf = _hf_dir(tmp_path / "hf", _hf_tensors(rng))
  words = ["<unk>", "</s>", "<eos_here>", "to", "be", "or", "not"]
  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(f"{hf}/tokenizer.json")
  with open(f"{hf}/tokenizer_config.json", "w") as f:
    json.dump({"eos_token": "<eos_here>"}, f)  # preferred to the well-known "</s>"
  import_hf(hf, str(tmp_path / "work"))
  parse_gin([str(tmp_path / "work" / "model.gin")], [])
  vocab = from_name(DataConfig().vocabulary)
  assert DataConfig().vocabulary == str(tmp_path / "work" / "tokenizer.json")
  assert vocab.encode("to be or not to be") == tok.encode("to be or not to be").ids
  assert vocab.eos_id == 2
  files = export_hf(str(tmp_path / "work"), str(tmp_path / "out"))
  assert "tokenizer.json" in files
