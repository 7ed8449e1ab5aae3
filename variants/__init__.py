"""The SAE variants and their registry.

  base.py     the protocol every variant implements (Variant, VariantConfig, LossOut, LinearSAE)
  common.py   maths several variants share (MSE, L1s, InfoNCE, correlations, KDE MI, AuxK, ...)
  <name>.py   one module per variant, registered under its module's name with `@register`

Lists of variants (CLI help, tests, tune spaces) are always derived from `names()`, never typed
out by hand.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import MISSING

from variants.base import ConfigError, LossOut, Variant, VariantConfig

_REGISTRY: dict[str, type[Variant]] = {}
_NOT_VARIANTS = {"base", "common"}


class UnknownVariant(KeyError):
    def __str__(self) -> str:
        return f"unknown variant '{self.args[0]}' (known: {', '.join(names())})"


def register(name: str):
    """Class decorator: register a Variant subclass under `name` (its module's name)."""

    def decorate(cls: type[Variant]) -> type[Variant]:
        if name in _REGISTRY:
            raise ValueError(f"variant '{name}' is registered twice")
        if cls.__module__.rsplit(".", 1)[-1] != name:
            raise ValueError(f"variant '{name}' must live in variants/{name}.py")
        cls.name = name
        cls.architecture = cls.saelens_architecture or f"saeforge_{name}"
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _NOT_VARIANTS and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[Variant]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownVariant(name) from None


def build(name: str, *, d_in: int, d_sae: int, overrides: dict | None = None) -> Variant:
    """Construct a variant from its name, sizes and `field=value` overrides."""
    cls = get(name)
    return cls(cls.Config.build(d_in=d_in, d_sae=d_sae, overrides=overrides))


def from_config_dict(name: str, cfg: dict) -> Variant:
    """Rebuild a variant from the config dict saved with it. A dict from another saeforge
    version (a field this one does not know, or lacks one it needs) is refused in one line."""
    cls = get(name)
    fields = dataclasses.fields(cls.Config)
    unknown = sorted(set(cfg) - {f.name for f in fields})
    needed = [f.name for f in fields if f.default is MISSING and f.default_factory is MISSING and f.name not in cfg]
    problems = []
    if unknown:
        problems.append(f"fields this saeforge does not know: {', '.join(unknown)}")
    if needed:
        problems.append(f"no value for: {', '.join(needed)}")
    if problems:
        raise ConfigError(f"a saved {name} SAE's config does not match this saeforge's {name} ({'; '.join(problems)})")
    return cls(cls.Config(**cfg))


_load_all()

__all__ = [
    "ConfigError",
    "LossOut",
    "UnknownVariant",
    "Variant",
    "VariantConfig",
    "build",
    "from_config_dict",
    "get",
    "names",
    "register",
]
