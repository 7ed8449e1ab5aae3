"""What runs inside each Ray Train worker: read the activation shard, train, report, checkpoint.

The same loop (`train_plan`) also runs in a one-worker Tune trial's own process, through a
`WorkerSession` that reports to Tune instead of Ray Train: there a worker group would only add
its start-up to a short trial's training
(docs/benchmarks.md#a-trial-in-its-own-process-against-a-torchtrainer-per-trial).

Thin glue around `core.training.train_side_by_side`: the worker gets the whole typed plan, builds
one variant per hook of the stream (or restores them from a checkpoint), gives a fresh SAE its
data-dependent start on the first batch (the activation scale averaged over workers) before
wrapping it for DDP, and turns the loop's log and checkpoint callbacks into MLflow curves, each
hook's into its own run (best-effort: a failure is counted, reported with each checkpoint, never
fatal) and the session's reports. A one-hook run is the same loop with one SAE.

After a worker is lost, Ray Train starts the group again (`--max-failures`) with the run's latest
checkpoint; the dataset shard then starts again at the stream's first step, so each worker skips
the steps trained since then and the run trains every planned step once. Which contexts a step
holds is fixed by the step (`activation_stream.step_batches` checks it), and the loop state
tallies the contexts trained, so a resumed run can be compared with an uninterrupted one.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from saeforge.core import metrics
from saeforge.core.training import LoopState, start_fresh_side_by_side, train_side_by_side
from saeforge.jobs.data.activation_stream import hook_step_batches
from saeforge.jobs.plan import RunPlan
from saeforge.jobs.runtime import faults, progress_board
from saeforge.jobs.tracking import mlflow_runs
from saeforge.jobs.train import checkpoints


def _average_over_workers(value: float) -> float:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item() / torch.distributed.get_world_size()


def _data_parallel(sae: torch.nn.Module) -> torch.nn.Module:
    import ray.train.torch

    return ray.train.torch.prepare_model(sae)


def _sum_over_workers(values: list[int]) -> list[int]:
    """Integer counts summed over the data-parallel workers (one all-reduce)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.int64)
    torch.distributed.all_reduce(t)
    return [int(v) for v in t.tolist()]


def progress_line(step: int, total_steps: int, values: dict[str, float], eta: float, hook: str = "") -> str:
    """Rank 0's progress line; a run of several hooks prints one per hook, the hook named at the end."""
    return (
        f"[saeforge] step {step}/{total_steps} ({100 * step // total_steps}%) "
        f"tokens {values['tokens_seen']:,.0f} | {values['tokens_per_s']:,.0f} tok/s | "
        f"loss {values['loss']:.4g} | L0 {values['l0']:.1f} | expl.var {values['explained_variance']:.3f} | "
        f"dead {values['dead_fraction']:.3f} | eta {eta:.0f}s" + (f" | {hook}" if hook else "")
    )


def fault_points(batches, step: int):
    """The batches, passing the fault tests' hook before handing out each step's (from `step`)."""
    for n, batch in enumerate(batches, step):
        faults.reached(faults.WORKER_STEP, n)
        yield batch


@dataclass
class WorkerSession:
    """Where the loop runs and where it reports: a Ray Train worker (`worker_loop`), or a Tune
    trial's own process (`trial.run_trial`, one worker: no worker group to start)."""

    rank: int
    world: int
    device: torch.device | str
    resume_dir: str | Path | None  # the checkpoint to continue from ("" / None: a fresh start)
    report: Callable[[dict, Path | None], None]  # metrics, and rank 0's checkpoint folder at checkpoints


def worker_loop(config: dict) -> None:
    """The per-worker training function given to TorchTrainer (config: {"plan": RunPlan})."""
    import ray.train
    import ray.train.torch

    plan: RunPlan = config["plan"]
    context = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()  # set after a restart: the run's latest checkpoint

    def report(values: dict, folder: Path | None) -> None:
        ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

    session = WorkerSession(
        context.get_world_rank(),
        context.get_world_size(),
        ray.train.torch.get_device(),
        checkpoint.to_directory() if checkpoint else plan.resume_from,
        report,
    )
    train_plan(plan, ray.train.get_dataset_shard("train"), session)


def in_process_device(plan: RunPlan) -> str:
    """A one-worker trial's device when it trains in its own process: its GPU when Tune gave it
    one, else the CPU (the evaluation model follows `compute_device`, which picks the same GPU)."""
    return "cuda" if plan.resources.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"


