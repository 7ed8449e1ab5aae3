"""The driver of `saeforge study SEED`: a seed paper's comparison, re-run on the platform at
matched L0, with a verdict per claim (docs/study.md).

1. Validate everything (`validate.plan_study`: one line and exit 2 for a bad input, before Ray).
2. One model pass (`sweep.open_sweep`): the activations are produced once (optionally an
   activation cache on disk) and every SAE of the study reads them.
3. Matched L0: an `l0_field` variant gets its field set to each target; every other variant is
   brought to each target by rounds of SAEs over one factor on its `sparsity_fields` (round
   one: a few factors around its defaults; then per target the next factor from every point
   measured so far, `core.study.l0_match`), until L0 is within the tolerance or the rounds run
   out.
4. The final SAEs: every (variant, target) at its factor, `--seeds` times, each evaluated with
   every suite of the study and logged as a child run of the study's MLflow run.
5. Verdicts (`core.study.claims`) and the report (`core.study.report`): Markdown, plots, tables,
   logged to the study's run and printed.
A study stopped by Ctrl-C or SIGTERM ends its MLflow run, and its SAEs' unfinished runs, KILLED.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import variants
from saeforge.core.reporting import write_csv
from saeforge.core.study import l0_match
from saeforge.core.study import report as study_report
from saeforge.jobs import sweep
from saeforge.jobs.arguments import StudyArgs
from saeforge.jobs.plan import StudyPlan
from saeforge.jobs.runtime.failures import one_line
from saeforge.jobs.runtime.ray_cluster import ray_driver
from saeforge.jobs.study.trial import CALIBRATION, FINAL, StudyContext, StudyJob, study_trial
from saeforge.jobs.tracking import store
from saeforge.jobs.validate import plan_study


def run_study(args: StudyArgs, progress=print) -> dict:
    """The whole `saeforge study`: returns its summary (also printed by the CLI)."""
    started = time.time()
    study, base, contexts = plan_study(args, progress)
    with ray_driver(args.address):
        base, acts = sweep.open_sweep(base, contexts, args.activations, progress)
        concurrency = sweep.trial_concurrency(args)
        base = sweep.with_trial_share(base, concurrency)
        name = args.name or f"study-{args.study}-{time.strftime('%Y%m%d-%H%M%S')}"
        storage = Path(args.storage).expanduser().resolve()
        folder = storage / name
        folder.mkdir(parents=True, exist_ok=True)
        params = study_params(args, study, base, acts.source)
        with sweep.parent_run(base, name, {"saeforge.kind": "study"}, params, acts) as parent_run_id:
            ctx = StudyContext(
                base,
                acts.dataset,
                acts.contexts,
                args.tokens,
                study.overrides,
                study.suites,
                study.suite_options,
                parent_run_id,
                str(folder),
            )
            rounds = Rounds(ctx, storage, concurrency[0], progress)
            phase = time.time()
            factors, calibration = calibrate(study, args, rounds)
            calibration_seconds, phase = time.time() - phase, time.time()
            jobs = [StudyJob(v, t, f, seed, FINAL) for (v, t), f in factors.items() for seed in range(study.seeds)]
            progress(f"saeforge: training and evaluating {len(jobs)} final SAE(s), {rounds.concurrency} at a time")
            finals = rounds.run(jobs, f"{name}-final")
            times = {
                "seconds": time.time() - started,
                "activation_seconds": acts.seconds,
                "calibration_seconds": calibration_seconds,
                "final_seconds": time.time() - phase,
            }
            info = study_info(args, study, base, acts, name, times, rounds.concurrency)
            report, paths = write_report(study, finals, calibration, info, folder)
    return {
        **info,
        "parent_run_id": parent_run_id,
        "experiment_id": base.tracking.experiment_id,
        "tracking_uri": store.redact(base.tracking.uri),
        "activations": acts.summary(),
        "factors": [{"variant": v, "target": t, "factor": f} for (v, t), f in factors.items()],
        "calibration": calibration,
        "saes": [{k: r.get(k) for k in ("job", "run_id", "sae_dir", "error", "steps")} for r in finals],
        "rows": report["rows"],
        "verdicts": report["verdicts"],
        "unlearning": report["unlearning"],
        "report": str(paths["report"]),
        "plots": [str(p) for p in paths["plots"]],
    }


def study_params(args: StudyArgs, study: StudyPlan, base, source: str) -> dict:
    """What the study's parent run logs as its params."""
    return {
        "study": args.study,
        "variants": ",".join(study.variants),
        "targets": ",".join(f"{t:g}" for t in study.targets),
        "seeds": study.seeds,
        "tokens": args.tokens,
        "batch_size": args.batch_size,
        "tolerance": args.tolerance,
        "model": args.model,
        "hook": base.hook.name,
        "d_sae": base.variant.d_sae,
        "activations": source,
    }


