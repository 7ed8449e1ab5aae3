"""The variant protocol: the one small interface every SAE variant implements.

The platform (training loop, evaluation, saving, tuning) only ever talks to this interface, so a
new variant needs no change outside its own module. Variants work in *normalised* activation
space: the platform multiplies raw activations by `act_scale` (estimated once per run and stored
with the SAE) before calling them; `encode_raw` does that for callers holding raw activations.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from variants.common import capped_warmup, geometric_median, mse_loss, tied_init


def param(default: Any, help: str) -> Any:
    """A config field with a one-line description (shown by `saeforge variants NAME`)."""
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A config value that does not fit the variant (unknown name, wrong type)."""


B_DEC_INITS = ("geometric_median", "init")  # what init_from_data does with the decoder bias
# After the warm-up: hold the lr, cosine-decay it to 0, or hold it and decay it linearly to 0 over
# the last 20% of the run (dictionary_learning's decay_start; the loop applies them).
LR_SCHEDULES = ("constant", "cosine", "decay")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULE_HELP = "after warm-up: 'constant', 'cosine' (decay to 0), or 'decay' (linear to 0 over the last 20%)"

# (field, bound, strict): the shared fields' ranges, checked when a variant is built (a zero batch
# or learning rate would otherwise reach a worker and fail or train nothing there).
SHARED_BOUNDS = (
    ("d_sae", 1, False),
    ("batch_size", 1, False),
    ("lr", 0.0, True),
    ("weight_decay", 0.0, False),
    ("warmup_steps", 0, False),
    ("grad_clip", 0.0, False),
    ("init_norm", 0.0, True),
)


