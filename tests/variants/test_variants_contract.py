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
TUNE_DIR = pathlib.Path(__file__).resolve().parents[2] / "tune_spaces"
# Cost knobs shrunk for a small CPU, applied to whichever variant has the field (none change the maths).
FAST = {"kde_tokens": "64", "n_candidates": "128"}
# A step past every warm-up ramp (and a multiple of every refresh interval): penalties at full strength.
STEP0 = 1_000_000
# Refreshes (pair sets, group assignments) only at step 0, for tests that watch one fixed objective.
STATIONARY = {"refresh_interval": "100000"}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def rounded(terms: dict) -> dict:
    return {k: round(float(v), 6) for k, v in terms.items()}


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
        mask[1::2, length - 5 :] = False
        return x, mask


def adam_steps(model, toy, steps, step_of=lambda i: i, after_step=True) -> list[float]:
    """Train `model` on `toy` batches for `steps` Adam steps (lr 1e-3); the losses, step by step."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for i in range(steps):
        x, mask = toy.batch(model.batch_layout)
        out = model(x, step_of(i), mask)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        if after_step:
            model.after_step(step_of(i))
        losses.append(float(out.total.detach()))
    return losses


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
def test_sparsity_knob_is_declared_and_is_a_real_config_field(name):
    """`saeforge study` matches L0 through these attributes alone: exactly one is set, an
    `l0_field` is an int field whose value is the L0 the encoder keeps, and every
    `sparsity_fields` entry is a float coefficient that weighs one of the loss terms."""
    cls = variants.get(name)
    types = cls.Config.field_types()
    assert bool(cls.l0_field) != bool(cls.sparsity_fields)
    if cls.l0_field:
        assert types[cls.l0_field] is int
        sae = variants.build(name, d_in=D_IN, d_sae=D_SAE, overrides={cls.l0_field: "4"})
        with torch.no_grad():
            f = sae.encode(torch.randn(256, D_IN))
        assert (f > 0).sum(-1).float().mean().item() == pytest.approx(4, abs=0.5)
    for field_name in cls.sparsity_fields:
        assert types[field_name] is float and field_name in cls.term_coefficients.values()


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_mse_and_grads_finite(name):
    model = build(name)
    x, mask = Toy().batch(model.batch_layout)
    out = model(x, STEP0, mask)
    assert isinstance(out, LossOut)
    assert torch.isfinite(out.total)
    assert out.latents.shape == (*x.shape[:-1], D_SAE)
    assert out.recon.shape == x.shape
    real = mask if mask is not None else torch.ones(x.shape[:-1], dtype=torch.bool)
    torch.testing.assert_close(out.terms["mse"], (out.recon - x)[real].pow(2).sum(-1).mean(), rtol=1e-5, atol=0)
    out.total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def terms_at(name: str, x, mask, **overrides) -> LossOut:
    """Eval-mode loss of a freshly built variant after one training forward (pair sets, group
    assignments, thresholds refreshed), with every other latent marked dead (AuxK is active)."""
    torch.manual_seed(0)
    model = build(name, **overrides)
    model(x, 0, mask)
    model.tokens_since_fired.zero_()
    model.tokens_since_fired[::2] = 10**12
    model.eval()
    with torch.no_grad():
        return model.loss(x, STEP0, mask)


@pytest.mark.parametrize("name", NAMES)
def test_every_term_is_weighted_by_its_coefficient_and_enters_the_total(name):
    """Each penalty is a finite, non-zero scalar that doubles with its coefficient, vanishes at 0,
    and moves the total by exactly its own value; the MSE matches the returned reconstruction."""
    cls = variants.get(name)
    x, mask = Toy(seed=5).batch(cls.batch_layout)
    ref = terms_at(name, x, mask)
    assert set(ref.terms) == {"mse", *cls.term_coefficients}, "every term but mse names its coefficient"
    real = mask if mask is not None else torch.ones(x.shape[:-1], dtype=torch.bool)
    torch.testing.assert_close(ref.terms["mse"], (ref.recon - x)[real].pow(2).sum(-1).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(ref.total, sum(ref.terms.values()), rtol=1e-6, atol=0)
    defaults = cls.Config(d_in=D_IN, d_sae=D_SAE)
    for term, field in cls.term_coefficients.items():
        value = ref.terms[term]
        assert value.shape == () and torch.isfinite(value) and float(value) != 0.0, f"{term} = {float(value)}"
        coeff = getattr(defaults, field)
        doubled = terms_at(name, x, mask, **{field: repr(2 * coeff)})
        zeroed = terms_at(name, x, mask, **{field: "0"})
        torch.testing.assert_close(doubled.terms[term], 2 * value, rtol=1e-5, atol=0, msg=f"{term} x2")
        assert float(zeroed.terms[term]) == 0.0, f"{term} at {field} = 0"
        for other in ref.terms:
            if other != term:
                torch.testing.assert_close(zeroed.terms[other], ref.terms[other], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            ref.total - zeroed.total,
            value,
            rtol=1e-4,
            atol=1e-5 * float(ref.total.abs()),
            msg=f"{term} does not enter the total",
        )


@pytest.mark.parametrize("name", NAMES)
def test_penalty_warmups_are_capped_at_ten_percent_of_the_run(name):
    """After begin_run(T), no term depends on the step past T / 10 (lr warm-up's cap)."""
    cls = variants.get(name)
    x, mask = Toy(seed=6).batch(cls.batch_layout)
    model = build(name).eval()
    model.begin_run(300)
    with torch.no_grad():
        early, late = model.loss(x, 30, mask), model.loss(x, 10**7, mask)
    for term, value in late.terms.items():
        torch.testing.assert_close(early.terms[term], value, rtol=1e-6, atol=0, msg=term)


@pytest.mark.parametrize("name", NAMES)
def test_init_from_data_runs_on_token_rows(name):
    """The platform calls init_from_data once with (N, d_in) token rows, whatever the layout."""
    model = build(name)
    x, mask = Toy(seed=7).batch(model.batch_layout)
    rows = x[mask] if mask is not None else x
    untouched = build(name, b_dec_init="init")
    state = {k: v.clone() for k, v in untouched.state_dict().items()}
    untouched.init_from_data(rows)
    assert all(torch.equal(v, untouched.state_dict()[k]) for k, v in state.items())  # 'init' keeps it all
    model.init_from_data(rows)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    out = model(x, 0, mask)
    assert torch.isfinite(out.total)


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_planted_features(name):
    """The first 150 steps of a long run, as the trainer runs them (begin_run, init_from_data,
    steps from 0 with their warm-up ramps). Refreshes happen at step 0 only: a refresh swaps in a
    new pair set or grouping, i.e. a new objective, which at the papers' weights jumps the loss."""
    torch.manual_seed(0)
    fields = variants.get(name).Config.field_types()
    model = build(name, **{k: v for k, v in STATIONARY.items() if k in fields})
    toy = Toy(seed=1)
    model.begin_run(100_000)
    first, mask = toy.batch(model.batch_layout)
    model.init_from_data(first[mask] if mask is not None else first)
    # from step 0, as the trainer runs it (warm-up ramps and refreshes included)
    losses = adam_steps(model, toy, 150)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert all(math.isfinite(v) for v in losses)
    assert last < 0.9 * first, f"{name}: mean loss {first:.3f} over the first 10 steps, {last:.3f} over the last 10"


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    model = build(name)
    toy = Toy(seed=2)
    adam_steps(model, toy, 3)
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


def prepared(name: str, **overrides):
    """A variant as training leaves it, in float64 eval mode: a few optimiser steps (so biases and
    refreshed state are generic), its constraints applied (after_step), half its latents dead."""
    torch.manual_seed(0)
    model = build(name, **overrides)
    toy = Toy(seed=4)
    adam_steps(model, toy, 3, step_of=lambda i: i * 1000, after_step=False)  # multiples of every refresh interval
    x, mask = toy.batch(model.batch_layout)
    model.double().after_step(0)  # in float64, so the constraints hold to float64 precision
    model.tokens_since_fired.zero_()
    model.tokens_since_fired[::2] = 10**12
    return model.eval(), x.double(), mask


def close(a, b) -> bool:
    return torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("c", [0.5, 0.1])
@pytest.mark.parametrize("name", NAMES)
def test_penalties_cannot_be_lowered_by_rescaling(name, c):
    """Each of the variant's rescaling moves (a code times c < 1, its readers times 1/c) keeps the
    reconstruction. The variant's constraints (after_step) then act on the moved copy, and either
    its reconstruction is still the original's, so its loss must not be lower, or the readers are
    back at the original's (the move is not feasible: smaller codes cost reconstruction)."""
    model, x, mask = prepared(name)
    if model.rescale_exempt:
        pytest.skip(f"{name}: {model.rescale_exempt}")
    with torch.no_grad():
        base = model.loss(x, STEP0, mask)
    moves = model.rescalings(c)
    assert "latents" in moves
    for move, clone in moves.items():
        with torch.no_grad():
            moved = clone.loss(x, STEP0, mask)
        if move == "latents":
            torch.testing.assert_close(moved.latents, c * base.latents, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(moved.recon, base.recon, rtol=1e-5, atol=1e-8, msg=f"{move}: recon changed")
        clone.after_step(STEP0)
        with torch.no_grad():
            projected = clone.loss(x, STEP0, mask)
        if close(projected.recon, base.recon):
            drop = float(base.total - projected.total)
            assert drop <= 1e-9 * (1 + abs(float(base.total))), (
                f"{name}/{move}: c = {c} lowers the loss by {drop:.6g} ({float(base.total):.6g} -> "
                f"{float(projected.total):.6g}); terms {rounded(projected.terms)} vs {rounded(base.terms)}"
            )
        else:
            assert close(clone.decoder_directions(), model.decoder_directions()), (
                f"{name}/{move}: after_step changes the reconstruction but leaves readers rescaled"
            )


@pytest.mark.parametrize("name", NAMES)
def test_latent_groups_label_every_latent_or_are_none(name):
    """The browser's hook: None for a flat dictionary, else one part id per latent."""
    groups = build(name).latent_groups()
    if groups is None:
        return
    assert groups.kind and groups.labels.shape == (D_SAE,) and groups.labels.dtype == torch.long
    assert len(torch.unique(groups.labels)) >= 2
