"""Probe generators: a plain-Python oracle reads each answer back from the decoded prompt,
lengths are token-exact for byte and SentencePiece vocabularies, and draws follow the seed."""

import collections
import re

import pytest

from lcjax.data import passkey, probes, shakespeare, train_spm
from lcjax.data import mqar as mqar_task
from lcjax.data import phonebook as phonebook_task
from lcjax.data.probes import needle, ruler
from lcjax.data.vocab import from_name

@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  prefix = tmp_path_factory.mktemp("spm") / "spm"
  return from_name(train_spm.train(vocab_size=300, output=str(prefix)))


@pytest.fixture(scope="module", params=["byte", "spm"])
def vocab(request):
  return from_name("byte") if request.param == "byte" else request.getfixturevalue("spm")


def _text(vocab, ids):
  return vocab.decode(list(ids))


def _answer(vocab, example):
  """The target's text without its EOS."""
  assert example.target[-1] == vocab.eos_id
  return _text(vocab, example.target[:-1]).strip()


# Each generator at lengths it can hold, with extra arguments: (generator, lengths, kwargs).
LENGTH_DRIVEN = [
    (probes.niah, (128, 300, 1024), dict(depth=0.5, max_new_tokens=9)),
    (probes.ruler_niah, (1024, 2048), dict(variant="multiquery")),
    (probes.variable_tracking, (1024, 2048), dict(num_chains=2)),
    (probes.common_words, (1024, 2048), {}),
    (probes.frequent_words, (1024, 2048), {}),
    (probes.mqar, (300, 1024), dict(num_pairs=8)),
]


@pytest.mark.parametrize("generator, lengths, kwargs", LENGTH_DRIVEN,
                         ids=[g.__name__ for g, _, _ in LENGTH_DRIVEN])
def test_lengths_are_exact(vocab, generator, lengths, kwargs):
  for length in lengths:
    for example in generator(vocab, length=length, num=2, seed=0, **kwargs):
      max_new = kwargs.get("max_new_tokens") or generator.__kwdefaults__["max_new_tokens"]
      assert len(example.prompt) == length - max_new, (generator.__name__, length)
      assert len(example.target) <= max_new and example.meta["length"] == length
      assert example.meta["max_new_tokens"] == max_new


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("needle_kind", needle.NEEDLES)
@pytest.mark.parametrize("haystack", ["filler", "play"])
def test_niah_oracle_and_lengths(vocab, depth, needle_kind, haystack):
  max_new = needle.default_max_new_tokens(needle_kind)
  for length in (128, 300, 1024) if needle_kind == "digits" else (300, 1024):
    for example in probes.niah(vocab, length=length, depth=depth, num=2, seed=1,
                               haystack=haystack, needle=needle_kind):
      assert len(example.prompt) == length - max_new
      text = _text(vocab, example.prompt)
      (key,) = re.findall(r"The pass key is ([\w-]+)\. Remember it\.", text)
      assert (key,) == example.references == (_answer(vocab, example),)
      assert text.rstrip().endswith(passkey.QUESTION.strip())


def test_niah_shares_the_passkey_template():
  byte = from_name("byte")
  (example,) = probes.niah(byte, length=300, depth=0.3, num=1, seed=0)
  assert re.search(passkey.PROMPT_RE, _text(byte, example.prompt))


@pytest.mark.parametrize("haystack", ["filler", "play"])
def test_niah_needle_moves_with_depth(haystack):
  byte, depths = from_name("byte"), [0.0, 0.25, 0.5, 0.75, 1.0]
  offsets = [probes.niah(byte, length=2048, depth=d, num=1, seed=0, haystack=haystack,
                         needle="uuid")[0].meta["needle_offset"] for d in depths]
  assert offsets[0] == 0 and offsets == sorted(set(offsets)), offsets
  key_line = len(passkey.KEY_LINE.format(key="0" * 36))
  assert offsets[-1] == 2048 - 38 - key_line - len(passkey.QUESTION)


