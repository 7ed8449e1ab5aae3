"""A training run on a simulated multi-node cluster, run as its own process by
`test_worker_restarts.test_a_trainer_node_removed_mid_run_...` (a process cannot be connected to
both the test session's private Ray and this cluster).

`ray.cluster_utils.Cluster` starts a head with no CPUs for work (the driver, Ray Train's
controller and Ray Data's split coordinator run there, at 0 CPUs), one producer node and two
trainer nodes, told apart by the custom resources `producer` and `trainer`; the run pins its
producer and its worker with --producer-resources producer=1 --worker-resources trainer=1.
The producer dies at its 3rd batch (Ray Data restarts it on the producer node and retries the
batch, in order). Rank 0 stops at step KILL_AT, writing its node id into a marker file; a thread
here removes that node (its raylet and every process on it die, as when a machine is lost), and
Ray Train starts the worker again on the other trainer node from the latest checkpoint.

Usage: python multi_node_run.py OUT.json WORK_DIR KILL_AT. OUT.json gets what the test checks.
"""

import dataclasses
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_args(*args, **kwargs):
    spec = importlib.util.spec_from_file_location("saeforge_test_conftest", TESTS / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    return conftest.tiny_args(*args, **kwargs)


def start_cluster(temp_dir: str):
    """The head (no CPUs; the dashboard on its own port, for the state API Ray Train's clean-up
    uses), a producer node and two trainer nodes, in a short temporary folder of their own."""
    from ray.cluster_utils import Cluster

    dashboard = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"  # this cluster's, not the session's
    head = {
        "num_cpus": 0,
        "gcs_server_port": free_port(),
        "temp_dir": temp_dir,
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard,
        # a lost node is declared dead after 2 failed health checks 1 s apart (Ray: 5, 3 s apart)
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 2},
    }
    cluster = Cluster(initialize_head=True, head_node_args=head, shutdown_at_exit=True)
    nodes = {  # started side by side, then waited for
        "producer": cluster.add_node(wait=False, num_cpus=2, resources={"producer": 1}),
        "trainer-a": cluster.add_node(wait=False, num_cpus=2, resources={"trainer": 1}),
        "trainer-b": cluster.add_node(wait=False, num_cpus=2, resources={"trainer": 1}),
    }
    cluster.wait_for_nodes()
    return cluster, nodes


def remove_when_marked(cluster, nodes: dict, marker: Path, removed: dict) -> None:
    """Wait for rank 0's marker (its node id), then remove that node."""
    while not marker.exists() or not marker.read_text():
        time.sleep(0.2)
    node_id = marker.read_text()
    (name,) = [n for n, node in nodes.items() if node.node_id == node_id]
    removed.update(name=name, node_id=node_id, at=time.time())
    cluster.remove_node(nodes[name], allow_graceful=False)


def actor_nodes(class_fragment: str) -> list[str]:
    from ray.util.state import list_actors

    return sorted({a.node_id for a in list_actors(detail=True, limit=10_000) if class_fragment in (a.class_name or "")})


def main(out: str, work: str, kill_at: int) -> None:
    import ray

    started = time.time()
    temp_dir = tempfile.mkdtemp(prefix="sf-mn-", dir="/tmp")  # short: Ray's socket paths are limited
    cluster, nodes = start_cluster(temp_dir)
    try:
        report = train_and_lose_a_node(cluster, nodes, Path(work), kill_at)
        report["cluster_seconds"] = report.pop("started") - started
        report["seconds"] = time.time() - started
        Path(out).write_text(json.dumps(report, indent=2))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def train_and_lose_a_node(cluster, nodes: dict, work: Path, kill_at: int) -> dict:
    """The run, with rank 0's node removed when it reaches `kill_at`; what the test checks."""
    from saeforge.core.corpus import valid_mask
    from saeforge.jobs.runtime import faults
    from saeforge.jobs.runtime.ray_cluster import connect_ray, plan_resources
    from saeforge.jobs.train.checkpoints import RUN_INFO_FILE
    from saeforge.jobs.train.driver import train_on_ray
    from saeforge.jobs.validate import plan_train

    started = time.time()
    marker, producer_marker = work / "worker-stopped", work / "producer-exited"
    args = tiny_args(
        work,
        address=cluster.address,
        producer_resources=["producer=1"],
        worker_resources=["trainer=1"],
        stream="on",
        tokens=6000,
        checkpoint_every=3,
        log_every=3,
        run_name="multi-node",
    )
    plan, contexts = plan_train(args)
    connect_ray(cluster.address)
    plan = dataclasses.replace(plan, resources=plan_resources(plan))
    removed: dict = {}
    watcher = threading.Thread(target=remove_when_marked, args=(cluster, nodes, marker, removed), daemon=True)
    watcher.start()
    lines: list[str] = []
    with (
        faults.arm(faults.PRODUCER_BATCH, 3, producer_marker),
        faults.arm(faults.WORKER_STEP, kill_at, marker, hang=True),
    ):
        result = train_on_ray(plan, contexts, plan.name, show=lines.append)
    checkpoint = Path(result.checkpoint.path)
    return {
        "started": started,
        "nodes": {name: node.node_id for name, node in nodes.items()},
        "producer_exited": producer_marker.exists(),
        "producer_nodes": actor_nodes("ActivationProducer"),
        "worker_nodes": actor_nodes("RayTrainWorker"),
        "removed": removed,
        "lines": lines,
        "checkpoint": str(checkpoint),
        "run_info": json.loads((checkpoint / RUN_INFO_FILE).read_text()),
        "total_steps": plan.loop.total_steps,
        "planned_tokens": int(valid_mask(contexts.train.pack(), list(plan.stream.special_ids)).sum()),
        "run_seconds": time.time() - started,
    }


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
