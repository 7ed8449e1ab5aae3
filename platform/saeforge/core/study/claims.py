"""The claims `saeforge study` tests: for each seed paper its variant, its baselines, its own
headline measure with the direction it claims and the numbers it reports; and the verdict logic,
pure functions on numbers with spreads.

Conventions:
- A measure is a flat evaluation key `<suite>/<metric>` (what `runner.flat_metrics` logs as
  `eval/<suite>/<metric>`), computed by the registered suites on every SAE alike.
- A statistic over the seeds of one SAE is (mean, spread, n) with spread the sample standard
  deviation (ddof 1; 0 for a single seed, which the report flags as "no spread").
- A difference variant - baseline counts only when |difference| > spread_variant +
  spread_baseline, i.e. the two mean +- spread intervals do not overlap.
- Verdict: "reproduced" (the claimed direction, beyond the spread), "reversed" (the opposite
  direction, beyond the spread), "not reproduced" (within the spread). A claim of exactly zero
  (the unlearning score) is reproduced when every seed scores 0.
This module names the papers' variants because it is the papers' table; the platform code that
runs the study reads it and never names a variant itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

REPRODUCED, NOT_REPRODUCED, REVERSED = "reproduced", "not reproduced", "reversed"
LOWER, HIGHER, ZERO = "lower", "higher", "zero"

# Every SAE of every study: the baseline every paper compares against, and the modern references.
PAPER_BASELINE = "relu"
MODERN_REFERENCES = ("topk", "matryoshka_batchtopk")

# The measures reported for every SAE (suite/metric), with the direction that is better.
COMMON_MEASURES = {
    "core/ce_loss_recovered": HIGHER,
    "core/explained_variance": HIGHER,
    "core/l0": "",
    "core/dead_fraction": LOWER,
    "probing/mean/sae_top_1_acc": HIGHER,
    "probing/mean/sae_top_5_acc": HIGHER,
    "absorption/absorption_rate": LOWER,
    "unlearning/score": HIGHER,
}


@dataclass(frozen=True)
class Claim:
    """One claim of a paper: its measure, the direction it claims for the variant against the
    baseline, and the numbers it reports (NaN: the paper gives none)."""

    key: str
    statement: str
    measure: str  # suite/metric
    direction: str  # LOWER, HIGHER (than the baseline) or ZERO (the variant's value itself)
    claimed_baseline: float = math.nan
    claimed_variant: float = math.nan
    note: str = ""


@dataclass(frozen=True)
class Study:
    seed: str  # the paper's number in seeds/
    variant: str
    extra_baselines: tuple[str, ...]  # the paper's own comparison variants besides relu
    claims: tuple[Claim, ...]
    suites: tuple[str, ...]  # evaluation suites every SAE of the study runs

    @property
    def variants(self) -> tuple[str, ...]:
        """The paper's variant first, then its baselines and the modern references."""
        return tuple(dict.fromkeys((self.variant, PAPER_BASELINE, *self.extra_baselines, *MODERN_REFERENCES)))

    @property
    def baselines(self) -> tuple[str, ...]:
        return self.variants[1:]


UNLEARNING = Claim(
    "unlearning_zero",
    "the unlearning score is exactly 0.0 for every configuration",
    "unlearning/score",
    ZERO,
    claimed_baseline=0.0,
    claimed_variant=0.0,
)
COMMON_SUITES = ("core", "probing", "absorption", "unlearning", "disentanglement", "groups")

