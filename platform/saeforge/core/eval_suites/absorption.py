"""First-letter feature absorption (SAEBench's absorption eval, simplified; no external data).

Feature absorption: a latent that looks like "starts with S" stays silent on some S-words because
a more specific latent (say "short") fires instead and carries the S direction itself. Steps:

1. Words: distinct lowercase alphabetic words of the built-in English corpus that the tokenizer
   spells as a single token after a space (i.e. word tokens of its vocabulary). A byte-level
   tokenizer has no word tokens; then short words are spelled byte by byte and read at their last
   token. Each word is run alone after BOS; the example is the hooked activation at its last token.
   Words are split 80/20 into train/test by a hash of the word.
2. A multinomial logistic probe for the first letter on the model's activations (train words):
   `probe_test_acc` says how linearly the model represents first letters at this hook; its
   per-letter weight vectors (mapped back to activation space) are the letter directions p_L.
3. Main latents of each letter (train words): the latent whose mean activation rises most on
   L-words (vs other words), then more of the next best, while each one raises the F1 of "some
   main latent fires => the word starts with L" by at least `split_f1_gain` (feature splitting),
   at most `max_main_latents`.
4. On test words the probe gets right: a *false negative* is a word on which no main latent of its
   letter fires; it is *absorbed* when another firing latent j carries the letter direction: its
   decoder direction has cosine >= `absorber_cos` with p_L and its contribution f_j <w_j, p_L>
   is >= `absorber_share` of all firing latents' positive contributions to that projection.

`absorption_rate` = absorbed / correctly probed test words (all letters); `mean_absorption_rate`
= its mean over letters; `false_negative_rate` = main latents silent / correctly probed words.
"""

from __future__ import annotations

import re
import zlib

import numpy as np
import torch

from saeforge.core import corpus
from saeforge.core.corpus import valid_mask
from saeforge.core.eval_suites import register
from saeforge.core.eval_suites.context import (
    EvalContext,
    SuiteResult,
    hook_activations,
    pad_id,
    padded_batches,
    sae_latents,
)
from saeforge.errors import UserError

WORD = re.compile(r"[a-z]{2,12}")


def corpus_words(max_chars: int = 12) -> list[str]:
    """Distinct lowercase alphabetic words of the built-in English summaries, most frequent first."""
    counts: dict[str, int] = {}
    for doc in corpus.builtin_documents("en-us"):
        for word in WORD.findall(doc.text):
            if len(word) <= max_chars:
                counts[word] = counts.get(word, 0) + 1
    return sorted(counts, key=lambda w: (-counts[w], w))


def first_letter_words(
    tokenizer, max_words: int, min_single_token: int = 200, byte_word_chars: int = 6
) -> tuple[list[str], list[list[int]]]:
    """(words, token ids of ' word') : single-token words when the vocabulary has at least
    min_single_token of them, else short words (<= byte_word_chars letters) spelled by several tokens."""
    words = corpus_words()
    spelled = [(w, tokenizer.encode(" " + w, add_special_tokens=False)) for w in words]
    single = [(w, ids) for w, ids in spelled if len(ids) == 1]
    if len(single) >= min_single_token:
        chosen = single
    else:
        chosen = [(w, ids) for w, ids in spelled if len(w) <= byte_word_chars]
    chosen = chosen[:max_words]
    return [w for w, _ in chosen], [ids for _, ids in chosen]


def is_test_word(word: str) -> bool:
    return zlib.crc32(word.encode("utf-8")) % 5 == 0


@torch.no_grad()
def word_features(ctx: EvalContext, token_ids: list[list[int]], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw activations (n, d_in), SAE latents (n, d_sae)) at the last token of each word, run after BOS."""
    seqs = [[ctx.tokenizer.bos_token_id, *ids] for ids in token_ids]
    acts_out = np.zeros((len(seqs), ctx.sae.cfg.d_in), np.float32)
    lat_out = np.zeros((len(seqs), ctx.sae.cfg.d_sae), np.float32)
    for idx, ids in padded_batches(seqs, batch, pad_id(ctx.tokenizer)):
        mask = valid_mask(ids, ctx.special_ids)
        acts = hook_activations(ctx.model, ctx.hook, ids)
        _, f = sae_latents(ctx.sae, acts, mask)
        last = torch.tensor([len(seqs[i]) - 1 for i in idx])
        rows = torch.arange(len(idx))
        acts_out[idx] = acts[rows, last].numpy()
        lat_out[idx] = f.cpu()[rows, last].numpy()
    return acts_out, lat_out


def _f1(predicted: np.ndarray, actual: np.ndarray) -> float:
    tp = float((predicted & actual).sum())
    return 2 * tp / max(float(predicted.sum() + actual.sum()), 1e-12)


def main_latents(
    latents: np.ndarray, is_letter: np.ndarray, max_main: int, split_f1_gain: float, candidates: int = 10
) -> tuple[list[int], float]:
    """The letter's main latents (see the module docstring, step 3) and their F1 on these words."""
    diff = latents[is_letter].mean(0) - latents[~is_letter].mean(0)
    ranked = [int(j) for j in np.argsort(-diff, kind="stable")[:candidates] if diff[j] > 0]
    if not ranked:
        return [], 0.0
    chosen = [ranked[0]]
    best = _f1((latents[:, chosen] > 0).any(1), is_letter)
    for j in ranked[1:]:
        if len(chosen) >= max_main:
            break
        f1 = _f1((latents[:, chosen + [j]] > 0).any(1), is_letter)
        if f1 - best >= split_f1_gain:
            chosen, best = chosen + [j], f1
    return chosen, best


