"""Passkey retrieval: find a number hidden at some depth in filler text.

One example is a prompt and its answer:
  prompt = filler[:cut] + KEY_LINE + filler[cut:] + QUESTION
  answer = the passkey digits
Loss is on the answer digits and on the EOS after them (so the model also
learns that the answer ends there), and, with `copy_loss`, in training on the
key's second mention in KEY_LINE (a copy of the first, 14 bytes back).
The prompt is kept as three segments around that second mention.
"""
import dataclasses
from typing import Optional

import gin
import numpy as np

from lcjax.config import check_types
from lcjax.data.splits import split_draws
from lcjax.errors import ConfigError

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. "
    "Here we go. There and back again. "
)
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "
SECOND_MENTION = "Remember it. {key}"  # where KEY_LINE repeats the key
# Matches a decoded prompt; group 1 is the key the prompt announces.
PROMPT_RE = r"The pass key is (\d+)\. Remember it\. \1 is the pass key\. "


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PasskeyConfig:
  """Passkey task parameters.

  prompt_bytes: upper bound on prompt length in bytes; None = as long as fits
    in one packed row with byte tokens (sequence_length - digits - 1 for EOS).
  min_prompt_bytes: None = every training prompt is prompt_bytes long; else each
    training prompt's length is uniform in [min_prompt_bytes, prompt_bytes] (several
    short ones pack into a row). Validation prompts are always prompt_bytes long.
  depth: where the key line goes, as a fraction of the filler; None = uniform
    random per example.
  copy_loss: training examples also have a loss on the key's second mention
    (retrieval at a short range, the same copy the answer needs at a long one).
  """

  prompt_bytes: Optional[int] = None
  min_prompt_bytes: Optional[int] = None
  depth: Optional[float] = None
  copy_loss: bool = False
  digits: int = 5
  num_train: int = 20000
  num_validation: int = 256
  train_seed: int = 1
  validation_seed: int = 2

  def __post_init__(self):
    check_types(self)  # a wrong-typed gin binding fails here, naming it


def min_prompt_bytes(digits: int) -> int:
  """The shortest prompt that still holds the key line and the question."""
  return len(KEY_LINE.format(key="0" * digits)) + len(QUESTION)


def resolve_prompt_bytes(cfg: PasskeyConfig, sequence_length: int) -> int:
  """Prompt length to use, validated against the packed row length."""
  prompt_bytes = cfg.prompt_bytes
  if prompt_bytes is None:
    prompt_bytes = sequence_length - cfg.digits - 1
  needed = min_prompt_bytes(cfg.digits)
  if prompt_bytes < needed:
    raise ConfigError(
        f"Passkey prompt of {prompt_bytes} bytes cannot hold the key line and "
        f"question ({needed} bytes). Fix: raise DataConfig.sequence_length to "
        f"at least {needed + cfg.digits + 1}, or set "
        f"PasskeyConfig.prompt_bytes >= {needed}."
    )
  return prompt_bytes


def make_prompt(key: str, depth: float, prompt_bytes: int) -> str:
  """Prompt of at most `prompt_bytes` bytes with `key` at `depth` of the filler.

  The filler is whole sentences, and the key line goes at the sentence
  boundary nearest to `depth` * len(filler).
  """
  room = prompt_bytes - len(KEY_LINE.format(key=key)) - len(QUESTION)
  sentences = [s + ". " for s in FILLER.split(". ") if s.strip()]
  filler, i = [], 0
  while sum(map(len, filler)) + len(sentences[i % len(sentences)]) <= room:
    filler.append(sentences[i % len(sentences)])
    i += 1
  bounds = np.cumsum([0] + [len(s) for s in filler])
  cut = int(np.argmin(np.abs(bounds - depth * bounds[-1])))
  return "".join(filler[:cut]) + KEY_LINE.format(key=key) + "".join(filler[cut:]) + QUESTION


def generate(cfg: PasskeyConfig, split: str, sequence_length: int):
  """Generates a split deterministically from its seed.

  Returns (segments [n, 4] str, loss [n, 4] int32): the prompt up to the key's
  second mention, that mention, the rest of the prompt, the answer.
  """
  prompt_bytes = resolve_prompt_bytes(cfg, sequence_length)
  n, rng = split_draws(cfg, split)
  keys = rng.integers(0, 10, size=(n, cfg.digits))
  depths = rng.uniform(0, 1, size=n) if cfg.depth is None else np.full(n, cfg.depth)
  lengths = np.full(n, prompt_bytes)
  if split == "train" and cfg.min_prompt_bytes is not None:
    shortest = max(cfg.min_prompt_bytes, min_prompt_bytes(cfg.digits))
    lengths = rng.integers(min(shortest, prompt_bytes), prompt_bytes + 1, size=n)
  segments = []
  for k, d, length in zip(keys, depths, lengths):
    key = "".join(map(str, k))
    prompt = make_prompt(key, float(d), int(length))
    second = prompt.index(SECOND_MENTION.format(key=key)) + len(SECOND_MENTION.format(key=""))
    segments.append([prompt[:second], key, prompt[second + len(key):], key])
  copy = int(cfg.copy_loss and split == "train")
  loss = np.tile(np.array([[0, copy, 0, 1]], np.int32), (n, 1))
  return np.array(segments, dtype=object), loss
