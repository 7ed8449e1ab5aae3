"""Sparse probing (SAEBench's procedure on offline data): can a handful of SAE latents carry a
binary concept as well as the model's whole activation does?

A task is data: a text source plus a label rule (`ProbeTask`). The built-in tasks come from the
Wikipedia summaries the package ships: one-vs-rest topic tasks (the most common English topics),
person-vs-not (topic "People"), and language identification (English / Spanish / French
summaries, one language against the other two). Hub datasets (ag_news, europarl, bias_in_bios)
are declared the same way (`HUB_TASKS`) and read with `datasets`; a JSON file of declarations
(`task_file`) adds any local or Hub source.

For each task: balanced train and test sets, the test set from the held-out documents
(`corpus.is_eval_document`, never seen in SAE training) and the train set from the others. Each
text (its first `context_size` tokens) is one example: the mean over its non-BOS tokens of the
hooked activation (model) and of the SAE latents. A logistic-regression probe on the model's
activation gives the ceiling (`llm_acc`); probes on the top-k latents, chosen by the absolute
difference of class means on the train split only, give `sae_top_<k>_acc`.
"""

from __future__ import annotations

import fnmatch
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from saeforge.core import corpus
from saeforge.core.corpus import valid_mask
from saeforge.core.eval_suites import register
from saeforge.core.eval_suites.context import (
    EvalContext,
    SuiteResult,
    encode_texts,
    hook_activations,
    pad_id,
    padded_batches,
    sae_latents,
)
from saeforge.errors import UserError

# Built-in topics that are not a concept: no topic, or a catch-all bucket.
NON_TOPICS = ("", "Uncategorized")
PERSON_TOPIC = "People"
BUILTIN_LANGUAGES = {"en": "en-us", "es": "es-es", "fr": "fr-fr"}


# -- task declarations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSource:
    """Where records come from: the built-in summaries (records: text, topic, language) or a
    `datasets` source (a Hub id or local .jsonl/.parquet/.txt files: records are its rows).
    `text_column` may be a dotted path into nested rows ('translation.en'); `fields` adds
    constant (name, value) pairs to every record (e.g. the language of a translation column)."""

    dataset: str = corpus.BUILTIN
    languages: tuple[str, ...] = ("en-us",)  # built-in only: which summaries
    text_column: str = "text"
    config: str | None = None  # Hub dataset configuration name
    split: str = "train"  # Hub dataset split to stream
    max_rows: int = 20_000  # rows read from a datasets source (streamed, never all downloaded)
    fields: tuple[tuple[str, object], ...] = ()

    def records(self) -> Iterator[dict]:
        extra = dict(self.fields)
        if self.dataset == corpus.BUILTIN:
            for language in self.languages:
                for doc in corpus.builtin_documents(language):
                    yield {"text": doc.text, "topic": doc.topic, "language": doc.language, **extra}
            return
        for row in _dataset_records(self):
            yield {**row, **extra}


@dataclass(frozen=True)
class LabelRule:
    """Label 1 where record[column] is in `positive`; 0 where it is in `negative` (every other
    value when `negative` is empty); records whose value is in `exclude` are not used."""

    column: str
    positive: tuple
    negative: tuple = ()
    exclude: tuple = ()

    def __call__(self, record: dict) -> int | None:
        value = record.get(self.column)
        if value in self.exclude:
            return None
        if value in self.positive:
            return 1
        if not self.negative or value in self.negative:
            return 0
        return None


