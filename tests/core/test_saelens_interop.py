"""Real SAELens (the optional `saelens` extra, which CI installs) loads the SAE folders of every
variant that exports to a SAELens architecture, and its `encode` on raw activations equals ours.

Each SAE is trained for a few steps first, so the folder holds what training leaves (a learnt
activation scale, a tracked BatchTopK threshold, moved biases), not a fresh initialisation."""

import pytest
import torch

import variants
from conftest import require
from saeforge.core import sae_files
from saeforge.core.sae_files import SaeMeta
from saeforge.core.training import LoopSettings, start_fresh, train_loop

try:
    import sae_lens
except ImportError:  # the optional `saelens` extra
    sae_lens = None

META = SaeMeta("tiny", "blocks.3.hook_resid_post", 3, 33, "wiki")
EXPORTED = [n for n in variants.names() if variants.get(n).saelens_architecture]


def raw_batches(n: int, seed: int = 0):
    """Planted sparse features in raw units (norms near 300, like a real residual stream's scale)."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(48, 16, generator=gen), dim=-1)
    mask = torch.ones(8, 33, dtype=torch.bool)
    mask[:, 0] = False
    for _ in range(n):
        codes = torch.rand(8, 33, 48, generator=gen) * (torch.rand(8, 33, 48, generator=gen) < 0.08)
        yield 300 * codes @ dictionary + 20, mask


@pytest.fixture(scope="module", params=EXPORTED)
def saved(request, tmp_path_factory):
    name = request.param
    sae = variants.build(
        name,
        d_in=16,
        d_sae=64,
        overrides={"k": "4", "lr": "3e-3"} if "k" in variants.get(name).Config.field_types() else {"lr": "3e-3"},
    )
    train_loop(sae, start_fresh(sae, raw_batches(30)), LoopSettings(30, log_every=10**9))
    folder = sae_files.save_sae(sae.eval(), tmp_path_factory.mktemp(name) / "sae", META)
    return sae, folder


def test_saelens_loads_the_folder_and_encodes_raw_activations_as_we_do(saved):
    require(sae_lens is not None, "SAELens (the `saelens` extra)")
    ours, folder = saved
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    assert type(theirs).__name__.lower().startswith(ours.architecture)  # StandardSAE, TopKSAE, JumpReLUSAE, GatedSAE
    x_raw, _ = next(raw_batches(1, seed=7))
    x_raw = x_raw.reshape(-1, 16)
    with torch.no_grad():
        want = ours.encode_raw(x_raw)
        got = theirs.encode(x_raw)
        assert (want > 0).any()
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel < 1e-5, rel
        recon = theirs.decode(got)
        torch.testing.assert_close(recon, ours.decode(want) / ours.act_scale, rtol=1e-5, atol=1e-3)
