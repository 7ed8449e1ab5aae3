"""The driver of `saeforge study SEED`: a seed paper's comparison, re-run on the platform at
matched L0, with a verdict per claim (docs/study.md).

1. Validate everything (one line and exit 2 for a bad input, before Ray starts).
2. One model pass: the activations are produced once (`shared_activations`, optionally an
   activation cache on disk) and every SAE of the study reads them.
3. Matched L0: an `l0_field` variant gets its field set to each target; every other variant is
   brought to each target by a Ray Tune search over one factor on its `sparsity_fields` (round
   one: a few factors around its defaults; then per target the next factor from every point
   measured so far, `core.l0_match`), until L0 is within the tolerance or the rounds run out.
4. The final SAEs: every (variant, target) at its factor, `--seeds` times, each evaluated with
   every suite of the study and logged as a child run of the study's MLflow run.
5. Verdicts (`core.study_claims`) and the report (`core.study_report`): Markdown, plots, tables,
   logged to the study's run and printed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import variants
from saeforge.core.eval_suites.runner import parse_options
from saeforge.core.reporting import write_csv
from saeforge.core.study import claims, l0_match
from saeforge.core.study import report as study_report
from saeforge.errors import UserError
from saeforge.jobs.arguments import ClusterArgs, SaeSizeArgs, SourceArgs, StudyArgs, TrainArgs, check_ranges, pairs_dict
from saeforge.jobs.study.trial import CALIBRATION, FINAL, StudyContext, study_trial
from saeforge.jobs.tracking import store
from saeforge.jobs.tune.driver import one_line, open_search, trial_concurrency
from saeforge.jobs.validate import hook_points, plan_train, variant_config

TRIAL_CPU = 1.0  # one SAE trains (and evaluates) in its trial's own process
# The suites' sizes in a study unless --eval-set says otherwise: smaller than `saeforge eval`'s so
# that one seed of the default study fits about an hour on 2 cores (README); core and groups read
# the --eval-contexts held-out contexts (the same ones: groups' zero fraction is 1 - L0 / d_sae).
SUITE_DEFAULTS = {
    "probing": {"train_size": 100, "test_size": 50, "ks": (1, 5)},
    "unlearning": {"train_contexts": 16, "eval_contexts": 8},
    "disentanglement": {"contexts": 16},
}


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    """What validation produced: the studies, the SAEs, the targets and the seeds."""

    studies: tuple[claims.Study, ...]
    variants: tuple[str, ...]
    targets: tuple[float, ...]
    seeds: int
    overrides: dict
    suites: tuple[str, ...]
    suite_options: dict


def parse_targets(text: str) -> tuple[float, ...]:
    try:
        targets = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UserError(f"--targets: expected comma-separated numbers, got '{text}'") from None
    if not targets:
        raise UserError("--targets: expected at least one target L0, e.g. 32,64,128")
    if any(not math.isfinite(t) or t < 1 for t in targets):
        raise UserError(f"--targets: every target L0 must be at least 1, got '{text}'")
    return tuple(dict.fromkeys(targets))


def plan_study(args: StudyArgs) -> StudyPlan:
    """Check the study's own inputs; UserError (one line) for a bad one."""
    check_ranges(args)
    known = claims.seed_names()
    if args.study == "all":
        studies = tuple(claims.STUDIES.values())
    elif args.study in known:
        studies = (claims.STUDIES[args.study],)
    else:
        raise UserError(f"unknown study '{args.study}' (known: {', '.join(known)}, all)")
    names = tuple(dict.fromkeys(v for s in studies for v in s.variants))
    if args.only:
        only = tuple(dict.fromkeys(n.strip() for n in args.only.split(",") if n.strip()))
        unknown = [n for n in only if n not in names]
        if unknown or not only:
            raise UserError(
                f"--only: {', '.join(unknown) or 'nothing named'} is not in this study ({', '.join(names)})"
            )
        names = only
    for name in names:
        if name not in variants.names():
            raise UserError(str(variants.UnknownVariant(name)))
    if len(hook_points(args)) > 1:
        raise UserError(f"--layer {args.layer}: a study reads one layer (train and tune take a list)")
    return StudyPlan(
        studies,
        names,
        parse_targets(args.targets),
        args.seeds,
        {"batch_size": str(args.batch_size), **pairs_dict(args.overrides)},
        tuple(dict.fromkeys(s for st in studies for s in st.suites)),
        suite_options(args),
    )


