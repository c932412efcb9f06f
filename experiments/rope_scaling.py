"""Finding: RoPE scaling extends a Transformer's usable context (PI, Chen et al. 2023; dynamic
NTK; YaRN, Peng et al. 2023; ABF, Xiong et al. 2023 and Code Llama).

    python experiments/sweep.py run experiments/rope_scaling.py \
        --root=runs/rope_scaling --parallel=2 --report=experiments/results/rope_scaling

The tiny RoPE Transformer trains once (the grid's base) on the plays at L = 128 tokens per row,
then is scored by loss over held-out plays at L, 2L, 4L and 8L (`ppl_by_position`) with each way
of handling positions beyond L:
  zero-shot (`<method>`): the base, evaluated with the method applied to its RoPE
    (`EvalConfig.attention`): nothing else changes;
  fine-tuned (`<method>_ft`): the base trained on for a short stage at 2L with the method
    applied (its optimizer state carried over), evaluated as it was fine-tuned.
Methods: none (plain RoPE), pi (linear interpolation, factor 4), ntk (dynamic NTK, factor 4),
yarn (factor 4), abf (base 1e4 -> 1e6).
The needle grid is rope_scaling_needle.py's (a model trained to retrieve, by the demo's recipe).
"""

import ml_collections

L = 128
BASE_STEPS = 800
TUNE_STEPS = 200


def methods(train_length: int) -> dict[str, dict]:
  """AttentionConfig overrides for each method (transformers' rope_scaling dicts), for a model
  trained at `train_length`, each aimed at 4x that length."""
  return {
      "none": {},
      "pi": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
      "ntk": {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0,
                               "original_max_position_embeddings": train_length}},
      "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": train_length}},
      "abf": {"rope_theta": 1e6},
  }


def fine_tuned(attention: dict, train_length: int, batch_size: int) -> list[str]:
  """A fine-tuned cell's bindings: the base (TrainConfig.init_from, moments included), then
  TUNE_STEPS at twice the training length with the method applied, as many tokens per step as
  the base's `batch_size` rows."""
  return [
      "TrainConfig.stages = [@long/Stage()]",
      f"TrainConfig.steps = {TUNE_STEPS}",
      "TrainConfig.init_mode = 'params_and_optimizer'",
      f"long/Stage.steps = {TUNE_STEPS}",
      f"long/Stage.sequence_length = {2 * train_length}",
      f"long/Stage.batch_size = {batch_size // 2}",
      "long/Stage.peak_learning_rate = 1e-3",
      "long/Stage.warmup_steps = 20",
      f"long/Stage.attention = {attention!r}",
  ]


def get_config():
  c = ml_collections.ConfigDict()
  c.gin_files = ["configs/demo.gin", "configs/data/shakespeare.gin",
                 "configs/models/transformer_tiny.gin"]
  c.bindings = [
      f"DataConfig.sequence_length = {L}",
      f"TrainConfig.steps = {BASE_STEPS}",
      "TrainConfig.batch_size = 8",
      "TrainConfig.log_every = 50",
      "TrainConfig.checkpoint_every = 200",
      "TrainConfig.eval_every = 100000",
      "EvalConfig.suite = ('ppl_by_position',)",
      f"PplByPosition.lengths = ({L}, {2 * L}, {4 * L}, {8 * L})",
      "PplByPosition.documents = 4",
  ]
  c.base = []  # the bindings above
  c.eval = True
  c.axes = [("method", {
      **{name: [f"EvalConfig.attention = {a!r}"] for name, a in methods(L).items()},
      **{f"{name}_ft": fine_tuned(a, L, 8) for name, a in methods(L).items()},
  })]
  c.metric = "suite/ppl_by_position/length=1024"
  c.figures = [("suite/ppl_by_position/length=*", "evaluation length")]
  c.claim = (
      "Expected (PI, YaRN, NTK, ABF papers): trained at 128 tokens, plain RoPE's held-out loss "
      "rises beyond 128 (rotations it never saw); a scaled RoPE degrades more gracefully even "
      "zero-shot (PI and YaRN trade a little loss within 128 for it), and a short fine-tune at "
      "256 with the scaling recovers most of the gap out to 1024. Scale: ~0.9M parameters, 800 "
      "steps of 8 x 128 tokens, then 200 steps of 4 x 256 for the fine-tuned cells; one seed.")
  return c
