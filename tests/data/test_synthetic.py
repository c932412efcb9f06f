import dataclasses
import re

import numpy as np
import pytest

import lcjax.data as data
from lcjax.data import copying, mqar, passkey, phonebook
from lcjax.errors import ConfigError
from tests.data.helpers import documents

BYTE = data.vocabulary(data.DataConfig())


def _split(targets, weights):
  """Decoded prompt (tokens without loss) and the list of loss-bearing spans."""
  prompt = BYTE.decode([int(t) for t, w in zip(targets, weights) if w == 0 and t != BYTE.eos_id])
  spans, current = [], []
  for t, w in zip(targets.tolist(), weights.tolist()):
    if w:
      current.append(t)
    elif current:
      spans.append(current)
      current = []
  if current:
    spans.append(current)
  return prompt, spans


def test_passkey_answer_recoverable_for_every_validation_example():
  cfg = data.DataConfig(sequence_length=512)
  batches = data.make_eval_batches(cfg, "lcjax_passkey", batch_size=32, num_batches=100)
  docs = list(documents(batches))
  assert len(docs) == passkey.PasskeyConfig().num_validation
  for targets, weights in docs:
    prompt, spans = _split(targets, weights)
    assert len(targets) <= 512 and prompt.endswith(passkey.QUESTION)
    (key,) = re.findall(passkey.PROMPT_RE, prompt)
    (answer,) = spans
    assert answer[-1] == BYTE.eos_id  # the EOS after the digits carries loss
    assert BYTE.decode(answer[:-1]) == key and len(key) == 5


def test_copy_answer_is_the_prompts_string_for_every_validation_example():
  cfg = data.DataConfig(sequence_length=128)
  batches = data.make_eval_batches(cfg, "lcjax_copy", batch_size=32, num_batches=100)
  docs = list(documents(batches))
  ccfg = copying.CopyConfig()
  assert len(docs) == ccfg.num_validation
  lengths = set()
  for targets, weights in docs:
    prompt, (answer,) = _split(targets, weights)
    text, rest = prompt.split(copying.SEPARATOR)
    assert rest == "" and set(text) <= set(copying.ALPHABET)
    assert answer[-1] == BYTE.eos_id and BYTE.decode(answer[:-1]) == text
    lengths.add(len(text))
  assert min(lengths) >= ccfg.min_chars and max(lengths) <= ccfg.max_chars and len(lengths) > 10


def test_copy_bad_lengths_name_the_fix():
  with pytest.raises(ConfigError, match="min_chars"):
    copying.CopyConfig(min_chars=20, max_chars=10)
  cfg = data.DataConfig(sequence_length=64)  # 2 x 48 + 3 + EOS do not fit
  with pytest.raises(ConfigError, match="CopyConfig.max_chars"):
    data.make_eval_batches(cfg, "lcjax_copy", batch_size=2, num_batches=1)


def test_phonebook_answer_is_the_asked_names_number_for_every_validation_example():
  cfg = data.DataConfig(sequence_length=512)
  batches = data.make_eval_batches(cfg, "lcjax_phonebook", batch_size=32, num_batches=100)
  docs = list(documents(batches))
  pcfg = phonebook.PhonebookConfig()
  assert len(docs) == pcfg.num_validation
  sizes = set()
  for targets, weights in docs:
    prompt, (answer,) = _split(targets, weights)
    book = dict(re.findall(phonebook.LINE_RE, prompt))
    (asked,) = re.findall(r"What is the phone number of (.+)\? \1:$", prompt)
    assert answer[-1] == BYTE.eos_id and BYTE.decode(answer[:-1]) == " " + book[asked]
    assert len(set(book.values())) == len(book)  # numbers distinct: one right answer
    sizes.add(len(book))
  assert sizes == set(range(pcfg.min_entries, pcfg.max_entries + 1))


