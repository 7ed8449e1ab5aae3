"""One model pass for a whole search: the activations are produced once (materialised in the
object store) or read from an activation cache on disk, and every trial reads them.

The cache is a folder: the stream's rows as parquet under `contexts/` and `manifest.json`,
written last, which marks it complete and names what it holds (model, hooks, precision, context
size, dataset and text column, contexts); a search asking for anything else is refused with one
line (a search of some of its hooks reads it).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from saeforge.errors import UserError
from saeforge.jobs.data.activation_stream import MASK_COLUMN, forward_counter, materialize
from saeforge.jobs.plan import Contexts, RunPlan

CACHE_MANIFEST = "manifest.json"
CACHE_ROWS = "contexts"


@dataclass
class SharedActivations:
    """The materialised activations every trial reads, and what making them cost."""

    dataset: Any  # a materialised Ray Dataset, one row per context (see activation_stream)
    tokens: int  # real tokens
    contexts: int
    source: str  # "model" or "cache:PATH"
    producer_batches: int  # model forwards in this search (0 when read from a cache)
    contexts_forwarded: int
    seconds: float

    def log_dict(self) -> dict[str, float]:
        return {f"activations/{k}": v for k, v in asdict(self).items() if isinstance(v, (int, float))}

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "dataset"}


def cache_identity(plan: RunPlan) -> dict:
    """What a cache must match to serve a plan: the same model, hooks and producer precision, the
    same contexts of the same text (a cache of fewer or more contexts is another one)."""
    args = plan.args
    return {
        "model": args.model,
        "hooks": [h.name for h in plan.stream.hooks],
        "precision": plan.stream.precision,
        "context_size": args.context_size,
        "dataset": args.dataset,
        "text_column": args.text_column,
        "contexts": plan.loop.total_steps * plan.stream.contexts_per_step,
    }


def check_cache(path: str, plan: RunPlan) -> dict | None:
    """The manifest of a usable activation cache at `path`, None when there is none yet;
    UserError when it holds something else (or not every hook the search needs)."""
    folder = Path(path).expanduser()
    manifest = folder / CACHE_MANIFEST
    if not manifest.is_file():
        if folder.exists() and any(folder.iterdir()):
            raise UserError(
                f"--activations {path}: the folder exists but holds no complete activation cache "
                f"(no {CACHE_MANIFEST}); delete it or choose another path"
            )
        return None
    try:
        info = json.loads(manifest.read_text())
    except (OSError, ValueError):
        raise UserError(f"--activations {path}: {CACHE_MANIFEST} is not readable JSON") from None
    for key, value in cache_identity(plan).items():
        held = info.get(key) if key != "hooks" else info.get("hooks") or [info.get("hook")]  # older caches: one hook
        if (key == "hooks" and not set(value) <= set(held)) or (key != "hooks" and held != value):
            raise UserError(
                f"--activations {path}: the cache holds {key} {held!r}, this search needs "
                f"{value!r}; choose another path"
            )
    return info


def _count_tokens(dataset) -> int:
    return int(sum(int(b[MASK_COLUMN].sum()) for b in dataset.iter_batches(batch_size=256, batch_format="numpy")))


def shared_activations(plan: RunPlan, contexts: Contexts, cache: str = "", progress=print) -> SharedActivations:
    """Produce the activations once (producers -> materialize() in the object store), or read the
    activation cache; with a cache path and no cache there yet, write one."""
    import ray
    import ray.data

    from saeforge.jobs.data.corpus_stream import plan_dataset

    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.time()
    cached = check_cache(cache, plan) if cache else None
    batches = forwarded = 0
    if cached is not None:
        progress(
            f"saeforge: reading the activation cache {cache} ({cached['tokens']:,} tokens); the model does not run"
        )
        produced = ray.data.read_parquet(str(Path(cache).expanduser().resolve() / CACHE_ROWS)).materialize()
        n_contexts, tokens, source = int(cached["contexts"]), int(cached["tokens"]), f"cache:{cache}"
    else:
        progress(
            f"saeforge: one model pass over {len(contexts.train)} contexts for every trial "
            f"({plan.args.producers} producer(s))..."
        )
        counter = forward_counter()
        dataset = plan_dataset(plan, contexts.train, counter=counter)
        produced, batches, forwarded = materialize(dataset, counter, len(contexts.train), progress)
        n_contexts, tokens, source = len(contexts.train), _count_tokens(produced), "model"
        if cache:
            folder = Path(cache).expanduser().resolve()
            produced.write_parquet(str(folder / CACHE_ROWS))
            info = {**cache_identity(plan), "tokens": tokens, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
            (folder / CACHE_MANIFEST).write_text(json.dumps(info, indent=2))  # last: marks the cache complete
            progress(f"saeforge: activation cache written to {folder}")
    seconds = time.time() - started
    progress(
        f"saeforge: {tokens:,} activation tokens ready in {seconds:.0f}s "
        f"({batches} producer batches, {forwarded} contexts forwarded)"
    )
    return SharedActivations(produced, tokens, n_contexts, source, batches, forwarded, seconds)