def test_play_haystack_is_held_out():
  byte = from_name("byte")
  train_text = "".join(shakespeare.split_texts("train"))
  validation_text = "".join(shakespeare.split_texts("validation"))
  for seed in range(3):
    (example,) = probes.niah(byte, length=4096, depth=1.0, num=1, seed=seed, haystack="play")
    hay = _text(byte, example.prompt[:example.meta["needle_offset"]])
    for start in (0, len(hay) // 2, len(hay) - 300):
      window = hay[start:start + 150]
      assert window in validation_text and window not in train_text, window


@pytest.mark.parametrize("variant", needle.VARIANTS)
def test_ruler_niah_oracle(vocab, variant):
  for example in probes.ruler_niah(vocab, variant=variant, length=1500, num=3, seed=2,
                                   haystack="play"):
    text = _text(vocab, example.prompt)
    values = collections.defaultdict(list)
    for key, value in re.findall(needle.RULER_NEEDLE_RE, text):
      values[key].append(value)
    asked = re.search(r"magic numbers for (.+?) mentioned in the text above\?", text).group(1)
    keys = re.split(r", | and ", asked)
    assert keys == example.meta["queries"]
    expected = tuple(v for k in keys for v in values[k])
    assert expected == example.references
    assert re.findall(r"\d+", _answer(vocab, example)) == list(expected)
    assert len(values) == (1 if variant in ("single", "multivalue") else 4)


def test_variable_tracking_oracle(vocab):
  for example in probes.variable_tracking(vocab, length=1500, num=3, seed=3, num_chains=3,
                                          num_hops=3):
    # The Shakespeare-trained SentencePiece model has no "=": it reads as unknown, " ⁇ ".
    text = re.sub(r"\s+⁇\s+", " = ", _text(vocab, example.prompt))
    value = re.search(r"assigned the value (\d+) in the text above", text).group(1)
    source = {}
    for name, number, other in re.findall(ruler.VT_RE, text):
      assert name not in source
      source[name] = number or other
    def resolve(name):
      while name in source:
        name = source[name]
      return name
    holders = {name for name in source if resolve(name) == value}
    assert len(source) == 3 * 4 and holders == set(example.references)
    assert _answer(vocab, example).split() == list(example.references)


def test_common_words_oracle(vocab):
  for length in (1024, 4096):
    for example in probes.common_words(vocab, length=length, num=2, seed=4):
      text = _text(vocab, example.prompt)
      counts = collections.Counter(re.findall(r"^\s?\d+\.\s+([a-z]+)$", text, re.MULTILINE))
      ranked = [w for w, _ in counts.most_common()]
      top = ranked[:10]
      assert set(top) == set(example.references) == set(_answer(vocab, example).split())
      assert min(counts[w] for w in top) > max(counts[w] for w in ranked[10:])
      assert example.meta["num_uncommon"] > 0


def test_frequent_words_oracle(vocab):
  for example in probes.frequent_words(vocab, length=2048, num=2, seed=5):
    text = _text(vocab, example.prompt)
    body = text[:text.index("Question:")]
    words = re.findall(r"\b(?:[bdfgklmnprstvz][aeiou]){3}\b", body)
    ranked = collections.Counter(words).most_common(4)
    assert ranked[2][1] > ranked[3][1]
    assert tuple(w for w, _ in ranked[:3]) == example.references
    assert _answer(vocab, example).split() == list(example.references)


def test_phonebook_oracle(vocab):
  for entries in (1, 20, 200):
    for example in probes.phonebook(vocab, entries=entries, num=2, seed=6):
      text = _text(vocab, example.prompt)
      book = dict(re.findall(phonebook_task.LINE_RE, text))
      name = re.search(r"What is the phone number of (.+?)\?", text).group(1)
      assert len(book) == entries and (book[name],) == example.references
      assert _answer(vocab, example) == book[name]
      assert example.meta["length"] == len(example.prompt) + example.meta["max_new_tokens"]


def test_mqar_oracle(vocab):
  for example in probes.mqar(vocab, length=1024, num_pairs=16, num=3, seed=7):
    text = _text(vocab, example.prompt)
    found = re.findall(r"([a-z]{3}):\s?(\d{2})", text)
    pairs = dict(found[:16])
    assert len(pairs) == 16
    # Every inline query is answered with its pair's value, as its value span decodes.
    inline = found[16:]
    assert len(inline) == 15 and all(pairs[k] == v for k, v in inline)
    spans = [_text(vocab, example.prompt[a:b]).strip() for a, b in example.meta["value_spans"]]
    assert spans == [v for _, v in inline]
    last = re.search(r"([a-z]{3}):$", text).group(1)
    assert (pairs[last],) == example.references == (_answer(vocab, example),)
    assert [k for k, _ in example.meta["queries"]] == [k for k, _ in inline] + [last]


def test_mqar_uses_the_training_format():
  byte = from_name("byte")
  (example,) = probes.mqar(byte, length=512, num_pairs=4, num=1, seed=0)
  head = _text(byte, example.prompt).split(mqar_task.SEPARATOR)[0]
  assert len(re.findall(mqar_task.PAIR_RE, head)) == 4


SEEDED = [
    (probes.niah, dict(length=300, depth=0.4, haystack="play")),
    (probes.ruler_niah, dict(length=1024, variant="multivalue")),
    (probes.variable_tracking, dict(length=1024)),
    (probes.common_words, dict(length=1024)),
    (probes.frequent_words, dict(length=1024)),
    (probes.phonebook, dict(entries=10)),
    (probes.mqar, dict(length=512, num_pairs=4)),
]


@pytest.mark.parametrize("generator, kwargs", SEEDED, ids=[g.__name__ for g, _ in SEEDED])
def test_same_seed_same_examples(generator, kwargs):
  byte = from_name("byte")
  first = generator(byte, num=3, seed=11, **kwargs)
  assert first == generator(byte, num=3, seed=11, **kwargs)
  other = generator(byte, num=3, seed=12, **kwargs)
  assert [e.prompt for e in first] != [e.prompt for e in other]
  assert len({e.prompt for e in first}) == 3


def test_too_short_a_length_says_how_to_fix():
  with pytest.raises(ValueError, match="raise length"):
    probes.ruler_niah(from_name("byte"), length=200, num=1, seed=0)
  with pytest.raises(ValueError, match="raise length"):
    probes.common_words(from_name("byte"), length=200, num=1, seed=0)
