"""Corpora: the built-in Wikipedia summaries, local files, the held-out split and packing."""

import json

import numpy as np
import pytest

from saeforge.core import corpus
from saeforge.core.model import ByteTokenizer


def test_builtin_corpus_has_labelled_english_articles():
    docs = corpus.builtin_documents()
    assert len(docs) > 9000
    assert len({d.topic for d in docs}) >= 10
    assert sum(d.topic == "Biology and health sciences" for d in docs) > 500


def test_held_out_split_is_fixed_and_disjoint():
    train = list(corpus.split_texts(corpus.BUILTIN, "train"))
    evals = list(corpus.split_texts(corpus.BUILTIN, "eval"))
    assert not set(train) & set(evals)
    assert 0.05 < len(evals) / (len(train) + len(evals)) < 0.15
    assert evals[:5] == list(corpus.split_texts(corpus.BUILTIN, "eval"))[:5]


def test_packing_starts_contexts_with_bos_and_masks_specials():
    tok = ByteTokenizer()
    contexts = corpus.pack_contexts(["hello world", "a second text that is longer"], tok, 16, 10)
    assert contexts.shape[1] == 16 and (contexts[:, 0] == tok.bos_token_id).all()
    mask = corpus.valid_mask(contexts, corpus.special_ids(tok))
    real = sum(len(t.encode()) for t in ["hello world", "a second text that is longer"])
    assert mask.sum() == real  # every real byte exactly once; BOS and padding are masked
    assert corpus.pack_contexts(["abcdefgh" * 10], tok, 8, 3).shape == (3, 8)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_local_files_through_datasets(tmp_path, fmt):
    texts = [f"document number {i} " * 3 for i in range(40)]
    path = tmp_path / f"data.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(texts))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), path)
    train = list(corpus.split_texts(str(path), "train"))
    evals = list(corpus.split_texts(str(path), "eval"))
    assert sorted(train + evals) == sorted(t for t in texts)
    assert all(corpus.is_eval_document(t) for t in evals)


def test_valid_mask_works_on_numpy_and_torch():
    import torch

    ids = np.array([[2, 5, 6, 0, 0]])
    assert corpus.valid_mask(ids, [0, 2]).tolist() == [[False, True, True, False, False]]
    assert corpus.valid_mask(torch.from_numpy(ids), [0, 2]).tolist() == [[False, True, True, False, False]]


def naive_pack(texts, tokenizer, context_size, max_contexts):
    """Packing as saeforge did it before the corpus moved into a Ray Data read task (one list of
    lists, built whole): the reference the streaming packer must match context for context."""
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    body, contexts, stream = context_size - 1, [], []
    for text in texts:
        stream.append(bos)
        stream.extend(tokenizer.encode(text, add_special_tokens=False))
        while len(stream) >= body and len(contexts) < max_contexts:
            contexts.append([bos, *stream[:body]])
            del stream[:body]
        if len(contexts) >= max_contexts:
            break
    if len(contexts) < max_contexts and any(t != bos for t in stream):
        contexts.append([bos, *stream, *[pad] * (body - len(stream))])
    return np.asarray(contexts, dtype=np.int32).reshape(-1, context_size)


@pytest.mark.parametrize(("context_size", "max_contexts"), [(128, 2400), (32, 500), (7, 10**9)])
def test_streamed_packing_makes_the_same_contexts_as_before(context_size, max_contexts):
    """The same contexts as before for the same input (so the default run trains the same SAE),
    and `context_blocks` cuts any range of them, with their ids."""
    tok = ByteTokenizer()
    texts = list(corpus.split_texts(corpus.BUILTIN, "train"))[: 300 if max_contexts > 10**6 else None]
    before = naive_pack(texts, tok, context_size, max_contexts)
    assert np.array_equal(corpus.pack_contexts(texts, tok, context_size, max_contexts), before)
    stop = min(max_contexts, len(before)) - 3
    blocks = list(corpus.context_blocks(texts, tok, context_size, 5, stop, 100))
    assert [first for first, _ in blocks] == list(range(5, stop, 100))
    assert np.array_equal(np.concatenate([b for _, b in blocks]), before[5:stop])
