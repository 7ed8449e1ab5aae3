"""The report of a study: the per-SAE results aggregated over seeds, the verdict per claim, the
unlearning grids, as a Markdown file with tables and plots (matplotlib, headless).

Input: the final SAEs' results (each {"job": {variant, target, factor, seed}, "metrics":
{suite/metric: value}, "tables": {suite: {title: rows}}}), the calibration points, and the
study's scale (`info`). Statistics and verdicts follow `core.study.claims` (mean +- sample standard
deviation over seeds; a difference counts only beyond the sum of the two spreads).
"""

from __future__ import annotations

import math
from pathlib import Path

from saeforge.core.reporting import cell
from saeforge.core.study import claims as sc
from saeforge.core.study.l0_match import matched

REPORT_DIR = "report"
REPORT_FILE = "study.md"
L0 = "core/l0"
CE = "core/ce_loss_recovered"


def measures(studies) -> list[str]:
    """Every measure the report shows: the common ones, then each claim's."""
    return list(dict.fromkeys([*sc.COMMON_MEASURES, *(c.measure for s in studies for c in s.claims)]))


def aggregate(names, finals: list[dict], keys: list[str], tolerance: float) -> tuple[list[dict], dict]:
    """(rows, stats): one row per (variant, target) with each measure's mean and spread;
    stats[(variant, target)][measure] is its `Stat`."""
    groups: dict[tuple[str, float], list[dict]] = {}
    factors: dict[tuple[str, float], float] = {}
    for r in finals:
        if r.get("error"):
            continue
        key = (r["job"]["variant"], r["job"]["target"])
        groups.setdefault(key, []).append(r["metrics"])
        factors[key] = r["job"]["factor"]
    rows, stats = [], {}
    for (variant, target), runs in sorted(groups.items(), key=lambda kv: (names.index(kv[0][0]), kv[0][1])):
        st = {m: sc.Stat.of(run.get(m, math.nan) for run in runs) for m in keys}
        stats[(variant, target)] = st
        row = {"variant": variant, "target_l0": target, "seeds": len(runs), "factor": factors[(variant, target)]}
        row["l0_matched"] = bool(st[L0].n and matched(st[L0].mean, target, tolerance))
        for m in keys:
            row[m] = st[m].mean
            row[f"{m} spread"] = st[m].spread
        rows.append(row)
    return rows, stats


def verdicts(studies, stats: dict, targets) -> list[dict]:
    """One row per (claim, target, comparison): the paper's variant against each baseline of its
    study, or (a claim of zero) every SAE's own value."""
    out = []
    for study in studies:
        for claim in study.claims:
            for target in targets:
                mine = stats.get((study.variant, target), {}).get(claim.measure)
                if claim.direction == sc.ZERO:
                    pairs = [(v, None) for v in study.variants]
                else:
                    pairs = [(study.variant, b) for b in study.baselines]
                for variant, baseline in pairs:
                    s_v = stats.get((variant, target), {}).get(claim.measure)
                    s_b = stats.get((baseline, target), {}).get(claim.measure) if baseline else None
                    if s_v is None or (baseline and s_b is None) or (claim.direction != sc.ZERO and mine is None):
                        continue
                    v = sc.compare(s_v, s_b or sc.Stat.of([]), claim.direction)
                    out.append(
                        {
                            "paper": study.seed,
                            "claim": claim.key,
                            "measure": claim.measure,
                            "target_l0": target,
                            "sae": variant,
                            "baseline": baseline or "-",
                            "sae_value": _pm(s_v),
                            "baseline_value": _pm(s_b) if s_b else "-",
                            "claimed": _claimed(claim),
                            "effect": v.effect,
                            "relative": v.relative,
                            "verdict": v.verdict,
                            "seeds": min(s_v.n, s_b.n) if s_b else s_v.n,
                        }
                    )
    return out


def unlearning(finals: list[dict]) -> list[dict]:
    """Every final SAE's unlearning score, whether it is specific, and its grid."""
    out = []
    for r in finals:
        if r.get("error") or "unlearning/score" not in r["metrics"]:
            continue
        m = r["metrics"]
        best = (
            {k: m[f"unlearning/best/{k}"] for k in ("forget_acc_ratio", "retain_acc_ratio")}
            if "unlearning/best/forget_acc_ratio" in m
            else None
        )
        u = sc.unlearning_kind(m["unlearning/score"], best)
        grid = r.get("tables", {}).get("unlearning", {}).get("unlearning grid", [])
        out.append(
            {
                "variant": r["job"]["variant"],
                "target_l0": r["job"]["target"],
                "seed": r["job"]["seed"],
                "score": u.score,
                "kind": u.kind,
                "forget_drop": u.forget_drop,
                "retain_drop": u.retain_drop,
                "grid": grid,
            }
        )
    return out


