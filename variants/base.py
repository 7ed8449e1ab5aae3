"""The variant protocol: the one small interface every SAE variant implements.

The platform (training loop, evaluation, saving, tuning) only ever talks to this interface, so a
new variant needs no change outside its own module. Variants work in *normalised* activation
space: the platform multiplies raw activations by `act_scale` (estimated once per run and stored
with the SAE) before calling them; `encode_raw` / `reconstruct_raw` do that for callers holding
raw activations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


def param(default: Any, help: str) -> Any:
    """A config field with a one-line description (shown by `saeforge variants --fields`)."""
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A config value that does not fit the variant (unknown name, wrong type)."""


@dataclass(kw_only=True)
class VariantConfig:
    """Fields every variant has. Each variant subclasses this with its paper's hyperparameters."""

    d_in: int = field(metadata={"help": "width of the activations the SAE reads"})
    d_sae: int = field(metadata={"help": "number of latents"})
    lr: float = param(3.0e-4, "learning rate")
    optimizer: str = param("adam", "'adam' or 'adamw'")
    weight_decay: float = param(0.0, "weight decay (adamw)")
    warmup_steps: int = param(1000, "linear learning-rate warm-up steps (capped at 10% of a run)")
    lr_schedule: str = param("constant", "after warm-up: 'constant' or 'cosine' decay to 0")
    grad_clip: float = param(0.0, "clip the gradient norm at this value; 0 turns clipping off")
    batch_size: int = param(1024, "activation tokens per optimiser step")
    normalize_decoder: bool = param(True, "renormalise decoder rows to unit norm after each step")
    seed: int = param(0, "seed for the initial weights")

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def field_types(cls) -> dict[str, type]:
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        kinds = {"int": int, "float": float, "bool": bool, "str": str}
        return {name: kinds.get(t if isinstance(t, str) else t.__name__, str) for name, t in hints.items()}

    @classmethod
    def build(cls, *, d_in: int, d_sae: int, overrides: dict[str, Any] | None = None) -> "VariantConfig":
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
class LossOut:
    """What `Variant.loss` returns: the total, its named weighted terms, and what the SAE computed."""

    total: Tensor
    terms: dict[str, Tensor]
    latents: Tensor
    recon: Tensor


def mse_loss(x_hat: Tensor, x: Tensor) -> Tensor:
    """Squared error summed over d_in and averaged over tokens (VARIANTS.md's convention)."""
    return (x_hat - x).pow(2).sum(-1).mean()


class Variant(nn.Module):
    """Base class of every SAE variant.

    A subclass sets `Config`, `description`, `architecture` (the cfg.json value) and, if it needs
    whole contexts in token order, `batch_layout = "contexts"`; it implements `encode`, `decode`
    and usually `penalties`. State refreshed every N steps lives in registered buffers so that
    checkpoints carry it.
    """

    Config: ClassVar[type[VariantConfig]] = VariantConfig
    name: ClassVar[str] = ""  # set by variants.register
    description: ClassVar[str] = ""
    architecture: ClassVar[str] = ""
    batch_layout: ClassVar[str] = "tokens"  # "tokens": (N, d_in) rows; "contexts": (B, T, d_in)

    def __init__(self, cfg: VariantConfig):
        super().__init__()
        self.cfg = cfg
        # Scale that brings raw activations to E||x|| = sqrt(d_in); set once per run by the platform.
        self.register_buffer("act_scale", torch.tensor(1.0))
        # Tokens seen since each latent last fired: dead-latent statistics and AuxK read it.
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long))

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

    def begin_run(self, total_steps: int) -> None:  # TEMP until the variants work lands
        pass

    def init_from_data(self, x: Tensor) -> None:  # TEMP until the variants work lands
        pass

    def saelens_fields(self) -> dict:  # TEMP
        return {"activation_fn_kwargs": {"k": self.cfg.k}} if hasattr(self.cfg, "k") else {}

    def after_step(self, step: int) -> None:
        """Called after every optimiser step (decoder renormalisation by default)."""
        if self.cfg.normalize_decoder:
            self.normalize_decoder_rows()

    def diagnostics(self, x: Tensor, mask: Tensor | None = None) -> dict[str, float]:
        """The variant's paper's own measures on a batch of normalised activations (same layout
        as `loss`). Shared measures (L0, mean |corr|, decoder cosines) are the platform's."""
        return {}

    def saelens_tensors(self) -> dict[str, Tensor]:
        """Extra tensors SAELens needs under its own names (e.g. JumpReLU's `threshold`), saved
        beside the state dict so SAELens can load the file; our loader ignores them."""
        return {}

    def decoder_directions(self) -> Tensor:
        """(d_sae, d_in): one decoder direction per latent (used for shared cosine statistics)."""
        return self.W_dec

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

    def reconstruct_raw(self, x_raw: Tensor) -> Tensor:
        """Reconstruction of raw activations, in raw units (what gets spliced into the model)."""
        return self.decode(self.encode(x_raw * self.act_scale)) / self.act_scale


class LinearSAE(Variant):
    """A variant with the standard linear encoder and decoder: W_enc (d_in x d_sae), b_enc,
    W_dec (d_sae x d_in), b_dec, tied initialisation, ReLU encoder by default. Most variants
    differ only in their activation and penalties, so they subclass this."""

    def __init__(self, cfg: VariantConfig):
        super().__init__(cfg)
        from variants.common import tied_init

        self.W_enc, self.W_dec = tied_init(cfg.d_in, cfg.d_sae, cfg.seed)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_activations(x))

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec
