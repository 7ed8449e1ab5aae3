"""Contract tests every registered variant must pass; the list comes from the registry, so a new
variant is tested as soon as it is registered."""

import dataclasses
import math
import pathlib

import pytest
import torch
import yaml

import variants
from variants.base import LossOut

NAMES = variants.names()
D_IN, D_SAE = 16, 128  # d_sae = 128 suits every variant (group_ib: multiple of 32; contrastive_hier: >= 64)
TUNE_DIR = pathlib.Path(__file__).resolve().parents[1] / "tune_spaces"
# Cost knobs shrunk for a small CPU, applied to whichever variant has the field (none change the maths).
FAST = {"kde_tokens": "64", "n_candidates": "128"}
# A step past every warm-up ramp (and a multiple of every refresh interval): penalties at full strength.
STEP0 = 1_000_000


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def build(name: str, **overrides) -> variants.Variant:
    fields = variants.get(name).Config.field_types()
    chosen = {k: v for k, v in FAST.items() if k in fields}
    chosen.update(overrides)
    return variants.build(name, d_in=D_IN, d_sae=D_SAE, overrides=chosen)


class Toy:
    """Activations made of planted sparse features: x = sparse codes @ a random unit dictionary."""

    def __init__(self, seed: int = 0, n_features: int = 32, active: int = 3):
        self.gen = torch.Generator().manual_seed(seed)
        dictionary = torch.randn(n_features, D_IN, generator=self.gen)
        self.dictionary = dictionary / dictionary.norm(dim=-1, keepdim=True)
        self.n_features, self.active = n_features, active

    def tokens(self, n: int) -> torch.Tensor:
        scores = torch.rand(n, self.n_features, generator=self.gen)
        on = scores >= scores.topk(self.active, dim=-1).values[:, -1:]
        codes = on * (1.0 + 2.0 * torch.rand(n, self.n_features, generator=self.gen))
        return codes @ self.dictionary

    def batch(self, layout: str, contexts: int = 8, length: int = 32):
        """(x, mask): tokens (N, d_in) and no mask, or contexts (B, T, d_in) with a BOS position and
        padding at the end of some contexts masked out."""
        if layout == "tokens":
            return self.tokens(contexts * length), None
        x = self.tokens(contexts * length).reshape(contexts, length, D_IN)
        mask = torch.ones(contexts, length, dtype=torch.bool)
        mask[:, 0] = False
        mask[1::2, length - 5:] = False
        return x, mask


def test_registry_lists_every_module():
    modules = {p.stem for p in (pathlib.Path(variants.__file__).parent).glob("*.py")} - {"__init__", "base", "common"}
    assert set(NAMES) == modules


@pytest.mark.parametrize("name", NAMES)
def test_class_attributes(name):
    cls = variants.get(name)
    assert cls.description and "\n" not in cls.description
    assert cls.architecture
    assert cls.batch_layout in ("tokens", "contexts")