@dataclass(frozen=True)
class ProbeTask:
    name: str
    sources: tuple[TextSource, ...]  # records of all sources, in order
    label: LabelRule
    tags: tuple[str, ...] = field(default=(), compare=False)  # for selecting tasks: "builtin", "hub", ...


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def builtin_tasks(n_topics: int = 5) -> list[ProbeTask]:
    """Topic one-vs-rest for the n most common English topics (besides People and the catch-all),
    person-vs-not, and one-vs-rest language identification."""
    english = (TextSource(languages=("en-us",)),)
    counts: dict[str, int] = {}
    for doc in corpus.builtin_documents("en-us"):
        counts[doc.topic] = counts.get(doc.topic, 0) + 1
    topics = [t for t in sorted(counts, key=lambda t: (-counts[t], t)) if t not in (*NON_TOPICS, PERSON_TOPIC)]
    tasks = [
        ProbeTask(f"topic_{_slug(t)}", english, LabelRule("topic", (t,), exclude=NON_TOPICS), ("builtin", "topic"))
        for t in topics[:n_topics]
    ]
    tasks.append(
        ProbeTask(
            "person_vs_not", english, LabelRule("topic", (PERSON_TOPIC,), exclude=NON_TOPICS), ("builtin", "person")
        )
    )
    languages = (TextSource(languages=tuple(BUILTIN_LANGUAGES.values())),)
    tasks += [
        ProbeTask(f"language_{code}", languages, LabelRule("language", (code,)), ("builtin", "language"))
        for code in BUILTIN_LANGUAGES
    ]
    return tasks


# SAEBench's sparse-probing datasets, declared for clusters with Hub access (not run by default;
# select them with tasks="hub", a dataset tag or a name). Label values are the datasets' own;
# Europarl has one configuration per language pair, so each language is read from its own pair.
_AG_NEWS = (TextSource("fancyzhx/ag_news", text_column="text"),)
_BIOS = (TextSource("LabHC/bias_in_bios", text_column="hard_text"),)
_EUROPARL_PAIRS = {"en": "en-fr", "fr": "fr-it", "de": "de-en", "es": "es-fr", "nl": "nl-pt"}
_EUROPARL = tuple(
    TextSource(
        "Helsinki-NLP/europarl",
        config=pair,
        text_column=f"translation.{lang}",
        max_rows=2_000,
        fields=(("language", lang),),
    )
    for lang, pair in _EUROPARL_PAIRS.items()
)
HUB_TASKS: list[ProbeTask] = [
    *[
        ProbeTask(f"ag_news_{name}", _AG_NEWS, LabelRule("label", (label,)), ("hub", "ag_news"))
        for label, name in enumerate(("world", "sports", "business", "scitech"))
    ],
    *[
        ProbeTask(f"bias_in_bios_profession_{p}", _BIOS, LabelRule("profession", (p,)), ("hub", "bias_in_bios"))
        for p in (0, 1, 2, 6, 9)
    ],
    *[
        ProbeTask(f"europarl_{lang}", _EUROPARL, LabelRule("language", (lang,)), ("hub", "europarl"))
        for lang in _EUROPARL_PAIRS
    ],
]


def tasks_from_file(path: str | Path) -> list[ProbeTask]:
    """Task declarations from a JSON list of objects: name, label_column, positive, optionally
    negative and exclude, and either `sources` (a list of source objects) or one source's keys
    inline: dataset, text_column, config, split, max_rows, languages, fields (an object)."""

    def source(e: dict) -> TextSource:
        return TextSource(
            e.get("dataset", corpus.BUILTIN),
            tuple(e.get("languages", ("en-us",))),
            e.get("text_column", "text"),
            e.get("config"),
            e.get("split", "train"),
            int(e.get("max_rows", 20_000)),
            tuple(sorted(e.get("fields", {}).items())),
        )

    try:
        entries = json.loads(Path(path).expanduser().read_text())
        tasks = []
        for e in entries:
            sources = tuple(source(s) for s in e["sources"]) if "sources" in e else (source(e),)
            rule = LabelRule(
                e["label_column"], tuple(e["positive"]), tuple(e.get("negative", ())), tuple(e.get("exclude", ()))
            )
            tasks.append(ProbeTask(e["name"], sources, rule, ("file",)))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read probing tasks from '{path}': {err}") from None
    return tasks


