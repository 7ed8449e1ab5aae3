"""The core suite: reconstruction, sparsity, CE loss recovered and KL on held-out contexts.

A thin wrapper around `saeforge.core.evaluation.evaluate_core` (what training runs at its end), read on
contexts packed from the held-out split of the SAE's own text source.
"""

from __future__ import annotations

from saeforge.core.eval_suites import register
from saeforge.core.eval_suites.context import EvalContext, SuiteResult, heldout_contexts
from saeforge.core.evaluation import evaluate_core


@register("core")
def core(ctx: EvalContext, contexts: int = 32, batch_contexts: int = 4) -> SuiteResult:
    """Reconstruction, sparsity, CE loss recovered and KL with the SAE spliced into the model.

    `batch_contexts` is small because whole-model passes hold (batch x tokens x vocabulary) logits.
    """
    ids = heldout_contexts(ctx, contexts)
    metrics = evaluate_core(
        ctx.model,
        ctx.sae,
        ctx.hook,
        ids,
        ctx.special_ids,
        batch_contexts=batch_contexts,
        progress=lambda done, total: ctx.say(f"core: {done}/{total} contexts"),
    )
    return SuiteResult(
        metrics, headline=("ce_loss_recovered", "explained_variance", "l0", "kl_div_sae", "dead_fraction")
    )