@pytest.mark.parametrize("name", NAMES)
def test_forward_terms_sum_and_grads_finite(name):
    model = build(name)
    x, mask = Toy().batch(model.batch_layout)
    out = model(x, STEP0, mask)
    assert isinstance(out, LossOut)
    assert torch.isfinite(out.total)
    assert torch.allclose(out.total, sum(out.terms.values()))
    assert out.latents.shape == (*x.shape[:-1], D_SAE)
    assert out.recon.shape == x.shape
    out.total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_planted_features(name):
    torch.manual_seed(0)
    model = build(name)
    toy = Toy(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(150):  # from step 0, as the trainer runs it (warm-up ramps and refreshes included)
        x, mask = toy.batch(model.batch_layout)
        out = model(x, step, mask)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        model.after_step(step)
        losses.append(float(out.total.detach()))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert all(math.isfinite(v) for v in losses)
    assert last < 0.9 * first, f"{name}: mean loss {first:.3f} over the first 10 steps, {last:.3f} over the last 10"


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    model = build(name)
    toy = Toy(seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i in range(3):
        x, mask = toy.batch(model.batch_layout)
        out = model(x, i, mask)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        model.after_step(i)
    state, cfg = model.state_dict(), model.cfg.to_dict()
    clone = variants.from_config_dict(name, cfg)
    clone.load_state_dict(state)
    model.eval()
    clone.eval()
    x, mask = toy.batch(model.batch_layout)
    with torch.no_grad():
        assert torch.equal(model.encode(x), clone.encode(x))
        assert torch.equal(model.decode(model.encode(x)), clone.decode(clone.encode(x)))
        assert torch.equal(model.loss(x, 5, mask).total, clone.loss(x, 5, mask).total)
    assert model.diagnostics(x, mask) == clone.diagnostics(x, mask)


@pytest.mark.parametrize("name", [n for n in NAMES if variants.get(n).batch_layout == "contexts"])
def test_masked_out_positions_do_not_count(name):
    """Whatever sits at BOS / padding positions, no loss term changes."""
    model = build(name).eval()
    toy = Toy(seed=3)
    x, mask = toy.batch("contexts")
    noisy = x.clone()
    noisy[~mask] = 100.0 * toy.tokens(int((~mask).sum()))
    with torch.no_grad():
        base, other = model.loss(x, 1, mask), model.loss(noisy, 1, mask)
    for key, value in base.terms.items():
        assert torch.allclose(other.terms[key], value, rtol=1e-5, atol=1e-6), key
    assert torch.equal(base.latents[mask], other.latents[mask])


@pytest.mark.parametrize("name", NAMES)
def test_encode_decode_shapes(name):
    model = build(name).eval()
    x, _ = Toy().batch(model.batch_layout)
    with torch.no_grad():
        if model.batch_layout == "contexts":
            f = model.encode(x)  # whole contexts, as evaluation calls it
            assert f.shape == (*x.shape[:-1], D_SAE)
            assert model.decode(f).shape == x.shape
        else:  # any leading shape, row by row
            grid = x[:24].reshape(2, 3, 4, D_IN)
            f = model.encode(grid)
            assert f.shape == (2, 3, 4, D_SAE)
            assert torch.allclose(f.reshape(-1, D_SAE), model.encode(x[:24]), atol=1e-6)
            assert torch.allclose(model.decode(f).reshape(-1, D_IN), model.decode(model.encode(x[:24])), atol=1e-6)
    assert model.decoder_directions().shape == (D_SAE, D_IN)


@pytest.mark.parametrize("name", NAMES)
def test_diagnostics_are_plain_floats(name):
    model = build(name)
    x, mask = Toy().batch(model.batch_layout)
    model(x, 0, mask)  # a training step's refreshes (pair sets, assignments) first
    diag = model.diagnostics(x, mask)
    assert all(isinstance(k, str) and type(v) is float and math.isfinite(v) for k, v in diag.items())


@pytest.mark.parametrize("name", NAMES)
def test_every_config_field_has_help(name):
    for f in dataclasses.fields(variants.get(name).Config):
        assert f.metadata.get("help", "").strip(), f"{name}.{f.name} has no help string"


@pytest.mark.parametrize("name", NAMES)
def test_config_fields_set_from_strings(name):
    config = variants.get(name).Config
    types = config.field_types()
    defaults = config(d_in=D_IN, d_sae=D_SAE)
    for field, kind in types.items():
        if field in ("d_in", "d_sae"):
            continue
        default = getattr(defaults, field)
        text = str(default).lower() if kind is bool else str(default)
        cfg = config.build(d_in=D_IN, d_sae=D_SAE, overrides={field: text})
        assert type(getattr(cfg, field)) is kind and getattr(cfg, field) == default, field


@pytest.mark.parametrize("name", NAMES)
def test_tune_space_matches_config(name):
    path = TUNE_DIR / f"{name}.yaml"
    assert path.exists(), f"missing {path}"
    space = yaml.safe_load(path.read_text())
    assert space["variant"] == name
    objective = space["objective"]
    assert isinstance(objective["metric"], str) and objective["mode"] in ("min", "max")
    types = variants.get(name).Config.field_types()

    def check(field, value):
        assert field in types and field not in ("d_in", "d_sae"), f"{name}: '{field}' is not a config field"
        kind = types[field]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        ok = ok or (kind is float and isinstance(value, int) and not isinstance(value, bool))
        assert ok, f"{name}: {field} = {value!r} is not a {kind.__name__}"

    assert space["params"], f"{name}: empty search space"
    for field, spec in space["params"].items():
        sampler = spec["sampler"]
        assert sampler in ("choice", "grid", "uniform", "loguniform", "randint"), sampler
        if sampler in ("choice", "grid"):
            assert spec["values"]
            for value in spec["values"]:
                check(field, value)
        else:
            check(field, spec["low"])
            check(field, spec["high"])
            assert spec["low"] < spec["high"]
            if sampler == "loguniform":
                assert spec["low"] > 0
    for field, value in (space.get("fixed") or {}).items():
        check(field, value)
    # The combination must build.
    fixed = {k: str(v) for k, v in (space.get("fixed") or {}).items()}
    variants.build(name, d_in=D_IN, d_sae=D_SAE, overrides=fixed)
