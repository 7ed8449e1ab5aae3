"""The corpus is read, tokenised and packed by a Ray Data read task, on the
session's real local Ray: the same contexts as packing in one process, contiguous ids from a
resumed run's first context, blocks that leave the reader while it reads, one clear line when a
source ends early, and a driver whose memory does not grow with the corpus."""

import random
import tracemalloc

import numpy as np
import pytest

from conftest import tiny_args

WORDS = ["the", "of", "and", "a", "to", "in", "is", "was", "for", "on", "as", "by", "with", "he", "that", "at"]


def write_corpus(path, documents: int, seed: int = 0):
    """A local text corpus: `documents` lines of 100 words (about 340 bytes: tokens, with the tiny
    model's byte tokenizer)."""
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(100)) + "\n" for _ in range(documents)))
    return str(path)


def tiny_range(start: int, stop: int, dataset: str = "wiki", counted: bool = True, context_size: int = 32):
    from saeforge.core.model import resolve_model
    from saeforge.jobs.plan import CorpusRange

    return CorpusRange(dataset, "text", resolve_model("tiny"), context_size, start, stop, counted)


def rows(dataset) -> tuple[np.ndarray, np.ndarray]:
    batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    return np.concatenate([b["context_id"] for b in batches]), np.concatenate([b["input_ids"] for b in batches])


def test_the_stream_holds_the_contexts_packing_makes_from_the_resumed_one_on(ray_session):
    """The read task packs as `pack_contexts` does in one process (the same contexts as before the
    corpus moved out of the driver), ids contiguous from the range's start, cut into blocks that
    give each producer a share; the contexts before the start are skipped."""
    from saeforge.core import corpus
    from saeforge.core.model import ByteTokenizer
    from saeforge.jobs.data.corpus_stream import corpus_dataset

    whole = corpus.pack_contexts(corpus.split_texts("wiki", "train"), ByteTokenizer(), 32, 700)
    ids, tokens = rows(corpus_dataset(tiny_range(0, 700), producers=2))
    assert ids.tolist() == list(range(700)) and np.array_equal(tokens, whole)
    ids, tokens = rows(corpus_dataset(tiny_range(412, 700), producers=2))  # a run resumed at context 412
    assert ids.tolist() == list(range(412, 700)) and np.array_equal(tokens, whole[412:])
    blocks = list(corpus_dataset(tiny_range(0, 700), producers=2).iter_batches(batch_size=None))
    assert len(blocks) >= 8  # at least 4 per producer


def test_blocks_leave_the_reader_while_it_reads(ray_session):
    """Ray Data merges a read task's blocks up to the dataset's target block size before they
    leave it (128 MiB by default: one block for this whole range, made only once the reader has
    tokenised all of it); the corpus dataset's is READ_BLOCK_BYTES, so more than one block comes
    out of the one read task, in order."""
    from saeforge.jobs.data.corpus_stream import READ_BLOCK_BYTES, read_corpus

    n = 3 * READ_BLOCK_BYTES // 2 // (256 * 4)  # one and a half target blocks of 256-token contexts
    batches = list(read_corpus(tiny_range(0, n, context_size=256)).iter_batches(batch_size=None, batch_format="numpy"))
    assert len(batches) >= 2
    assert np.concatenate([b["context_id"] for b in batches]).tolist() == list(range(n))


def test_a_source_that_ends_before_the_planned_contexts_fails_in_one_line(ray_session, tmp_path):
    """A Hub dataset is not counted up front (validation reads one step's worth): if it ends before
    the contexts the run planned, the read task stops the run with one line saying how many it
    held, at once (an error raised by the read task is not retried)."""
    from saeforge.core import corpus
    from saeforge.core.model import ByteTokenizer
    from saeforge.jobs.data.corpus_stream import corpus_dataset
    from saeforge.jobs.runtime.failures import describe

    path = write_corpus(tmp_path / "short.txt", 60)
    held = len(corpus.pack_contexts(corpus.split_texts(path, "train"), ByteTokenizer(), 32, 10**6))
    with pytest.raises(Exception) as failure:
        rows(corpus_dataset(tiny_range(0, held + 50, path, counted=False), max_failures=2))
    line = describe(failure.value)
    print(line)
    assert f"ended after {held} training contexts, but the run planned {held + 50}" in line


