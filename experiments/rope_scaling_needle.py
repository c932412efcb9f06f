"""Finding: RoPE scaling extends a Transformer's usable context, measured by retrieval: the
needle grid beyond the training length (the perplexity half is rope_scaling.py).

    python experiments/sweep.py run experiments/rope_scaling_needle.py \
        --root=runs/rope_scaling_needle --parallel=2 \
        --report=experiments/results/rope_scaling_needle

A RoPE Transformer (3 attention + 3 SwiGLU blocks at d_model 64) trained once, the grid's base,
by the demo's recipe (configs/recipes/demo_retrieval.gin: copying, then mostly passkey
retrieval) at L = 256 tokens per row, then scored on the needle grid (generated,
string_match_all) at L, 2L, 4L and 8L x 5 depths with each way of handling positions beyond L:
zero-shot (`<method>`: the base evaluated with EvalConfig.attention), and after a short
fine-tune of the base at 2L with the method applied (`<method>_ft`: its optimizer state
carried over, as if the recipe had a third stage), with rope_scaling.py's methods and its
fine-tuning stage for this L.
"""
import os

import ml_collections

from lcjax.sweep import grid as grids

L = 256


def _rope_scaling_grid():
  """rope_scaling.py, whose methods and fine-tuning stage this grid shares."""
  return grids.grid_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        "rope_scaling.py"), "rope_scaling")


def get_config():
  rope = _rope_scaling_grid()

  def fine_tuned(attention):
    return [*rope.fine_tuned(attention, L, 8),
            "long/Stage.train_mixture = 'demo_retrieval'",
            "long/Stage.data = {'loss_normalization': 'documents'}"]

  c = ml_collections.ConfigDict()
  c.gin_files = ["configs/demo.gin", "configs/recipes/demo_retrieval.gin"]
  c.bindings = [
      "ModelConfig.pattern = '*-*-*-'",
      "AttentionConfig.position_encoding = 'rope'",
      f"DataConfig.sequence_length = {L}",
      "EvalConfig.suite = ('niah_grid',)",
      # Fixed: the default (1x-4x the last stage's length) would move with the fine-tune.
      f"NiahGrid.lengths = ({L}, {2 * L}, {4 * L}, {8 * L})",
      "DataConfig.eval_tasks = ('lcjax_passkey',)",
  ]
  c.base = []  # the recipe, as the bindings above configure it
  c.eval = True
  c.axes = [("method", {
      **{name: [f"EvalConfig.attention = {a!r}"] for name, a in rope.methods(L).items()},
      **{f"{name}_ft": fine_tuned(a) for name, a in rope.methods(L).items()},
  })]
  c.metric = f"suite/niah_grid/length={2 * L}"
  c.figures = [("suite/niah_grid/length=*", "evaluation length")]
  c.claim = (
      "Expected (PI, YaRN, NTK, ABF papers): trained at 256 tokens, plain RoPE stops finding "
      "the needle beyond 256; a scaled RoPE keeps finding it further even zero-shot, and a "
      "short fine-tune at 512 with the scaling recovers most of it out to 2048. Scale: 0.34M "
      "parameters, the demo's 1100 steps of 8 x 256 tokens, then 200 steps of 4 x 512 for the "
      "fine-tuned cells; 10 needles per length (5 depths x 2); one seed.")
  return c
