"""Pure functions for the sequence-mixing math, each with its reference: the one attention mask
(mask.py), tile math (tiles.py), attention (reference, blockwise, Pallas, XLA), SSD (scan,
minimal, chunked, Pallas), the causal conv, one dispatch (dispatch.py) and the one-device ops
object (ops.py). Imports only jax."""
