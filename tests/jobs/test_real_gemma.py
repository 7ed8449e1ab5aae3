"""The real Gemma 3 270M (the packaged GGUF, de-quantised once): slicing equivalence and one short
end-to-end run."""

import math

import torch

from conftest import tiny_args
from saeforge.core import corpus
from saeforge.core.hooks import HookPoint, capture, layers_needed
from saeforge.core.model import DEFAULT_MODEL, load_config, load_model, load_tokenizer, resolve_model, run_slice


def test_real_gemma_slice_equals_full_model_at_layer_6():
    spec = resolve_model(DEFAULT_MODEL)
    assert load_config(spec).num_hidden_layers == 18
    tok = load_tokenizer(spec)
    ids = torch.from_numpy(
        corpus.pack_contexts(list(corpus.split_texts(corpus.BUILTIN, "eval"))[:4], tok, 32, 2)
    ).long()
    hook = HookPoint(6)
    full = load_model(spec)
    with torch.no_grad(), capture(full, [hook]) as want:
        run_slice(full, ids)
    del full
    sliced = load_model(spec, n_layers=layers_needed([hook]))
    assert len(sliced.model.layers) == 7
    with torch.no_grad(), capture(sliced, [hook]) as got:
        run_slice(sliced, ids)
    torch.testing.assert_close(got[hook.name], want[hook.name])


def test_short_end_to_end_run_on_real_gemma(ray_session, mlflow_store, session_dir):
    from saeforge.jobs.train.driver import run_train

    args = tiny_args(
        session_dir,
        model=DEFAULT_MODEL,
        layer="6",
        tokens=4000,
        d_sae=1024,
        eval_contexts=2,
        run_name="real-gemma-short",
    )
    summary = run_train(args, progress=lambda *_: None)
    m = summary["metrics"]
    assert m["ce_loss_zero"] > m["ce_loss_clean"] + 1  # deleting the residual stream wrecks the model
    assert m["ce_loss_clean"] < 6 and all(math.isfinite(v) for v in m.values())
    assert summary["registered_model"] == "gemma-3-270m__blocks.6.hook_resid_post__relu"
    assert summary["version"] >= 1