def suite_options(args: StudyArgs) -> dict[str, dict]:
    """The study's suite sizes (`SUITE_DEFAULTS`, core and groups on --eval-contexts contexts),
    then what --eval-set gives."""
    given = parse_options(args.eval_options)
    held_out = {"contexts": args.eval_contexts}
    base = {**SUITE_DEFAULTS, "core": held_out, "groups": held_out}
    return {k: {**base.get(k, {}), **given.get(k, {})} for k in {*base, *given}}


def shared_train_args(args: StudyArgs, variant: str) -> TrainArgs:
    """The study as a training run's arguments, for the shared validation and contexts."""
    shared = {
        f.name: getattr(args, f.name) for cls in (SourceArgs, ClusterArgs, SaeSizeArgs) for f in dataclasses.fields(cls)
    }
    return TrainArgs(**shared, variant=variant, overrides={"batch_size": str(args.batch_size)}, tokens=args.tokens)


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


def run_jobs(jobs: list[dict], ctx: StudyContext, name: str, storage: Path, concurrency: int, progress) -> list[dict]:
    """One Tuner over the jobs (a grid, `concurrency` at once); each job's result, or its error."""
    from ray import tune

    gpus = ctx.plan.resources.gpus_per_worker
    # each SAE trains inside its trial: the trial asks for what a worker would (--worker-resources too)
    resources = {"cpu": TRIAL_CPU, **({"gpu": gpus} if gpus else {}), **ctx.plan.resources.worker_resources}
    trainable = tune.with_resources(tune.with_parameters(study_trial, ctx=ctx), resources)
    tuner = tune.Tuner(
        trainable,
        param_space={"job": tune.grid_search(jobs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage), verbose=0, callbacks=[sae_done_printer(len(jobs), progress)]
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


def calibrate(plan: StudyPlan, args: StudyArgs, ctx: StudyContext, storage: Path, n: int, progress) -> tuple:
    """Per (variant, target) the factor whose L0 is nearest the target, and every point measured."""
    points: dict[str, list[tuple[float, float]]] = {}
    rows: list[dict] = []
    searched = [v for v in plan.variants if not variants.get(v).l0_field]
    chosen: dict[tuple[str, float], float] = {(v, t): 1.0 for v in plan.variants for t in plan.targets}

    def measure(jobs: list[dict], round_no: int) -> None:
        for r in run_jobs(jobs, ctx, f"{Path(ctx.folder).name}-calibration-{round_no}", storage, n, progress):
            l0 = r["metrics"].get("l0", math.nan)
            job = r["job"]
            rows.append({"round": round_no, **job, "l0": l0, "error": r.get("error", "")})
            if math.isfinite(l0):
                points.setdefault(job["variant"], []).append((job["factor"], l0))

    first = l0_match.first_factors(max(2, len(plan.targets)))
    jobs = [_job(v, plan.targets[0], f, 0, CALIBRATION) for v in searched for f in first]
    if jobs:
        progress(
            f"saeforge: matching L0: round 0, {len(jobs)} SAE(s) at factors {', '.join(f'{f:.3g}' for f in first)}"
        )
        measure(jobs, 0)
    for round_no in range(1, args.rounds + 1):
        pending = [
            (v, t)
            for v in searched
            for t in plan.targets
            if points.get(v) and not l0_match.matched(l0_match.closest(points[v], t)[1], t, args.tolerance)
        ]
        if not pending:
            break
        jobs = [_job(v, t, l0_match.next_factor(points[v], t), 0, CALIBRATION) for v, t in pending]
        progress(f"saeforge: matching L0: round {round_no}, {len(jobs)} SAE(s) not yet within {args.tolerance:.0%}")
        measure(jobs, round_no)
    for v in searched:
        for t in plan.targets:
            if points.get(v):
                chosen[(v, t)] = l0_match.closest(points[v], t)[0]
            else:  # every calibration SAE failed (their errors are in the rows): no final SAEs
                progress(f"saeforge: warning: {v}: no calibration SAE trained; it is left out of the study")
                chosen.pop((v, t))
    return chosen, rows


def _job(variant: str, target: float, factor: float, seed: int, role: str) -> dict:
    return {"variant": variant, "target": target, "factor": float(factor), "seed": seed, "role": role}


def run_study(args: StudyArgs, progress=print) -> dict:
    """The whole `saeforge study`: returns its summary (also printed by the CLI)."""
    import mlflow

    started = time.time()
    plan = plan_study(args)
    base, contexts = plan_train(shared_train_args(args, plan.variants[0]), progress)
    fields = {name: variants.get(name).Config.field_types() for name in plan.variants}
    for key in plan.overrides:
        if not any(key in f for f in fields.values()):
            raise UserError(f"--set {key}: no SAE of this study has that config field")
    for name in plan.variants:  # every SAE builds at this width with the values it is given
        given = {k: v for k, v in plan.overrides.items() if k in fields[name]}
        variant_config(name, base.variant.d_in, base.variant.d_sae, given)
    base, acts = open_search(base, contexts, args, progress)
    uri, experiment_id = base.tracking.uri, base.tracking.experiment_id
    n, threads, gpus = trial_concurrency(args)
    base = dataclasses.replace(
        base, resources=dataclasses.replace(base.resources, worker_threads=threads, gpus_per_worker=gpus)
    )
    name = args.name or f"study-{args.study}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Path(args.storage).expanduser().resolve()
    folder = storage / name
    folder.mkdir(parents=True, exist_ok=True)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags={"saeforge.kind": "study"}) as parent:
        mlflow.log_params(
            {
                "study": args.study,
                "variants": ",".join(plan.variants),
                "targets": ",".join(f"{t:g}" for t in plan.targets),
                "seeds": plan.seeds,
                "tokens": args.tokens,
                "batch_size": args.batch_size,
                "tolerance": args.tolerance,
                "model": args.model,
                "hook": base.hook.name,
                "d_sae": base.variant.d_sae,
                "activations": acts.source,
            }
        )
        mlflow.log_metrics(acts.log_dict())
        ctx = StudyContext(
            base,
            acts.dataset,
            acts.contexts,
            args.tokens,
            plan.overrides,
            plan.suites,
            plan.suite_options,
            parent.info.run_id,
            str(folder),
        )
        phase = time.time()
        factors, calibration = calibrate(plan, args, ctx, storage, n, progress)
        calibration_seconds, phase = time.time() - phase, time.time()
        jobs = [_job(v, t, factor, seed, FINAL) for (v, t), factor in factors.items() for seed in range(plan.seeds)]
        progress(f"saeforge: training and evaluating {len(jobs)} final SAE(s), {n} at a time")
        finals = run_jobs(jobs, ctx, f"{name}-final", storage, n, progress)
        final_seconds, seconds = time.time() - phase, time.time() - started
        info = {
            "name": name,
            "model": args.model,
            "hook": base.hook.name,
            "d_sae": base.variant.d_sae,
            "tokens": acts.tokens,
            "contexts": acts.contexts,
            "activations_source": acts.source,
            "contexts_forwarded": acts.contexts_forwarded,
            "targets": list(plan.targets),
            "seeds": plan.seeds,
            "tolerance": args.tolerance,
            "batch_size": args.batch_size,
            "seconds": seconds,
            "activation_seconds": acts.seconds,
            "calibration_seconds": calibration_seconds,
            "final_seconds": final_seconds,
            "concurrent_saes": n,
        }
        write_csv(calibration, folder / "calibration.csv")  # before the report: each SAE's result is on disk too
        report = study_report.build(plan.studies, plan.variants, finals, calibration, info)
        paths = study_report.write(report, folder)
        mlflow.log_artifacts(str(folder / study_report.REPORT_DIR), artifact_path="study")
        mlflow.log_artifact(str(folder / "calibration.csv"), artifact_path="study")
        mlflow.log_metrics(
            {
                "saes": len(finals),
                "saes_failed": sum(1 for r in finals if r.get("error")),
                "calibration_saes": len(calibration),
                "seconds": seconds,
            }
        )
    return {
        **info,
        "parent_run_id": parent.info.run_id,
        "experiment_id": experiment_id,
        "tracking_uri": store.redact(uri),
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
