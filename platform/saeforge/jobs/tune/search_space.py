"""Tune-space YAML files: parse, validate against the variant's config, turn into a Ray Tune
param_space, and judge trials (objective, constraints, Pareto set).

The format (docs/tuning.md has the full description)::

    variant: relu
    objective: {metric: ce_loss_recovered, mode: max, l0_max: 128}    # or metric/mode lists
    constraints: [{metric: dead_fraction, max: 0.5}]                    # optional
    early_stopping: {metric: explained_variance, mode: max, grace_period: 40}   # optional
    params:
      l1_coeff: {sampler: loguniform, low: 0.01, high: 0.2}
      lr: {sampler: choice, values: [1.0e-4, 3.0e-4, 1.0e-3]}
    fixed:
      batch_size: 1024

Every error names the file, the key (as a dotted path) and what was expected, and is raised as a
UserError before Ray starts.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import variants
from saeforge.core.evaluation import CORE_METRICS
from saeforge.errors import UserError
from saeforge.jobs.tracking.registry import CHAMPION_METRIC

# What objectives and constraints are judged on: the evaluation's figures of an SAE (its
# standard errors and sizes left out), the headline one first.
EVAL_METRICS = (
    CHAMPION_METRIC,
    *(m for m in CORE_METRICS if m != CHAMPION_METRIC and not m.endswith("_stderr") and not m.startswith("eval_")),
)
# What the training loop logs (and reports to Tune every `report_every` steps): early stopping
# reads one of these, or a named loss term (loss/...) or a variant diagnostic (diag/...).
TRAIN_METRICS = ("loss", "explained_variance", "l0", "dead_fraction", "mean_abs_corr")
MODES = ("min", "max")
PARETO = (("l0", "min"), ("ce_loss_recovered", "max"))  # the multi-objective pair SAEs are judged on
SAMPLERS = {
    "choice": ("values",),
    "grid": ("values",),
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "randint": ("low", "high"),
}
TOP_KEYS = ("variant", "objective", "constraints", "early_stopping", "params", "fixed")
_NUMBER_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class Constraint:
    """A bound a trial must meet to count (e.g. L0 <= 128)."""

    metric: str
    min: float | None = None
    max: float | None = None

    def violation(self, metrics: dict[str, float]) -> float:
        """0 when met; else how far out, relative to the bound (inf for a missing/NaN value)."""
        value = metrics.get(self.metric, math.nan)
        if not math.isfinite(value):
            return math.inf
        out = 0.0
        if self.max is not None and value > self.max:
            out += (value - self.max) / max(abs(self.max), 1e-12)
        if self.min is not None and value < self.min:
            out += (self.min - value) / max(abs(self.min), 1e-12)
        return out

    def __str__(self) -> str:
        lo = f"{self.min:g} <= " if self.min is not None else ""
        hi = f" <= {self.max:g}" if self.max is not None else ""
        return f"{lo}{self.metric}{hi}"


@dataclass(frozen=True)
class EarlyStopping:
    """The intermediate metric ASHA compares trials on, and its schedule (in training steps)."""

    metric: str = "explained_variance"
    mode: str = "max"
    grace_period: int = 0  # 0: a quarter of the trial's steps
    reduction_factor: float = 2.0


@dataclass
class TuneSpace:
    path: Path
    variant: str
    metrics: tuple[str, ...]  # one metric (single objective) or the Pareto pair
    modes: tuple[str, ...]
    constraints: list[Constraint]
    early_stopping: EarlyStopping
    params: dict[str, dict]
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    @property
    def has_grid(self) -> bool:
        return any(spec["sampler"] == "grid" for spec in self.params.values())

    def as_pareto(self) -> TuneSpace:
        """The same space searched over (L0 min, CE loss recovered max)."""
        metrics, modes = zip(*PARETO)
        return TuneSpace(
            self.path, self.variant, metrics, modes, self.constraints, self.early_stopping, self.params, self.fixed
        )

    def as_single(self) -> TuneSpace:
        """The same space searched on CE loss recovered alone (the constraints still apply)."""
        return TuneSpace(
            self.path,
            self.variant,
            ("ce_loss_recovered",),
            ("max",),
            self.constraints,
            self.early_stopping,
            self.params,
            self.fixed,
        )

    def l0_max(self) -> float | None:
        bounds = [c.max for c in self.constraints if c.metric == "l0" and c.max is not None]
        return min(bounds) if bounds else None

    def param_space(self) -> dict:
        """Ray Tune's param_space: one sampler per searched field (fixed values are not in it)."""
        from ray import tune

        space = {}
        for name, spec in self.params.items():
            sampler = spec["sampler"]
            if sampler == "choice":
                space[name] = tune.choice(list(spec["values"]))
            elif sampler == "grid":
                space[name] = tune.grid_search(list(spec["values"]))
            elif sampler == "uniform":
                space[name] = tune.uniform(spec["low"], spec["high"])
            elif sampler == "loguniform":
                space[name] = tune.loguniform(spec["low"], spec["high"])
            else:
                space[name] = tune.randint(spec["low"], spec["high"])
        return space

    def representative(self) -> dict[str, Any]:
        """One value per searched field (the first choice, or the low end): to check it builds."""
        return {name: spec["values"][0] if "values" in spec else spec["low"] for name, spec in self.params.items()}

    # -- judging trials ---------------------------------------------------------------------------

    def violation(self, metrics: dict[str, float]) -> float:
        return sum(c.violation(metrics) for c in self.constraints)

    def feasible(self, metrics: dict[str, float]) -> bool:
        return all(math.isfinite(metrics.get(m, math.nan)) for m in self.metrics) and self.violation(metrics) == 0

    def score(self, metrics: dict[str, float]) -> float:
        """The single objective as the search sees it: the metric, worsened by the relative
        constraint violation so that the search is pushed back into the feasible region."""
        value = metrics.get(self.metrics[0], math.nan)
        if not math.isfinite(value):
            return math.nan
        penalty = self.violation(metrics)
        if not math.isfinite(penalty):
            return math.nan
        return value - penalty if self.modes[0] == "max" else value + penalty


