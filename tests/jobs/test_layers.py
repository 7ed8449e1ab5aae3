"""k layers from one pass, on the tiny Gemma with real Ray Data producers, a real
Ray Train worker and the session's SQLite MLflow store.

`saeforge train --layer 1,3` runs the model once (to layer 3) and trains one SAE per hook: the
producers forward exactly the contexts a one-layer run of layer 3 forwards, and each hook's SAE is
the one a separate single-hook run of that layer trains (the layer-3 one is the session's
`tiny_run`, trained by `saeforge train --layer 3` on the same data; the layer-1 one is checked
against a single-hook loop run here). Each SAE is evaluated, logged in its own MLflow run and
registered under its own name; `--resume` goes on with every hook. `saeforge tune --layer 4,5`
produces the activations once and searches each hook.

The k-layer run registers versions of the layer-3 model that `tiny_run`'s tests also read: its
--max-l0 1 keeps them from ever becoming champion (the decision is still made, per hook).
"""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_args

LAYERS = "1,3"
HOOKS = ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post")


def k_args(tmp, **changes):
    changes = {"run_name": "tiny-k-layers", "max_l0": 1.0, "checkpoint_every": 10, "eval_contexts": 4, **changes}
    return tiny_args(tmp, layer=LAYERS, **changes)


def assert_same_sae(a, b, what=""):
    for name, weight in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], weight, rtol=1e-5, atol=1e-6, msg=f"{what} {name}")


def sae_at(checkpoint_folder):
    from saeforge.core.sae_files import SAE_DIR, load_sae

    return load_sae(Path(checkpoint_folder) / SAE_DIR)[0]


@pytest.fixture(scope="module")
def k_run(tiny_run, session_dir):
    """`saeforge train --layer 1,3` (after `tiny_run`, the one-layer run of layer 3)."""
    from saeforge.jobs.train.driver import run_train

    lines = []
    summary = run_train(k_args(session_dir / "k-layers"), progress=lines.append)
    return summary, lines


def test_one_model_pass_to_the_deepest_hook_serves_every_sae(k_run, tiny_run, session_dir):
    from saeforge.jobs.validate import plan_train

    summary, lines = k_run
    plan, contexts = plan_train(k_args(session_dir / "k-plan"))
    assert [h.name for h in plan.stream.hooks] == list(HOOKS)
    # the same producer forwards and contexts as the one-layer run of layer 3, every context once
    assert summary["activations"] == tiny_run["activations"]
    assert summary["activations"]["contexts_forwarded"] == len(contexts.train) == 92
    assert 1 <= summary["activations"]["producer_batches"] <= len(contexts.train) // 16 + 4
    for hook in HOOKS:  # rank 0's progress lines, one per hook
        assert any(line.startswith("[saeforge] step ") and line.endswith(f"| {hook}") for line in lines)


def test_each_hooks_sae_is_the_one_a_single_hook_run_trains(k_run, tiny_run, session_dir):
    """Layer 3: the session's one-layer run (`saeforge train --layer 3`, same data and seed).
    Layer 1: a single-hook loop over the same contexts, made by a producer in this process."""
    import dataclasses

    from saeforge.bench.plain_loop import plain_stream
    from saeforge.core.training import start_fresh, train_loop
    from saeforge.jobs.data.activation_stream import ActivationProducer
    from saeforge.jobs.validate import plan_train

    hooks = {h["hook"]: h for h in k_run[0]["hooks"]}
    assert_same_sae(sae_at(tiny_run["checkpoint"]), sae_at(hooks[HOOKS[1]]["checkpoint"]), "layer 3")
    plan, contexts = plan_train(tiny_args(session_dir / "layer-1", layer="1"))
    alone = plan.build_variant()
    producer = ActivationProducer(plan.stream, threads=2)
    batches = start_fresh(alone, plain_stream(producer, contexts.train.pack(), plan.stream.contexts_per_step))
    state = train_loop(alone, batches, dataclasses.replace(plan.loop, log_every=10**9))
    assert state.step == plan.loop.total_steps == 23
    assert_same_sae(alone, sae_at(hooks[HOOKS[0]]["checkpoint"]), "layer 1")
    assert not torch.allclose(sae_at(hooks[HOOKS[0]]["checkpoint"]).W_dec, sae_at(tiny_run["checkpoint"]).W_dec)


def test_every_hook_is_evaluated_logged_and_registered_under_its_own_name(k_run):
    from mlflow.tracking import MlflowClient

    summary, _ = k_run
    client = MlflowClient()
    assert [h["hook"] for h in summary["hooks"]] == list(HOOKS)
    siblings = {h["hook"]: h["run_id"] for h in summary["hooks"]}
    for hook in summary["hooks"]:
        assert hook["registered_model"] == f"tiny__{hook['hook']}__relu"
        version = client.get_model_version(hook["registered_model"], str(hook["version"]))
        assert version.run_id == hook["run_id"]  # registered from the hook's own run
        assert float(version.tags["ce_loss_recovered"]) == pytest.approx(hook["metrics"]["ce_loss_recovered"], abs=1e-5)
        assert not hook["champion"] and "outside the sane range [1, 1]" in hook["champion_reason"]
        run = client.get_run(hook["run_id"])
        experiment = client.get_experiment(run.info.experiment_id)
        assert experiment.name == f"saeforge/tiny/{hook['hook']}"  # where a one-hook run of it would be
        assert run.info.status == "FINISHED" and run.info.run_name == "tiny-k-layers"
        assert run.data.params["layer"] == LAYERS and run.data.params["hooks"] == ",".join(HOOKS)
        assert json.loads(run.data.tags["saeforge.hook_runs"]) == siblings
        assert math.isfinite(run.data.metrics["eval/ce_loss_recovered"]) and "time/train_s" in run.data.metrics
        assert len(client.get_metric_history(hook["run_id"], "loss/mse")) >= 3  # its own curve
        assert run.data.metrics["eval/explained_variance"] == pytest.approx(hook["metrics"]["explained_variance"])
        cfg = json.loads((Path(hook["checkpoint"]) / "sae" / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == hook["hook"]
    curves = [client.get_metric_history(h["run_id"], "loss/mse")[-1].value for h in summary["hooks"]]
    assert curves[0] != curves[1]


def test_resume_goes_on_with_every_hook(k_run, session_dir):
    """`--resume` from the k-layer run's earlier checkpoint trains the rest of every hook's SAE
    into the same MLflow runs and ends with the uninterrupted run's SAEs."""
    from saeforge.jobs.train.checkpoints import RUN_INFO_FILE, is_checkpoint
    from saeforge.jobs.train.driver import run_train

    summary, _ = k_run
    run_dir = Path(summary["checkpoint"]).parent
    earlier = min(
        (p for p in run_dir.glob("checkpoint_*") if is_checkpoint(p)),
        key=lambda p: json.loads((p / RUN_INFO_FILE).read_text())["step"],
    )
    assert json.loads((earlier / RUN_INFO_FILE).read_text())["step"] == 20
    resumed = run_train(k_args(session_dir / "k-layers", resume=str(earlier)), progress=lambda *_: None)
    assert [h["run_id"] for h in resumed["hooks"]] == [h["run_id"] for h in summary["hooks"]]
    assert resumed["activations"]["contexts_forwarded"] == 12  # only the 3 steps left, 4 contexts each
    for before, after in zip(summary["hooks"], resumed["hooks"]):
        assert_same_sae(sae_at(before["checkpoint"]), sae_at(after["checkpoint"]), before["hook"])
        assert after["version"] == before["version"] + 1
    info = json.loads((Path(resumed["checkpoint"]) / RUN_INFO_FILE).read_text())
    assert info["step"] == 23 and info["contexts_trained"] == 92


SPACE = """\
variant: relu
objective: {metric: ce_loss_recovered, mode: max, l0_max: 128}
params:
  lr: {sampler: grid, values: [3.0e-3]}
fixed:
  batch_size: 256
  l1_coeff: 0.01
"""


def test_a_search_of_two_hooks_runs_the_model_once_and_registers_each_hooks_best(ray_session, mlflow_store, tmp_path):
    """`saeforge tune --layer 4,5` (layers no other test registers), attached to a running
    cluster (the session's Ray, by address, as inside `ray job submit`): one model pass for both
    hooks; a search per hook, whose trial trains on its own hook's activations, recorded in the
    hook's experiment and registered under the hook's name."""
    import ray
    from mlflow.tracking import MlflowClient

    from saeforge.core.training import estimate_act_scale
    from saeforge.jobs.arguments import TuneArgs
    from saeforge.jobs.data.activation_stream import ActivationProducer
    from saeforge.jobs.tune.driver import run_tune
    from saeforge.jobs.validate import plan_tune

    (tmp_path / "space.yaml").write_text(SPACE)
    args = TuneArgs(
        variant="relu",
        space=str(tmp_path / "space.yaml"),
        samples=1,
        scheduler="fifo",
        search_alg="random",
        tokens_per_trial=2000,
        model="tiny",
        layer="4,5",
        d_sae=64,
        context_size=32,
        eval_contexts=2,
        storage=str(tmp_path / "runs"),
        max_failures=0,
        address=ray.get_runtime_context().gcs_address,
        precision="float32",  # on a cluster `auto` is each producer's choice: the same as here, whatever
    )
    summary = run_tune(args, progress=lambda *_: None, verbose=0)
    plan, contexts, _ = plan_tune(args)
    acts = summary["activations"]
    assert acts["contexts_forwarded"] == acts["contexts"] == len(contexts.train)  # once, for both hooks
    assert [s["hook"] for s in summary["searches"]] == ["blocks.4.hook_resid_post", "blocks.5.hook_resid_post"]
    producer = ActivationProducer(plan.stream, threads=2)
    first = producer({"context_id": list(range(8)), "input_ids": contexts.train.pack()[:8]})
    client = MlflowClient()
    for search in summary["searches"]:
        best = search["best"]
        assert search["trials_completed"] == 1 and best is not None
        assert search["registered_model"] == f"tiny__{search['hook']}__relu"
        version = client.get_model_version(search["registered_model"], str(search["version"]))
        assert version.run_id == best["run_id"]  # the hook's best trial's SAE, under the hook's name
        parent = client.get_run(search["parent_run_id"])
        assert client.get_experiment(parent.info.experiment_id).name == f"saeforge/tiny/{search['hook']}"
        sae = sae_at(best["checkpoint_dir"])
        # the trial's SAE read its own hook's column: its scale comes from that hook's first step
        want = estimate_act_scale(torch.from_numpy(first[search["hook"]]), torch.from_numpy(first["mask"]))
        assert sae.act_scale.item() == pytest.approx(want, rel=1e-5), search["hook"]
