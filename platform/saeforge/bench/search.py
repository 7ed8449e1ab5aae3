"""`saeforge bench --search N`: an N-trial `saeforge tune` against the same N trials run as N
separate `saeforge train` runs, each program a fresh process timed whole: a search must cost far
less than its trials one by one.

The search runs first, with the FIFO scheduler (every trial trains to its end, so both arms do
the same training); its trials' sampled values, plus the space's fixed ones, then become the
`--set` flags of the separate runs, which train on the same number of tokens of the same corpus
and evaluate on the same held-out contexts. Both arms read the prepared model from the same
cache (prepared before anything is timed) and log to one MLflow store of their own. What the
search saves: the model pass (once for all trials instead of once per run), the zero-ablated
evaluation pass (once per search), Ray's and MLflow's start-up (once), a worker group per trial
(a one-worker trial trains in its own process, where each run starts a TorchTrainer), and trials
side by side where the cores allow.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from saeforge.bench.processes import bench_env, saeforge_command, timed
from saeforge.jobs.arguments import BenchArgs


def tune_command(args: BenchArgs, storage: Path) -> list[str]:
    flags = {
        "--model": args.model,
        "--layer": args.layer,
        "--variant": args.variant,
        "--samples": args.search,
        "--tokens-per-trial": args.tokens,
        "--d-sae": args.d_sae,
        "--eval-contexts": args.eval_contexts,
        "--scheduler": "fifo",
        "--storage": storage,
        "--name": "bench",
    }
    return saeforge_command("tune", flags)


def trial_command(args: BenchArgs, overrides: dict, storage: Path) -> list[str]:
    flags = {
        "--model": args.model,
        "--layer": args.layer,
        "--variant": args.variant,
        "--tokens": args.tokens,
        "--d-sae": args.d_sae,
        "--eval-contexts": args.eval_contexts,
        "--storage": storage,
    }
    sets = [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]
    return saeforge_command("train", flags, *sets)


def completed_trials(search: dict, fixed: dict) -> list[tuple[dict, dict]]:
    """(row, `--set` pairs) of each completed trial: the space's fixed values, then the sampled ones."""
    rows = [row for row in search["rows"] if row["status"] == "completed"]
    return [(row, {**fixed, **{k: row[k] for k in search["params"]}}) for row in rows]


def run_search_bench(args: BenchArgs, say=print) -> dict:
    from saeforge.core.model import resolve_model
    from saeforge.jobs.tune import search_space
    from saeforge.jobs.validate import variant_names

    (variant,) = variant_names(args.variant)  # one variant: its tune space, tune_spaces/<variant>.yaml
    fixed = dict(search_space.load(search_space.default_space_path(variant), variant).fixed)
    resolve_model(args.model)  # prepared once, before anything is timed
    with tempfile.TemporaryDirectory(prefix="saeforge-search-bench-") as tmp:
        folder = Path(tmp)
        env = bench_env(folder)
        say(f"[bench] a {args.search}-trial search of {variant} (fifo: every trial to its end)...")
        search_wall, tuned = timed(tune_command(args, folder / "runs"), folder, env)
        search = tuned["searches"][0]
        runs = []
        for i, (row, overrides) in enumerate(completed_trials(search, fixed), 1):
            say(f"[bench] separate run {i}/{search['trials_completed']}: saeforge train --set {overrides}...")
            wall, summary = timed(trial_command(args, overrides, folder / "runs"), folder, env)
            # the same work: the run's held-out L0 and CE loss recovered are its trial's
            runs.append(
                {
                    "overrides": overrides,
                    "wall_s": wall,
                    **{f"run_{k}": summary["metrics"][k] for k in ("l0", "ce_loss_recovered")},
                    **{f"trial_{k}": row[k] for k in ("l0", "ce_loss_recovered")},
                }
            )
    separate_wall = sum(r["wall_s"] for r in runs)
    # a failed trial has no separate run: the search's time includes it, so a failure only
    # lowers the speed-up
    completed = search["trials_completed"]
    figures = {
        "variant": variant,
        "trials": args.search,
        "trials_completed": completed,
        "tokens_per_trial": args.tokens,
        "search_wall_s": search_wall,
        "search_max_concurrent": tuned["max_concurrent"],
        "separate_wall_s": separate_wall,
        "runs": runs,
        "speedup": separate_wall / search_wall,  # > 1: the search is faster
    }
    say(
        f"[bench] {variant}, {args.search} trials of {args.tokens:,} tokens, {args.eval_contexts} eval contexts, "
        f"{args.model} layer {args.layer}"
    )
    say("| program | wall |")
    say("|---|---|")
    at_once = tuned["max_concurrent"]
    say(f"| saeforge tune: {completed} of {args.search} trials done, {at_once} at once | {search_wall:.0f} s |")
    say(f"| {len(runs)} separate saeforge train runs, one after another | {separate_wall:.0f} s |")
    say(f"| speed-up (separate / search) | {figures['speedup']:.2f}x |")
    for r in runs:
        say(
            f"[bench] {r['overrides']}: L0 {r['trial_l0']:.2f} in the search, {r['run_l0']:.2f} alone; CE loss "
            f"recovered {r['trial_ce_loss_recovered']:.4f}, {r['run_ce_loss_recovered']:.4f} ({r['wall_s']:.0f} s)"
        )
    return figures
