"""The architectures the converter knows, by Hugging Face class name.

An architecture (`lcjax.convert.pieces.Architecture`) is three functions: config.json ->
`ModelConfig` (ConvertError on a field it cannot express), the inverse, and the `Piece` of every
lcjax parameter. Adding one is a module with those and a line in `_registry`.
"""

from lcjax.convert import llama, mamba2, nemotron_h
from lcjax.convert.pieces import Architecture
from lcjax.errors import ConvertError
from lcjax.models.config import ModelConfig


def _registry() -> dict[str, Architecture]:
  archs = [*llama.ARCHITECTURES, mamba2.ARCHITECTURE, nemotron_h.ARCHITECTURE]
  return {a.hf_class: a for a in archs}


def for_hf(config: dict) -> Architecture:
  """The architecture of a config.json; ConvertError naming it when unsupported."""
  registry = _registry()
  names = config.get("architectures") or []
  for name in names:
    if name in registry:
      return registry[name]
  raise ConvertError(f"config.json architectures={names}: lcjax converts {sorted(registry)}; "
                     f"nothing was written.")


def for_model(cfg: ModelConfig, hf_class: str | None = None) -> Architecture:
  """The named architecture, or the first that can express `cfg`; ConvertError listing why
  each cannot."""
  registry = _registry()
  if hf_class is not None:
    if hf_class not in registry:
      raise ConvertError(f"Unknown architecture {hf_class!r}: lcjax exports {sorted(registry)}.")
    registry[hf_class].hf_config(cfg)  # raises with the reason when it cannot
    return registry[hf_class]
  reasons = []
  for arch in registry.values():
    try:
      arch.hf_config(cfg)
      return arch
    except ConvertError as e:
      reasons.append(f"{arch.hf_class}: {e}")
  raise ConvertError("No Hugging Face architecture can express this model; nothing was "
                     "written.\n  " + "\n  ".join(reasons))
