import numpy as np

import lcjax.data as data
from lcjax.data import shakespeare, train_spm


def test_train_spm_and_use_it(tmp_path):
  path = train_spm.train(vocab_size=300, output=str(tmp_path / "spm"))
  assert path == str(tmp_path / "spm.model")
  cfg = data.DataConfig(vocabulary=path, sequence_length=1024)
  vocab = data.vocabulary(cfg)
  assert vocab.vocab_size == 300 and vocab.eos_id == 1
  (batch,) = data.make_eval_batches(cfg, "lcjax_shakespeare", batch_size=2, num_batches=1)
  assert batch["targets"].max() < 300
  first_play = shakespeare.split_texts("validation")[0]
  decoded = vocab.decode(batch["targets"][0][batch["segment_ids"][0] > 0].tolist())
  assert first_play.startswith(decoded[:200])
  it = data.make_train_iterator(cfg, batch_size=2)
  assert next(it)["targets"].shape == (2, 1024) and np.all(next(it)["targets"] < 300)
