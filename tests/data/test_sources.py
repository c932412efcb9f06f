"""Text and JSONL sources (lcjax.data.sources) from tiny files the tests write: end to end into
packed batches, windows without truncation, filters, bad input, resume, per-process shares."""
import gzip
import json
import re

import gin
import numpy as np
import pytest

import lcjax.data as data
from lcjax.data import sources
from lcjax.errors import ConfigError, DataError
from tests.data.helpers import check_contract, check_round_trip, documents

BYTE = data.vocabulary(data.DataConfig())
LENGTH = 16  # short rows, so that documents span several windows


def _write(path, content):
  path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
  return str(path)


def _ids(*texts):
  """Every text's byte ids + EOS, back to back."""
  return np.array([i for t in texts for i in BYTE.encode(t) + [BYTE.eos_id]], np.int32)


def _config(source, **kwargs):
  return data.DataConfig(sources=(source,), train_mixture=source.name, eval_tasks=(source.name,),
                         sequence_length=LENGTH, **kwargs)


def _eval_tokens(source):
  """The validation split's tokens, as make_eval_batches packs them, in order."""
  batches = data.make_eval_batches(_config(source), source.name, batch_size=4,
                                   num_batches=10**6)
  for batch in batches:
    check_contract(batch, 4, LENGTH)
  return np.concatenate([b["targets"][b["segment_ids"] > 0] for b in batches])


def _shard_texts(source, index, shards):
  tokens, _ = sources.source_windows(source, "byte", LENGTH, "train", index, shards)
  return {BYTE.decode(d.tolist()) for d in np.split(tokens, np.nonzero(tokens == 1)[0] + 1)
          if len(d)}


def test_one_document_per_file_is_windowed_without_loss(tmp_path):
  long = "A long document, far longer than one row of sixteen tokens.\n"
  files = [_write(tmp_path / "b.txt", "second"), _write(tmp_path / "a.txt", long)]
  source = sources.TextSource(name="mine", files=str(tmp_path / "*.txt"),
                              validation_files=files)
  assert np.array_equal(_eval_tokens(source), _ids(long, "second"))  # sorted file order
  batch = next(data.make_train_iterator(_config(source), batch_size=3))
  check_contract(batch, 3, LENGTH)
  assert np.all(batch["loss_weights"][batch["segment_ids"] > 0] == 1)


def test_delimited_documents_and_token_bounds(tmp_path):
  texts = ["short", "just twelve!", "a document of thirty-two tokens."]
  path = _write(tmp_path / "all.txt", "<|doc|>".join(["", *texts, ""]))
  source = sources.TextSource(name="docs", files=path, validation_files=path,
                              delimiter="<|doc|>")
  assert np.array_equal(_eval_tokens(source), _ids(*texts))
  bounded = sources.TextSource(name="docs", files=path, validation_files=path,
                               delimiter="<|doc|>", min_tokens=6, max_tokens=12)
  assert np.array_equal(_eval_tokens(bounded), _ids("just twelve!"))


def test_jsonl_field_filters_and_gzip(tmp_path):
  records = [{"text": "kept one", "meta": {"source": "arxiv"}, "n": 5},
             {"text": "other source", "meta": {"source": "web"}, "n": 5},
             {"text": "too short", "meta": {"source": "arxiv"}, "n": 1},
             {"text": "no meta", "n": 9},
             {"text": "kept two", "meta": {"source": "arxiv"}, "n": 7}]
  lines = "\n".join(json.dumps(r) for r in records) + "\n\n"
  path = _write(tmp_path / "part.jsonl.gz", gzip.compress(lines.encode()))
  source = sources.JsonlSource(name="papers", files=path, validation_files=path,
                               filters=['meta.source == "arxiv"', "n >= 2"])
  assert np.array_equal(_eval_tokens(source), _ids("kept one", "kept two"))
  batch = next(data.make_train_iterator(_config(source), batch_size=2))
  assert {BYTE.decode(t.tolist()) for t, _ in documents([batch])} <= {"kept one", "kept two"}