def train_plan(plan: RunPlan, shard, session: WorkerSession) -> None:
    """Train the plan's SAEs (one per hook) on this worker's shard (a Ray Data iterator),
    reporting through the session: every `report_every` steps, and each checkpoint."""
    torch.set_num_threads(plan.resources.worker_threads)
    saes, states = starting_point(plan, session)
    start_step = states[0].step
    # the shard starts at the stream's first step whatever was trained since: skip that
    trained = start_step - plan.stream.first_step
    if trained < 0:
        raise ValueError(f"checkpoint at step {start_step} is before the stream's first step {plan.stream.first_step}")
    batches = hook_step_batches(shard, plan.stream, device=session.device, skip_steps=trained, rank=session.rank)
    if session.rank == 0:
        batches = fault_points(batches, start_step)
    if not session.resume_dir:
        batches = start_fresh_side_by_side(saes, batches, average=_average_over_workers)
    models = [_data_parallel(sae) if session.world > 1 else sae for sae in saes]
    reports = Reports(plan, session, saes, start_step)
    train_side_by_side(
        models,
        batches,
        plan.loop,
        states=states,
        on_log=reports.on_log,
        on_checkpoint=reports.on_checkpoint,
        sum_over_workers=_sum_over_workers,
    )


def starting_point(plan: RunPlan, session: WorkerSession) -> tuple[list, list[LoopState]]:
    """Each hook's SAE and loop state, on the session's device: restored from the checkpoint to
    resume from, else fresh."""
    hooks = [h.name for h in plan.stream.hooks]
    if session.resume_dir:
        saes, states = (list(x) for x in zip(*checkpoints.load_checkpoint(session.resume_dir, hooks)))
    else:
        saes, states = [plan.build_variant() for _ in hooks], [LoopState() for _ in hooks]
    return [sae.to(session.device) for sae in saes], states


class Reports:
    """What the loop's callbacks do: every rank reports to its session every `report_every`
    steps and at each checkpoint; rank 0 also logs each hook's curves to its MLflow run
    (best-effort), posts the progress lines and writes the checkpoint folder."""

    def __init__(self, plan: RunPlan, session: WorkerSession, saes: list, start_step: int):
        hooks = plan.stream.hooks
        self.plan, self.session, self.saes, self.start_step = plan, session, saes, start_step
        self.curves = (
            [mlflow_runs.RunCurves(plan.tracking.uri, run_id) for run_id in plan.run_ids] if session.rank == 0 else []
        )
        self.labels = [h.name for h in hooks] if len(hooks) > 1 else [""]
        hook_run_ids = {h.name: run_id for h, run_id in zip(hooks, plan.run_ids)} if len(hooks) > 1 else None
        self.info = checkpoints.run_info(plan.args, plan.tracking.run_id, plan.loop.total_steps, hook_run_ids)
        self.started = time.perf_counter()  # the first batch is already here

    def on_log(self, step: int, values: list[dict[str, float]]) -> None:
        plan, settings = self.plan, self.plan.loop
        if settings.report_every and step % settings.report_every == 0:  # a barrier: every rank reports
            self.session.report({"step": step, **{k: float(v) for k, v in values[0].items()}}, None)
        if self.session.rank != 0:
            return
        failed_before = self.failures()
        for hook_curves, hook_values in zip(self.curves, values):
            hook_curves.log(step, hook_values)  # the curves (best-effort), then the lines on the driver's stderr
        if not failed_before and self.failures():
            first_error = next(c.first_error for c in self.curves if c.failures)
            progress_board.post(
                plan.progress_board,
                f"saeforge: warning: logging curves to MLflow failed ({first_error}); "
                "training goes on, failures are counted",
            )
        eta = (time.perf_counter() - self.started) / max(1, step - self.start_step) * (settings.total_steps - step)
        for hook_values, label in zip(values, self.labels):
            progress_board.post(plan.progress_board, progress_line(step, settings.total_steps, hook_values, eta, label))

    def on_checkpoint(self, snapshots: list[LoopState]) -> None:
        hooks, rank = self.plan.stream.hooks, self.session.rank
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                metas = [self.plan.sae_meta_of(h) for h in hooks]
                checkpoints.save_checkpoint(Path(tmp), list(zip(self.saes, snapshots, metas)), self.info)
            snapshot = snapshots[0]
            dead = [metrics.dead_fraction(sae.tokens_since_fired, snapshot.tokens_seen) for sae in self.saes]
            progress = {
                "step": snapshot.step,
                "tokens_seen": snapshot.tokens_seen,
                "train_seconds": time.perf_counter() - self.started,  # from the first batch on
                "dead_fraction": dead[0],
                "mlflow_failures": self.failures(),  # rank 0's count reaches the driver
            }
            if len(hooks) > 1:  # each hook's silent latents
                progress.update({f"dead_fraction/{h.name}": d for h, d in zip(hooks, dead)})
            self.session.report(progress, Path(tmp) if rank == 0 else None)

    def failures(self) -> int:
        return sum(c.failures for c in self.curves)
