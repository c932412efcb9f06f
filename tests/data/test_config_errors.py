import pytest

import lcjax.data as data


def test_unknown_task_name():
  with pytest.raises(ValueError, match="Unknown seqio task or mixture 'nope'.*Fix"):
    data.make_train_iterator(data.DataConfig(train_mixture="nope"), batch_size=2)
  with pytest.raises(ValueError, match="Unknown seqio task 'lcjax_demo'.*Fix"):
    data.make_eval_batches(data.DataConfig(), "lcjax_demo", batch_size=2, num_batches=1)


def test_missing_vocabulary_file(tmp_path):
  cfg = data.DataConfig(vocabulary=str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="missing.model.*Fix.*train_spm"):
    data.make_train_iterator(cfg, batch_size=2)


def test_sequence_length_too_short_for_passkey():
  with pytest.raises(ValueError, match="Passkey prompt.*Fix: raise DataConfig.sequence_length"):
    cfg = data.DataConfig(train_mixture="lcjax_passkey", sequence_length=64)
    data.make_train_iterator(cfg, batch_size=2)


def test_mqar_too_long_for_sequence_length():
  with pytest.raises(ValueError, match="MQAR example.*Fix"):
    data.make_eval_batches(data.DataConfig(sequence_length=200), "lcjax_mqar", 2, 1)
