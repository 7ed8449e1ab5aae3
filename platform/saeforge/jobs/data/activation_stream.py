"""The activation stream: Ray Data actors host a Gemma slice and emit activations into the object
store, where Ray Train workers read them.

Ray Data's streaming executor is the buffer between producers and trainers (backpressure,
retries, actor restarts); there is no hand-written queue. A row of the stream is one whole
context: its id, its activations at every hook point and its mask of real tokens (see
`saeforge.core.batches`); the order of the contexts is kept, so what each step reads is fixed.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from saeforge.core.allocator import keep_freed_memory
from saeforge.core.corpus import valid_mask
from saeforge.core.hooks import capture, layers_needed
from saeforge.core.model import compute_device, forward_precision, load_model, resolve_precision, run_slice, slice_dtype
from saeforge.jobs.arguments import DEFAULT_MAX_FAILURES
from saeforge.jobs.plan import StreamSpec
from saeforge.jobs.runtime import faults
from saeforge.jobs.runtime.ray_cluster import on_this_node

MASK_COLUMN = "mask"
ID_COLUMN = "context_id"
TOKENS_COLUMN = "input_ids"
BATCH_CONTEXTS = 16  # contexts per producer forward pass


@contextlib.contextmanager
def plain_remote_args() -> Iterator[None]:
    """Ray 2.60 takes an actor pool's restart caps and a read task's retry cap only as plain remote
    args, which it marks deprecated for 2.64 without a named replacement yet: its warning is
    silenced here (look again when upgrading)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        yield


def forward_counter():
    """A new actor counting producer forwards and the contexts they read (the proof that a search,
    or a k-layer run, ran the model once), on the driver's node. The producers get its handle;
    it lives while the driver holds it."""
    import ray

    @ray.remote(num_cpus=0)
    class ForwardCounter:
        def __init__(self):
            self.batches = self.contexts = 0

        def add(self, contexts: int) -> None:
            self.batches += 1
            self.contexts += contexts

        def read(self) -> tuple[int, int]:
            return self.batches, self.contexts

    return ForwardCounter.options(scheduling_strategy=on_this_node()).remote()


def forwards(counter) -> tuple[int, int]:
    """(producer forwards, contexts forwarded) the `forward_counter` has counted so far."""
    import ray

    return tuple(ray.get(counter.read.remote()))


