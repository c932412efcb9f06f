"""lcjax: long-context language models in JAX."""
