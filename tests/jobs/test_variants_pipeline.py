"""Every registered variant trains on activations from the real stream (Ray Data producer actors
on the tiny Gemma, read in the variant's own batch layout) and leaves a loadable SAE (a
context-layout variant through the whole Ray Train path: test_run_faults.py)."""

import pytest
import torch

import variants
from saeforge.core import corpus
from saeforge.core.batches import contexts_per_step
from saeforge.core.hooks import HookPoint
from saeforge.core.model import ByteTokenizer, resolve_model
from saeforge.core.sae_files import SaeMeta, load_sae, save_sae
from saeforge.core.training import LoopSettings, start_fresh, train_loop
from saeforge.jobs.data.activation_stream import activation_dataset, step_batches
from saeforge.jobs.plan import StreamSpec

FAST = {"kde_tokens": "64", "n_candidates": "128"}  # keep per-step costs of big-batch maths tiny
HOOK = HookPoint(3)
CONTEXT = 32
META = SaeMeta("tiny", HOOK.name, HOOK.layer, CONTEXT, "wiki")


def fast_overrides(name):
    fields = variants.get(name).Config.field_types()
    return {"batch_size": "256", **{k: v for k, v in FAST.items() if k in fields}}


@pytest.fixture(scope="module")
def stream(ray_session):
    """One materialised activation stream, produced by Ray Data actors, read by every variant."""
    tok = ByteTokenizer()
    contexts = corpus.pack_contexts(corpus.split_texts(corpus.BUILTIN, "train"), tok, CONTEXT, 96)
    spec = StreamSpec(
        resolve_model("tiny"), (HOOK,), tuple(corpus.special_ids(tok)), CONTEXT, contexts_per_step(256, CONTEXT, 1), 1
    )
    return spec, activation_dataset(contexts, spec, producers=1).materialize()


@pytest.mark.parametrize("name", variants.names())
def test_variant_trains_on_the_producer_stream(name, stream, tmp_path):
    spec, dataset = stream
    sae = variants.build(name, d_in=64, d_sae=128, overrides=fast_overrides(name))
    batches = list(step_batches(dataset, spec))
    assert len(batches) >= 4 and batches[0][0].shape == (spec.contexts_per_step, CONTEXT, 64)
    assert not batches[0][1][:, 0].any()  # BOS is masked out
    logs = []
    state = train_loop(
        sae, start_fresh(sae, batches), LoopSettings(len(batches), log_every=2), on_log=lambda s, m: logs.append(m)
    )
    assert state.step == len(batches) and all(torch.isfinite(torch.tensor(m["loss"])) for m in logs)
    assert "mean_abs_corr" in logs[-1] and "decoder_cos_mean" in logs[-1]
    assert sae.act_scale.item() != 1.0  # estimated from the first batch
    loaded, _ = load_sae(save_sae(sae, tmp_path / "sae", META))
    x = batches[0][0]
    torch.testing.assert_close(loaded.encode_raw(x), sae.eval().encode_raw(x))
