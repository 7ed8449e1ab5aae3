"""Core evaluation on held-out contexts, with the model in the loop.

Reconstruction and sparsity on the hooked activations, then three forward passes of the whole
model per batch: clean, with the SAE's reconstruction spliced in at the hook, and with the hook
zero-ablated. CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean): 1 means the SAE
loses nothing the model needs, 0 means it is as bad as deleting the activation. BOS and padding
positions keep their original activations and are not scored.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

import variants
from saeforge.core import metrics
from saeforge.core.batches import real_rows, sae_input
from saeforge.core.corpus import valid_mask
from saeforge.core.hooks import HookPoint, capture, replace
from variants.common import mean_abs_correlation

DENSE_RATE = metrics.DENSE_FIRING_RATE
MAX_CORR_ROWS = 4096  # latent rows kept for the correlation statistics


def _next_token_losses(logits: torch.Tensor, ids: torch.Tensor, target_mask: torch.Tensor):
    """Per-position CE of the next token and the log-probs, at positions whose target is real."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)[target_mask]
    ce = -logp.gather(-1, ids[:, 1:][target_mask].unsqueeze(-1)).squeeze(-1)
    return ce, logp


@torch.no_grad()
def evaluate_core(model, variant: variants.Variant, hook: HookPoint, contexts: np.ndarray,
                  special_ids: list[int], batch_contexts: int = 4, progress=None) -> dict[str, float]:
    """Every core metric of one SAE on held-out contexts ((n, context_size) token ids)."""
    variant.eval()
    device = next(model.parameters()).device
    scale = variant.act_scale.item()
    sums = {k: 0.0 for k in ("mse", "l1", "cos", "ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero", "l0")}
    resid_sq, total_sq, n_tokens, n_targets = 0.0, 0.0, 0, 0
    fire_counts = torch.zeros(variant.cfg.d_sae)
    x_sum = x_sq = None
    corr_rows: list[torch.Tensor] = []
    diag_sums: dict[str, float] = {}
    n_batches = 0
    for start in range(0, len(contexts), batch_contexts):
        ids = torch.from_numpy(contexts[start:start + batch_contexts].astype(np.int64)).to(device)
        mask = valid_mask(ids, special_ids)
        target_mask = mask[:, 1:]
        with capture(model, [hook]) as captured:
            clean_logits = model(input_ids=ids, use_cache=False).logits
        acts = captured[hook.name].float()
        x, m = sae_input(variant, acts.cpu(), mask.cpu())
        f = variant.encode(x)
        x_hat = variant.decode(f)
        xr, xh, fr = real_rows(x, m), real_rows(x_hat, m), real_rows(f, m)
        sums["mse"] += (xr - xh).pow(2).sum().item()
        sums["l1"] += fr.abs().sum().item()
        sums["l0"] += (fr > 0).sum().item()
        sums["cos"] += F.cosine_similarity(xr, xh, dim=-1).sum().item()
        fire_counts += (fr > 0).sum(0).float()
        x_sum = xr.sum(0) if x_sum is None else x_sum + xr.sum(0)
        x_sq = xr.pow(2).sum(0) if x_sq is None else x_sq + xr.pow(2).sum(0)
        resid_sq += (xr - xh).pow(2).sum().item()
        n_tokens += len(xr)
        if sum(len(r) for r in corr_rows) < MAX_CORR_ROWS:
            corr_rows.append(fr)
        for k, v in variant.diagnostics(x, m).items():
            diag_sums[k] = diag_sums.get(k, 0.0) + v
        n_batches += 1

        recon = (xh / scale).to(device=device, dtype=acts.dtype)  # real-token rows, raw units
        real = mask.unsqueeze(-1)

        def spliced(out):
            out = out.clone()
            out[mask] = recon.to(out.dtype)
            return out

        ablated = lambda out: torch.where(real, torch.zeros_like(out), out)  # noqa: E731
        ce_clean, logp_clean = _next_token_losses(clean_logits, ids, target_mask)
        del clean_logits
        p_clean = logp_clean.exp()
        for tag, fn in (("sae", spliced), ("zero", ablated)):
            with replace(model, hook, fn):
                logits = model(input_ids=ids, use_cache=False).logits
            ce, logp = _next_token_losses(logits, ids, target_mask)
            del logits
            sums[f"ce_{tag}"] += ce.sum().item()
            sums[f"kl_{tag}"] += (p_clean * (logp_clean - logp)).sum().item()
        sums["ce_clean"] += ce_clean.sum().item()
        n_targets += len(ce_clean)
        if progress:
            progress(min(start + batch_contexts, len(contexts)), len(contexts))

    total_sq = (x_sq - x_sum.pow(2) / n_tokens).sum().item()
    ce_clean, ce_sae, ce_zero = (sums[k] / n_targets for k in ("ce_clean", "ce_sae", "ce_zero"))
    firing_rate = fire_counts / n_tokens
    result = {
        "mse": sums["mse"] / n_tokens,
        "explained_variance": 1 - resid_sq / max(total_sq, 1e-12),
        "cossim": sums["cos"] / n_tokens,
        "l0": sums["l0"] / n_tokens,
        "l1": sums["l1"] / n_tokens,
        "dead_fraction": (fire_counts == 0).float().mean().item(),
        "dense_fraction": (firing_rate > DENSE_RATE).float().mean().item(),
        "ce_loss_clean": ce_clean,
        "ce_loss_sae": ce_sae,
        "ce_loss_zero": ce_zero,
        "ce_loss_recovered": (ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else math.nan,
        "kl_div_sae": sums["kl_sae"] / n_targets,
        "kl_div_zero": sums["kl_zero"] / n_targets,
        "eval_tokens": float(n_tokens),
    }
    result["mean_abs_corr"] = mean_abs_correlation(torch.cat(corr_rows)[:MAX_CORR_ROWS])
    result.update(metrics.decoder_cosine_stats(variant.decoder_directions().detach()))
    result.update({f"diag/{k}": v / n_batches for k, v in diag_sums.items()})
    return result
