"""Token-share mixtures (lcjax.data.mixtures): the packed training batches give each source its
share of the tokens within a stated tolerance, where example-count rates would not."""
import gin
import numpy as np
import pytest
import seqio

import lcjax.data as data
from lcjax.data import mixtures, sources
from lcjax.errors import ConfigError
from tests.data.helpers import check_round_trip

LENGTH, ROWS, BATCHES = 32, 4, 100
TOLERANCE = 0.05  # absolute, on shares of ~12.8K tokens


def _sources(tmp_path):
  """'short': 60 documents of 5 tokens (s..., + EOS); 'long': 10 of 201 (L..., + EOS), which
  become windows of 32 tokens: per example, 'long' has ~5.7 times the tokens of 'short'."""
  (tmp_path / "short.txt").write_text("|".join(f"s{i:03d}" for i in range(60)))
  (tmp_path / "long.txt").write_text("|".join("L" + f"{i}" * 199 for i in range(10)))
  return tuple(sources.TextSource(name=n, files=str(tmp_path / f"{n}.txt"), delimiter="|")
               for n in ("short", "long"))


def _shares(cfg):
  """Each source's share of the tokens of the first BATCHES packed training batches."""
  it = data.make_train_iterator(cfg, batch_size=ROWS)
  counts = {"short": 0, "long": 0}
  for _ in range(BATCHES):
    batch = next(it)
    for row in range(ROWS):
      seg, tgt = batch["segment_ids"][row], batch["targets"][row]
      for s in np.unique(seg[seg > 0]):
        window = tgt[seg == s]
        counts["short" if window[0] == ord("s") + 3 else "long"] += len(window)
  total = sum(counts.values())
  return {k: v / total for k, v in counts.items()}


def test_batches_hold_the_token_shares(tmp_path, capsys):
  gin.parse_config("""
      mix/TokenShareMixture.name = 'mix'
      mix/TokenShareMixture.shares = [('short', 1), ('long', 3)]
      mix/TokenShareMixture.report_batches = 50
      DataConfig.mixtures = [@mix/TokenShareMixture()]
  """)
  try:
    cfg = data.DataConfig(sources=_sources(tmp_path), train_mixture="mix",
                          sequence_length=LENGTH, seed=1)
  finally:
    gin.clear_config()
  got = _shares(cfg)
  assert abs(got["short"] - 0.25) < TOLERANCE and abs(got["long"] - 0.75) < TOLERANCE, got
  printed = capsys.readouterr().out
  reported = float(printed.split("short ")[1].split(" ")[0])
  assert "first 50 batches" in printed and "(target 0.250)" in printed
  assert abs(reported - 0.25) < TOLERANCE
  # The same rates by example count give 'short' far less than its share of the tokens.
  seqio.MixtureRegistry.remove("by_examples")
  seqio.MixtureRegistry.add("by_examples", list(cfg.mixtures[0].shares))
  by_examples = _shares(data.DataConfig(sources=cfg.sources, train_mixture="by_examples",
                                        sequence_length=LENGTH, seed=1))
  assert by_examples["short"] < 0.1


def test_bad_mixtures(tmp_path):
  with pytest.raises(ConfigError, match="must name each task once with a positive share"):
    mixtures.TokenShareMixture(name="m", shares=[("a", 1), ("a", 2)])
  with pytest.raises(ConfigError, match="must name each task once with a positive share"):
    mixtures.TokenShareMixture(name="m", shares=[("a", 0)])
  cfg = data.DataConfig(sources=_sources(tmp_path), train_mixture="m", sequence_length=LENGTH,
                        mixtures=(mixtures.TokenShareMixture(name="m", shares=[("nope", 1)]),))
  with pytest.raises(ConfigError, match="names task 'nope', which is not registered"):
    data.make_train_iterator(cfg, batch_size=2)
  with pytest.raises(ConfigError, match="the name 'short' is used twice"):
    data.DataConfig(sources=_sources(tmp_path),
                    mixtures=(mixtures.TokenShareMixture(name="short", shares=[("long", 1)]),))


def test_resume_is_exact(tmp_path):
  """A restarted process re-estimates the same rates (same seed and share), so the restored
  iterator continues the mixture's stream exactly."""
  mixture = mixtures.TokenShareMixture(name="mix", shares=[("short", 1), ("long", 3)],
                                       sample_examples=16, report_batches=0)
  cfg = data.DataConfig(sources=_sources(tmp_path), mixtures=(mixture,), train_mixture="mix",
                        sequence_length=LENGTH, seed=3)
  check_round_trip(cfg, batch_size=ROWS, skip=9, check=4)