def best_trial(rows: list[dict], space: TuneSpace) -> dict | None:
    """The search's best, the one trial it registers. Among trials that completed and meet every
    constraint (the objective's l0_max included): the highest CE loss recovered (a single
    objective on another metric: that metric's best). When none meets them: the completed trial
    closest to doing so (that metric worsened by the relative constraint violation), which is
    registered for the record but cannot become champion. None when no trial completed."""
    metric, mode = ("ce_loss_recovered", "max") if space.multi_objective else (space.metrics[0], space.modes[0])
    done = [r for r in rows if r.get("status") == "completed" and math.isfinite(r.get(metric, math.nan))]
    pick = max if mode == "max" else min
    feasible = [r for r in done if space.feasible(r)]
    if feasible:
        return pick(feasible, key=lambda r: r[metric])
    sign = -1 if mode == "max" else 1
    scored = [(r[metric] + sign * space.violation(r), i) for i, r in enumerate(done)]
    scored = [(score, i) for score, i in scored if math.isfinite(score)]
    return done[pick(scored)[1]] if scored else None


# -- parsing -------------------------------------------------------------------------------------


class _Reader:
    """Error messages that name the file, the key and what was expected."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, expected: str, got: Any = None, hint: str = "") -> UserError:
        got_text = "" if got is None else f", got {got!r}"
        return UserError(f"{self.path}: {key}: expected {expected}{got_text}{hint}")

    def mapping(self, value: Any, key: str, what: str = "a mapping") -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, what, value)
        return value

    def choice(self, value: Any, key: str, allowed) -> str:
        if value not in allowed:
            raise self.fail(key, "one of " + ", ".join(allowed), value)
        return value

    def number(self, value: Any, key: str, *, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, "a number", value, _string_hint(value))
        if positive and not value > 0:
            raise self.fail(key, "a number > 0", value)
        return value

    def no_extra(self, mapping: dict, key: str, allowed) -> None:
        extra = sorted(set(mapping) - set(allowed))
        if extra:
            prefix = f"{key}." if key else ""
            raise self.fail(prefix + str(extra[0]), "one of the keys " + ", ".join(allowed) + " (unknown key)")

    def config_field(self, key: str, field_name: str, searchable: dict, variant: str) -> str:
        """`key` when `field_name` is a searchable config field of the variant."""
        if field_name not in searchable:
            raise self.fail(
                key, f"a config field of {variant} ({', '.join(sorted(searchable))})", None, " (unknown field)"
            )
        return key

    def typed(self, value: Any, kind: type, key: str, field_name: str, variant: str) -> Any:
        """A YAML value checked against the config field's type (ints are fine for floats)."""
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        ok = ok or (kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            article = "an" if kind.__name__[0] in "aeiou" else "a"
            raise self.fail(
                key, f"{article} {kind.__name__} for {variant}'s '{field_name}'", value, _string_hint(value)
            )
        return float(value) if kind is float else value


def _string_hint(value: Any) -> str:
    if isinstance(value, str) and _NUMBER_TEXT.match(value.strip()):
        return (
            " (a string: YAML reads numbers like 1e-4 as text; write 1.0e-4)"
            if "e" in value.lower()
            else " (a string: remove the quotes)"
        )
    return ""


def default_space_path(variant: str) -> Path:
    """tune_spaces/<variant>.yaml of this checkout (SAEFORGE_TUNE_SPACES overrides the folder)."""
    folder = Path(os.environ.get("SAEFORGE_TUNE_SPACES", Path(__file__).resolve().parents[4] / "tune_spaces"))
    return folder / f"{variant}.yaml"


def load(path: str | Path, variant: str | None = None) -> TuneSpace:
    """Parse and validate one tune-space file (against `variant` when given)."""
    import yaml

    path = Path(path)
    r = _Reader(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"{path}: cannot read the tune space ({err.strerror or err})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    raw = r.mapping(raw, "(top level)", "a mapping with keys " + ", ".join(TOP_KEYS))
    r.no_extra(raw, "", TOP_KEYS)

    name = raw.get("variant")
    if not isinstance(name, str) or name not in variants.names():
        raise r.fail("variant", "a registered variant (" + ", ".join(variants.names()) + ")", name)
    if variant is not None and name != variant:
        raise r.fail("variant", f"'{variant}' (the variant being searched)", name)
    types = variants.get(name).Config.field_types()
    searchable = {k: v for k, v in types.items() if k not in ("d_in", "d_sae")}

    metrics, modes, constraints = _objective(r, raw.get("objective"))
    constraints += _constraints(r, raw.get("constraints"))
    stopping = _early_stopping(r, raw.get("early_stopping"))

    params_raw = r.mapping(raw.get("params"), "params", "a mapping of config field -> sampler")
    if not params_raw:
        raise r.fail("params", "at least one searched field", params_raw)
    params = {}
    for field_name, spec in params_raw.items():
        key = r.config_field(f"params.{field_name}", field_name, searchable, name)
        params[field_name] = _sampler(r, spec, key, field_name, searchable[field_name], name)

    fixed_raw = raw.get("fixed") or {}
    r.mapping(fixed_raw, "fixed", "a mapping of config field -> value")
    fixed = {}
    for field_name, value in fixed_raw.items():
        key = r.config_field(f"fixed.{field_name}", field_name, searchable, name)
        if field_name in params:
            raise r.fail(key, f"a field that is not also searched (params.{field_name})")
        fixed[field_name] = r.typed(value, searchable[field_name], key, field_name, name)
    return TuneSpace(path, name, metrics, modes, constraints, stopping, params, fixed)


def _objective(r: _Reader, raw: Any) -> tuple[tuple, tuple, list[Constraint]]:
    expected = "a mapping {metric, mode[, l0_max]} (metric/mode may be lists for a multi-objective search)"
    raw = r.mapping(raw, "objective", expected)
    r.no_extra(raw, "objective", ("metric", "mode", "l0_max"))
    metric, mode = raw.get("metric"), raw.get("mode")
    metrics = tuple(metric) if isinstance(metric, list) else (metric,)
    modes = tuple(mode) if isinstance(mode, list) else (mode,)
    if not metrics or len(metrics) > 2:
        raise r.fail("objective.metric", "one metric, or a list of two", metric)
    for i, m in enumerate(metrics):
        r.choice(m, "objective.metric" + (f"[{i}]" if len(metrics) > 1 else ""), EVAL_METRICS)
    if len(modes) != len(metrics):
        raise r.fail("objective.mode", f"{len(metrics)} mode(s), one per metric", mode)
    for i, m in enumerate(modes):
        r.choice(m, "objective.mode" + (f"[{i}]" if len(modes) > 1 else ""), MODES)
    if len(metrics) == 2 and set(zip(metrics, modes)) != set(PARETO):
        raise r.fail(
            "objective",
            "the Pareto pair metric: [l0, ce_loss_recovered], mode: [min, max]",
            {"metric": metric, "mode": mode},
        )
    constraints = []
    if "l0_max" in raw:
        constraints.append(Constraint("l0", max=r.number(raw["l0_max"], "objective.l0_max", positive=True)))
    return metrics, modes, constraints


def _constraints(r: _Reader, raw: Any) -> list[Constraint]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise r.fail("constraints", "a list of {metric, min and/or max}", raw)
    out = []
    for i, item in enumerate(raw):
        key = f"constraints[{i}]"
        item = r.mapping(item, key, "a mapping {metric, min and/or max}")
        r.no_extra(item, key, ("metric", "min", "max"))
        metric = r.choice(item.get("metric"), f"{key}.metric", EVAL_METRICS)
        if "min" not in item and "max" not in item:
            raise r.fail(key, "a min and/or a max", item)
        lo = r.number(item["min"], f"{key}.min") if "min" in item else None
        hi = r.number(item["max"], f"{key}.max") if "max" in item else None
        if lo is not None and hi is not None and lo > hi:
            raise r.fail(f"{key}.min", f"a value <= max ({hi})", lo)
        out.append(Constraint(metric, lo, hi))
    return out


def _early_stopping(r: _Reader, raw: Any) -> EarlyStopping:
    if raw is None:
        return EarlyStopping()
    raw = r.mapping(raw, "early_stopping", "a mapping {metric, mode, grace_period, reduction_factor}")
    r.no_extra(raw, "early_stopping", ("metric", "mode", "grace_period", "reduction_factor"))
    d = EarlyStopping()
    metric = raw.get("metric", d.metric)
    if not (metric in TRAIN_METRICS or (isinstance(metric, str) and metric.startswith(("loss/", "diag/")))):
        raise r.fail(
            "early_stopping.metric",
            "a training metric (" + ", ".join(TRAIN_METRICS) + ", loss/TERM or diag/NAME)",
            metric,
        )
    mode = r.choice(raw.get("mode", d.mode), "early_stopping.mode", MODES)
    grace = raw.get("grace_period", d.grace_period)
    if isinstance(grace, bool) or not isinstance(grace, int) or grace < 0:
        raise r.fail("early_stopping.grace_period", "a whole number of training steps >= 0", grace)
    factor = r.number(raw.get("reduction_factor", d.reduction_factor), "early_stopping.reduction_factor")
    if factor <= 1:
        raise r.fail("early_stopping.reduction_factor", "a number > 1", factor)
    return EarlyStopping(metric, mode, grace, float(factor))


def _sampler(r: _Reader, spec: Any, key: str, field_name: str, kind: type, variant: str) -> dict:
    spec = r.mapping(spec, key, "a mapping {sampler: " + "|".join(SAMPLERS) + ", ...}")
    sampler = r.choice(spec.get("sampler"), f"{key}.sampler", tuple(SAMPLERS))
    needed = SAMPLERS[sampler]
    r.no_extra(spec, key, ("sampler", *needed))
    for k in needed:
        if k not in spec:
            raise r.fail(f"{key}.{k}", f"'{k}' (the {sampler} sampler needs " + " and ".join(needed) + ")")
    if sampler in ("choice", "grid"):
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise r.fail(f"{key}.values", "a non-empty list", values)
        return {
            "sampler": sampler,
            "values": [r.typed(v, kind, f"{key}.values[{i}]", field_name, variant) for i, v in enumerate(values)],
        }
    if kind in (str, bool):
        raise r.fail(f"{key}.sampler", f"choice or grid for the {kind.__name__} field '{field_name}'", sampler)
    if sampler == "randint":
        low, high = (r.typed(spec[k], int, f"{key}.{k}", field_name, variant) for k in ("low", "high"))
    else:
        if kind is int:
            raise r.fail(f"{key}.sampler", f"randint or choice for the int field '{field_name}'", sampler)
        low, high = (r.typed(spec[k], float, f"{key}.{k}", field_name, variant) for k in ("low", "high"))
    if not low < high:
        raise r.fail(f"{key}.high", f"a value > low ({low})", high)
    if sampler == "loguniform" and low <= 0:
        raise r.fail(f"{key}.low", "a value > 0 (loguniform)", low)
    return {"sampler": sampler, "low": low, "high": high}


def check_builds(space: TuneSpace, d_in: int, d_sae: int) -> None:
    """The fixed values plus one value per searched field must build the variant at these sizes."""
    cls = variants.get(space.variant)
    try:
        cls(cls.Config.build(d_in=d_in, d_sae=d_sae, overrides={**space.fixed, **space.representative()}))
    except (variants.ConfigError, ValueError) as err:
        raise UserError(
            f"{space.path}: params/fixed: expected values that build {space.variant} at "
            f"d_in {d_in}, d_sae {d_sae}: {err}"
        ) from None
