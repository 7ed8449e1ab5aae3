"""The SAE artifact: SAELens 6.x's layout with the activation scale folded into its weights,
saeforge's whole state beside it (never inside it), exact round trips, and atomic replacement."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import variants
from conftest import crash_during, crash_points
from saeforge.core import sae_files
from saeforge.core.sae_files import SaeMeta

META = SaeMeta("tiny", "blocks.3.hook_resid_post", 3, 16, "wiki")
# SAELens 6.x's architectures (what `SAE.load_from_disk` dispatches on); ours must not take these names
SAELENS_ARCHITECTURES = {
    "standard",
    "gated",
    "jumprelu",
    "topk",
    "batchtopk",
    "matryoshka_batchtopk",
    "temporal",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
}


def trained_like(name: str, scale: float = 0.25) -> variants.Variant:
    """A variant whose weights and buffers are all non-trivial (as after training)."""
    variant = variants.build(name, d_in=16, d_sae=128, overrides={"seed": "3"})
    variant.act_scale.fill_(scale)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in variant.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        variant.tokens_since_fired.random_(0, 1000, generator=gen)
    return variant.eval()


@pytest.mark.parametrize("name", variants.names())
def test_round_trip_is_exact_for_every_variant(tmp_path, name):
    variant = trained_like(name)
    folder = sae_files.save_sae(variant, tmp_path / "sae", META)
    assert {p.name for p in folder.iterdir()} == {"cfg.json", "sae_weights.safetensors", "saeforge_state.safetensors"}
    loaded, cfg = sae_files.load_sae(folder)
    for key, value in variant.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert cfg["saeforge"]["variant"] == name and cfg["saeforge"]["act_scale"] == 0.25
    assert SaeMeta.from_cfg(cfg) == META
    assert not list(tmp_path.glob(".sae*"))  # no staging or backup folder left behind


@pytest.mark.parametrize("name", variants.names())
def test_architecture_names_cannot_collide_with_saelens(name):
    cls = variants.get(name)
    if cls.saelens_architecture:
        assert cls.architecture == cls.saelens_architecture in SAELENS_ARCHITECTURES
    else:
        assert cls.architecture == f"saeforge_{name}" and cls.architecture not in SAELENS_ARCHITECTURES


def saelens_encode(architecture: str, t: dict, cfg: dict, x_raw: torch.Tensor) -> torch.Tensor:
    """SAELens's encode, written from its source (docs/saelens-interop-notes.md), on raw activations."""
    if architecture == "gated":  # GatedSAE.encode: a gate path and a magnitude path sharing W_enc
        centred = x_raw - t["b_dec"]
        gate = centred @ t["W_enc"] + t["b_gate"]
        magnitude = centred @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]
        return (gate > 0).to(x_raw.dtype) * torch.relu(magnitude)
    pre = (x_raw - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if architecture == "standard":
        return torch.relu(pre)
    if architecture == "topk":
        values, indices = pre.topk(cfg["k"], dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())
    return torch.relu(pre) * (pre > t["threshold"])  # jumprelu


@pytest.mark.parametrize("name", [n for n in variants.names() if variants.get(n).saelens_architecture])
def test_saelens_files_hold_only_saelens_tensors_in_raw_units(tmp_path, name):
    variant = trained_like(name)
    folder = sae_files.save_sae(variant, tmp_path / "sae", META)
    cfg = json.loads((folder / "cfg.json").read_text())
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    expected = {
        "gated": {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"},  # SAELens's GatedSAE has no b_enc
        "jumprelu": {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"},
    }.get(variant.architecture, {"W_enc", "W_dec", "b_enc", "b_dec"})
    assert set(tensors) == expected  # SAELens loads strictly: nothing of saeforge's may be in this file
    assert cfg["normalize_activations"] == "none" and cfg["sae_lens_version"] >= "6"
    assert cfg["metadata"]["hook_name"] == META.hook_name and cfg["metadata"]["model_name"] == META.model_name
    x_raw = torch.randn(50, 16, dtype=torch.float64) * 40  # raw units: norms far from sqrt(d_in)
    with torch.no_grad():
        ours = variant.double().encode_raw(x_raw)
        theirs = saelens_encode(variant.architecture, {k: v.double() for k, v in tensors.items()}, cfg, x_raw)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-9)
        recon = theirs @ tensors["W_dec"].double() + tensors["b_dec"].double()
        torch.testing.assert_close(recon, variant.decode(ours) / variant.act_scale, rtol=1e-5, atol=1e-7)
    assert (ours > 0).sum() > 0


def test_a_crash_between_the_two_renames_keeps_the_old_folder(tmp_path, monkeypatch):
    old, new = trained_like("relu", 0.25), trained_like("relu", 0.5)
    folder = sae_files.save_sae(old, tmp_path / "sae", META)
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(OSError, match="power cut"):
        sae_files.save_sae(new, folder, META)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not folder.exists()  # the crash hit after the old folder was moved aside ...
    loaded, cfg = sae_files.load_sae(folder)  # ... and the loader finds it there
    assert cfg["saeforge"]["act_scale"] == 0.25
    sae_files.save_sae(new, folder, META)  # the next save completes and leaves one folder
    assert sae_files.load_sae(folder)[1]["saeforge"]["act_scale"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_a_crash_at_any_step_of_a_save_keeps_a_complete_sae(tmp_path):
    """A real process dies (no clean-up runs) at each file operation of save_sae in turn, and
    half-way through each file it writes: every time the folder loads complete, as the old SAE or
    the new one, and the next save completes and leaves nothing else behind."""
    old, new = trained_like("relu", 0.25), trained_like("relu", 0.5)
    folder = sae_files.save_sae(old, tmp_path / "sae", META)
    crashes = 0
    for step, torn in crash_points():
        outcome = crash_during(lambda: sae_files.save_sae(new, folder, META), step, torn)
        if outcome == "completed":
            break
        if outcome == "crashed":
            crashes += 1
            assert sae_files.load_sae(folder)[1]["saeforge"]["act_scale"] in (0.25, 0.5), (step, torn)
        sae_files.save_sae(old, folder, META)  # the next save recovers, and leaves one folder
        assert sae_files.load_sae(folder)[1]["saeforge"]["act_scale"] == 0.25
        assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"], (step, torn)
    assert crashes >= 12  # three files written and torn, their flushes, two renames, the removals
    assert sae_files.load_sae(folder)[1]["saeforge"]["act_scale"] == 0.5


def test_a_folder_from_another_saeforge_version_is_refused_in_one_line(tmp_path):
    """A cfg.json with a config field this saeforge does not know, or without one it needs, is
    a ConfigError naming the fields (the CLI's one line, exit 2), not a TypeError."""
    folder = sae_files.save_sae(trained_like("relu"), tmp_path / "sae", META)
    saved = json.loads((folder / "cfg.json").read_text())
    config = saved["saeforge"]["config"]
    config["new_knob"] = 1.0
    del config["d_sae"]
    (folder / "cfg.json").write_text(json.dumps(saved))
    with pytest.raises(variants.ConfigError) as err:
        sae_files.load_sae(folder)
    message = str(err.value)
    assert "does not know: new_knob" in message and "no value for: d_sae" in message and "\n" not in message
