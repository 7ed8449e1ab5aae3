"""What runs inside each Ray Train worker: read the activation shard, train, report, checkpoint.

Thin glue around `core.training.train_loop`: the worker gets the whole typed plan, builds the
variant (or restores a checkpoint), gives a fresh SAE its data-dependent start on the first batch
(the activation scale averaged over workers) before wrapping it for DDP, and turns the loop's
log and checkpoint callbacks into MLflow curves (best-effort: a failure is counted, reported with
each checkpoint, never fatal) and `ray.train.report` calls.

After a worker is lost, Ray Train starts the group again (`--max-failures`) with the run's latest
checkpoint; the dataset shard then starts again at the stream's first step, so each worker skips
the steps trained since then and the run trains every planned step once. Which contexts a step
holds is fixed by the step (`activation_stream.step_batches` checks it), and the loop state
tallies the contexts trained, so a resumed run can be compared with an uninterrupted one.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from saeforge.core import metrics
from saeforge.core.training import LoopState, start_fresh, train_loop
from saeforge.jobs import checkpoints, progress_board, tracking
from saeforge.jobs.activation_stream import step_batches
from saeforge.jobs.plan import InjectedExit, RunPlan


def _average_over_workers(value: float) -> float:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item() / torch.distributed.get_world_size()


def _sum_over_workers(values: list[int]) -> list[int]:
    """Integer counts summed over the data-parallel workers (one all-reduce)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.int64)
    torch.distributed.all_reduce(t)
    return [int(v) for v in t.tolist()]


def progress_line(step: int, total_steps: int, values: dict[str, float], eta: float) -> str:
    return (
        f"[saeforge] step {step}/{total_steps} ({100 * step // total_steps}%) "
        f"tokens {values['tokens_seen']:,.0f} | {values['tokens_per_s']:,.0f} tok/s | "
        f"loss {values['loss']:.4g} | L0 {values['l0']:.1f} | expl.var {values['explained_variance']:.3f} | "
        f"dead {values['dead_fraction']:.3f} | eta {eta:.0f}s"
    )


def exit_at_step(batches, step: int, inject: InjectedExit):
    """The batches, checking the fault tests' crash before handing out each step's (from `step`)."""
    for n, batch in enumerate(batches, step):
        inject.check(n)
        yield batch


def worker_loop(config: dict) -> None:
    """The per-worker training function given to TorchTrainer (config: {"plan": RunPlan})."""
    import ray.train
    import ray.train.torch

    plan: RunPlan = config["plan"]
    torch.set_num_threads(plan.resources.worker_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    checkpoint = ray.train.get_checkpoint()  # set after a restart: the run's latest checkpoint
    resume_dir = checkpoint.to_directory() if checkpoint else plan.resume_from
    variant, state = checkpoints.load_checkpoint(resume_dir) if resume_dir else (plan.build_variant(), LoopState())
    device = ray.train.torch.get_device()
    variant.to(device)
    # the shard starts at the stream's first step whatever was trained since: skip that
    trained = state.step - plan.stream.first_step
    if trained < 0:
        raise ValueError(f"checkpoint at step {state.step} is before the stream's first step {plan.stream.first_step}")
    batches = step_batches(
        ray.train.get_dataset_shard("train"), plan.stream, device=device, skip_steps=trained, rank=rank
    )
    if rank == 0 and plan.worker_exit:
        batches = exit_at_step(batches, state.step, plan.worker_exit)
    if not resume_dir:
        batches = start_fresh(variant, batches, average=_average_over_workers)
    model = ray.train.torch.prepare_model(variant) if world > 1 else variant

    curves = tracking.RunCurves(plan.tracking.uri, plan.tracking.run_id) if rank == 0 else None
    settings, start_step = plan.loop, state.step
    started = time.perf_counter()  # the first batch is already here
    info = checkpoints.run_info(plan.args, plan.tracking.run_id, settings.total_steps)

    def on_log(step: int, values: dict[str, float]) -> None:
        if settings.report_every and step % settings.report_every == 0:  # a barrier: every rank reports
            ray.train.report({"step": step, **{k: float(v) for k, v in values.items()}})
        if rank != 0:
            return
        failures = curves.failures
        curves.log(step, values)  # log the curves (best-effort), then the line on the driver's stderr
        if curves.failures and not failures:
            progress_board.post(
                plan.progress_board,
                f"saeforge: warning: logging curves to MLflow failed ({curves.first_error}); "
                "training goes on, failures are counted",
            )
        eta = (time.perf_counter() - started) / max(1, step - start_step) * (settings.total_steps - step)
        progress_board.post(plan.progress_board, progress_line(step, settings.total_steps, values, eta))

    def on_checkpoint(snapshot: LoopState) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                checkpoints.save_checkpoint(Path(tmp), variant, snapshot, plan.sae_meta, info)
            progress = {
                "step": snapshot.step,
                "tokens_seen": snapshot.tokens_seen,
                "train_seconds": time.perf_counter() - started,  # from the first batch on
                "dead_fraction": metrics.dead_fraction(variant.tokens_since_fired, snapshot.tokens_seen),
                "mlflow_failures": curves.failures if curves else 0,  # rank 0's count reaches the driver
            }
            ray.train.report(progress, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)

    train_loop(
        model,
        batches,
        settings,
        state=state,
        on_log=on_log,
        on_checkpoint=on_checkpoint,
        sum_over_workers=_sum_over_workers,
    )
