"""Every registered variant trains on activations from the real stream (Ray Data producer actors
on the tiny Gemma, in the variant's own batch layout) and leaves a loadable SAE; one
context-layout variant also runs the whole Ray Train path (the token layout is covered by the
end-to-end tests)."""

import json
from pathlib import Path

import pytest
import torch

import variants
from conftest import tiny_args
from saeforge import corpus
from saeforge.activations import ProducerSpec, activation_dataset, iterate_batches
from saeforge.hooks import HookPoint
from saeforge.model import ByteTokenizer, resolve_model
from saeforge.sae_io import load_sae, save_sae
from saeforge.training import estimate_act_scale, train_loop

FAST = {"kde_tokens": "64", "n_candidates": "128"}  # keep per-step costs of big-batch maths tiny
HOOK = HookPoint(3)
CONTEXT = 32


def fast_overrides(name):
    fields = variants.get(name).Config.field_types()
    return {"batch_size": "256", **{k: v for k, v in FAST.items() if k in fields}}


@pytest.fixture(scope="module")
def streams(ray_session):
    """One materialised activation stream per batch layout, produced by Ray Data actors."""
    tok = ByteTokenizer()
    contexts = corpus.pack_contexts(corpus.split_texts(corpus.BUILTIN, "train"), tok, CONTEXT, 96)
    special = tuple(corpus.special_ids(tok))
    out = {}
    for layout in ("tokens", "contexts"):
        spec = ProducerSpec(resolve_model("tiny"), (HOOK,), special, layout, threads=1)
        out[layout] = (spec, activation_dataset(contexts, spec, producers=1, cpus_per_producer=0.5).materialize())
    return out


@pytest.mark.parametrize("name", variants.names())
def test_variant_trains_on_the_producer_stream(name, streams, tmp_path):
    cls = variants.get(name)
    spec, dataset = streams[cls.batch_layout]
    sae = variants.build(name, d_in=64, d_sae=128, overrides=fast_overrides(name))
    rows = sae.cfg.batch_size if cls.batch_layout == "tokens" else sae.cfg.batch_size // CONTEXT
    batches = list(iterate_batches(dataset, spec, HOOK.name, rows, shuffle_rows=rows * 4))
    assert len(batches) >= 4
    if cls.batch_layout == "contexts":
        assert batches[0][0].shape == (rows, CONTEXT, 64) and batches[0][1].shape == (rows, CONTEXT)
        assert not batches[0][1][:, 0].any()  # BOS is masked out
    sae.act_scale.fill_(estimate_act_scale(*batches[0]))
    logs = []
    state = train_loop(sae, batches, len(batches), log_every=2, on_log=lambda s, m: logs.append(m))
    assert state.step == len(batches) and all(torch.isfinite(torch.tensor(m["loss"])) for m in logs)
    assert "mean_abs_corr" in logs[-1] and "decoder_cos_mean" in logs[-1]
    loaded, _ = load_sae(save_sae(sae, tmp_path / "sae", {"hook_name": HOOK.name}))
    x = batches[0][0]
    torch.testing.assert_close(loaded.encode_raw(x), sae.eval().encode_raw(x))


def test_a_context_layout_variant_through_ray_train(ray_session, session_dir):
    from saeforge.train_job import fit, plan_run
    from saeforge.train_workers import RUN_INFO_FILE

    name = next(n for n in variants.names() if variants.get(n).batch_layout == "contexts")
    args = tiny_args(session_dir, variant=name, tokens=3000, context_size=CONTEXT, overrides=fast_overrides(name),
                     run_name=f"pipeline-{name}", checkpoint_every=1000, log_every=2)
    plan = plan_run(args)
    checkpoint = Path(fit(plan, uri="", run_id="").checkpoint.path)
    assert json.loads((checkpoint / RUN_INFO_FILE).read_text())["step"] == plan.total_steps >= 2