class ActivationProducer:
    """Ray Data actor class: loads the model slice once, then maps token contexts to activations
    (counting its forwards in the `counter` actor when it is given one). Its process keeps the
    memory each forward frees (`allocator.keep_freed_memory`: a fresh Ray worker process would
    page the forward's blocks in again on every batch)."""

    def __init__(self, spec: StreamSpec, threads: int = 1, counter=None):
        self.batches, self.counter = 0, counter
        faults.reached(faults.PRODUCER_BATCH, 0)
        keep_freed_memory()
        torch.set_num_threads(threads)
        self.spec = spec
        self.device = compute_device()[0]
        self.precision = resolve_precision(spec.precision, self.device)
        self.model = load_model(
            spec.model,
            n_layers=layers_needed(list(spec.hooks)),
            dtype=slice_dtype(self.precision, self.device),
            device=self.device,
        )

    def activations(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        with (
            torch.inference_mode(),
            forward_precision(self.precision, self.device),
            capture(self.model, list(self.spec.hooks)) as captured,
        ):
            run_slice(self.model, input_ids)
        return {name: t.float() for name, t in captured.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches += 1
        faults.reached(faults.PRODUCER_BATCH, self.batches)
        ids = torch.from_numpy(np.asarray(batch[TOKENS_COLUMN], dtype=np.int64)).to(self.device)
        acts = self.activations(ids)
        if self.counter is not None:
            import ray

            ray.get(self.counter.add.remote(len(ids)))
        return {
            ID_COLUMN: np.asarray(batch[ID_COLUMN]),
            **{name: a.cpu().numpy() for name, a in acts.items()},
            MASK_COLUMN: valid_mask(ids, list(self.spec.special_ids)).cpu().numpy(),
        }


def context_dataset(contexts: np.ndarray, first_id: int = 0, blocks: int = 1):
    """A Ray Dataset of token contexts, one row per context with its id (its index in the run)."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    ids = np.arange(first_id, first_id + len(contexts), dtype=np.int64)
    parts = [p for p in np.array_split(np.arange(len(contexts)), min(max(1, blocks), max(1, len(contexts)))) if len(p)]
    return ray.data.from_arrow(
        [pa.table({ID_COLUMN: ids[p], TOKENS_COLUMN: ArrowTensorArray.from_numpy(contexts[p])}) for p in parts]
    )


def activation_dataset(
    contexts: np.ndarray,
    spec: StreamSpec,
    *,
    producers: int,
    first_id: int = 0,
    **options,
):
    """A lazy Ray Dataset of activations for `contexts` ((n, context_size) token ids held here:
    tests and local tools; a training run reads its corpus with `corpus_stream.plan_dataset`),
    in order, ids from `first_id`; `options` as `produce_activations` takes them."""
    n_blocks = max(producers * 4, len(contexts) // (BATCH_CONTEXTS * 8), 1)
    ds = context_dataset(contexts, first_id, n_blocks)
    ds.context.execution_options.preserve_order = True
    return produce_activations(ds, spec, producers=producers, **options)


def produce_activations(
    tokens,
    spec: StreamSpec,
    *,
    producers: int,
    threads: int = 1,
    gpus_per_producer: float = 0.0,
    resources: dict[str, float] | None = None,
    counter=None,
    max_failures: int = DEFAULT_MAX_FAILURES,
):
    """The producer actors over `tokens` (a Ray Dataset of contexts: ids and token ids, in order):
    a lazy Ray Dataset of activations, in the same order. `resources`: custom Ray resources each
    producer asks for (they pin producers to the nodes that offer them); `counter`: a
    `forward_counter` the producers count their forwards in (its holder keeps it alive).

    A producer whose process dies is restarted and its batch retried, each at most
    `max_failures` times (Ray Data's default is forever: a crash that recurs, e.g. out of memory
    loading the model, would loop); one whose constructor raises fails the dataset at once
    (Ray Data's `max_consecutive_actor_init_deaths`, 0 by default)."""
    import ray

    with plain_remote_args():
        return tokens.map_batches(
            ActivationProducer,
            fn_constructor_kwargs={"spec": spec, "threads": threads, "counter": counter},
            batch_size=BATCH_CONTEXTS,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=producers),
            num_gpus=gpus_per_producer,
            num_cpus=1,
            resources=resources or None,
            max_restarts=max_failures,
            max_task_retries=max_failures,
        )


def materialize(dataset, counter, n_contexts: int, progress=None, every: float = 15.0):
    """Run `dataset` (whose producers count into `counter`) to the end into the object store,
    printing a progress line every `every` seconds from the counter. Returns (materialised
    dataset, producer batches, contexts).

    The dataset runs in the calling thread and only the progress lines in a helper thread: an
    interrupt (Ctrl-C, SIGTERM) then stops Ray Data's executor where it stands, and the helper
    is stopped before the caller goes on. (A daemon thread left running Ray Data would call Ray
    after the exit's shutdown, and Ray would start a new local instance from that thread.)"""
    import threading

    import ray

    before = ray.get(counter.read.remote())
    started = time.perf_counter()
    stop = threading.Event()

    def report():
        while not stop.wait(every):
            try:
                done = ray.get(counter.read.remote(), timeout=every)[1] - before[1]
            except Exception:  # a progress line is not worth failing or delaying the run for
                continue
            if stop.is_set():
                return
            rate = done / max(time.perf_counter() - started, 1e-9)
            eta = (n_contexts - done) / rate if rate > 0 else float("nan")
            progress(f"  activations: {done}/{n_contexts} contexts ({rate:.1f} contexts/s, eta {eta:.0f}s)")

    reporter = threading.Thread(target=report, name="saeforge-progress-lines", daemon=True)
    if progress is not None:
        reporter.start()
    try:
        produced = dataset.materialize()
    finally:
        stop.set()
        if reporter.is_alive():
            reporter.join(every)
    after = ray.get(counter.read.remote())
    return produced, after[0] - before[0], after[1] - before[1]


def step_batches(
    shard, spec: StreamSpec, device: str | torch.device = "cpu", skip_steps: int = 0, rank: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(activations, mask, context ids) torch batches of worker `rank`'s contexts of each step, on
    `device`, from a Ray Data shard (one hook: the first of the spec), after its first
    `skip_steps` steps' (a restarted worker reads its shard from the start again: those steps are
    trained already).

    Which contexts a step trains is fixed by the step alone: step t of worker w holds contexts
    (t * workers + w) * c up to the next c (c = contexts_per_worker), so together the workers
    train the same contexts at step t as one worker would, whatever the producers, restarts or
    `--resume` (`worker_dataset` lays the stream out so). Every batch is checked against that:
    a stream out of order fails the run at once rather than training some contexts twice."""
    for acts, mask, ids in hook_step_batches(shard, spec, device, skip_steps, rank):
        yield acts[0], mask, ids


def hook_step_batches(
    shard, spec: StreamSpec, device: str | torch.device = "cpu", skip_steps: int = 0, rank: int = 0
) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]]:
    """`step_batches` with the activations of every hook of the spec, in its order (the SAEs of a
    k-hook run train side by side on them: `core.training.train_side_by_side`)."""
    columns, c = [hook.name for hook in spec.hooks], spec.contexts_per_worker
    first_id = spec.first_step * spec.contexts_per_step
    batches = shard.iter_torch_batches(batch_size=c, drop_last=True, device=device)
    for step, batch in enumerate(itertools.islice(batches, skip_steps, None), skip_steps):
        ids = batch[ID_COLUMN].to("cpu", torch.int64)
        start = first_id + (step * spec.workers + rank) * c
        if not torch.equal(ids, torch.arange(start, start + c)):
            raise RuntimeError(
                f"the activation stream is out of order: worker {rank} got contexts {ids.tolist()} for step "
                f"{spec.first_step + step}, where contexts {start}..{start + c - 1} belong"
            )
        yield tuple(batch[column] for column in columns), batch[MASK_COLUMN].bool(), ids


def worker_dataset(dataset, spec: StreamSpec):
    """The stream as `step_batches` reads it, with the Ray Train ingest options that keep it so.

    With several workers Ray Train splits the stream (`streaming_split(equal=True)`), handing each
    bundle of rows in turn to the split that has had the fewest rows: with every bundle exactly
    one worker's share of a step (c contexts) and the order preserved, bundle j goes to worker
    j % workers, which is the layout `step_batches` checks. Ray Train's default ingest options
    take `preserve_order` from the driver's global DataContext, not the dataset's, and locality
    hints (ignored anyway when the order is preserved) would reorder bundles: both are set here."""
    import ray.train

    with warnings.catch_warnings():  # Ray 2.60's own default passes a field it deprecates: not the user's to fix
        warnings.filterwarnings("ignore", message=".*exclude_resources")
        options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    config = ray.train.DataConfig(execution_options=options, enable_shard_locality=False)
    if spec.workers > 1:
        dataset = dataset.repartition(target_num_rows_per_block=spec.contexts_per_worker, strict=True)
    return dataset, config
