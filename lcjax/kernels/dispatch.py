"""Picking a kernel implementation by name: one small mechanism for every op (attention, SSD).

An op has named implementations with one signature, "auto" (the backend's choice), and, per
implementation, an optional `supports(*args, **kwargs) -> reason | None` that says why it cannot
take given inputs. The model names an implementation in its config; `Dispatch.check_name`
validates that name at construction and `Dispatch.resolve` picks the function at trace time.
"""

import dataclasses
from collections.abc import Callable, Mapping

import jax

from lcjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Dispatch:
  op: str  # for messages: "attention", "ssd"
  impls: Mapping[str, Callable]
  auto: str | Mapping[str, str]  # the name "auto" runs: one for all backends, or per backend
  supports: Mapping[str, Callable[..., str | None]] = dataclasses.field(default_factory=dict)

  @property
  def choices(self) -> tuple[str, ...]:
    return ("auto", *sorted(self.impls))

  def check_name(self, impl: str, field: str) -> None:
    """Fails naming the config field `field` if `impl` is not "auto" or an implementation."""
    if impl not in self.choices:
      raise ConfigError(f"{field}={impl!r} is not one of {self.choices}.")

  def resolve(self, impl: str, *args, **kwargs) -> str:
    """The implementation name `impl` stands for on this backend; with inputs given, fails
    naming the cause when that implementation cannot take them."""
    if impl == "auto":
      impl = self.auto if isinstance(self.auto, str) else self.auto[jax.default_backend()]
    self.check_name(impl, f"{self.op} impl")
    check = self.supports.get(impl)
    reason = check(*args, **kwargs) if check is not None and args else None
    if reason:
      raise ConfigError(f"{self.op} impl {impl!r} cannot run these inputs: {reason} Choose "
                        f"another one of {self.choices}.")
    return impl
