"""The train loop (a short top-down story), the jitted step, train state, optimizer,
checkpoints, metrics and FLOPs/MFU, and the training CLI. Builds its run with lcjax.run;
imports nothing from lcjax.eval."""