def study_info(args: StudyArgs, study: StudyPlan, base, acts, name: str, times: dict, concurrency: int) -> dict:
    """What the report and the summary say about the study's scale and time."""
    return {
        "name": name,
        "model": args.model,
        "hook": base.hook.name,
        "d_sae": base.variant.d_sae,
        "tokens": acts.tokens,
        "contexts": acts.contexts,
        "activations_source": acts.source,
        "contexts_forwarded": acts.contexts_forwarded,
        "targets": list(study.targets),
        "seeds": study.seeds,
        "tolerance": args.tolerance,
        "batch_size": args.batch_size,
        **times,
        "concurrent_saes": concurrency,
    }


def write_report(study: StudyPlan, finals: list[dict], calibration: list[dict], info: dict, folder: Path):
    """The calibration table, the report (Markdown, plots, tables) and the study's metrics, on
    disk and in the study's MLflow run. Returns (report, its paths)."""
    import mlflow

    write_csv(calibration, folder / "calibration.csv")  # before the report: each SAE's result is on disk too
    report = study_report.build(study.studies, study.variants, finals, calibration, info)
    paths = study_report.write(report, folder)
    mlflow.log_artifacts(str(folder / study_report.REPORT_DIR), artifact_path="study")
    mlflow.log_artifact(str(folder / "calibration.csv"), artifact_path="study")
    failed = sum(1 for r in finals if r.get("error"))
    counts = {"saes": len(finals), "saes_failed": failed, "calibration_saes": len(calibration)}
    mlflow.log_metrics({**counts, "seconds": info["seconds"]})
    return report, paths


class Rounds:
    """Runs rounds of SAEs: one Tuner per round over its jobs (a grid, `concurrency` at once)."""

    def __init__(self, ctx: StudyContext, storage: Path, concurrency: int, progress):
        self.ctx, self.storage, self.concurrency, self.progress = ctx, storage, concurrency, progress

    def run(self, jobs: list[StudyJob], name: str) -> list[dict]:
        """Each job's result (its result.json), or its error."""
        from ray import tune

        resources = sweep.trial_resources(self.ctx.plan)  # each SAE trains inside its trial
        trainable = tune.with_resources(tune.with_parameters(study_trial, ctx=self.ctx), resources)
        tuner = tune.Tuner(
            trainable,
            param_space={"job": tune.grid_search([job.as_dict() for job in jobs])},
            # a trial process serves the next SAE: no new process, the evaluation model kept
            tune_config=tune.TuneConfig(max_concurrent_trials=self.concurrency, reuse_actors=True),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(self.storage),
                verbose=0,
                callbacks=[sae_done_printer(len(jobs), self.progress)],
            ),
        )
        out = []
        for result in tuner.fit():
            job = (result.config or {}).get("job", {})
            path = (result.metrics or {}).get("result_file")
            if result.error or not path:
                out.append({"job": job, "error": one_line(result.error or "no result"), "metrics": {}})
            else:
                out.append(json.loads(Path(path).read_text()))
        return out


