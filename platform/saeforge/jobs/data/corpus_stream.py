"""The training corpus as a Ray Dataset of token contexts, read, tokenised and packed by a Ray Data
read task feeding the producer actors: the driver only ships the small `CorpusRange`, never the
corpus (a cluster run trains on billions of tokens).

Why one read task: packing runs across documents (a context holds the end of one document and
the start of the next), so where context i begins depends on every document before it. One task
that reads the split in order keeps the contexts exactly as `corpus.iter_contexts` packs them
(the same as ever for the same input) with contiguous ids, which exact resume relies on
(`activation_stream.step_batches`). Tokenising is about a hundred times cheaper than the model's
forward pass (docs/benchmarks.md#corpus-reader-speed), so one ordered reader keeps many
producers busy; a pool of GPU
producers that outran it would need the corpus split into shards, each read in order (not done).
A resumed run's reader tokenises and drops the contexts before its first one (no model pass),
and it stops after the run's last.

Ray Data merges the blocks a read task yields until they reach the dataset's
`target_max_block_size` (128 MiB by default: about 260,000 contexts of 128 tokens, minutes of
tokenising on a big corpus before the first context leaves the reader). This dataset sets
`READ_BLOCK_BYTES`, so contexts leave in blocks of about 16,000 (at 128 tokens) while the
reader goes on; a streaming repartition then cuts them into blocks small enough that every
producer gets a share. Activation blocks above 1.5 x that size are cut too, in order.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from saeforge.jobs.arguments import DEFAULT_MAX_FAILURES
from saeforge.jobs.data.activation_stream import (
    BATCH_CONTEXTS,
    ID_COLUMN,
    TOKENS_COLUMN,
    plain_remote_args,
    produce_activations,
)
from saeforge.jobs.plan import CorpusRange, RunPlan

READ_BLOCK_BYTES = 8 * 1024 * 1024  # the dataset's target_max_block_size (see the module docstring)
READ_BLOCK_CONTEXTS = 1024  # contexts per block the reader yields (merged up to READ_BLOCK_BYTES)


class CorpusEndedError(RuntimeError):
    """The source held fewer training contexts than the run planned (a Hub dataset is not counted
    up front; a local one that shrank since validation)."""


def read_contexts(contexts: CorpusRange, block: int = READ_BLOCK_CONTEXTS) -> Iterator:
    """The read task's body (in a Ray worker): Arrow blocks of (context id, tokens), in order,
    ids `contexts.start` up to `contexts.stop`; CorpusEndedError if the source runs out sooner."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    end = contexts.start
    for first, array in contexts.blocks(block):
        end = first + len(array)
        yield pa.table(
            {ID_COLUMN: np.arange(first, end, dtype=np.int64), TOKENS_COLUMN: ArrowTensorArray.from_numpy(array)}
        )
    if end < contexts.stop:
        raise CorpusEndedError(
            f"dataset '{contexts.dataset}' ended after {end} training contexts, but the run planned {contexts.stop} "
            f"(about {end * (contexts.context_size - 1):,} tokens: ask --tokens for no more)"
        )


class CorpusSource(Datasource):
    """A Ray Data datasource of one read task: `read_contexts` over a `CorpusRange`."""

    def __init__(self, contexts: CorpusRange):
        super().__init__()
        self.contexts = contexts

    def estimate_inmemory_data_size(self) -> int:
        return len(self.contexts) * (self.contexts.context_size * 4 + 8)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        metadata = BlockMetadata(
            num_rows=len(self.contexts),
            size_bytes=self.estimate_inmemory_data_size(),
            input_files=None,
            exec_stats=None,
        )
        read = functools.partial(read_contexts, self.contexts)
        return [ReadTask(read, metadata, per_task_row_limit=per_task_row_limit)]

    def get_name(self) -> str:
        return "Corpus"


def block_rows(n_contexts: int, producers: int) -> int:
    """Contexts per block into the producers: at least 4 blocks per producer (each gets a share of
    a small run), at most 8 producer batches a block."""
    return max(1, min(BATCH_CONTEXTS * 8, n_contexts // (4 * producers)))


def read_corpus(contexts: CorpusRange, *, max_failures: int = DEFAULT_MAX_FAILURES):
    """The read alone: a lazy Ray Dataset of the range's contexts (one row per context: its id,
    its tokens), in order, in blocks of about READ_BLOCK_BYTES. The read task is retried at most
    `max_failures` times when its process dies (Ray Data's default is forever), and not at all
    when it raises (CorpusEndedError, a broken file)."""
    import ray

    with plain_remote_args():
        ds = ray.data.read_datasource(
            CorpusSource(contexts), override_num_blocks=1, ray_remote_args={"max_retries": max_failures}
        )
    ds.context.execution_options.preserve_order = True
    ds.context.target_max_block_size = READ_BLOCK_BYTES
    return ds


def corpus_dataset(contexts: CorpusRange, *, producers: int = 1, max_failures: int = DEFAULT_MAX_FAILURES):
    """`read_corpus`, its blocks cut for `producers` (`block_rows`): what the producers read."""
    return read_corpus(contexts, max_failures=max_failures).repartition(
        target_num_rows_per_block=block_rows(len(contexts), producers)
    )


def plan_dataset(plan: RunPlan, contexts: CorpusRange, *, counter=None):
    """The run's activation dataset: its corpus range read by `corpus_dataset`, then the producer
    actors with the plan's stream, producer count and per-producer resources (counting their
    forwards in `counter`, a `forward_counter`, when given)."""
    res = plan.resources
    return produce_activations(
        corpus_dataset(contexts, producers=plan.args.producers, max_failures=plan.args.max_failures),
        plan.stream,
        producers=plan.args.producers,
        threads=res.producer_threads,
        gpus_per_producer=res.gpus_per_producer,
        resources=res.producer_resources,
        counter=counter,
        max_failures=plan.args.max_failures,
    )