def test_phonebook_bad_sizes_name_the_fix():
  with pytest.raises(ConfigError, match="min_entries"):
    phonebook.PhonebookConfig(min_entries=8, max_entries=4)
  # The longest possible book of 16 entries is 498 bytes: it does not fit a row of 256.
  assert phonebook.example_bytes(phonebook.PhonebookConfig()) == 498
  cfg = data.DataConfig(sequence_length=256)
  with pytest.raises(ConfigError, match="PhonebookConfig.max_entries"):
    data.make_eval_batches(cfg, "lcjax_phonebook", batch_size=2, num_batches=1)


def test_mqar_answers_recoverable_for_every_validation_example():
  cfg = data.DataConfig(sequence_length=512)
  batches = data.make_eval_batches(cfg, "lcjax_mqar", batch_size=32, num_batches=100)
  docs = list(documents(batches))
  mcfg = mqar.MqarConfig()
  assert len(docs) == mcfg.num_validation
  for targets, weights in docs:
    prompt, spans = _split(targets, weights)
    context, queries = prompt.split(mqar.SEPARATOR)
    pairs = dict(re.findall(mqar.PAIR_RE, context))
    assert len(pairs) == mcfg.num_pairs  # keys are unique
    query_keys = re.findall(r"([a-z]{3}):", queries)
    assert len(query_keys) == len(spans) == mcfg.num_queries
    assert [BYTE.decode(s) for s in spans] == [pairs[k] for k in query_keys]
    assert weights[-1] == 0  # no loss on EOS


@pytest.mark.parametrize("key_letters,value_digits", [(1, 1), (2, 1), (3, 2)])
def test_mqar_format_lengths_and_answers(key_letters, value_digits):
  cfg = mqar.MqarConfig(num_pairs=12, num_queries=6, num_validation=50,
                        key_letters=key_letters, value_digits=value_digits)
  segments, loss = mqar.generate(cfg, "validation")
  for row, flags in zip(segments, loss):
    text = "".join(row)
    assert len(text) == mqar.example_bytes(cfg)
    context = text.split(mqar.SEPARATOR)[0]
    pairs = dict(re.findall(mqar.pair_re(key_letters, value_digits), context))
    assert len(pairs) == cfg.num_pairs  # keys are unique
    queried = [row[i - 1].split(" ")[-1].rstrip(":") for i in range(1, len(row), 2)]
    assert [pairs[k] for k in queried] == list(row[1::2])
    assert list(flags) == [0, 1] * cfg.num_queries


def test_mqar_filler_lengthens_the_example_and_leaves_the_recall_as_it_was():
  plain = mqar.MqarConfig(num_pairs=6, num_queries=6, num_validation=40, key_letters=1,
                          value_digits=1)
  padded = dataclasses.replace(plain, filler=30)
  plain_rows, plain_loss = mqar.generate(plain, "validation")
  padded_rows, padded_loss = mqar.generate(padded, "validation")
  assert mqar.example_bytes(padded) == mqar.example_bytes(plain) + 30
  assert (padded_loss == plain_loss).all()
  fillers = set()
  for a, b in zip(plain_rows, padded_rows):
    context, filler = re.fullmatch(r"([a-z0-9: ]+?)([A-Z]{30}) \| .*", b[0]).groups()
    assert context + mqar.SEPARATOR + a[0].split(mqar.SEPARATOR)[1] == a[0]
    assert list(a[1:]) == list(b[1:])  # the same queries and answers
    assert len("".join(b)) == mqar.example_bytes(padded)
    fillers.add(filler)
  assert len(fillers) == len(padded_rows)  # drawn per example


def test_mqar_negative_filler_names_the_binding():
  with pytest.raises(ConfigError, match="MqarConfig.filler"):
    mqar.generate(mqar.MqarConfig(filler=-1), "train")