STUDIES = {
    "group_ib": Study(
        "000",
        "group_ib",
        (),
        (
            Claim(
                "group_mi",
                "group-wise information bottleneck lowers the dependence between latents (KDE MI)",
                "disentanglement/top_pairs_kde_mi_mean",
                LOWER,
                note="the paper gives no number; group_ib's own window MI and inter-group correlation exist only "
                "for grouped SAEs (its diagnostics, in its child runs as disentanglement/inter_group_correlation)",
            ),
            Claim(
                "group_correlation",
                "group-wise information bottleneck lowers the correlation between latents",
                "disentanglement/mean_abs_corr",
                LOWER,
            ),
            UNLEARNING,
        ),
        COMMON_SUITES,
    ),
    "mi_ortho": Study(
        "001",
        "mi_ortho",
        (),
        (
            Claim(
                "mean_abs_corr",
                "MI-guided orthogonality cuts the mean absolute correlation between latents by 45%",
                "disentanglement/mean_abs_corr",
                LOWER,
                0.31,
                0.17,
            ),
            UNLEARNING,
        ),
        COMMON_SUITES,
    ),
    "cubic_ortho": Study(
        "002",
        "cubic_ortho",
        (),
        (
            Claim(
                "reconstruction",
                "cubic orthogonality lowers the reconstruction loss by 3.8%",
                "core/mse",
                LOWER,
                200.23,
                192.60,
                "the paper's loss is on Gemma-2-2B's raw scale; ours is the MSE of normalised activations",
            ),
            Claim(
                "absorption",
                "feature separation lowers first-letter absorption",
                "absorption/absorption_rate",
                LOWER,
                note="the paper reports no absorption number",
            ),
            UNLEARNING,
        ),
        COMMON_SUITES,
    ),
    "contrastive_hier": Study(
        "003",
        "contrastive_hier",
        (),
        (
            Claim(
                "centroid_cosine",
                "contrastive hierarchical grouping lowers the mean cosine between group centroids",
                "groups/centroid_cosine",
                LOWER,
                0.28,
                0.11,
                "a flat SAE's groups are 64 contiguous blocks of latent ids; Matryoshka's are its prefix blocks",
            ),
            UNLEARNING,
        ),
        COMMON_SUITES,
    ),
    "hsae": Study(
        "004",
        "hsae",
        ("temporal", "adaptive_mask"),
        (
            Claim(
                "zero_fraction",
                "the two-level hierarchy raises the fraction of zero activations (60% vs 40%)",
                "groups/zero_fraction",
                HIGHER,
                0.40,
                0.60,
                "at matched L0 and equal width the overall zero fraction is 1 - L0 / d_sae for every SAE: "
                "the paper's gap is a gap in L0; the per-level fractions are in the groups table",
            ),
            UNLEARNING,
        ),
        COMMON_SUITES,
    ),
}


def seed_names() -> list[str]:
    return list(STUDIES)


@dataclass(frozen=True)
class Stat:
    """A measure over the seeds of one SAE."""

    mean: float
    spread: float
    n: int
    values: tuple[float, ...] = ()

    @classmethod
    def of(cls, values) -> Stat:
        vals = tuple(float(v) for v in values if v is not None and math.isfinite(float(v)))
        if not vals:
            return cls(math.nan, math.nan, 0)
        mean = sum(vals) / len(vals)
        spread = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        return cls(mean, spread, len(vals), vals)


@dataclass(frozen=True)
class Verdict:
    verdict: str
    effect: float  # variant - baseline (for ZERO: the variant's mean)
    relative: float  # effect / |baseline| (NaN when the baseline is 0 or for ZERO)
    spread: float  # the sum of spreads the effect is measured against
    beyond_spread: bool


def compare(variant: Stat, baseline: Stat, direction: str) -> Verdict:
    """The verdict on "the variant is `direction` than the baseline" from the two statistics."""
    if direction == ZERO:
        return zero_verdict(variant)
    if variant.n == 0 or baseline.n == 0:
        return Verdict(NOT_REPRODUCED, math.nan, math.nan, math.nan, False)
    effect = variant.mean - baseline.mean
    spread = variant.spread + baseline.spread
    relative = effect / abs(baseline.mean) if baseline.mean else math.nan
    beyond = abs(effect) > spread
    wanted = effect < 0 if direction == LOWER else effect > 0
    verdict = NOT_REPRODUCED if not beyond else REPRODUCED if wanted else REVERSED
    return Verdict(verdict, effect, relative, spread, beyond)


def zero_verdict(variant: Stat, tolerance: float = 1e-12) -> Verdict:
    """A claim of exactly zero: reproduced when every seed's value is 0."""
    if variant.n == 0:
        return Verdict(NOT_REPRODUCED, math.nan, math.nan, math.nan, False)
    zero = max(abs(v) for v in variant.values) <= tolerance
    return Verdict(REPRODUCED if zero else NOT_REPRODUCED, variant.mean, math.nan, variant.spread, not zero)


@dataclass(frozen=True)
class Unlearned:
    """What an SAE's unlearning grid says: its score, and whether a non-zero score is specific
    (forget accuracy falls well beyond retain accuracy) or non-specific damage (both fall)."""

    score: float
    kind: str  # "zero", "specific" or "non-specific"
    forget_drop: float  # 1 - forget_acc_after / before at the scored setting (0 for a zero score)
    retain_drop: float


def unlearning_kind(score: float, best: dict | None, specificity: float = 2.0) -> Unlearned:
    """`best` is the grid row that gave the score (forget_acc_ratio, retain_acc_ratio: after /
    before). A non-zero score is specific when the forget drop exceeds `specificity` times the
    retain drop; otherwise forget and retain fell together: non-specific damage."""
    if not score or best is None:
        return Unlearned(0.0, "zero", 0.0, 0.0)
    forget_drop = 1.0 - best["forget_acc_ratio"]
    retain_drop = max(0.0, 1.0 - best["retain_acc_ratio"])
    kind = "specific" if forget_drop > specificity * retain_drop else "non-specific"
    return Unlearned(score, kind, forget_drop, retain_drop)
