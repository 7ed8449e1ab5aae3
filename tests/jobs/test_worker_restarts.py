"""Workers, producers, drivers and nodes can die, on the tiny Gemma with real Ray Train workers,
Ray Data producers and the session's SQLite MLflow store. A crash is injected with the testing
hook `faults.arm` (the process calls os._exit, or hangs, at a chosen step or batch, once: a
marker file disarms the restarted process), and the run must end as if nothing happened: every
planned step once, every planned token once, the same SAE as an uninterrupted run (fixed data
order)."""

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_args

pytestmark = pytest.mark.ray  # every test here runs Ray Train, Ray Data or both

KILL_AT = 7  # the step (or producer batch) at which the process dies: after the checkpoint at step 6


def small_args(tmp: Path, **changes):
    """11 steps of 4 contexts, a checkpoint every 3: a kill at step 7 loses step 6 and restarts there."""
    return tiny_args(tmp, tokens=6000, checkpoint_every=3, log_every=3, **changes)


def planned_tokens(plan, contexts) -> int:
    from saeforge.core.corpus import valid_mask

    return int(valid_mask(contexts.train.pack(), list(plan.stream.special_ids)).sum())


def final_state(result):
    from saeforge.core.sae_files import SAE_DIR, load_sae
    from saeforge.jobs.train.checkpoints import RUN_INFO_FILE

    folder = Path(result.checkpoint.path) if hasattr(result, "checkpoint") else Path(result)
    sae, _ = load_sae(folder / SAE_DIR)
    return sae, json.loads((folder / RUN_INFO_FILE).read_text())


def assert_same_sae(a, b):
    for name, weight in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], weight, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def reference(session_dir):
    """The uninterrupted run every one-worker faulty run is compared with: the same plan trained
    by the plain loop in this process, from the same start on the same contexts in the same
    order (what a one-worker Ray run trains: test_layers.py checks the two agree)."""
    from saeforge.bench.plain_loop import plain_stream
    from saeforge.core.training import start_fresh, train_loop
    from saeforge.jobs.data.activation_stream import ActivationProducer
    from saeforge.jobs.validate import plan_train

    plan, contexts = plan_train(small_args(session_dir / "reference"))
    sae = plan.build_variant()
    producer = ActivationProducer(plan.stream, threads=2)
    batches = start_fresh(sae, plain_stream(producer, contexts.train.pack(), plan.stream.contexts_per_step))
    state = train_loop(sae, batches, dataclasses.replace(plan.loop, log_every=10**9))
    assert state.step == plan.loop.total_steps > KILL_AT
    return sae, {"step": state.step, "tokens_seen": state.tokens_seen}


def test_a_producer_that_always_crashes_ends_the_run_in_one_line(ray_session, mlflow_store, tmp_path, capsys):
    """A producer that dies every time it loads the model (as out of memory would) is restarted
    --max-failures times, then the run fails: one line, exit 1, the MLflow run FAILED."""
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors

    from saeforge.cli import main
    from saeforge.jobs.runtime import faults

    producer_class = "MapWorker(MapBatches(ActivationProducer))"
    assert not list_actors(filters=[("class_name", "=", producer_class), ("state", "!=", "DEAD")])
    earlier = {a.actor_id for a in list_actors(filters=[("class_name", "=", producer_class)], limit=10_000)}

    argv = ["train", "--model", "tiny", "--layer", "3", "--variant", "relu", "--tokens", "2000", "--d-sae", "64"]
    argv += ["--storage", str(tmp_path), "--run-name", "oom", "--stream", "off", "--max-failures", "1"]
    started = time.time()
    with faults.arm(faults.PRODUCER_BATCH, 0):  # every time a producer loads the model
        code = main(argv)
    seconds = time.time() - started
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    print(line)
    assert code == 1 and "Traceback" not in err
    assert line.startswith("saeforge: error: the run failed (a producer actor died: its process died")
    assert "--max-failures 1" in line
    restarts = [
        a.num_restarts
        for a in list_actors(filters=[("class_name", "=", producer_class)], detail=True, limit=10_000)
        if a.actor_id not in earlier  # the producers of earlier tests in the session are listed too
    ]
    assert restarts == [1]  # restarted once (--max-failures 1), then given up
    client = MlflowClient()
    experiment = client.get_experiment_by_name("saeforge/tiny/blocks.3.hook_resid_post")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'oom'")
    assert run.info.status == "FAILED"
    print(f"deterministic producer crash: failed in {seconds:.0f}s")


@pytest.fixture(scope="module")
def two_worker_reference(ray_session, session_dir):
    """The uninterrupted data-parallel run: two producers streaming into two DDP workers (gloo)."""
    from saeforge.jobs.train.driver import train_on_ray
    from saeforge.jobs.validate import plan_train

    plan, contexts = plan_train(small_args(session_dir / "two-workers", workers=2, producers=2, stream="on"))
    sae, info = final_state(train_on_ray(plan, contexts, plan.name))
    return sae, info, plan, contexts