def select_tasks(spec: str, n_topics: int, task_file: str = "") -> list[ProbeTask]:
    """Tasks named by a comma-separated list of names, globs or tags ('builtin', 'hub', 'topic',
    'language', 'file', ...)."""
    pool = builtin_tasks(n_topics) + HUB_TASKS + (tasks_from_file(task_file) if task_file else [])
    chosen: dict[str, ProbeTask] = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        matches = [t for t in pool if item in t.tags or fnmatch.fnmatchcase(t.name, item)]
        if not matches:
            raise UserError(f"no probing task matches '{item}' (tasks: {', '.join(t.name for t in pool)})")
        chosen.update((t.name, t) for t in matches)
    return list(chosen.values())


def _dataset_records(source: TextSource) -> Iterator[dict]:
    import datasets

    path = Path(source.dataset).expanduser()
    try:
        if path.exists():
            files = sorted(p for p in path.rglob("*") if p.suffix in corpus.LOCAL_FORMATS) if path.is_dir() else [path]
            kind = corpus.LOCAL_FORMATS.get(files[0].suffix) if files else None
            if kind is None:
                raise UserError(f"probing dataset '{source.dataset}': expected .jsonl, .parquet or .txt files")
            stream = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train", streaming=True)
        else:
            stream = datasets.load_dataset(source.dataset, source.config, split=source.split, streaming=True)
    except UserError:
        raise
    except Exception as err:  # the Hub raises many types; all mean "cannot read it"
        raise UserError(f"cannot read probing dataset '{source.dataset}': {str(err).splitlines()[0]}") from None
    for i, row in enumerate(stream):
        if i >= source.max_rows:
            return
        text = row
        for key in source.text_column.split("."):
            if not isinstance(text, dict) or key not in text:
                raise UserError(
                    f"probing dataset '{source.dataset}' has no '{source.text_column}' column (has: {', '.join(row)})"
                )
            text = text[key]
        yield {**row, "text": text}


# -- balanced splits -----------------------------------------------------------------------------


def _order_key(text: str, seed: int) -> int:
    """A fixed pseudo-random order shared by every task, so tasks reuse each other's texts (the
    costly part, the forward pass, is done once per distinct text)."""
    return zlib.crc32(f"{seed}:{text}".encode())


