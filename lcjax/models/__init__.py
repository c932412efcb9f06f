"""Per-mixer configs and modules (attention, Mamba-2, MLP), RoPE, the pattern registry (symbol
-> module, sub-config, FLOPs), the LM with decoding, and the per-token loss. Imports
lcjax.kernels and lcjax.parallel."""
