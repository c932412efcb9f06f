"""Held-out metrics (loss, perplexity, token accuracy, exact match for tasks that declare
answers) and the eval CLI. Builds its run with lcjax.run; imports nothing from lcjax.train's
loop."""