def letter_probe(acts_train: np.ndarray, letters_train: np.ndarray, c: float):
    """Multinomial logistic probe on standardised activations; returns (probe, unit letter
    directions in activation space, (n_letters, d_in))."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    with threadpool_limits(1):  # problems this small only lose time to BLAS threads
        probe.fit(acts_train, letters_train)
    scaler, logistic = probe[0], probe[1]
    directions = logistic.coef_ / np.maximum(scaler.scale_, 1e-12)  # logit = coef . (x - mu) / sigma
    directions /= np.linalg.norm(directions, axis=1, keepdims=True).clip(min=1e-12)
    return probe, directions


@register("absorption")
def absorption(
    ctx: EvalContext,
    max_words: int = 3000,
    min_words_per_letter: int = 10,
    max_main_latents: int = 3,
    split_f1_gain: float = 0.03,
    absorber_cos: float = 0.025,
    absorber_share: float = 0.4,
    probe_c: float = 1.0,
    batch_words: int = 64,
) -> SuiteResult:
    """First-letter absorption: how often first-letter latents stay silent and another latent absorbs them.

    max_words: words read; min_words_per_letter: train words a letter needs to be scored;
    max_main_latents / split_f1_gain: main latents per letter; absorber_cos / absorber_share: what
    counts as absorbing the letter direction; probe_c: inverse L2 strength of the letter probe.
    """
    words, token_ids = first_letter_words(ctx.tokenizer, max_words)
    acts, latents = word_features(ctx, token_ids, batch_words)
    first = np.array([w[0] for w in words])
    test = np.array([is_test_word(w) for w in words])
    letters = sorted(c for c in set(first) if (first[~test] == c).sum() >= min_words_per_letter)
    use = np.isin(first, letters)
    train_idx, test_idx = np.where(use & ~test)[0], np.where(use & test)[0]
    if len(letters) < 2 or len(test_idx) == 0:
        raise UserError(f"absorption: too few words ({len(words)}) with a known first letter in the vocabulary")
    ctx.say(f"absorption: {len(train_idx)} train / {len(test_idx)} test words, {len(letters)} letters")
    probe, directions = letter_probe(acts[train_idx], first[train_idx], probe_c)
    predicted = probe.predict(acts[test_idx])
    class_row = {c: i for i, c in enumerate(probe[1].classes_)}

    decoder = ctx.sae.decoder_directions().detach().float().cpu().numpy()  # (d_sae, d_in)
    unit_decoder = decoder / np.linalg.norm(decoder, axis=1, keepdims=True).clip(min=1e-12)
    table, totals = [], {"correct": 0, "false_negative": 0, "absorbed": 0}
    for letter in letters:
        mains, f1 = main_latents(latents[train_idx], first[train_idx] == letter, max_main_latents, split_f1_gain)
        p = directions[class_row[letter]]
        cos = unit_decoder @ p  # (d_sae,)
        along = decoder @ p  # <w_j, p_L>
        words_l = [i for k, i in enumerate(test_idx) if first[i] == letter and predicted[k] == letter]
        false_neg = absorbed = 0
        for i in words_l:
            f = latents[i]
            if mains and (f[mains] > 0).any():
                continue
            false_neg += 1
            contribution = f * along
            total = contribution[contribution > 0].sum()
            others = np.ones_like(f, dtype=bool)
            others[mains] = False
            carries = (cos >= absorber_cos) & (contribution >= absorber_share * total) & (total > 0)
            absorbers = others & (f > 0) & carries
            absorbed += bool(absorbers.any())
        n = len(words_l)
        totals["correct"] += n
        totals["false_negative"] += false_neg
        totals["absorbed"] += absorbed
        table.append(
            {
                "letter": letter,
                "main_latents": mains,
                "main_f1": f1,
                "test_words_correct": n,
                "false_negative_rate": false_neg / n if n else float("nan"),
                "absorption_rate": absorbed / n if n else float("nan"),
            }
        )
    rates = [r["absorption_rate"] for r in table if r["test_words_correct"]]
    correct = max(totals["correct"], 1)
    metrics = {
        "probe_test_acc": float((predicted == first[test_idx]).mean()),
        "absorption_rate": totals["absorbed"] / correct,
        "mean_absorption_rate": float(np.mean(rates)) if rates else 0.0,
        "false_negative_rate": totals["false_negative"] / correct,
        "main_latents_per_letter": float(np.mean([len(r["main_latents"]) for r in table])),
        "main_f1_mean": float(np.mean([r["main_f1"] for r in table])),
        "letters": float(len(letters)),
        "train_words": float(len(train_idx)),
        "test_words": float(len(test_idx)),
        "single_token_words": float(all(len(t) == 1 for t in token_ids)),
    }
    metrics.update(
        {f"letter/{r['letter']}/absorption_rate": r["absorption_rate"] for r in table if r["test_words_correct"]}
    )
    return SuiteResult(
        metrics,
        headline=("absorption_rate", "mean_absorption_rate", "false_negative_rate", "probe_test_acc"),
        tables={"absorption by letter": table},
    )
