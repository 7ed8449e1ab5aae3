"""Bringing an SAE to a target L0 by one sparsity factor: the next factor to try from the
(factor, L0) points measured so far. Pure numbers, no training.

Model: log L0 = a - s log factor locally (a larger penalty gives a lower L0, s > 0). Between two
measured points that bracket the target, interpolate in log-log; otherwise step from the point
nearest the target with the slope of the two nearest points (clamped to [SLOPE_MIN, SLOPE_MAX];
the first guess's SLOPE_GUESS when there is one point or the points disagree). A step is at most
a factor MAX_STEP. An L0 of 0 (every latent silent) counts as FLOOR_L0.
"""

from __future__ import annotations

import math

SLOPE_GUESS, SLOPE_MIN, SLOPE_MAX = 1.0, 0.25, 4.0
MAX_STEP = 30.0
FLOOR_L0 = 0.1


def log_error(l0: float, target: float) -> float:
    """|log(L0 / target)|: the distance a search minimises."""
    return abs(math.log(max(l0, FLOOR_L0) / target))


def matched(l0: float, target: float, tolerance: float) -> bool:
    """L0 within a relative `tolerance` of the target, symmetric in log (0.15: 0.87x .. 1.15x)."""
    return log_error(l0, target) <= math.log1p(tolerance)


def first_factors(n: int, ratio: float = 4.0) -> list[float]:
    """The first round's factors: n points geometric around 1 (the variant's defaults)."""
    return [ratio ** (i - (n - 1) / 2) for i in range(n)]


def next_factor(points: list[tuple[float, float]], target: float) -> float:
    """The factor to try next for `target`, from the measured (factor, L0) points."""
    pts = sorted((f, math.log(max(l0, FLOOR_L0))) for f, l0 in points)
    goal = math.log(target)
    for (f0, y0), (f1, y1) in zip(pts, pts[1:]):
        if (y0 - goal) * (y1 - goal) <= 0 and y0 != y1:  # bracketed: interpolate in log-log
            t = (goal - y0) / (y1 - y0)
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
    near = sorted(pts, key=lambda p: abs(p[1] - goal))
    slope = SLOPE_GUESS
    if len(near) >= 2 and near[0][0] != near[1][0]:
        s = -(near[0][1] - near[1][1]) / (math.log(near[0][0]) - math.log(near[1][0]))
        slope = min(max(s, SLOPE_MIN), SLOPE_MAX) if s > 0 else SLOPE_GUESS
    step = (near[0][1] - goal) / slope  # log factor to add: L0 above target -> larger factor
    step = max(-math.log(MAX_STEP), min(math.log(MAX_STEP), step))
    return near[0][0] * math.exp(step)


def closest(points: list[tuple[float, float]], target: float) -> tuple[float, float]:
    """The measured (factor, L0) nearest the target in log."""
    return min(points, key=lambda p: log_error(p[1], target))