def sae_done_printer(total: int, progress):
    """A Tune callback printing one line per SAE of a round as it ends (a study's rounds run for
    tens of minutes on a CPU): its place in the round, what it is, its L0 or its error, its time."""
    from ray.tune import Callback

    class SaeDone(Callback):
        def __init__(self):
            self.done, self.started = 0, time.time()

        def _line(self, trial, outcome: str) -> None:
            self.done += 1
            job = (trial.config or {}).get("job", {})
            what = f"{job.get('variant', '?')} target L0 {job.get('target', 0):g} seed {job.get('seed', 0)}"
            minutes = (time.time() - self.started) / 60
            progress(f"  SAE {self.done}/{total} ({what}): {outcome} [{minutes:.1f} min into the round]")

        def on_trial_complete(self, iteration, trials, trial, **info):
            l0 = (trial.last_result or {}).get("l0", math.nan)
            self._line(trial, f"L0 {l0:.1f}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "failed")

    return SaeDone()


def calibrate(study: StudyPlan, args: StudyArgs, rounds: Rounds) -> tuple[dict, list[dict]]:
    """Per (variant, target) the factor whose L0 is nearest the target, and every point measured."""
    points: dict[str, list[tuple[float, float]]] = {}
    rows: list[dict] = []
    searched = [v for v in study.variants if not variants.get(v).l0_field]
    prefix = f"{Path(rounds.ctx.folder).name}-calibration"

    def measure(jobs: list[StudyJob], round_no: int) -> None:
        for r in rounds.run(jobs, f"{prefix}-{round_no}"):
            l0, job = r["metrics"].get("l0", math.nan), r["job"]
            rows.append({"round": round_no, **job, "l0": l0, "error": r.get("error", "")})
            if math.isfinite(l0):
                points.setdefault(job["variant"], []).append((job["factor"], l0))

    first = l0_match.first_factors(max(2, len(study.targets)))
    jobs = [StudyJob(v, study.targets[0], f, 0, CALIBRATION) for v in searched for f in first]
    if jobs:
        rounds.progress(
            f"saeforge: matching L0: round 0, {len(jobs)} SAE(s) at factors {', '.join(f'{f:.3g}' for f in first)}"
        )
        measure(jobs, 0)
    for round_no in range(1, args.rounds + 1):
        pending = unmatched(points, searched, study.targets, args.tolerance)
        if not pending:
            break
        jobs = [StudyJob(v, t, l0_match.next_factor(points[v], t), 0, CALIBRATION) for v, t in pending]
        rounds.progress(
            f"saeforge: matching L0: round {round_no}, {len(jobs)} SAE(s) not yet within {args.tolerance:.0%}"
        )
        measure(jobs, round_no)
    return chosen_factors(study, points, searched, rounds.progress), rows


def unmatched(points: dict, searched: list[str], targets, tolerance: float) -> list[tuple[str, float]]:
    """(variant, target) pairs whose nearest point so far is outside the tolerance."""
    return [
        (v, t)
        for v in searched
        for t in targets
        if points.get(v) and not l0_match.matched(l0_match.closest(points[v], t)[1], t, tolerance)
    ]


def chosen_factors(study: StudyPlan, points: dict, searched: list[str], progress) -> dict[tuple[str, float], float]:
    """Each (variant, target)'s factor: the nearest point's for a searched variant (1 for an
    `l0_field` one); a variant whose every calibration SAE failed is left out."""
    chosen = {(v, t): 1.0 for v in study.variants for t in study.targets}
    for v in searched:
        if not points.get(v):  # every calibration SAE failed (their errors are in the rows)
            progress(f"saeforge: warning: {v}: no calibration SAE trained; it is left out of the study")
        for t in study.targets:
            if points.get(v):
                chosen[(v, t)] = l0_match.closest(points[v], t)[0]
            else:
                chosen.pop((v, t))
    return chosen
