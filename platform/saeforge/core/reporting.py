"""Tables and plots a person reads: plain text tables, CSV files, and the L0 vs CE-loss-recovered
plot with each variant's Pareto frontier. Shared by train, tune, eval, compare and bench."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def cell(value) -> str:
    """A number to 4 significant digits ('-' for NaN); a tuple or list comma-separated."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(cell(v) for v in value)
    return "" if value is None else str(value)


def format_rows(rows: list[dict], keys: list[str]) -> str:
    """A plain text table: one line per row, one column per key."""
    cells = [[cell(r.get(k)) for k in keys] for r in rows]
    widths = [max([len(k)] + [len(c[i]) for c in cells]) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> Path:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (l0, ce_loss_recovered) no other point beats on both (lower L0,
    higher CE loss recovered), sorted by L0."""
    finite = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    front = [
        i
        for i in finite
        if not any(
            points[j][0] <= points[i][0] and points[j][1] >= points[i][1] and points[j] != points[i] for j in finite
        )
    ]
    return sorted(front, key=lambda i: points[i])


def plot_l0_vs_ce(points: list[dict], path: str | Path, title: str = "", l0_max: float | None = None) -> Path:
    """Scatter of L0 (x) against CE loss recovered (y): one marker per point, one colour per
    variant, each variant's Pareto frontier as a step line; points with best/champion set are
    starred. points: dicts with variant, l0, ce_loss_recovered and optional label, best, champion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = [
        p
        for p in points
        if math.isfinite(p.get("l0", math.nan)) and math.isfinite(p.get("ce_loss_recovered", math.nan))
    ]
    by_variant: dict[str, list[dict]] = {}
    for p in finite:
        by_variant.setdefault(p["variant"], []).append(p)
    colours = plt.get_cmap("tab10")
    for i, (variant, pts) in enumerate(sorted(by_variant.items())):
        colour = colours(i % 10)
        xs, ys = [p["l0"] for p in pts], [p["ce_loss_recovered"] for p in pts]
        ax.scatter(xs, ys, color=colour, alpha=0.75, label=variant, s=28)
        front = pareto_front(list(zip(xs, ys)))
        if front:
            ax.step(
                [xs[j] for j in front],
                [ys[j] for j in front],
                where="post",
                color=colour,
                linewidth=1.2,
                linestyle="--",
            )
        for p in pts:
            if p.get("best") or p.get("champion"):
                ax.scatter(
                    [p["l0"]],
                    [p["ce_loss_recovered"]],
                    marker="*",
                    s=220,
                    color=colour,
                    edgecolors="black",
                    linewidths=0.8,
                    zorder=5,
                )
    if l0_max:
        ax.axvline(l0_max, color="grey", linestyle=":", linewidth=1, label=f"L0 bound {l0_max:g}")
    xs = [p["l0"] for p in finite]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    if ax.get_xscale() == "linear":
        ax.ticklabel_format(useOffset=False, style="plain")
    else:
        ax.ticklabel_format(useOffset=False, axis="y", style="plain")
    ax.margins(0.08)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("CE loss recovered")
    ax.set_title(title or "L0 vs CE loss recovered", fontsize=10)
    ax.grid(alpha=0.3)
    if by_variant:
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no finished runs to show", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
