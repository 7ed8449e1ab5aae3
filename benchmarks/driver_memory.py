"""The driver's peak memory on the default corpus and on one ten times larger.

The driver of a run must not hold the corpus: one Ray Data read task packs it and streams it to the
producers (measured: docs/benchmarks.md#corpus-memory).

One process per measurement (so its peak resident set is its own):
  python benchmarks/driver_memory.py --scale 1            # the default run's plan + corpus stage
  python benchmarks/driver_memory.py --scale 10           # the same on ten times the text and tokens
  python benchmarks/driver_memory.py --scale 10 --old     # packing those contexts in the driver, as before

`--scale 1` is the default run's corpus (the built-in Wikipedia summaries, --tokens 300000, the
packaged Gemma 3 270M's tokenizer); `--scale 10` writes the training texts ten times into a local
JSON-lines file and asks for ten times the tokens. The stream is read by a Ray task, as the
producers read it in a run (the model itself does not run: its memory is the producers', not the
driver's). Prints one JSON line: contexts; the driver's tracemalloc peak over the corpus stage,
the tokenizer loaded (plan_train's count and the stream, or with --old the packing as
plan_train did it before); the peak over plan_train itself (loading the tokenizer is most of it,
whatever the corpus); and the process's peak resident set (ru_maxrss: imports, tokenizer, Ray).
"""

import argparse
import json
import resource
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path


def corpus_file(scale: int, folder: Path) -> str:
    from saeforge.core import corpus

    if scale == 1:
        return corpus.BUILTIN
    path = folder / "wiki-x10.jsonl"
    texts = list(corpus.split_texts(corpus.BUILTIN, "train")) + list(corpus.split_texts(corpus.BUILTIN, "eval"))
    with path.open("w") as out:
        for _ in range(scale):
            for text in texts:
                out.write(json.dumps({"text": text}) + "\n")
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--old", action="store_true", help="pack the contexts in the driver, as before")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="driver-memory-"))
    try:
        measure(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure(args, folder: Path) -> None:

    from saeforge.core import corpus
    from saeforge.core.model import load_tokenizer
    from saeforge.jobs.arguments import TrainArgs
    from saeforge.jobs.validate import Source, count_contexts, plan_train

    dataset = corpus_file(args.scale, folder)
    train_args = TrainArgs(dataset=dataset, tokens=300_000 * args.scale, storage=str(folder / "runs"))
    started = time.time()
    next(corpus.split_texts(dataset, "train"))  # imports and caches, outside the measurement
    if not args.old:
        import ray

        from saeforge.jobs.data.corpus_stream import corpus_dataset
        from saeforge.jobs.runtime.ray_cluster import connect_ray

        connect_ray("")

        @ray.remote(num_cpus=1)
        def consume(ds) -> int:
            return sum(len(b["context_id"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))

    tracemalloc.start()
    plan, contexts = plan_train(train_args, progress=lambda *_: None)
    plan_peak = tracemalloc.get_traced_memory()[1]  # the tokenizer's load is most of it, whatever the corpus
    tracemalloc.stop()
    tokenizer = load_tokenizer(plan.stream.model)
    per_step = plan.stream.contexts_per_step
    tracemalloc.start()  # the corpus stage alone, the tokenizer loaded
    if args.old:  # what plan_train did before: the contexts packed and kept in the driver
        packed = corpus.pack_contexts(corpus.split_texts(dataset, "train"), tokenizer, 128, len(contexts.train))
        n = len(packed)
    else:  # plan_train's count, then the stream read by a Ray task
        source = Source(plan.stream.model, None, tokenizer, plan.stream.special_ids)
        count_contexts(train_args, source, len(contexts.train), per_step)
        n = ray.get(consume.remote(corpus_dataset(contexts.train)))
        assert n == len(contexts.train)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(
        json.dumps(
            {
                "scale": args.scale,
                "path": "old: packed in the driver" if args.old else "read task",
                "contexts": n,
                "corpus_stage_peak_mb": round(peak / 2**20, 1),
                "plan_train_peak_mb": round(plan_peak / 2**20, 1),
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "seconds": round(time.time() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