def test_mqar_too_many_pairs_for_one_letter_keys_names_the_fix():
  with pytest.raises(ConfigError, match="key_letters"):
    mqar.generate(mqar.MqarConfig(num_pairs=14, num_queries=4, key_letters=1), "train")


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75, 1.0])
def test_passkey_depth_is_honoured(depth):
  cfg = passkey.PasskeyConfig(depth=depth, prompt_bytes=2000, num_validation=8)
  segments, loss = passkey.generate(cfg, "validation", sequence_length=4096)
  assert np.array_equal(loss, [[0, 0, 0, 1]] * 8)
  for prompt, key in map(_prompt_and_key, segments):
    assert len(prompt) <= 2000
    line = passkey.KEY_LINE.format(key=key)
    filler = prompt.replace(line, "")[: -len(passkey.QUESTION)]
    at = prompt.index(line)
    # Within one filler sentence of the requested depth.
    assert abs(at - depth * len(filler)) <= max(map(len, passkey.FILLER.split(". ")))


def test_passkey_random_depth_and_gin(gin_bindings):
  gin_bindings(**{"PasskeyConfig.num_validation": 64, "PasskeyConfig.depth": 0.0})
  cfg = data.DataConfig(sequence_length=512)
  batches = data.make_eval_batches(cfg, "lcjax_passkey", batch_size=8, num_batches=100)
  docs = list(documents(batches))
  assert len(docs) == 64
  for targets, weights in docs:
    prompt, _ = _split(targets, weights)
    assert prompt.startswith("The pass key is ")
  # Default depth is random: positions spread over the prompt.
  unbound = passkey.PasskeyConfig(depth=None, num_validation=256)
  segments, _ = passkey.generate(unbound, "validation", 512)
  where = [p.index("The pass key is") / len(p) for p, _ in map(_prompt_and_key, segments)]
  assert min(where) < 0.1 and max(where) > 0.7


def _prompt_and_key(row) -> tuple[str, str]:
  """A passkey example's segments (prompt in three pieces, then the answer) -> (prompt, key)."""
  return "".join(row[:3]), row[3]


def test_passkey_copy_loss_marks_the_keys_second_mention_in_training_only():
  cfg = passkey.PasskeyConfig(copy_loss=True, num_train=4, num_validation=4)
  for split, copy in (("train", 1), ("validation", 0)):
    segments, loss = passkey.generate(cfg, split, sequence_length=256)
    assert np.array_equal(loss, [[0, copy, 0, 1]] * 4)
    for row in segments:
      assert row[1] == row[3] and row[0].endswith(f"The pass key is {row[3]}. Remember it. ")


def test_passkey_min_prompt_bytes_varies_training_lengths_only():
  cfg = passkey.PasskeyConfig(min_prompt_bytes=100, num_train=64, num_validation=8)
  train = [len(p) for p, _ in map(_prompt_and_key, passkey.generate(cfg, "train", 256)[0])]
  valid = [len(p) for p, _ in map(_prompt_and_key, passkey.generate(cfg, "validation", 256)[0])]
  assert min(train) < 150 < max(train) <= 250
  assert min(valid) > 200  # every validation prompt fills the row


def test_synthetic_generation_is_deterministic():
  a = mqar.generate(mqar.MqarConfig(num_train=50), "train")
  b = mqar.generate(mqar.MqarConfig(num_train=50), "train")
  assert np.array_equal(a[0], b[0])
  v = mqar.generate(mqar.MqarConfig(num_validation=50), "validation")
  assert not np.array_equal(a[0], v[0])
  c = copying.CopyConfig(num_train=50, num_validation=50)
  assert np.array_equal(copying.generate(c, "train")[0], copying.generate(c, "train")[0])
  assert not np.array_equal(copying.generate(c, "train")[0], copying.generate(c, "validation")[0])
  p = phonebook.PhonebookConfig(num_train=20, num_validation=20)
  assert np.array_equal(phonebook.generate(p, "train")[0], phonebook.generate(p, "train")[0])
  assert not np.array_equal(phonebook.generate(p, "train")[0],
                            phonebook.generate(p, "validation")[0])
