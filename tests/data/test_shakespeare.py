import numpy as np

import lcjax.data as data
from lcjax.data import shakespeare, tasks, vocab
from tests.data.helpers import check_contract


def test_split_is_by_play_and_disjoint():
  train, val = shakespeare.split_names("train"), shakespeare.split_names("validation")
  assert sorted(val) == sorted(shakespeare.VALIDATION_PLAYS)
  assert not set(train) & set(val)
  assert len(train) + len(val) == len(shakespeare.load_plays()) >= 36
  texts = set(shakespeare.split_texts("train"))
  assert not texts & set(shakespeare.split_texts("validation"))


def test_text_is_cleaned_but_real():
  text = shakespeare.load_plays()["macbeth"]
  assert "  \n" not in text and "**" not in text
  assert "Out, damned spot" in text


def test_windows_are_lossless():
  length = 512
  v = vocab.from_name("byte")
  tokens, bounds = tasks.shakespeare_windows("byte", length, "validation")
  play_ids = [v.encode(t) + [v.eos_id] for t in shakespeare.split_texts("validation")]
  assert np.array_equal(tokens, np.concatenate(play_ids))
  sizes = bounds[:, 1] - bounds[:, 0]
  assert np.all(sizes <= length) and np.all(sizes > 0)
  # Windows tile the token array; only a play's last window is short.
  assert bounds[0, 0] == 0 and np.array_equal(bounds[1:, 0], bounds[:-1, 1])
  assert bounds[-1, 1] == len(tokens)
  play_ends = set(np.cumsum([len(p) for p in play_ids]).tolist())
  short_ends = set(bounds[sizes < length, 1].tolist())
  assert short_ends <= play_ends
  assert int(np.sum(tokens == v.eos_id)) == len(play_ids)


def test_eval_batches_reproduce_the_validation_plays():
  cfg = data.DataConfig(sequence_length=512)
  tokens, bounds = tasks.shakespeare_windows("byte", 512, "validation")
  batches = data.make_eval_batches(cfg, "lcjax_shakespeare", batch_size=16, num_batches=10**6)
  for b in batches:
    check_contract(b, 16, 512)
  got = np.concatenate([b["targets"][b["segment_ids"] > 0] for b in batches])
  assert np.array_equal(got, tokens)
  weights = np.concatenate([b["loss_weights"][b["segment_ids"] > 0] for b in batches])
  assert np.all(weights == 1)
  # Exhausted split: fewer batches than asked, last one padded to full size.
  assert len(batches) == -(-len(bounds) // 16)
