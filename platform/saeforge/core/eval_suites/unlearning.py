"""Domain unlearning by latent clamping (SAEBench's procedure, adapted to a base model).

Forget set: articles of one topic (default "Biology and health sciences", the analogue of
WMDP-bio); retain set: the articles of every other topic. Latents are chosen on the *train*
documents: those that fire on at most `retain_threshold` of retain tokens and more often on forget
than on retain tokens, ranked by how often they fire on forget tokens. For each setting
(n latents, m) of the grid, the chosen latents are clamped to -m wherever they fire, and the whole
model runs with the edit spliced in at the hook; next-token accuracy and CE loss are measured on
*held-out* forget and retain documents.

The edit keeps the SAE's error term: the hook's output becomes x + decode(f') - decode(f), i.e.
decode(f') + (x - decode(f)), so with nothing clamped the model is exactly the original model and
every change comes from the clamped latents alone. BOS/padding positions are never edited.

score = max(0, 1 - forget_acc_after / forget_acc_before) at the best setting whose retain accuracy
stays >= `retain_keep` (0.99) of its original value; 0 when no setting qualifies.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from saeforge.core import corpus
from saeforge.core.batches import scaled_positions
from saeforge.core.eval_suites import register
from saeforge.core.eval_suites.context import EvalContext, SuiteResult, context_batches, firing_frequency, pack_texts
from saeforge.core.hooks import replace
from saeforge.errors import UserError

DEFAULT_FORGET_TOPIC = "Biology and health sciences"
NON_TOPICS = ("", "Uncategorized")


def topic_texts(topic: str, language: str = "en-us") -> dict[str, list[str]]:
    """Built-in texts split four ways: forget/retain x train/test (test = held-out documents)."""
    docs = corpus.builtin_documents(language)
    if topic not in {d.topic for d in docs}:
        known = sorted({d.topic for d in docs} - set(NON_TOPICS))
        raise UserError(f"unknown unlearning topic '{topic}' (topics: {', '.join(known)})")
    out: dict[str, list[str]] = {"forget_train": [], "forget_test": [], "retain_train": [], "retain_test": []}
    for d in docs:
        if d.topic in NON_TOPICS:
            continue
        side = "forget" if d.topic == topic else "retain"
        out[f"{side}_{'test' if corpus.is_eval_document(d.text) else 'train'}"].append(d.text)
    return out


def select_latents(
    forget_freq: torch.Tensor, retain_freq: torch.Tensor, n: int, retain_threshold: float
) -> torch.Tensor:
    """Up to n latents that fire on at most retain_threshold of retain tokens and more often on
    forget than on retain tokens, most frequent on the forget set first."""
    eligible = (retain_freq <= retain_threshold) & (forget_freq > retain_freq)
    score = torch.where(eligible, forget_freq, torch.full_like(forget_freq, -1.0))
    order = torch.argsort(score, descending=True, stable=True)
    return order[: min(n, int(eligible.sum()))]


def clamp_edit(sae, latents: torch.Tensor, value: float, mask: torch.Tensor):
    """The hook replacement: clamp `latents` to -value where they fire, keep the SAE error term."""
    scale = sae.act_scale

    def edit(out: torch.Tensor) -> torch.Tensor:
        x = scaled_positions(sae, out, mask)
        m = mask.to(x.device)
        f = sae.encode(x)
        chosen = f[..., latents]
        clamped = f.clone()
        clamped[..., latents] = torch.where(chosen > 0, torch.full_like(chosen, -value), chosen)
        delta = (sae.decode(clamped) - sae.decode(f)) / scale * m.unsqueeze(-1)
        return out + delta.to(device=out.device, dtype=out.dtype)

    return edit


@torch.no_grad()
def next_token_scores(
    ctx: EvalContext,
    contexts: np.ndarray,
    latents: torch.Tensor | None = None,
    value: float = 0.0,
    batch_contexts: int = 4,
) -> dict[str, float]:
    """Next-token accuracy and mean CE over real targets, optionally with latents clamped."""
    correct, loss, targets = 0.0, 0.0, 0
    for ids, mask in context_batches(ctx, contexts, batch_contexts):
        ids = ids.to(ctx.device)
        if latents is None or len(latents) == 0:
            logits = ctx.model(input_ids=ids, use_cache=False).logits
        else:
            with replace(ctx.model, ctx.hook, clamp_edit(ctx.sae, latents, value, mask)):
                logits = ctx.model(input_ids=ids, use_cache=False).logits
        target_mask = mask[:, 1:].to(ctx.device)
        pred = logits[:, :-1][target_mask].float()
        del logits
        gold = ids[:, 1:][target_mask]
        correct += (pred.argmax(-1) == gold).sum().item()
        loss += F.cross_entropy(pred, gold, reduction="sum").item()
        targets += len(gold)
    return {"acc": correct / max(targets, 1), "ce": loss / max(targets, 1)}


def unlearning_score(
    grid: list[dict], forget_before: float, retain_before: float, retain_keep: float
) -> tuple[float, dict | None]:
    """(score, best setting): 1 - forget_acc / forget_before at the qualifying setting that lowers
    forget accuracy most; 0 and None when no setting keeps retain accuracy >= retain_keep x before."""
    qualifying = [g for g in grid if g["retain_acc"] >= retain_keep * retain_before]
    if not qualifying or forget_before <= 0:
        return 0.0, None
    best = min(qualifying, key=lambda g: g["forget_acc"])
    return max(0.0, 1.0 - best["forget_acc"] / forget_before), best


def unlearn_texts(
    ctx: EvalContext,
    texts: dict[str, list[str]],
    *,
    n_latents: tuple[int, ...],
    multipliers: tuple[float, ...],
    retain_threshold: float,
    retain_keep: float,
    train_contexts: int,
    eval_contexts: int,
    batch_contexts: int,
) -> SuiteResult:
    """The procedure on given forget/retain x train/test texts (see the module docstring)."""
    packed = {
        name: pack_texts(ctx, items, train_contexts if name.endswith("train") else eval_contexts)
        for name, items in texts.items()
    }
    for name, ids in packed.items():
        if len(ids) == 0:
            raise UserError(f"unlearning: no {name.replace('_', ' ')} text")
    ctx.say("unlearning: latent firing frequencies on the train split")
    forget_freq = firing_frequency(ctx, packed["forget_train"])
    retain_freq = firing_frequency(ctx, packed["retain_train"])
    ctx.say("unlearning: baseline next-token scores")
    before = {
        side: next_token_scores(ctx, packed[f"{side}_test"], batch_contexts=batch_contexts)
        for side in ("forget", "retain")
    }
    grid = []
    measured: dict[tuple, dict] = {}  # fewer eligible latents than n: settings repeat, measure once
    for n, m in itertools.product(n_latents, multipliers):
        chosen = select_latents(forget_freq, retain_freq, n, retain_threshold)
        key = (tuple(chosen.tolist()), m)
        if key not in measured:
            measured[key] = (
                before
                if not len(chosen)
                else {
                    side: next_token_scores(ctx, packed[f"{side}_test"], chosen, m, batch_contexts)
                    for side in ("forget", "retain")
                }
            )
        after = measured[key]
        grid.append(
            {
                "n_latents": n,
                "multiplier": m,
                "latents_used": int(len(chosen)),
                "forget_acc": after["forget"]["acc"],
                "retain_acc": after["retain"]["acc"],
                "forget_ce": after["forget"]["ce"],
                "retain_ce": after["retain"]["ce"],
                "forget_acc_ratio": after["forget"]["acc"] / max(before["forget"]["acc"], 1e-12),
                "retain_acc_ratio": after["retain"]["acc"] / max(before["retain"]["acc"], 1e-12),
            }
        )
        ctx.say(
            f"unlearning: n={n} m={m:g}: forget acc {grid[-1]['forget_acc']:.4f}, "
            f"retain acc {grid[-1]['retain_acc']:.4f}"
        )
    score, best = unlearning_score(grid, before["forget"]["acc"], before["retain"]["acc"], retain_keep)
    metrics = {
        "score": score,
        "forget_acc_before": before["forget"]["acc"],
        "retain_acc_before": before["retain"]["acc"],
        "forget_ce_before": before["forget"]["ce"],
        "retain_ce_before": before["retain"]["ce"],
        "settings_qualifying": float(sum(g["retain_acc"] >= retain_keep * before["retain"]["acc"] for g in grid)),
        "candidate_latents": float(len(select_latents(forget_freq, retain_freq, len(forget_freq), retain_threshold))),
    }
    if best is not None:
        metrics.update({f"best/{k}": float(v) for k, v in best.items()})
    for g in grid:
        tag = f"grid/n{g['n_latents']}_m{g['multiplier']:g}"
        metrics.update({f"{tag}/{k}": float(g[k]) for k in ("forget_acc", "retain_acc", "forget_ce", "retain_ce")})
    return SuiteResult(
        metrics,
        headline=("score", "forget_acc_before", "retain_acc_before", "settings_qualifying"),
        tables={"unlearning grid": grid},
    )


@register("unlearning")
def unlearning(
    ctx: EvalContext,
    forget_topic: str = DEFAULT_FORGET_TOPIC,
    n_latents: tuple[int, ...] = (5, 10, 20),
    multipliers: tuple[float, ...] = (10.0, 25.0, 50.0),
    retain_threshold: float = 0.01,
    retain_keep: float = 0.99,
    train_contexts: int = 32,
    eval_contexts: int = 16,
    batch_contexts: int = 4,
) -> SuiteResult:
    """Domain unlearning: clamp forget-topic latents to -m, score the forget-accuracy drop.

    forget_topic: built-in English topic to forget; n_latents x multipliers: the grid (m in the
    SAE's normalised latent units); retain_threshold: highest retain firing rate of a chosen latent;
    retain_keep: retain accuracy a setting must keep (fraction of the original) to count;
    train_contexts / eval_contexts: contexts per set for latent choice / measurement.
    """
    return unlearn_texts(
        ctx,
        topic_texts(forget_topic),
        n_latents=n_latents,
        multipliers=multipliers,
        retain_threshold=retain_threshold,
        retain_keep=retain_keep,
        train_contexts=train_contexts,
        eval_contexts=eval_contexts,
        batch_contexts=batch_contexts,
    )
