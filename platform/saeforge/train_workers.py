"""What runs inside each Ray Train worker: read the activation shard, train, report, checkpoint.

Thin glue around `training.train_loop`: the worker builds the variant, restores a checkpoint if
there is one, estimates the activation scale on its first batch (averaged over workers), wraps the
model for DDP, and turns the loop's log/checkpoint callbacks into MLflow metrics and
`ray.train.report` calls.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import variants
from saeforge import sae_io
from saeforge.activations import iterate_batches
from saeforge.training import LoopState, estimate_act_scale, train_loop

LOOP_STATE_FILE = "loop_state.pt"
RUN_INFO_FILE = "run.json"  # the run's arguments and progress, read by --resume
SAE_DIR = "sae"


def save_checkpoint(folder: Path, variant: variants.Variant, state: LoopState, meta: dict) -> None:
    sae_io.save_sae(variant, folder / SAE_DIR, meta)
    torch.save({"step": state.step, "tokens_seen": state.tokens_seen, "optimizer": state.optimizer,
                "scheduler": state.scheduler}, folder / LOOP_STATE_FILE)


def load_checkpoint(folder: str | Path) -> tuple[variants.Variant, LoopState, dict]:
    variant, cfg = sae_io.load_sae(Path(folder) / SAE_DIR)
    raw = torch.load(Path(folder) / LOOP_STATE_FILE, weights_only=True, map_location="cpu")
    return variant, LoopState(raw["step"], raw["tokens_seen"], raw["optimizer"], raw["scheduler"]), cfg


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / LOOP_STATE_FILE).is_file() and (Path(folder) / SAE_DIR / sae_io.CFG_FILE).is_file()


def _average_over_workers(value: float) -> float:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item() / torch.distributed.get_world_size()


class MlflowCurves:
    """Logs the training curves of rank 0 into the driver's MLflow run."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.client = None
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])


def worker_loop(config: dict) -> None:
    """The per-worker training function given to TorchTrainer (config: see train_job.worker_config)."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    spec = config["producer_spec"]

    checkpoint = ray.train.get_checkpoint()
    resume_dir = checkpoint.to_directory() if checkpoint else config.get("resume_from")
    if resume_dir:
        variant, state, _ = load_checkpoint(resume_dir)
    else:
        variant = variants.build(config["variant"], d_in=config["d_in"], d_sae=config["d_sae"],
                                 overrides=config["overrides"])
        state = LoopState()
    rows_per_worker = config["batch_rows"] // world
    device = ray.train.torch.get_device()
    variant.to(device)
    batches = iterate_batches(ray.train.get_dataset_shard("train"), spec, config["column"],
                              rows_per_worker, shuffle_rows=rows_per_worker * 8, device=device)
    if not resume_dir:
        first = next(batches)
        variant.act_scale.fill_(_average_over_workers(estimate_act_scale(*first)))
        batches = itertools.chain([first], batches)
    model = ray.train.torch.prepare_model(variant) if world > 1 else variant

    curves = MlflowCurves(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    total_steps, started = config["total_steps"], time.perf_counter()  # the first batch is already here

    report_every = config.get("report_every", 0)  # a multiple of log_every; 0: no intermediate reports

    def on_log(step: int, values: dict[str, float]) -> None:
        if report_every and step % report_every == 0:  # a barrier: every rank reports at the same steps
            ray.train.report({"step": step, **{k: float(v) for k, v in values.items()}})
        if rank != 0:
            return
        curves.log(step, values)
        elapsed = time.perf_counter() - started
        eta = elapsed / max(1, step - start_step) * (total_steps - step)
        print(f"[saeforge] step {step}/{total_steps} ({100 * step // total_steps}%) "
              f"tokens {values['tokens_seen']:,.0f} | {values['tokens_per_s']:,.0f} tok/s | "
              f"loss {values['loss']:.4g} | L0 {values['l0']:.1f} | expl.var {values['explained_variance']:.3f} | "
              f"dead {values['dead_fraction']:.3f} | eta {eta:.0f}s", file=sys.__stdout__, flush=True)
        # sys.__stdout__: Ray Train patches print() and would otherwise emit each line twice

    def on_checkpoint(snapshot: LoopState) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_checkpoint(Path(tmp), variant, snapshot, config["sae_meta"])
                info = {**config["run_info"], "step": snapshot.step, "tokens_seen": snapshot.tokens_seen}
                (Path(tmp) / RUN_INFO_FILE).write_text(json.dumps(info))
            metrics = {"step": snapshot.step, "tokens_seen": snapshot.tokens_seen,
                       "train_seconds": time.perf_counter() - started}  # from the first batch on
            ray.train.report(metrics,
                             checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)

    start_step = state.step
    train_loop(model, batches, total_steps, state=state, log_every=config["log_every"],
               checkpoint_every=config["checkpoint_every"], on_log=on_log, on_checkpoint=on_checkpoint,
               world_size=world)