def test_two_producers_and_two_ddp_workers_train_every_context_once(two_worker_reference):
    """Each rank read its half of every step's contexts, and together every context once."""
    sae, info, plan, contexts = two_worker_reference
    n = len(contexts.train)  # every context of the plan, once: ids 0..n-1
    assert n == plan.loop.total_steps * plan.stream.contexts_per_step
    assert info["step"] == plan.loop.total_steps
    assert info["tokens_seen"] == planned_tokens(plan, contexts)
    assert tally(info) == (n, n * (n - 1) // 2, sum(i * i for i in range(n)))
    assert torch.isfinite(sae.W_dec).all()


def tally(info: dict) -> tuple[int, int, int]:
    """The contexts a run trained (count, sum and sum of squares of their ids), from run.json."""
    return info["contexts_trained"], info["context_id_sum"], info["context_id_square_sum"]


DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from conftest import tiny_args
from saeforge.jobs.train.driver import run_train

run_train(tiny_args(Path({tmp!r}), **{changes!r}), progress=print)
"""


def test_a_worker_then_the_driver_killed_resume_to_the_uninterrupted_sae(two_worker_reference, mlflow_store, tmp_path):
    """Data parallelism, then exact resume. A driver with two producers and two DDP workers makes
    its activations first; rank 0 dies at step 4, and Ray Train restarts the whole group from the
    checkpoint at step 3 (each rank skipping its share of the steps trained); then the driver is
    killed (SIGKILL) while rank 0 waits at step 7. `--resume` from its run folder trains the
    rest, and the run ends as the uninterrupted one did (which streamed: made first or streamed,
    the steps hold the same contexts): the same steps, tokens, set of contexts (counted) and SAE,
    in the same MLflow run, FINISHED."""
    import os
    import signal
    import subprocess
    import sys

    import ray
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors

    from saeforge.jobs.arguments import TrainArgs
    from saeforge.jobs.runtime import faults
    from saeforge.jobs.train.driver import run_train

    exited, waits = tmp_path / "worker-exited", tmp_path / "worker-waits"
    tests = str(Path(__file__).resolve().parents[1])
    changes = {"workers": 2, "producers": 2, "stream": "off", "run_name": "driver-killed"}
    changes.update(tokens=6000, checkpoint_every=3, log_every=3, address=ray.get_runtime_context().gcs_address)
    script = DRIVER.format(tests=tests, tmp=str(tmp_path), changes=changes)
    log = tmp_path / "driver.log"  # a file, not a pipe: a full pipe would stall the driver
    with (
        faults.arm(faults.WORKER_STEP, 4, exited),
        faults.arm(faults.WORKER_STEP, KILL_AT, waits, hang=True),
        log.open("wb") as out,
    ):
        driver = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not waits.exists() and driver.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert exited.exists() and waits.exists(), log.read_text()[-3000:]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    run_folder = tmp_path / "runs" / "driver-killed"
    assert list(run_folder.glob("checkpoint_*"))  # the checkpoint at step 3 or 6 is there to resume from
    ours, deadline = ray.get_runtime_context().get_job_id(), time.time() + 60
    while time.time() < deadline and any(  # the killed driver's actors (its own job) go with it
        a.job_id != ours for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
    ):
        time.sleep(0.5)

    summary = run_train(TrainArgs(resume=str(run_folder)), progress=lambda *_: None)
    sae, info = final_state(summary["checkpoint"])
    reference = two_worker_reference[1]
    assert (info["step"], info["tokens_seen"]) == (reference["step"], reference["tokens_seen"])
    assert tally(info) == tally(reference)
    assert_same_sae(two_worker_reference[0], sae)
    run = MlflowClient().get_run(summary["run_id"])
    assert run.info.run_name == "driver-killed" and run.info.status == "FINISHED"


def test_a_trainer_node_removed_mid_run_restarts_on_another_node(reference, tmp_path):
    """Scale out, on a simulated cluster (`ray.cluster_utils.Cluster`, run by
    multi_node_run.py in its own process): a head with no CPUs for work, a producer node and two
    trainer nodes told apart by custom resources. The producer streams from the producer node
    and the worker trains on a trainer node. The producer dies at its 3rd batch (Ray Data restarts
    it and retries the batch, in order); when rank 0 reaches step 7 its whole node is removed, and
    Ray Train restarts the worker on the other trainer node from the checkpoint at step 6 (or 3,
    when the controller had not yet taken the report at 6): the run ends with the planned steps,
    tokens and contexts and the uninterrupted run's SAE, from the same rows in the same order."""
    import os
    import subprocess
    import sys

    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    script = Path(__file__).with_name("multi_node_run.py")
    done = subprocess.run(
        [sys.executable, str(script), str(out), str(tmp_path), str(KILL_AT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert done.returncode == 0 and out.exists(), (done.stdout + done.stderr)[-4000:]
    report = json.loads(out.read_text())
    nodes, removed = report["nodes"], report["removed"]
    trainers = {nodes["trainer-a"], nodes["trainer-b"]}
    assert report["producer_exited"]  # the producer did die
    assert report["producer_nodes"] == [nodes["producer"]]  # the producer ran (and restarted) there only
    assert set(report["worker_nodes"]) == trainers  # rank 0 on one trainer node, then on the other
    assert removed["node_id"] in trainers
    logged = [line.split()[2] for line in report["lines"] if line.startswith("[saeforge] step ")]
    assert logged.count("3/11") == 1 and logged[-2:] == ["9/11", "11/11"], logged  # from a checkpoint
    info = report["run_info"]
    assert (info["step"], info["tokens_seen"]) == (report["total_steps"], report["planned_tokens"])
    n = report["total_steps"] * 4  # 4 contexts a step: ids 0..n-1, each once
    assert tally(info) == (n, n * (n - 1) // 2, sum(i * i for i in range(n)))
    sae, _ = final_state(report["checkpoint"])
    assert_same_sae(reference[0], sae)
    print(
        f"trainer node removed at step {KILL_AT}: cluster up in {report['cluster_seconds']:.0f}s, "
        f"run done in {report['run_seconds']:.0f}s"
    )