def test_sources_from_gin(tmp_path):
  path = _write(tmp_path / "c.jsonl", '{"body": "from gin"}\n')
  gin.parse_config(f"""
      code/JsonlSource.name = 'code'
      code/JsonlSource.files = ['{path}']
      code/JsonlSource.validation_files = '{path}'
      code/JsonlSource.text_field = 'body'
      DataConfig.sources = [@code/JsonlSource()]
  """)
  try:
    cfg = data.DataConfig(train_mixture="code", sequence_length=LENGTH)
    written = gin.operative_config_str()  # what a run writes to DIR/config.<step>.gin
    gin.clear_config()
    gin.parse_config(written)
    assert data.DataConfig(train_mixture="code", sequence_length=LENGTH) == cfg
  finally:
    gin.clear_config()
  want = sources.JsonlSource(name="code", files=(path,), validation_files=(path,),
                             text_field="body")
  assert cfg.sources == (want,)
  (batch,) = data.make_eval_batches(cfg, "code", batch_size=1, num_batches=1)
  assert np.array_equal(batch["targets"][0][batch["segment_ids"][0] > 0], _ids("from gin"))


@pytest.mark.parametrize("kind", [sources.TextSource, sources.JsonlSource])
def test_resume_is_exact(tmp_path, kind):
  texts = [f"document number {i} " * (1 + i % 4) for i in range(12)]
  if kind is sources.TextSource:
    path = _write(tmp_path / "d.txt", "\n\n".join(texts))
    source = kind(name="resume", files=path, delimiter="\n\n")
  else:
    path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps({"text": t}) for t in texts))
    source = kind(name="resume", files=path)
  check_round_trip(_config(source, seed=5), batch_size=2, skip=7, check=4)


@pytest.mark.parametrize("files", [4, 1])  # files by process index / documents by index
def test_two_processes_read_disjoint_shares(tmp_path, files):
  texts = [f"doc {i}" for i in range(10)]
  for f in range(files):
    _write(tmp_path / f"{f}.txt", "|".join(texts[f::files]))
  source = sources.TextSource(name="shared", files=str(tmp_path / "*.txt"), delimiter="|")
  shares = [_shard_texts(source, index, 2) for index in range(2)]
  assert shares[0] and shares[1] and not shares[0] & shares[1]
  assert shares[0] | shares[1] == set(texts)
  # Through seqio: each process's train batches hold only its share.
  for index in range(2):
    it = data.make_train_iterator(_config(source), batch_size=4, shard_index=index,
                                  num_shards=2)
    seen = {BYTE.decode(t.tolist()) for t, _ in documents([next(it), next(it)])}
    assert seen <= shares[index]


def test_no_file_matches(tmp_path):
  glob = str(tmp_path / "nothing" / "*.txt")
  with pytest.raises(DataError, match=re.escape(f"TextSource 'x'.files: no file matches '{glob}'")):
    data.make_train_iterator(_config(sources.TextSource(name="x", files=glob)), batch_size=1)


def test_empty_file(tmp_path):
  path = _write(tmp_path / "empty.jsonl", b"")
  with pytest.raises(DataError, match=re.escape(f"{path} is empty")):
    data.make_train_iterator(_config(sources.JsonlSource(name="x", files=path)), batch_size=1)


def test_undecodable_bytes_raise_or_skip(tmp_path, caplog):
  path = _write(tmp_path / "bad.txt", b"good one|bad \xff here|good two")
  source = sources.TextSource(name="x", files=path, validation_files=path, delimiter="|")
  where = re.escape(f"{path} at byte offset 13: bytes that are not UTF-8")
  with pytest.raises(DataError, match=where):
    _eval_tokens(source)
  skipping = sources.TextSource(name="x", files=path, validation_files=path, delimiter="|",
                                on_decode_error="skip")
  assert np.array_equal(_eval_tokens(skipping), _ids("good one", "good two"))
  assert "skipped 1 documents" in caplog.text and "byte offset 13" in caplog.text
  jsonl = _write(tmp_path / "bad.jsonl", b'{"text": "a"}\n{"text": "\xc3"}\n')
  with pytest.raises(DataError, match=re.escape(f"{jsonl} line 2 at byte offset 24")):
    _eval_tokens(sources.JsonlSource(name="x", files=jsonl, validation_files=jsonl))


