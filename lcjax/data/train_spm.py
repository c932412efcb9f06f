"""Trains a SentencePiece vocabulary on the *train* plays only (offline).

  python -m lcjax.data.train_spm --vocab_size=8000 --output=/path/spm
writes /path/spm.model (and .vocab); use it with DataConfig.vocabulary="/path/spm.model".
Ids follow seqio's convention: pad=0, eos=1, unk=2, no bos.
"""
import argparse
import os

import sentencepiece as spm

from lcjax.data import shakespeare


def train(vocab_size: int, output: str) -> str:
  """Trains on the train-split plays; returns the path of the .model file."""
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  lines = [line for text in shakespeare.split_texts("train") for line in text.splitlines() if line]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_prefix=output,
      vocab_size=vocab_size,
      model_type="unigram",
      character_coverage=1.0,
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      # Keep text exactly (decode(encode(x)) == x): no normalization, and a
      # piece for the newlines that line-by-line training never shows it.
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      user_defined_symbols=["\n"],
      # Plays are small; use every sentence and keep the tool quiet.
      input_sentence_size=0,
      minloglevel=2,
  )
  return output + ".model"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vocab_size", type=int, required=True)
  parser.add_argument("--output", required=True, help="prefix; writes PREFIX.model")
  args = parser.parse_args(argv)
  print(train(args.vocab_size, args.output))


if __name__ == "__main__":
  main()
