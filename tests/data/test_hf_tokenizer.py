"""A Hugging Face tokenizer.json as DataConfig.vocabulary: ids equal to `tokenizers`' own,
decode round trip, EOS, no truncation, the vocabulary size check, end to end into batches."""
import json
import types

import numpy as np
import pytest
import tensorflow as tf
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import lcjax.data as data
from lcjax.data import sources
from lcjax.errors import ConfigError

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Long documents are cut into windows, never truncated.",
             "Tokenizers agree when their ids are the same, ünïcode included."]
SAMPLE = "The lazy fox: windows of ünïcode, never the same twice!\n  Two spaces."


def _train(tmp_path, special=("<pad>", "<|endoftext|>"), name="tokenizer.json"):
  """A tiny byte-level BPE tokenizer, saved the way Hugging Face repositories ship it, with a
  BOS post-processor and truncation that the vocabulary must not apply."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(special),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(SENTENCES * 4, trainer)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{special[-1]} $A", special_tokens=[(special[-1], tok.token_to_id(special[-1]))])
  tok.enable_truncation(4)
  path = str(tmp_path / name)
  tok.save(path)
  return path, tokenizers.Tokenizer.from_file(path)


def _write_text(tmp_path, text):
  path = tmp_path / "doc.txt"
  path.write_text(text, encoding="utf-8")
  return str(path)


def test_ids_equal_tokenizers_encode_and_decode_round_trips(tmp_path):
  path, tok = _train(tmp_path)
  vocab = data.vocabulary(data.DataConfig(vocabulary=path))
  tok.no_truncation()
  expected = tok.encode(SAMPLE, add_special_tokens=False).ids
  assert len(expected) > 4 and vocab.encode(SAMPLE) == expected  # no BOS, no truncation
  assert vocab.decode(vocab.encode(SAMPLE)) == SAMPLE
  assert vocab.eos_id == tok.token_to_id("<|endoftext|>") == 1
  assert vocab.vocab_size == tok.get_vocab_size(with_added_tokens=True)
  # Decoding stops at EOS, which decodes to nothing.
  assert vocab.decode(vocab.encode("fox") + [vocab.eos_id] + vocab.encode("dog")) == "fox"
  assert vocab.encode_tf(tf.constant(SAMPLE)).numpy().tolist() == expected
  rows = [vocab.encode(t) + [vocab.eos_id] for t in ("quick fox", "lazy dog")]
  width = max(map(len, rows)) + 2
  # Anything after a row's EOS (here id 0's token and more text) is not decoded.
  ids = tf.constant([(r + [0, *vocab.encode("dog")] * width)[:width] for r in rows])
  assert vocab.decode_tf(ids).numpy().tolist() == [b"quick fox", b"lazy dog"]


def test_eos_from_tokenizer_config_or_gin(tmp_path, gin_bindings):
  path, tok = _train(tmp_path, special=("<unk>", "<s>", "[END]"))
  with pytest.raises(ConfigError, match="none of the end-of-text tokens.*HfTokenizerConfig"):
    data.vocabulary(data.DataConfig(vocabulary=path))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "[END]"}}))
  assert data.vocabulary(data.DataConfig(vocabulary=path)).eos_id == tok.token_to_id("[END]")
  gin_bindings(**{"HfTokenizerConfig.eos_token": "<s>"})
  assert data.vocabulary(data.DataConfig(vocabulary=path)).eos_id == tok.token_to_id("<s>")


def test_vocabulary_size_is_checked_against_the_model(tmp_path):
  from lcjax.run import check_vocabulary

  path, tok = _train(tmp_path)
  cfg = data.DataConfig(vocabulary=path)
  size = tok.get_vocab_size(with_added_tokens=True)
  check_vocabulary(types.SimpleNamespace(vocab_size=size), cfg)
  with pytest.raises(ConfigError, match=f"smaller than the data vocabulary.*{size} ids"):
    check_vocabulary(types.SimpleNamespace(vocab_size=size - 1), cfg)


def test_a_source_tokenized_with_it_end_to_end(tmp_path):
  path, tok = _train(tmp_path)
  tok.no_truncation()
  text = _write_text(tmp_path, SAMPLE * 3)
  source = sources.TextSource(name="hf", files=text, validation_files=text)
  cfg = data.DataConfig(vocabulary=path, sources=(source,), train_mixture="hf",
                        sequence_length=32)
  batches = data.make_eval_batches(cfg, "hf", batch_size=2, num_batches=10**6)
  got = np.concatenate([b["targets"][b["segment_ids"] > 0] for b in batches])
  assert got.tolist() == tok.encode(SAMPLE * 3, add_special_tokens=False).ids + [1]
  assert next(data.make_train_iterator(cfg, batch_size=2))["targets"].shape == (2, 32)
  other, _ = _train(tmp_path, special=("<|endoftext|>",), name="other.json")  # EOS id 0
  with pytest.raises(ConfigError, match="DataConfig.anchor"):
    data.make_train_iterator(data.DataConfig(vocabulary=other, anchor=True), batch_size=2)