@pytest.mark.parametrize("line, error", [
    ("not json", "line 2: not JSON"),
    ('{"txt": "a"}', "line 2: no string field 'text' \\(missing\\)"),
    ('{"text": 3}', "line 2: no string field 'text' \\(it is int\\)"),
])
def test_bad_jsonl_lines(tmp_path, line, error):
  path = _write(tmp_path / "x.jsonl", '{"text": "fine"}\n' + line + "\n")
  with pytest.raises(DataError, match=re.escape(path) + " " + error):
    data.make_train_iterator(_config(sources.JsonlSource(name="x", files=path)), batch_size=1)


def test_config_errors(tmp_path):
  path = _write(tmp_path / "a.txt", "text")
  with pytest.raises(ConfigError, match="filter 'n >> 2' is not 'field op value'"):
    sources.JsonlSource(name="x", files=path, filters=["n >> 2"])
  with pytest.raises(ConfigError, match="on_decode_error='ignore'"):
    sources.TextSource(name="x", files=path, on_decode_error="ignore")
  with pytest.raises(ConfigError, match="keep no document"):
    sources.TextSource(name="x", files=path, min_tokens=5, max_tokens=4)
  twice = (sources.TextSource(name="x", files=path), sources.TextSource(name="x", files=path))
  with pytest.raises(ConfigError, match="'x' is used twice"):
    data.DataConfig(sources=twice)
  with pytest.raises(ConfigError, match="'lcjax_mqar' is used twice"):
    data.DataConfig(sources=(sources.TextSource(name="lcjax_mqar", files=path),))
  no_validation = sources.TextSource(name="x", files=path)
  with pytest.raises(DataError, match="no validation_files.*DataConfig.eval_tasks"):
    _eval_tokens(no_validation)
  too_short = sources.TextSource(name="x", files=path, min_tokens=100)
  with pytest.raises(DataError, match="1 read, none with min_tokens=100"):
    data.make_train_iterator(_config(too_short), batch_size=1)


def test_batched_encoding_keeps_every_text_in_order():
  class Batched:
    encode = staticmethod(BYTE.encode)

    @staticmethod
    def encode_batch(texts):
      return [BYTE.encode(t) for t in texts]

  texts = [f"text {i}" for i in range(5)]
  want = [BYTE.encode(t) for t in texts]
  assert list(sources._encode_chunks(Batched, iter(texts), chunk=2)) == want
  assert list(sources._encode_chunks(BYTE, iter(texts))) == want


def test_length_buckets_take_a_source(tmp_path):
  path = _write(tmp_path / "a.txt", "|".join(f"document {i} " * i for i in range(1, 9)))
  source = sources.TextSource(name="bucketed", files=path, delimiter="|")
  cfg = _config(source, length_buckets=(8, 16))
  it = data.make_train_iterator(cfg, batch_size=2, steps=4)
  widths = {next(it)["targets"].shape for _ in range(4)}
  assert widths <= {(2, 16), (4, 8)} and widths


def test_prefetched_batches_resume_exactly(tmp_path):
  path = _write(tmp_path / "d.txt", "|".join(f"prefetched {i} " * (1 + i % 3) for i in range(9)))
  source = sources.TextSource(name="ahead", files=path, delimiter="|")
  check_round_trip(_config(source, prefetch_batches=3), batch_size=2, skip=4, check=4)
  with pytest.raises(ConfigError, match="prefetch_batches=-1 is negative"):
    _config(source, prefetch_batches=-1)


def test_a_directory_means_every_file_under_it(tmp_path):
  (tmp_path / "corpus" / "nested").mkdir(parents=True)
  _write(tmp_path / "corpus" / "a.txt", "top")
  _write(tmp_path / "corpus" / "nested" / "b.txt", "nested")
  source = sources.TextSource(name="dir", files=str(tmp_path / "corpus"))
  assert _shard_texts(source, 0, 1) == {"top", "nested"}
