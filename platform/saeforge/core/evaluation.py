"""Core evaluation on held-out contexts, with the model in the loop, on SAELens's footing.

The conventions are SAELens's `run_evals` (sae_lens/evals.py, checked against it in
docs/saelens-interop-notes.md), so our numbers and SAEBench's can be compared:
- Special tokens (BOS, padding) are excluded: the SAE is not spliced in at them (they keep their
  activation) and no metric counts them.
- Zero ablation zeroes the hook at *every* position, BOS included.
- CE loss: the next-token loss of the predictions made at real tokens (the prediction made at BOS
  is dropped, the prediction of a following BOS is kept), a token-weighted mean over all contexts.
  CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean): 1 means the SAE loses nothing
  the model needs, 0 means it is as bad as deleting the activation.
- KL: KL(clean || patched) of the next-token distribution at every real position, pooled mean.
- Explained variance: 1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2 over every real token, one
  global mean. MSE is summed over d_in and averaged over tokens, in raw activation units.
Each headline figure comes with its bootstrap standard error over contexts (`*_stderr`), so a
reader can tell whether the held-out text was enough.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import variants
from saeforge.core import metrics
from saeforge.core.batches import real_rows, sae_input
from saeforge.core.corpus import valid_mask
from saeforge.core.hooks import HookPoint, block_input, capture, replace, skip_blocks_before
from saeforge.core.model import forward_precision, resolve_precision
from variants.common import mean_abs_correlation

MAX_CORR_ROWS = 4096  # latent rows kept for the correlation statistics
BOOTSTRAP_SAMPLES = 200
HEAD_ROWS = 128  # positions per LM-head chunk (see _losses)
PER_CONTEXT = ("tokens", "resid_sq", "x_sq", "ce_targets", "ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero")
# What `evaluate_core` returns for every SAE (besides the variant's own `diag/*`): what a search's
# objective and constraints may name.
CORE_METRICS = (
    "mse",
    "explained_variance",
    "explained_variance_stderr",
    "cossim",
    "l0",
    "l1",
    "dead_fraction",
    "dense_fraction",
    "ce_loss_clean",
    "ce_loss_sae",
    "ce_loss_zero",
    "ce_loss_recovered",
    "ce_loss_recovered_stderr",
    "kl_div_sae",
    "kl_div_zero",
    "eval_tokens",
    "eval_contexts",
    "mean_abs_corr",
    *metrics.DECODER_COSINE_STATS,
)


@dataclass(frozen=True)
class Baseline:
    """What does not depend on the SAE, per context: the zero-ablated next-token loss and KL.
    Computed once (`baseline`), it spares every later evaluation of the same contexts its
    zero-ablated forward pass (a search or a sweep evaluates many SAEs on one text)."""

    ce_zero: np.ndarray
    kl_zero: np.ndarray


def bootstrap_stderr(per_context: dict[str, np.ndarray], fn, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> float:
    """Standard deviation of `fn` (a function of pooled per-context sums) over resampled contexts."""
    n = len(next(iter(per_context.values())))
    if n < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        pick = rng.integers(0, n, n)
        values.append(fn({k: v[pick].sum(0) for k, v in per_context.items()}))
    values = [v for v in values if math.isfinite(v)]
    return float(np.std(values)) if len(values) > 1 else math.nan


def _explained_variance(s: dict) -> float:
    total = s["x_sq"] - (s["x_sum"] ** 2).sum() / max(s["tokens"], 1)
    return 1 - s["resid_sq"] / max(total, 1e-12)


def _ce_recovered(s: dict) -> float:
    clean, sae, zero = (s[k] / max(s["ce_targets"], 1) for k in ("ce_clean", "ce_sae", "ce_zero"))
    return (zero - sae) / (zero - clean) if zero != clean else math.nan


@torch.no_grad()
def evaluate_core(
    model,
    variant: variants.Variant,
    hook: HookPoint,
    contexts: np.ndarray,
    special_ids: list[int],
    batch_contexts: int = 4,
    progress=None,
    reference: Baseline | None = None,
    precision: str = "float32",
) -> dict[str, float]:
    """Every core metric of one SAE on held-out contexts ((n, context_size) token ids). With a
    `reference` (`baseline` of the same contexts) the zero-ablated forward is not run again."""
    (result,) = evaluate_hooks(
        model,
        [(variant, hook)],
        contexts,
        special_ids,
        batch_contexts,
        progress,
        references={hook: reference} if reference is not None else None,
        precision=precision,
    )
    return result


@torch.no_grad()
def evaluate_hooks(
    model,
    saes: Sequence[tuple[variants.Variant, HookPoint]],
    contexts: np.ndarray,
    special_ids: list[int],
    batch_contexts: int = 4,
    progress=None,
    references: dict[HookPoint, Baseline] | None = None,
    precision: str = "float32",
) -> list[dict[str, float]]:
    """`evaluate_core` of several SAEs, each at its own hook, on the same held-out contexts (the
    SAEs of a k-hook run): one clean forward per batch serves them all (every hook's activations
    and block input are captured in it, and the clean log-probabilities are computed once per
    chunk of positions), then each SAE's spliced pass and each hook's zero-ablated pass (unless
    `references` holds that hook's `baseline`) start at their hook's block. Each SAE's figures
    are the ones `evaluate_core` gives it alone.

    `precision` (the run's --precision) is the model's, as in the producers: on a CPU, bfloat16
    runs the model's matmuls (the LM head most of all) in bf16 under one autocast context for the
    whole evaluation, so each weight is cast once; the SAEs always compute in fp32."""
    references = references or {}
    device = next(model.parameters()).device
    tallies = [_SaeTally(variant) for variant, _ in saes]
    hooks = list(dict.fromkeys(hook for _, hook in saes))
    with forward_precision(resolve_precision(precision, device.type), device.type):
        for start in range(0, len(contexts), batch_contexts):
            _evaluate_batch(
                model, saes, tallies, hooks, references, contexts[start : start + batch_contexts], special_ids
            )
            if progress:
                progress(min(start + batch_contexts, len(contexts)), len(contexts))
    return [tally.result(references.get(hook)) for tally, (_, hook) in zip(tallies, saes)]


def _evaluate_batch(model, saes, tallies, hooks, references, batch: np.ndarray, special_ids: list[int]) -> None:
    """One batch of `evaluate_hooks`: the clean forward, each SAE's tally and spliced pass, the
    zero-ablated passes not in `references`."""
    device = next(model.parameters()).device
    ids = torch.from_numpy(batch.astype(np.int64)).to(device)
    real = valid_mask(ids, special_ids)  # (b, T): the positions every metric counts
    with contextlib.ExitStack() as stack:
        captured = stack.enter_context(capture(model, hooks))
        entering = {n: stack.enter_context(block_input(model, n)) for n in dict.fromkeys(h.layer for h in hooks)}
        clean_hidden = final_hidden(model, ids)
    passes = {}
    for i, (tally, (_, hook)) in enumerate(zip(tallies, saes)):
        acts = captured[hook.name].float()
        with torch.autocast(device.type, enabled=False):  # the SAE in fp32 whatever the model's precision
            recon = tally.add(acts, real).to(device=device, dtype=acts.dtype)  # real-token rows, raw units

        def spliced(out, recon=recon, real=real):
            out = out.clone()
            out[real] = recon.to(out.dtype)
            return out

        passes[f"sae#{i}"] = (hook, entering[hook.layer]["hidden"], spliced)
    for hook in hooks:
        if hook not in references:
            passes[f"zero@{hook.name}"] = (hook, entering[hook.layer]["hidden"], torch.zeros_like)
    losses = _losses(model, ids, real, clean_hidden, passes)
    targets = real[:, :-1].sum(1).double().cpu()  # predictions made at real tokens (entry i predicts i + 1)
    for i, (tally, (_, hook)) in enumerate(zip(tallies, saes)):
        tally.add_losses(targets, losses, f"sae#{i}", None if hook in references else f"zero@{hook.name}")


class _SaeTally:
    """One SAE's sums over the evaluation's batches (per context where a standard error needs them)."""

    def __init__(self, variant: variants.Variant):
        self.variant = variant.eval()
        self.scale = variant.act_scale.item()
        self.per = {k: [] for k in (*PER_CONTEXT, "x_sum")}
        self.sums = dict.fromkeys(("l1", "l0", "cos"), 0.0)
        self.fire_counts = torch.zeros(variant.cfg.d_sae)
        self.corr_rows: list[torch.Tensor] = []
        self.diag_sums: dict[str, float] = {}
        self.n_batches = 0

    def add(self, acts: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Tally the SAE on one batch's activations at its hook; returns its reconstruction of
        the real tokens (rows, raw units) for the spliced pass."""
        variant, per, scale = self.variant, self.per, self.scale
        x, m = sae_input(variant, acts.cpu(), real.cpu())
        f = variant.encode(x)
        x_hat = variant.decode(f)
        xr, xh, fr = real_rows(x, m) / scale, real_rows(x_hat, m) / scale, real_rows(f, m)  # raw units
        counts = real.sum(1).cpu()
        owner = _owners(counts)
        per["tokens"].append(counts.double())
        per["resid_sq"].append(_by_context((xr - xh).pow(2).sum(-1), owner, len(counts)))
        per["x_sq"].append(_by_context(xr.pow(2).sum(-1), owner, len(counts)))
        per["x_sum"].append(
            torch.zeros(len(counts), xr.shape[-1], dtype=torch.float64).index_add_(0, owner, xr.double())
        )
        self.sums["l1"] += fr.abs().sum().item()
        self.sums["l0"] += (fr > 0).sum().item()
        self.sums["cos"] += F.cosine_similarity(xr, xh, dim=-1).sum().item()
        self.fire_counts += (fr > 0).sum(0).float()
        if sum(len(r) for r in self.corr_rows) < MAX_CORR_ROWS:
            self.corr_rows.append(fr)
        for k, v in variant.diagnostics(x, m).items():
            self.diag_sums[k] = self.diag_sums.get(k, 0.0) + v
        self.n_batches += 1
        return xh

    def add_losses(self, targets: torch.Tensor, losses: dict, sae_tag: str, zero_tag: str | None) -> None:
        self.per["ce_targets"].append(targets)
        self.per["ce_clean"].append(losses["ce_clean"])
        self.per["ce_sae"].append(losses[f"ce_{sae_tag}"])
        self.per["kl_sae"].append(losses[f"kl_{sae_tag}"])
        if zero_tag is not None:
            self.per["ce_zero"].append(losses[f"ce_{zero_tag}"])
            self.per["kl_zero"].append(losses[f"kl_{zero_tag}"])

    def result(self, reference: Baseline | None) -> dict[str, float]:
        per, sums, variant = dict(self.per), self.sums, self.variant
        if reference is not None:
            per["ce_zero"] = [torch.from_numpy(reference.ce_zero)]
            per["kl_zero"] = [torch.from_numpy(reference.kl_zero)]
        per_context = {k: torch.cat(v).double().numpy() for k, v in per.items()}
        pooled = {k: v.sum(0) for k, v in per_context.items()}
        n_tokens, n_targets = pooled["tokens"], pooled["ce_targets"]
        ce_clean, ce_sae, ce_zero = (pooled[k] / n_targets for k in ("ce_clean", "ce_sae", "ce_zero"))
        result = {
            "mse": pooled["resid_sq"] / n_tokens,
            "explained_variance": _explained_variance(pooled),
            "explained_variance_stderr": bootstrap_stderr(per_context, _explained_variance),
            "cossim": sums["cos"] / n_tokens,
            "l0": sums["l0"] / n_tokens,
            "l1": sums["l1"] / n_tokens,
            "dead_fraction": (self.fire_counts == 0).float().mean().item(),  # never fired on this evaluation text
            "dense_fraction": (self.fire_counts / n_tokens > metrics.DENSE_FIRING_RATE).float().mean().item(),
            "ce_loss_clean": ce_clean,
            "ce_loss_sae": ce_sae,
            "ce_loss_zero": ce_zero,
            "ce_loss_recovered": _ce_recovered(pooled),
            "ce_loss_recovered_stderr": bootstrap_stderr(per_context, _ce_recovered),
            "kl_div_sae": pooled["kl_sae"] / n_tokens,
            "kl_div_zero": pooled["kl_zero"] / n_tokens,
            "eval_tokens": float(n_tokens),
            "eval_contexts": float(len(per_context["tokens"])),
        }
        result["mean_abs_corr"] = mean_abs_correlation(torch.cat(self.corr_rows)[:MAX_CORR_ROWS])
        result.update(metrics.decoder_cosine_stats(variant.decoder_directions().detach()))
        result.update({f"diag/{k}": v / self.n_batches for k, v in self.diag_sums.items()})
        return result


@torch.no_grad()
def baseline(
    model, hook: HookPoint, contexts: np.ndarray, special_ids: list[int], batch_contexts: int = 4, precision="float32"
) -> Baseline:
    """The SAE-independent part of the evaluation of these contexts (the zero ablation)."""
    return baselines(model, [hook], contexts, special_ids, batch_contexts, precision)[hook]


@torch.no_grad()
def baselines(
    model,
    hooks: Sequence[HookPoint],
    contexts: np.ndarray,
    special_ids: list[int],
    batch_contexts: int = 4,
    precision: str = "float32",
) -> dict[HookPoint, Baseline]:
    """`baseline` of several hooks, from one clean forward per batch (in `precision`, as
    `evaluate_hooks` runs the model)."""
    device = next(model.parameters()).device
    ce_zero, kl_zero = {h: [] for h in hooks}, {h: [] for h in hooks}
    with forward_precision(resolve_precision(precision, device.type), device.type):
        _zero_ablations(model, hooks, contexts, special_ids, batch_contexts, ce_zero, kl_zero)
    return {h: Baseline(torch.cat(ce_zero[h]).numpy(), torch.cat(kl_zero[h]).numpy()) for h in hooks}


def _zero_ablations(model, hooks, contexts, special_ids, batch_contexts, ce_zero: dict, kl_zero: dict) -> None:
    """`baselines`' batches: each hook's zero-ablated losses appended to `ce_zero` and `kl_zero`."""
    device = next(model.parameters()).device
    for start in range(0, len(contexts), batch_contexts):
        ids = torch.from_numpy(contexts[start : start + batch_contexts].astype(np.int64)).to(device)
        real = valid_mask(ids, special_ids)
        with contextlib.ExitStack() as stack:
            entering = {n: stack.enter_context(block_input(model, n)) for n in dict.fromkeys(h.layer for h in hooks)}
            clean_hidden = final_hidden(model, ids)
        passes = {h: (h, entering[h.layer]["hidden"], torch.zeros_like) for h in hooks}
        losses = _losses(model, ids, real, clean_hidden, {f"zero@{h.name}": p for h, p in passes.items()})
        for h in hooks:
            ce_zero[h].append(losses[f"ce_zero@{h.name}"])
            kl_zero[h].append(losses[f"kl_zero@{h.name}"])


def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (b, T, d_model), before the LM head."""
    return model.model(input_ids=ids, use_cache=False).last_hidden_state


def head_log_probs(model, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities from final hidden states: the LM head, Gemma's final
    soft-capping where the config has one (as the model's own forward applies it), log-softmax."""
    logits = model.lm_head(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.log_softmax(logits, dim=-1)


def _losses(model, ids, real, clean_hidden, passes: dict) -> dict[str, torch.Tensor]:
    """Per context, summed over its real positions: the next-token CE of the clean model and of
    each patched one (`passes`: tag -> (hook, the hidden states entering its block, a function
    replacing the hook's output); the last column predicts nothing and is not scored), and
    KL(clean || patched).

    A patched pass starts at the hook's block from the hidden states the clean pass fed it: the
    blocks before the hook are the same in every pass (for layer 6 of Gemma 3 270M's 18, each
    patched pass skips 6 of its 18 blocks).

    The LM head runs on HEAD_ROWS positions at a time, the clean log-probabilities once per chunk
    for every pass: a (rows, vocab) tensor for all positions of a batch is about 0.5 GB with
    Gemma's 262k-token vocabulary, and allocating and freeing such tensors (each one freshly
    page-faulted) cost more than the matmul. Chunks too small are slow the other way: each reads
    the whole 0.67 GB head matrix, so 16-row chunks ran the LM head several times slower than
    128-row ones (measured: docs/benchmarks.md#evaluation)."""
    hidden = {"clean": clean_hidden[real]}
    for tag, (hook, entering, fn) in passes.items():
        with replace(model, hook, fn), skip_blocks_before(model, hook.layer, entering):
            hidden[tag] = final_hidden(model, ids)[real]
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets = targets[real]  # -100: the last column predicts nothing we can score
    scored = targets != -100
    safe = targets.clamp(min=0).unsqueeze(1)
    out = {f"ce_{tag}": torch.zeros(len(targets), dtype=torch.float64) for tag in hidden}
    out.update({f"kl_{tag}": torch.zeros(len(targets), dtype=torch.float64) for tag in passes})
    for s in range(0, len(targets), HEAD_ROWS):
        rows = slice(s, s + HEAD_ROWS)
        logp_clean = head_log_probs(model, hidden["clean"][rows])
        p_clean = logp_clean.exp()
        for tag in hidden:
            logp = logp_clean if tag == "clean" else head_log_probs(model, hidden[tag][rows])
            out[f"ce_{tag}"][rows] = (-logp.gather(1, safe[rows]).squeeze(1) * scored[rows]).double().cpu()
            if tag != "clean":
                out[f"kl_{tag}"][rows] = (p_clean * (logp_clean - logp)).sum(-1).double().cpu()
    owner = _owners(real.sum(1).cpu())
    return {key: _by_context(value, owner, len(ids)) for key, value in out.items()}


def _owners(counts: torch.Tensor) -> torch.Tensor:
    """The context of each real row, for rows taken context by context."""
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def _by_context(values: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Per-row values summed per context."""
    return torch.zeros(n, dtype=torch.float64).index_add_(0, owner, values.double().cpu())