def parts(names, finals: list[dict]) -> list[dict]:
    """Per (variant, target, part) of a variant's own parts (hsae's levels, Matryoshka's prefix
    blocks, contrastive_hier's groups): the zero fraction over seeds, from the groups suite."""
    by: dict[tuple, list[float]] = {}
    sizes: dict[tuple, int] = {}
    for r in finals:
        for rows in (r.get("tables", {}).get("groups") or {}).values() if not r.get("error") else ():
            for row in rows:
                key = (r["job"]["variant"], r["job"]["target"], row["part"])
                by.setdefault(key, []).append(row["zero_fraction"])
                sizes[key] = row["latents"]
    out = []
    for key in sorted(by, key=lambda k: (names.index(k[0]) if k[0] in names else 99, k[1])):
        s = sc.Stat.of(by[key])
        out.append(
            {
                "variant": key[0],
                "target_l0": key[1],
                "part": key[2],
                "latents": sizes[key],
                "zero_fraction": s.mean,
                "spread": s.spread,
            }
        )
    return out


def costs(names, finals: list[dict]) -> list[dict]:
    """Per variant: mean seconds of a final SAE's training, its evaluation and each suite."""
    out = []
    for variant in names:
        runs = [r for r in finals if not r.get("error") and r["job"]["variant"] == variant]
        if not runs:
            continue
        row = {"variant": variant, "saes": len(runs)}
        row["train_s"] = sum(r.get("train_seconds", math.nan) for r in runs) / len(runs)
        row["eval_s"] = sum(r.get("eval_seconds", math.nan) for r in runs) / len(runs)
        suites = sorted({k for r in runs for k in r["metrics"] if k.endswith("/seconds")})
        for key in suites:
            row[key.replace("/seconds", "_s")] = sum(r["metrics"].get(key, 0.0) for r in runs) / len(runs)
        out.append(row)
    return out


def _pm(s: sc.Stat | None) -> str:
    if s is None or s.n == 0:
        return "-"
    return f"{cell(s.mean)} ± {cell(s.spread)}" + (" (1 seed)" if s.n == 1 else "")


def _claimed(claim: sc.Claim) -> str:
    if math.isnan(claim.claimed_baseline) and math.isnan(claim.claimed_variant):
        return "no number"
    if claim.direction == sc.ZERO:
        return f"{claim.claimed_variant:g}"
    return f"{claim.claimed_baseline:g} -> {claim.claimed_variant:g}"


def markdown_table(rows: list[dict], keys: list[str]) -> str:
    if not rows:
        return "_(none)_\n"
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def build(studies, names, finals: list[dict], calibration: list[dict], info: dict) -> dict:
    """Everything the report holds, as data (the CLI prints from it, `write` renders it)."""
    keys = measures(studies)
    rows, stats = aggregate(list(names), finals, keys, info["tolerance"])
    verdict_rows = verdicts(studies, stats, info["targets"])
    unlearned = unlearning(finals)
    return {
        "info": info,
        "studies": studies,
        "measures": keys,
        "rows": rows,
        "stats": stats,
        "verdicts": verdict_rows,
        "unlearning": [{k: v for k, v in u.items() if k != "grid"} for u in unlearned],
        "unlearning_grids": unlearned,
        "parts": parts(list(names), finals),
        "costs": costs(list(names), finals),
        "calibration": calibration,
        "failed": [{"job": r["job"], "error": r["error"]} for r in finals if r.get("error")],
    }


def unlearning_summary(unlearned: list[dict]) -> str:
    nonzero = [u for u in unlearned if u["score"] > 0]
    specific = [u for u in nonzero if u["kind"] == "specific"]
    if not unlearned:
        return "No SAE was scored for unlearning."
    if not nonzero:
        return f"Every one of the {len(unlearned)} SAEs scores exactly 0.0, as the papers report."
    text = f"{len(nonzero)} of {len(unlearned)} SAEs score above 0; "
    if specific:
        names = ", ".join(f"{u['variant']} (L0 {u['target_l0']:g}, seed {u['seed']})" for u in specific)
        return text + f"{len(specific)} of them specifically (forget accuracy falls beyond retain accuracy): {names}."
    return (
        text
        + "none specifically: at every such setting forget and retain accuracy fell together (non-specific damage)."
    )


def render(report: dict, plots: list[Path]) -> str:
    info = report["info"]
    lines = [
        f"# saeforge study: {info['name']}",
        "",
        f"Model {info['model']}, hook {info['hook']}, d_sae {info['d_sae']}; {info['tokens']:,} activation tokens "
        f"({info['contexts']} contexts) produced once from {info['activations_source']} "
        f"({info['contexts_forwarded']} contexts forwarded) and read by every SAE; batch {info['batch_size']} tokens; "
        f"target L0s {', '.join(f'{t:g}' for t in info['targets'])} (tolerance {info['tolerance']:.0%}); "
        f"{info['seeds']} seed(s) per final SAE; {info['seconds'] / 60:.1f} min in all "
        f"(activations {info.get('activation_seconds', math.nan):.0f} s, L0 search "
        f"{info.get('calibration_seconds', math.nan):.0f} s, final SAEs {info.get('final_seconds', math.nan):.0f} s, "
        f"{info.get('concurrent_saes', 1)} SAE(s) at a time).",
        "",
        "Statistics are mean ± sample standard deviation over seeds. A difference counts only when it exceeds "
        "the sum of the two spreads; with one seed there is no spread and the verdicts are indicative only.",
        "",
    ]
    for study in report["studies"]:
        lines += [f"## Paper {study.seed}: {study.variant}", ""]
        for claim in study.claims:
            note = f" ({claim.note})" if claim.note else ""
            lines.append(
                f"- **{claim.key}**: {claim.statement}; measure `{claim.measure}`, claimed {_claimed(claim)}{note}."
            )
        lines.append("")
        rows = [v for v in report["verdicts"] if v["paper"] == study.seed]
        keys = ["claim", "target_l0", "sae", "baseline", "sae_value", "baseline_value", "claimed", "effect", "relative"]
        lines += ["### Verdicts", "", markdown_table(rows, [*keys, "verdict"]), ""]
    keys = ["variant", "target_l0", "seeds", "factor", "l0_matched"]
    lines += ["## Every SAE at matched L0 (means over seeds)", ""]
    lines.append(markdown_table(report["rows"], keys + report["measures"]))
    lines += ["", "Spreads (sample standard deviation over seeds):", ""]
    lines.append(markdown_table(report["rows"], ["variant", "target_l0"] + [f"{m} spread" for m in report["measures"]]))
    if report["parts"]:
        lines += [
            "",
            "## Zero fraction per part (each variant's own levels, groups or prefix blocks)",
            "",
            "The Matryoshka SAE's parts are its prefix blocks, measured as levels (`groups` suite).",
            "",
            markdown_table(report["parts"], ["variant", "target_l0", "part", "latents", "zero_fraction", "spread"]),
        ]
    lines += ["", "## Unlearning", "", unlearning_summary(report["unlearning"]), ""]
    lines.append(
        markdown_table(
            report["unlearning"], ["variant", "target_l0", "seed", "score", "kind", "forget_drop", "retain_drop"]
        )
    )
    lines += ["", "Full grids (after / before accuracy on held-out forget and retain text):", ""]
    for u in report["unlearning_grids"]:
        lines.append(f"**{u['variant']}, L0 {u['target_l0']:g}, seed {u['seed']}**")
        lines.append("")
        keys = [
            "n_latents",
            "multiplier",
            "latents_used",
            "forget_acc_ratio",
            "retain_acc_ratio",
            "forget_ce",
            "retain_ce",
        ]
        lines.append(markdown_table(u["grid"], keys))
    if report["costs"]:
        keys = list(dict.fromkeys(k for row in report["costs"] for k in row))
        lines += ["## Cost of a final SAE (seconds, mean over its seeds and targets)", ""]
        lines += [markdown_table(report["costs"], keys), ""]
    lines += [
        "## Matching L0: every calibration SAE",
        "",
        markdown_table(report["calibration"], ["round", "variant", "target", "factor", "l0", "error"]),
    ]
    if report["failed"]:
        lines += ["", "## Failed SAEs", ""]
        lines += [f"- {f['job']}: {f['error']}" for f in report["failed"]]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def plot_measure(stats: dict, names, measure: str, path: Path) -> Path:
    """The measure against the measured L0, one line per variant, error bars = spreads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in names:
        pts = sorted(
            ((st[L0], st[measure]) for (v, _), st in stats.items() if v == variant and st[measure].n),
            key=lambda point: point[0].mean,  # by L0 (a Stat has no order of its own)
        )
        if pts:
            ax.errorbar(
                [a.mean for a, _ in pts],
                [b.mean for _, b in pts],
                xerr=[a.spread for a, _ in pts],
                yerr=[b.spread for _, b in pts],
                marker="o",
                capsize=3,
                label=variant,
            )
    ax.set_xscale("log")
    ax.set_xlabel("L0 (held-out)")
    ax.set_ylabel(measure)
    ax.set_title(f"{measure} vs L0")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(report: dict, folder: Path) -> dict:
    """The report folder: study.md, one plot per claim measure and the L0 / CE frontier."""
    out = Path(folder) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(r["variant"] for r in report["rows"]))
    plots = []
    wanted = [CE] + [c.measure for s in report["studies"] for c in s.claims if c.direction != sc.ZERO]
    for measure in dict.fromkeys(wanted):
        slug = measure.replace("/", "_")
        plots.append(plot_measure(report["stats"], names, measure, out / f"{slug}_vs_l0.png"))
    path = out / REPORT_FILE
    path.write_text(render(report, plots))
    return {"report": path, "plots": plots}
