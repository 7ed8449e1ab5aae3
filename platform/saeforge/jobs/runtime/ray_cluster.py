"""Connecting to Ray, and sharing its resources between producers and trainers.

A cluster is attached through --address or RAY_ADDRESS (as inside `ray job submit`); otherwise a
private local Ray starts with generously declared logical CPUs (declaring only the 2 cores, two
producers and two train workers of 1 CPU each wait for each other for ever) and its dashboard on
localhost: Ray Train's placement-group cleaner and the
clean-up of a Tune trial stopped early go through the state API, which needs it. Without it, a
run prints "Failed to query Ray Train Controller actor state" hundreds of times and a stopped
trial's placement group leaks.

Either way the workers' output is not forwarded to the driver (`log_to_driver=False`): a run's
own progress comes through `progress_board`, and Ray's many internal messages stay in its log
files (/tmp/ray/session_latest/logs) instead of drowning it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator

from saeforge.jobs.arguments import gpu_request, resource_request
from saeforge.jobs.plan import Resources, RunPlan

TRAIN_HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray Train 2.60's name (constants.py)
TRAIN_HEALTH_CHECK_S = "0.5"


def local_cpus() -> int:
    """The logical CPUs a private local Ray declares: twice the cores (at least 8), since
    producers and workers wait on each other and one process per core would deadlock on 2 cores."""
    return max(8, 2 * (os.cpu_count() or 1))


def connect_ray(address: str = "") -> None:
    import ray

    if ray.is_initialized():
        return
    quiet_ray_data()
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # before init: Ray's processes inherit it
    # Ray Train's controller notices that training ended at its next health check of the workers,
    # every 2 s by default: checking every 0.5 s brings a run's result sooner at no measurable
    # cost (docs/benchmarks.md#start-up-costs).
    os.environ.setdefault(TRAIN_HEALTH_CHECK_ENV, TRAIN_HEALTH_CHECK_S)
    ray.init(
        address="local",
        num_cpus=local_cpus(),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        logging_level="ERROR",
        log_to_driver=False,
        # No idle worker processes at start-up: a run starts its own actors, and 8 prestarted
        # workers on 2 cores cost memory and set off the raylet's "too many workers" warning.
        _system_config={"prestart_worker_first_driver": False},
    )


def on_this_node():
    """The scheduling of a driver's helper actor (progress board, forward counter): the driver's own
    node. A 0-CPU actor may otherwise land on any node, and losing that node (a trainer node
    taken away mid-run) would end a run that Ray Train itself survives."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def quiet_ray_data() -> None:
    """Nothing from Ray Data's logger on the driver's terminal: it prints INFO lines for every
    dataset and, when an actor dies, a full internal traceback. A run prints its own progress,
    and one line for a failure that ends it (`failures`); Ray Data's log file, in the session's
    logs folder, still gets every record."""
    import logging

    import ray.data  # noqa: F401  (configures its logger on import)

    for handler in logging.getLogger("ray.data").handlers:
        if "File" not in type(handler).__name__:
            handler.setLevel(logging.CRITICAL)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While the block runs, SIGTERM raises KeyboardInterrupt in the driver, as Ctrl-C does
    (Ray's own handler exits without a word), so the run is ended KILLED on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ray_driver(address: str = "") -> Iterator[None]:
    """A driver's Ray: connected (`connect_ray`) and, while the block runs, SIGTERM raising
    KeyboardInterrupt as Ctrl-C does (`sigterm_interrupts`), so train, tune and study end their
    MLflow runs KILLED on the way out. Connected first: ray.init sets a SIGTERM handler of its own."""
    connect_ray(address)
    with sigterm_interrupts():
        yield


def cores() -> int:
    """Physical cores this machine offers the run (a local Ray declares more logical CPUs)."""
    return os.cpu_count() or 1


def produce_first(mode: str, address: str, activation_bytes: int) -> bool:
    """Whether a training run makes all its activations before it trains (`--stream`).

    On one machine the producers' forward and the SAE steps compete for the same cores, so making
    the activations first (every core on the forward, then every core on the steps) is faster
    end to end than overlapping them (docs/benchmarks.md#sharing-cores-on-one-machine), as long
    as they fit in the object store. On a cluster
    (an --address or RAY_ADDRESS) producers and trainers sit on their own nodes: stream."""
    import ray

    if mode != "auto":
        return mode == "off"
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    return activation_bytes <= ray.available_resources().get("object_store_memory", 0) / 3


LARGE_MODEL_PARAMS = 1_000_000_000  # from here on a model is given GPUs on a cluster that has none yet


def attached(address: str = "") -> bool:
    """Whether the run goes to an existing cluster (--address or RAY_ADDRESS) rather than a
    private local Ray."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def gpus_each(
    producers: int,
    workers: int,
    cluster_gpus: float,
    *,
    per_producer: float | None = None,
    per_worker: float | None = None,
    large_model: bool = False,
    on_cluster: bool = False,
) -> tuple[float, float]:
    """GPUs per producer actor and per worker. An explicit request (--gpus-per-*) stands. Auto:
    whole GPUs when the cluster has one for every actor, else equal shares of what it has; and
    where it has none yet but is an attached cluster (an autoscaler with `min_workers: 0` shows
    no GPU until a node is asked for) one each for a large model, so the request makes the
    autoscaler add GPU nodes. A small model on a machine without GPUs runs on CPU."""
    if cluster_gpus > 0:
        auto = 1.0 if cluster_gpus >= producers + workers else cluster_gpus / (producers + workers)
    else:
        auto = 1.0 if (large_model and on_cluster) else 0.0
    return (auto if per_producer is None else per_producer, auto if per_worker is None else per_worker)


def share_resources(
    producers: int,
    workers: int,
    *,
    concurrent: bool = True,
    per_producer: float | None = None,
    per_worker: float | None = None,
    large_model: bool = False,
    on_cluster: bool = False,
    producer_resources: dict[str, float] | None = None,
    worker_resources: dict[str, float] | None = None,
) -> Resources:
    """GPUs and threads for `producers` actors and `workers` trainers: GPUs as `gpus_each`
    decides from what the cluster has now. Threads: when producers and workers run at once
    (`concurrent`: a streaming training run) each process gets its share of all the cores, so the
    threads never outnumber the cores (more threads than cores gained nothing:
    docs/benchmarks.md#sharing-cores-on-one-machine); when the producers run alone first (a
    search, or a training run that makes its activations first) they share every core, and then
    the workers do."""
    import ray

    producer_gpus, worker_gpus = gpus_each(
        producers,
        workers,
        ray.cluster_resources().get("GPU", 0),
        per_producer=per_producer,
        per_worker=per_worker,
        large_model=large_model,
        on_cluster=on_cluster,
    )
    at_once = producers + workers if concurrent else producers
    return Resources(
        produce_first=not concurrent,
        gpus_per_producer=producer_gpus,
        gpus_per_worker=worker_gpus,
        producer_threads=max(1, cores() // at_once),
        worker_threads=max(1, cores() // (producers + workers if concurrent else workers)),
        producer_resources=dict(producer_resources or {}),
        worker_resources=dict(worker_resources or {}),
    )


def plan_resources(plan: RunPlan, *, concurrent: bool = True, workers: int | None = None) -> Resources:
    """`share_resources` for a plan's producers and `workers` (default the plan's), with its
    --gpus-per-* and --*-resources flags and its model's size."""
    return share_resources(
        plan.args.producers,
        plan.args.workers if workers is None else workers,
        concurrent=concurrent,
        per_producer=gpu_request(plan.args, "gpus_per_producer"),
        per_worker=gpu_request(plan.args, "gpus_per_worker"),
        large_model=plan.model_params >= LARGE_MODEL_PARAMS,
        on_cluster=attached(plan.args.address),
        producer_resources=resource_request(plan.args, "producer_resources"),
        worker_resources=resource_request(plan.args, "worker_resources"),
    )
