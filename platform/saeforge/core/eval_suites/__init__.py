"""The evaluation suites and their registry: suite name -> function.

Every module in this package registers its suite(s) with `@register(name)`; the CLI, the JSON
report, the MLflow keys (`eval/<suite>/<metric>`) and the tests derive their lists from `names()`
and each suite's keyword options from its signature (never typed out by hand).

A suite is a function `suite(ctx: EvalContext, **options) -> SuiteResult`; `ctx` carries the
model, tokenizer, SAE and hook point (see `context.py`).

  context.py           EvalContext, SuiteResult and the forward passes the suites share
  runner.py            building a context, parsing options, running suites in this process
  core.py              reconstruction, sparsity, CE loss recovered and KL (core.evaluation)
  probing.py           sparse probing on the built-in corpus
  disentanglement.py   mean |corr|, KDE mutual information, decoder cosines
  groups.py            per-part zero fractions and centroid cosines of a variant's groups
  unlearning.py        domain unlearning by latent clamping
  absorption.py        first-letter feature absorption
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from saeforge.core.eval_suites.context import EvalContext, SuiteResult
from saeforge.errors import UserError

_SUITES: dict[str, Suite] = {}
_NOT_SUITES = {"context", "runner"}


@dataclass(frozen=True)
class Suite:
    name: str
    run: Callable[..., SuiteResult]

    @property
    def description(self) -> str:
        return (inspect.getdoc(self.run) or "").split("\n")[0]

    def options(self) -> dict[str, Any]:
        """The suite's keyword options and their defaults (what `--set SUITE.NAME=VALUE` accepts)."""
        params = list(inspect.signature(self.run).parameters.values())[1:]  # skip ctx
        return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def register(name: str):
    """Function decorator: register an evaluation suite under `name`."""

    def decorate(fn: Callable[..., SuiteResult]) -> Callable[..., SuiteResult]:
        if name in _SUITES:
            raise ValueError(f"evaluation suite '{name}' is registered twice")
        _SUITES[name] = Suite(name, fn)
        return fn

    return decorate


def names() -> list[str]:
    return sorted(_SUITES)


def get(name: str) -> Suite:
    try:
        return _SUITES[name]
    except KeyError:
        raise UserError(f"unknown evaluation suite '{name}' (known: {', '.join(names())})") from None


def parse_suites(text: str | list[str] | None) -> list[str]:
    """'core,probing' (or a list, or 'all' / None for every suite) -> checked suite names, in order."""
    if text is None or text == "all" or text == ["all"]:
        return names()
    items = text.split(",") if isinstance(text, str) else list(text)
    chosen = [s.strip() for s in items if s.strip()]
    if not chosen:
        raise UserError(f"no evaluation suite named (known: {', '.join(names())})")
    for name in chosen:
        get(name)
    return list(dict.fromkeys(chosen))


def coerce_option(suite: str, name: str, value: Any) -> Any:
    """A `--set` value in the type of the option's default (tuples: comma-separated)."""
    options = get(suite).options()
    if name not in options:
        known = ", ".join(options) or "none"
        raise UserError(f"unknown option '{name}' for suite '{suite}' (known: {known})")
    default = options[name]
    if not isinstance(value, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            return tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        if isinstance(default, int):
            number = float(value)
            if not number.is_integer():
                raise ValueError(value)
            return int(number)
        if isinstance(default, float):
            return float(value)
        return value
    except ValueError:
        raise UserError(f"{suite}.{name} expects {type(default).__name__}, got '{value}'") from None


def _load_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _NOT_SUITES and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_load_all()

__all__ = ["EvalContext", "Suite", "SuiteResult", "coerce_option", "get", "names", "parse_suites", "register"]