def balanced_split(
    task: ProbeTask, records: list[dict], n_train: int, n_test: int, seed: int = 0
) -> dict[str, tuple[list[str], np.ndarray]]:
    """{'train': (texts, labels), 'test': (texts, labels)}, each with as many positives as
    negatives; test texts are held-out documents, train texts are not."""
    pools: dict[tuple[str, int], list[str]] = {}
    seen = set()
    for record in records:
        text = record.get("text")
        if not isinstance(text, str) or not text.strip() or text in seen:
            continue
        label = task.label(record)
        if label is None:
            continue
        seen.add(text)
        split = "test" if corpus.is_eval_document(text) else "train"
        pools.setdefault((split, label), []).append(text)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        pos = sorted(pools.get((split, 1), []), key=lambda t: _order_key(t, seed))
        neg = sorted(pools.get((split, 0), []), key=lambda t: _order_key(t, seed))
        half = min(n // 2, len(pos), len(neg))
        if half < 2:
            raise UserError(
                f"probing task '{task.name}' has too few {split} examples of one class "
                f"({len(pos)} positive, {len(neg)} negative)"
            )
        texts = pos[:half] + neg[:half]
        out[split] = (texts, np.array([1] * half + [0] * half))
    return out


# -- features and probes ---------------------------------------------------------------------------


@torch.no_grad()
def pooled_features(ctx: EvalContext, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(model activations (n, d_in), SAE latents (n, d_sae)), each the mean over a text's non-BOS
    tokens (its first context_size tokens)."""
    seqs = encode_texts(ctx.tokenizer, texts, ctx.context_size)
    model_out = np.zeros((len(texts), ctx.sae.cfg.d_in), np.float32)
    sae_out = np.zeros((len(texts), ctx.sae.cfg.d_sae), np.float32)
    done = 0
    for idx, ids in padded_batches(seqs, ctx.batch_contexts, pad_id(ctx.tokenizer)):
        mask = valid_mask(ids, ctx.special_ids)
        acts = hook_activations(ctx.model, ctx.hook, ids)
        _, f = sae_latents(ctx.sae, acts, mask)
        weights = mask.unsqueeze(-1).float()
        count = weights.sum(1).clamp_min(1.0)
        model_out[idx] = ((acts * weights).sum(1) / count).numpy()
        sae_out[idx] = ((f.cpu() * weights).sum(1) / count).numpy()
        done += len(idx)
        if done % (ctx.batch_contexts * 25) < len(idx):
            ctx.say(f"probing: {done}/{len(texts)} texts")
    return model_out, sae_out


def _probe_accuracy(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, c: float
) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    with threadpool_limits(1):  # problems this small only lose time to BLAS threads
        probe.fit(x_train, y_train)
        return float(probe.score(x_test, y_test))


def top_latents_by_mean_difference(latents: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The k latents whose mean activation differs most (in absolute value) between the classes."""
    diff = np.abs(latents[labels == 1].mean(0) - latents[labels == 0].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def probe_task(
    model_train, model_test, sae_train, sae_test, y_train, y_test, ks: tuple[int, ...], c: float = 1.0
) -> dict[str, float]:
    """Accuracies of the model probe and the top-k SAE-latent probes on one task's features."""
    out = {"llm_acc": _probe_accuracy(model_train, y_train, model_test, y_test, c)}
    for k in ks:
        top = top_latents_by_mean_difference(sae_train, y_train, k)
        out[f"sae_top_{k}_acc"] = _probe_accuracy(sae_train[:, top], y_train, sae_test[:, top], y_test, c)
    return out


@register("probing")
def probing(
    ctx: EvalContext,
    tasks: str = "builtin",
    n_topics: int = 5,
    train_size: int = 200,
    test_size: int = 100,
    ks: tuple[int, ...] = (1, 2, 5, 10),
    probe_c: float = 1.0,
    task_file: str = "",
    seed: int = 0,
) -> SuiteResult:
    """Sparse probing: logistic probes on the model's activation vs on its top-k SAE latents.

    tasks: names, globs or tags ('builtin', 'hub', 'topic', 'language', 'person', 'file');
    train_size / test_size: texts per task (balanced); ks: numbers of latents probed; probe_c:
    inverse L2 strength of the logistic regression; task_file: JSON task declarations.
    """
    chosen = select_tasks(tasks, n_topics, task_file)
    records: dict[TextSource, list[dict]] = {}  # each source is read once, whatever the tasks sharing it
    splits = {}
    for task in chosen:
        for source in task.sources:
            if source not in records:
                records[source] = list(source.records())
        task_records = [r for source in task.sources for r in records[source]]
        splits[task.name] = balanced_split(task, task_records, train_size, test_size, seed)
    texts = sorted({t for s in splits.values() for texts, _ in s.values() for t in texts})
    ctx.say(f"probing: {len(chosen)} tasks, {len(texts)} distinct texts")
    model_feats, sae_feats = pooled_features(ctx, texts)
    row = {t: i for i, t in enumerate(texts)}
    metrics: dict[str, float] = {}
    table = []
    for task in chosen:
        (tr_texts, y_tr), (te_texts, y_te) = splits[task.name]["train"], splits[task.name]["test"]
        tr, te = [row[t] for t in tr_texts], [row[t] for t in te_texts]
        accs = probe_task(model_feats[tr], model_feats[te], sae_feats[tr], sae_feats[te], y_tr, y_te, ks, probe_c)
        metrics.update({f"{task.name}/{k}": v for k, v in accs.items()})
        table.append({"task": task.name, "train": len(tr), "test": len(te), **accs})
    keys = ["llm_acc", *(f"sae_top_{k}_acc" for k in ks)]
    for key in keys:
        metrics[f"mean/{key}"] = float(np.mean([r[key] for r in table]))
    metrics["tasks"] = float(len(table))
    return SuiteResult(metrics, headline=tuple(f"mean/{k}" for k in keys), tables={"probing": table})