@dataclass(kw_only=True)
class VariantConfig:
    """Fields every variant has. Each variant subclasses this with its paper's hyperparameters."""

    d_in: int = field(metadata={"help": "width of the activations the SAE reads"})
    d_sae: int = field(metadata={"help": "number of latents"})
    # The recipe every variant starts from, chosen by the sweep in docs/recipe.md#the-default-recipe
    # for the default run's 300k tokens: Adam at 2e-3, warm-up, held, decayed over the last 20%,
    # batches of 1024 tokens. The papers' own rates and batches (3e-4, 2048-4096 tokens) are for
    # runs of millions of tokens or more; each variant's docstring gives the `--set` for its paper's.
    lr: float = param(2.0e-3, "learning rate (the recipe sweep's choice for a 300k-token run)")
    optimizer: str = param("adam", "'adam' or 'adamw'")
    weight_decay: float = param(0.0, "weight decay (adamw)")
    warmup_steps: int = param(1000, "linear learning-rate warm-up steps (capped at 10% of a run)")
    lr_schedule: str = param("decay", LR_SCHEDULE_HELP)
    grad_clip: float = param(0.0, "clip the gradient norm at this value; 0 turns clipping off")
    batch_size: int = param(1024, "activation tokens per optimiser step")
    normalize_decoder: bool = param(True, "renormalise decoder rows to unit norm after each step")
    b_dec_init: str = param(
        "geometric_median",
        "decoder bias set by init_from_data: 'geometric_median' of the "
        "first batch (Gao et al.) or 'init' (keep the constructor's)",
    )
    init_norm: float = param(0.1, "norm of the initial decoder rows (the encoder starts as their transpose)")
    seed: int = param(0, "seed for the initial weights")

    @classmethod
    def field_types(cls) -> dict[str, type]:
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        kinds = {"int": int, "float": float, "bool": bool, "str": str}
        return {name: kinds.get(t if isinstance(t, str) else t.__name__, str) for name, t in hints.items()}

    @classmethod
    def build(cls, *, d_in: int, d_sae: int, overrides: dict[str, Any] | None = None) -> VariantConfig:
        """Build a config from the run's sizes plus `name=value` overrides (strings are coerced)."""
        types = cls.field_types()
        values: dict[str, Any] = {}
        for name, raw in (overrides or {}).items():
            if name not in types or name in ("d_in", "d_sae"):
                known = ", ".join(sorted(n for n in types if n not in ("d_in", "d_sae")))
                raise ConfigError(f"unknown config field '{name}' for {cls.__name__} (known: {known})")
            values[name] = coerce(raw, types[name], name)
        return cls(d_in=d_in, d_sae=d_sae, **values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def coerce(value: Any, kind: type, name: str) -> Any:
    """Turn a CLI/YAML value into the field's type, or raise a one-line ConfigError."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name} expects true/false, got {value!r}")
    if kind is str:
        return str(value)
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{name} expects {kind.__name__}, got {value!r}")
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} expects {kind.__name__}, got {value!r}") from None


@dataclass
class LatentGroups:
    """A variant's own structure over its latents, for the feature browser: what a part is
    called ("group", "level", "prefix block"...) and each latent's part (d_sae,) long ids."""

    kind: str
    labels: Tensor


@dataclass
class LossOut:
    """What `Variant.loss` returns: the total, its named weighted terms, and what the SAE computed."""

    total: Tensor
    terms: dict[str, Tensor]
    latents: Tensor
    recon: Tensor


class Variant(nn.Module):
    """Base class of every SAE variant.

    A subclass sets `Config`, `description`, `saelens_architecture` when it is exactly one of
    SAELens's architectures (its cfg.json `architecture`; the others get "saeforge_<name>",
    which cannot collide with SAELens's), `term_coefficients` and, if it needs whole contexts in token order,
    `batch_layout = "contexts"`; it implements `encode`, `decode`, usually `penalties`, and
    `_scale_latents` (see `rescaled_latents`). State refreshed every N steps lives in registered
    buffers so that checkpoints carry it.

    What the platform calls, in order: `begin_run(total_steps)` once before training (fresh or
    resumed), `init_from_data(x)` once on the first normalised batch of a fresh run (before step
    0), then per step `forward(x, step, mask)` and, after the optimiser step, `after_step(step)`.
    """

    Config: ClassVar[type[VariantConfig]] = VariantConfig
    name: ClassVar[str] = ""  # set by variants.register
    description: ClassVar[str] = ""
    saelens_architecture: ClassVar[str | None] = None  # "standard", "topk", "jumprelu", ...: SAELens loads it
    architecture: ClassVar[str] = ""  # the cfg.json value, set by variants.register
    batch_layout: ClassVar[str] = "tokens"  # "tokens": (N, d_in) rows; "contexts": (B, T, d_in)
    # Loss term -> the config field that weights it (every term but "mse" has one): the contract
    # tests check each term scales with its coefficient and enters the total.
    term_coefficients: ClassVar[dict[str, str]] = {}
    # Non-empty: why the rescaling property (see `rescaled_latents`) does not apply to this variant.
    rescale_exempt: ClassVar[str] = ""
    # How a caller (`saeforge study`) brings the variant to a target L0 without naming it: either
    # `l0_field`, a config field that *is* the mean L0 (k of the top-k family), or
    # `sparsity_fields`, penalty coefficients multiplied together by one factor, where a larger
    # factor gives a lower L0. Every variant sets exactly one of the two.
    l0_field: ClassVar[str] = ""
    sparsity_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: VariantConfig):
        super().__init__()
        if cfg.b_dec_init not in B_DEC_INITS:
            raise ConfigError(f"b_dec_init must be one of {', '.join(B_DEC_INITS)}, got {cfg.b_dec_init!r}")
        if cfg.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule!r}")
        if cfg.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
        for f in dataclasses.fields(cfg):  # NaN passes every bound below: refused first
            value = getattr(cfg, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        for name, low, strict in SHARED_BOUNDS:
            value = getattr(cfg, name)
            if value < low or (strict and value == low):
                raise ConfigError(f"{name} must be {'above' if strict else 'at least'} {low:g}, got {value}")
        for term, name in self.term_coefficients.items():  # a negative weight rewards its term
            value = getattr(cfg, name)
            if isinstance(value, (int, float)) and value < 0:
                raise ConfigError(f"{name} weights the {term} term: it must be at least 0, got {value}")
        self.cfg = cfg
        # Scale that brings raw activations to E||x|| = sqrt(d_in); set once per run by the platform.
        self.register_buffer("act_scale", torch.tensor(1.0))
        # Tokens seen since each latent last fired: dead-latent statistics and AuxK read it.
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long))
        # Optimiser steps of the run (begin_run); 0: unknown, penalty warm-ups are not capped.
        self.register_buffer("run_steps", torch.tensor(0, dtype=torch.long))

    # -- the maths each variant defines ------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, f: Tensor) -> Tensor:
        raise NotImplementedError

    def penalties(self, x: Tensor, f: Tensor, x_hat: Tensor, step: int) -> dict[str, Tensor]:
        """Weighted loss terms besides the reconstruction MSE."""
        return {}

    def loss(self, x: Tensor, step: int = 0, mask: Tensor | None = None) -> LossOut:
        """Token-layout default: MSE plus `penalties`. Context-layout variants override this and
        use `mask` (B, T), true where a position is a real token (not BOS or padding)."""
        f = self.encode(x)
        x_hat = self.decode(f)
        terms = {"mse": mse_loss(x_hat, x), **self.penalties(x, f, x_hat, step)}
        return LossOut(total=sum(terms.values()), terms=terms, latents=f, recon=x_hat)

    def after_step(self, step: int) -> None:
        """Called after every optimiser step (decoder renormalisation by default)."""
        if self.cfg.normalize_decoder:
            self.normalize_decoder_rows()

    def diagnostics(self, x: Tensor, mask: Tensor | None = None) -> dict[str, float]:
        """The variant's paper's own measures on a batch of normalised activations (same layout
        as `loss`). Shared measures (L0, mean |corr|, decoder cosines) are the platform's."""
        return {}

    def saelens_fields(self) -> dict[str, Any]:
        """Extra cfg.json fields SAELens needs for this architecture (e.g. TopK's k), so the SAE
        files module never reads a variant-specific config field."""
        return {}

    def saelens_tensors(self) -> dict[str, Tensor]:
        """The tensors of sae_weights.safetensors, the file SAELens reads. A SAELens architecture
        returns exactly SAELens's tensors in raw activation units (the activation scale folded
        in, see LinearSAE); any other variant its parameters as they are (normalised units)."""
        return dict(self.named_parameters())

    def decoder_directions(self) -> Tensor:
        """(d_sae, d_in): one decoder direction per latent (used for shared cosine statistics)."""
        return self.W_dec

    def latent_groups(self) -> LatentGroups | None:
        """The variant's groups or levels of latents, if it has any (the browser shows their
        sizes and zero fractions); None for a flat dictionary."""
        return None

    # -- run set-up (called by the platform) ---------------------------------------------------
    def begin_run(self, total_steps: int) -> None:
        """Called once before training with the run's optimiser steps, so every penalty warm-up
        is capped like the lr warm-up (`penalty_warmup`): short runs and search trials reach their
        own coefficients. Kept in a buffer, so a resumed run keeps the same cap."""
        self.run_steps.fill_(int(total_steps))

    def penalty_warmup(self, warmup_steps: int) -> int:
        """The warm-up of a penalty coefficient, capped at 10% of the run (`capped_warmup`, the
        lr warm-up's rule) once `begin_run` has been called; uncapped before."""
        total = int(self.run_steps)
        return capped_warmup(warmup_steps, total) if total > 0 else warmup_steps

    def init_from_data(self, x: Tensor) -> None:
        """Data-dependent initialisation, called once on the first normalised batch x (N, d_in
        token rows) of a fresh run, before step 0 (never on resume). Default: nothing."""

    # -- the rescaling property ------------------------------------------------------------------
    def rescaled_latents(self, c: float) -> Variant:
        """A copy whose latents are c times this SAE's and whose readers of the latents are 1/c
        times, so its reconstruction is unchanged. A penalty must not fall under this move, or
        the variant's constraints (`after_step`, e.g. unit-norm decoder rows) must undo it: the
        contract test checks one or the other for every variant."""
        clone = copy.deepcopy(self)
        with torch.no_grad():
            clone._scale_latents(c)
        return clone

    def rescalings(self, c: float) -> dict[str, Variant]:
        """Every reconstruction-preserving rescaling move of this variant, by name: the latents
        move, plus any code inside the SAE a penalty reads (a gate, one level of a hierarchy)."""
        return {"latents": self.rescaled_latents(c)}

    def _scale_latents(self, c: float) -> None:
        """In place, without gradients: latents times c, their readers times 1/c."""
        raise NotImplementedError(f"{type(self).__name__} does not implement the rescaling move")

    # -- shared behaviour ----------------------------------------------------------------------
    def forward(self, x: Tensor, step: int = 0, mask: Tensor | None = None) -> LossOut:
        """The loss, computed inside forward so DistributedDataParallel syncs its gradients."""
        out = self.loss(x, step, mask)
        with torch.no_grad():
            latents = out.latents if mask is None else out.latents[mask]
            latents = latents.reshape(-1, latents.shape[-1])
            fired = (latents > 0).any(0)
            self.tokens_since_fired += latents.shape[0]
            self.tokens_since_fired[fired] = 0
        return out

    @torch.no_grad()
    def normalize_decoder_rows(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    def encode_raw(self, x_raw: Tensor) -> Tensor:
        """Latents of raw (un-normalised) activations."""
        return self.encode(x_raw * self.act_scale)


class LinearSAE(Variant):
    """A variant with the standard linear encoder and decoder: W_enc (d_in x d_sae), b_enc,
    W_dec (d_sae x d_in), b_dec, tied initialisation, ReLU encoder by default. Most variants
    differ only in their activation and penalties, so they subclass this."""

    def __init__(self, cfg: VariantConfig):
        super().__init__(cfg)
        self.W_enc, self.W_dec = tied_init(cfg.d_in, cfg.d_sae, cfg.seed, cfg.init_norm)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_activations(x))

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """b_dec at the batch's geometric median (Gao et al.), so the encoder reads centred
        inputs and the first reconstructions start at the data's centre, robust to outliers."""
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(x.reshape(-1, x.shape[-1])).to(self.b_dec))

    def saelens_tensors(self) -> dict[str, Tensor]:
        """For a SAELens architecture, SAELens's four tensors with the activation scale s
        (x_normalised = s * x_raw) folded in: W_enc * s, W_dec / s, b_dec / s, b_enc unchanged,
        so every pre-activation on raw activations equals ours on normalised ones and the
        reconstruction comes out in raw units (SAELens's convention; docs/saelens-interop-notes.md)."""
        if self.saelens_architecture is None:
            return super().saelens_tensors()
        s = self.act_scale
        return {"W_enc": self.W_enc * s, "W_dec": self.W_dec / s, "b_enc": self.b_enc, "b_dec": self.b_dec / s}

    def _scale_latents(self, c: float) -> None:
        """The pre-activations (hence ReLU / top-k latents) scale with W_enc and b_enc."""
        self.W_enc.mul_(c)
        self.b_enc.mul_(c)
        self.W_dec.div_(c)
