"""Pre-tokenized corpora (lcjax.data.tokenized, the pretokenize command): the same documents as
the text they were made from, exact resume, per-process shares, and every bad-input case."""
import collections
import json
import re

import gin
import numpy as np
import pytest

import lcjax.data as data
from lcjax.data import pretokenize, sources, tokenized
from lcjax.errors import ConfigError, DataError
from tests.data.helpers import check_round_trip

LENGTH = 16
TEXTS = [f"document {i} " * (1 + i % 5) for i in range(11)]


def _corpus(tmp_path, num_files=3):
  """TEXTS as a JSONL source, pre-tokenized into num_files files; returns (source, gin lines)."""
  path = tmp_path / "c.jsonl"
  path.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
  jsonl = sources.JsonlSource(name="corpus", files=str(path), validation_files=str(path))
  cfg = data.DataConfig(sources=(jsonl,), sequence_length=LENGTH)
  return jsonl, pretokenize.pretokenize(cfg, "corpus", str(tmp_path / "ids"), num_files)


def _token_source(tmp_path, **kwargs):
  out = tmp_path / "ids"
  return data.TokenSource(name="corpus", files=str(out / "train-*.tokens.npy"),
                          validation_files=str(out / "validation-*.tokens.npy"), **kwargs)


def _documents(source, split="train", index=0, shards=1, vocabulary="byte"):
  tokens, _ = sources.source_windows(source, vocabulary, LENGTH, split, index, shards)
  return collections.Counter(tuple(d) for d in np.split(tokens, np.nonzero(tokens == 1)[0] + 1)
                             if len(d))


def test_same_documents_as_the_text_and_gin_lines_that_read_them(tmp_path):
  jsonl, lines = _corpus(tmp_path)
  assert len(list((tmp_path / "ids").glob("train-*-of-00003.tokens.npy"))) == 3
  token = _token_source(tmp_path)
  for split in ("train", "validation"):
    assert _documents(token, split) == _documents(jsonl, split)
  gin.parse_config("\n".join(lines))
  try:
    cfg = data.DataConfig(train_mixture="corpus", eval_tasks=("corpus",),
                          sequence_length=LENGTH)
  finally:
    gin.clear_config()
  assert cfg.sources == (token,) and cfg.vocabulary == "byte"
  batches = data.make_eval_batches(cfg, "corpus", batch_size=4, num_batches=10**6)
  assert sum(int(np.sum(b["segment_ids"] > 0)) for b in batches) == sum(
      len(t) + 1 for t in TEXTS)


def test_token_bounds_resume_and_shares(tmp_path):
  _corpus(tmp_path)
  short = _token_source(tmp_path, max_tokens=24)
  assert all(len(d) <= 25 for d in _documents(short)) and len(_documents(short)) < len(TEXTS)
  check_round_trip(data.DataConfig(sources=(short,), train_mixture="corpus",
                                   sequence_length=LENGTH, seed=3), batch_size=2, skip=5,
                   check=4)
  everything = _documents(_token_source(tmp_path))
  for shards in (2, 4):  # 3 files: by file, then by document
    parts = [_documents(_token_source(tmp_path), "train", i, shards) for i in range(shards)]
    assert sum(parts, collections.Counter()) == everything and all(parts)


def test_the_command_line(tmp_path, capsys):
  path = tmp_path / "a.txt"
  path.write_text("one|two|three")
  gin_file = tmp_path / "data.gin"
  gin_file.write_text(f"t/TextSource.name = 't'\nt/TextSource.files = '{path}'\n"
                      "t/TextSource.delimiter = '|'\nDataConfig.sources = [@t/TextSource()]\n")
  try:
    pretokenize.main([f"--gin_file={gin_file}", "--source=t", f"--output={tmp_path / 'ids'}",
                      "--num_files=2"])
  finally:
    gin.clear_config()
  printed = capsys.readouterr().out
  assert f"t/TokenSource.files = '{tmp_path}/ids/train-*.tokens.npy'" in printed
  assert "validation_files" not in printed
  with pytest.raises(ConfigError, match="--source='nope' is not in DataConfig.sources"):
    pretokenize.pretokenize(data.DataConfig(), "nope", str(tmp_path / "x"), 1)


def test_bad_corpora(tmp_path):
  _corpus(tmp_path, num_files=1)
  ids = tmp_path / "ids"
  source = _token_source(tmp_path)
  record = json.loads((ids / "vocabulary.json").read_text())
  (ids / "vocabulary.json").write_text(json.dumps({**record, "vocab_size": 300}))
  with pytest.raises(DataError, match="tokenized with 'byte' \\(300 ids, EOS 1\\), not "
                     "DataConfig.vocabulary='byte' \\(259 ids"):
    _documents(source)
  (ids / "vocabulary.json").unlink()
  with pytest.raises(DataError, match="vocabulary.json is missing"):
    _documents(source)
  (ids / "vocabulary.json").write_text(json.dumps(record))
  offsets = ids / "train-00000-of-00001.offsets.npy"
  np.save(offsets, np.array([0, 5, 3], np.int64))
  with pytest.raises(DataError, match="does not index .*damaged or mismatched"):
    _documents(source)
  offsets.unlink()
  with pytest.raises(DataError, match=re.escape(f"{offsets} is missing")):
    _documents(source)
  (ids / "train-00000-of-00001.tokens.npy").write_bytes(b"")
  with pytest.raises(DataError, match="tokens.npy is empty"):
    _documents(source)
  other = data.TokenSource(name="corpus", files=str(ids / "vocabulary.json"))
  with pytest.raises(DataError, match="is not a .tokens.npy file"):
    _documents(other)
