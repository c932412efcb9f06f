"""Finding: recall needs attention, on Jelassi et al.'s phonebook lookup (the models and
settings of recall_needs_attention.py, trained on lcjax_phonebook instead of MQAR).

    python experiments/sweep.py run experiments/recall_phonebook.py \
        --root=runs/recall_phonebook --parallel=2 --report=experiments/results/recall_phonebook

Each example is a phone book of 2 or 4 lines ("Ada Bokitu: 555-0123"), then "What is the phone
number of Ada Bokitu? Ada Bokitu:"; loss on the number and EOS. The asked name is several tokens
(a first name and a 6-letter surname), so the lookup matches a multi-token key, unlike MQAR's
one-token keys. Scored by exact match (all 4 random digits right) on the 256 held-out books:
a model that does not read the book scores 1e-4, one that picks a line at random 1 / entries.
"""
import os

import ml_collections

from lcjax.sweep import grid as grids

ENTRIES = (2, 4)


def _recall_grid():
  """recall_needs_attention.py, whose models and settings this grid shares."""
  return grids.grid_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        "recall_needs_attention.py"), "recall_needs_attention")


def get_config():
  recall = _recall_grid()
  c = ml_collections.ConfigDict()
  c.gin_files = recall.GIN_FILES
  c.bindings = recall.MODEL_BINDINGS + [
      "DataConfig.train_mixture = 'lcjax_phonebook'",
      "DataConfig.eval_tasks = ('lcjax_phonebook',)",
      "DataConfig.sequence_length = 224",  # a 4-entry book is at most 223 bytes with EOS
      "TrainConfig.batch_size = 8",
      "TrainConfig.eval_batches = 32",  # every held-out book: one per row
      f"TrainConfig.steps = {recall.STEPS}",
  ]
  c.axes = [("model", recall.MODELS),
            ("entries", {str(e): [f"PhonebookConfig.min_entries = {e}",
                                  f"PhonebookConfig.max_entries = {e}"] for e in ENTRIES})]
  c.metric = "eval/lcjax_phonebook/exact_match"
  c.claim = (
      "Expected (Jelassi et al. 2024; Waleffe et al. 2024): the Transformer looks the number up "
      "whatever the book's size; the pure Mamba-2 model's accuracy falls as the book grows "
      "(its state must hold every entry); one attention mixer among Mamba-2 ones closes most "
      "of the gap. Scale: 0.2-0.3M parameters, "
      f"{recall.STEPS} steps of 8 x 224 tokens per cell (held-out accuracy logged every 250); "
      "one seed.")
  return c