def test_a_hub_dataset_is_checked_one_step_deep_not_counted(tmp_path, monkeypatch):
    """Validation reads a streamed (Hub) source only as far as one step: the run is planned from
    --tokens, with no warning, and its range marked uncounted (the read task then checks it)."""
    from saeforge.core import corpus
    from saeforge.jobs.validate import plan_train

    path = write_corpus(tmp_path / "hub-like.txt", 60)
    read = []
    real_texts = corpus.split_texts

    def counted_texts(*args):
        for text in real_texts(*args):
            read.append(text)
            yield text

    monkeypatch.setattr(corpus, "split_texts", counted_texts)
    said = []
    local_plan, _ = plan_train(tiny_args(tmp_path, dataset=path, tokens=10**6), said.append)
    assert any("instead of" in line for line in said)  # a local source is counted: shortened, warned
    monkeypatch.setattr(corpus, "is_local", lambda dataset: False)  # as a Hub id is
    read.clear()
    said.clear()
    plan, contexts = plan_train(tiny_args(tmp_path, dataset=path, tokens=10**6), said.append)
    assert not said and not contexts.train.counted
    assert plan.loop.total_steps > local_plan.loop.total_steps  # planned from --tokens
    assert len(contexts.train) == plan.loop.total_steps * plan.stream.contexts_per_step
    training_read = [t for t in read if not corpus.is_eval_document(t)]
    assert len(training_read) < 10  # one step's worth (4 contexts of 128 bytes), not the 54 documents


def test_the_driver_never_holds_the_corpus(ray_session, tmp_path):
    """The driver's peak memory (Python allocations, tracemalloc) while it plans a run over a whole
    local corpus and the run's corpus stage streams every context to a consumer in another
    process: the same for a corpus of N documents and of 10 N, where packing the contexts in
    the driver as before (`pack_contexts`) takes ten times more.

    Not a whole training run: training on 10 million tokens takes minutes, and the driver's part
    of a run is exactly this, the plan and the dataset it hands to Ray Train (the other run tests
    go through the same read task)."""
    import ray

    from saeforge.core import corpus
    from saeforge.core.model import ByteTokenizer
    from saeforge.jobs.data.corpus_stream import corpus_dataset
    from saeforge.jobs.validate import plan_train

    @ray.remote(num_cpus=1)
    def consume(dataset) -> tuple[int, bool]:
        """What the producers do with the stream, without the model: read every context in order."""
        n, in_order = 0, True
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            in_order &= batch["context_id"].tolist() == list(range(n, n + len(batch["context_id"])))
            n += len(batch["context_id"])
        return n, in_order

    def driver_peak(path: str) -> tuple[int, int]:
        tracemalloc.start()
        try:
            plan, contexts = plan_train(tiny_args(tmp_path, dataset=path, tokens=10**9), progress=lambda *_: None)
            assert ray.get(consume.remote(corpus_dataset(contexts.train, producers=2))) == (len(contexts.train), True)
            return tracemalloc.get_traced_memory()[1], len(contexts.train)
        finally:
            tracemalloc.stop()

    def old_path_peak(path: str) -> int:
        tracemalloc.start()
        try:
            corpus.pack_contexts(corpus.split_texts(path, "train"), ByteTokenizer(), 128, 10**9)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = write_corpus(tmp_path / "n.txt", 1000), write_corpus(tmp_path / "10n.txt", 10_000, seed=1)
    driver_peak(small)  # the first plan imports and caches what every later one reuses
    (peak_n, contexts_n), (peak_10n, contexts_10n) = driver_peak(small), driver_peak(large)
    old_n, old_10n = old_path_peak(small), old_path_peak(large)
    print(
        f"driver peak: {peak_n / 1e6:.1f} MB for {contexts_n} contexts, {peak_10n / 1e6:.1f} MB for {contexts_10n}; "
        f"packing them in the driver: {old_n / 1e6:.1f} MB, {old_10n / 1e6:.1f} MB"
    )
    assert contexts_10n > 9 * contexts_n
    assert peak_10n < 1.2 * peak_n + 1e6  # flat: what grows is counted, not kept
    assert old_10n > 5 * old_n and old_10n > 5 * peak_10n  # the old path grew with the corpus
