"""The driver of `saeforge browse`: run an SAE over held-out text on Ray producer actors, keep
exact per-latent statistics, and write the feature browser (a static site) logged to the SAE's
MLflow run.

Validation first (the URI, the latent choice, the SAE's width against the model's, the text),
before Ray starts. Then `--producers` actors each host the model slice up to the SAE's hook (as
the training producers do) plus the SAE, read chunks of contexts handed out by Ray's ActorPool,
and fold the latents into their own `LatentStats` as they go: only the statistics (d_sae x
top-k examples) cross the object store, never the activations, so memory does not grow with
--tokens. The driver merges the actors' statistics (exact: see core.browser_stats), asks the
actors (which hold the model's unembedding) for each latent's promoted and suppressed tokens,
chooses the latents that get a page, and writes the site (core.browser_site).
"""

from __future__ import annotations

import functools
import re
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saeforge.core import corpus, sae_files
from saeforge.core.browser.site import SiteData, write_site
from saeforge.core.browser.stats import LatentStats, cosine_histogram, logit_effects, most_similar
from saeforge.core.eval_suites.context import sae_latents
from saeforge.core.hooks import HookPoint
from saeforge.core.model import load_tokenizer, resolve_model
from saeforge.core.sae_files import SaeMeta
from saeforge.errors import UserError
from saeforge.jobs.arguments import BrowseArgs, check_ranges
from saeforge.jobs.checks import check_sae_fits_model
from saeforge.jobs.data.activation_stream import ActivationProducer
from saeforge.jobs.eval import ResolvedSAE, require_run, resolve_sae
from saeforge.jobs.plan import StreamSpec
from saeforge.jobs.runtime.ray_cluster import connect_ray, cores

CHOICES = ("frequent", "random", "all")
ARTIFACT_DIR = "browser"
N_TOKENS = 10  # promoted / suppressed tokens per latent
N_SIMILAR = 10
SAMPLES = 32  # contexts sampled per latent for the quantile examples


class LatentProducer(ActivationProducer):
    """A Ray actor: the model slice and the SAE; folds the latents of each chunk of contexts it
    is handed into its own LatentStats."""

    def __init__(self, spec: StreamSpec, payload: dict, settings: dict, threads: int = 1):
        super().__init__(spec, threads)
        self.sae = sae_files.from_bytes(payload).to(self.device)
        self.stats = LatentStats(self.sae.cfg.d_sae, **settings)

    def read(self, first_id: int, contexts: np.ndarray) -> int:
        """Fold in contexts first_id, first_id + 1, ...; returns the real tokens read."""
        ids = torch.from_numpy(np.asarray(contexts, dtype=np.int64)).to(self.device)
        acts = self.activations(ids)[self.spec.hooks[0].name]
        mask = corpus.valid_mask(ids, list(self.spec.special_ids))
        with torch.inference_mode():
            _, f = sae_latents(self.sae, acts, mask)
        self.stats.update(f, mask, torch.arange(first_id, first_id + len(ids)))
        return int(mask.sum())

    def result(self) -> LatentStats:
        return self.stats

    def peak_memory_mb(self) -> float:
        return peak_memory_mb()

    def logit_effects(self, directions: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        """Promoted / suppressed tokens of decoder directions through this model's unembedding."""
        return logit_effects(directions, self.model.get_output_embeddings().weight.detach(), n)


def peak_memory_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- validation ------------------------------------------------------------------------------------


def parse_latents(text: str) -> tuple[str, list[int]]:
    """--latents as (choice, ids): ('frequent' | 'random' | 'all', []) or ('list', ids)."""
    text = text.strip()
    if text in CHOICES:
        return text, []
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        raise UserError(f"--latents: expected {', '.join(CHOICES)} or comma-separated latent ids, got '{text}'")
    return "list", list(dict.fromkeys(int(p) for p in parts))


def check_latents(ids: list[int], d_sae: int) -> None:
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad:
        raise UserError(f"--latents: latent {bad[0]} is out of range: the SAE has {d_sae} latents (0-{d_sae - 1})")


def choose_pages(stats: LatentStats, choice: str, ids: list[int], n: int, cap: int, seed: int) -> list[int]:
    """The latents that get a page, in the order of --latents (frequent / all: most frequent first)."""
    if choice == "list":
        return ids
    counts = stats.fire_counts
    fired = torch.nonzero(counts > 0).squeeze(-1)
    by_frequency = fired[torch.argsort(counts[fired], descending=True, stable=True)].tolist()
    if choice == "frequent":
        return by_frequency[:n]
    if choice == "all":
        return by_frequency[:cap] if len(by_frequency) > cap else sorted(by_frequency)
    gen = torch.Generator().manual_seed(seed)
    return sorted(fired[torch.randperm(len(fired), generator=gen)[:n]].tolist())


# -- the activation pass ---------------------------------------------------------------------------


def read_on_ray(
    contexts: np.ndarray, spec: StreamSpec, payload: dict, settings: dict, args: BrowseArgs, say
) -> tuple[LatentStats, list]:
    """Fold every context into LatentStats on `args.producers` actors; returns the merged
    statistics and the actors (still up, for the logit effects)."""
    import ray
    from ray.util import ActorPool

    gpus = ray.cluster_resources().get("GPU", 0)
    threads = max(1, cores() // args.producers)
    actor_class = ray.remote(LatentProducer)
    actors = [
        actor_class.options(num_cpus=1, num_gpus=1 if gpus >= args.producers else 0).remote(
            spec, payload, settings, threads
        )
        for _ in range(args.producers)
    ]
    step = args.batch_contexts
    pool = ActorPool(actors)
    started = last = time.time()
    done = 0
    total = int(corpus.valid_mask(contexts, list(spec.special_ids)).sum())
    starts = range(0, len(contexts), step)
    for tokens in pool.map_unordered(lambda a, start: a.read.remote(start, contexts[start : start + step]), starts):
        done += tokens
        now = time.time()
        if now - last >= 5 or done == total:
            last = now
            say(f"  browse {done:,}/{total:,} tokens ({done / max(now - started, 1e-9):,.0f} tokens/s)")
    parts = ray.get([a.result.remote() for a in actors])
    stats = parts[0]
    for part in parts[1:]:
        stats.merge(part)
    return stats, actors


def decoder_effects(actors: list, directions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(top ids, top values, bottom ids, bottom values) per latent, the latents split over the actors."""
    import ray

    parts = np.array_split(np.arange(len(directions)), len(actors))
    futures = [a.logit_effects.remote(directions[p], N_TOKENS) for a, p in zip(actors, parts) if len(p)]
    return tuple(torch.cat(t) for t in zip(*ray.get(futures)))


# -- the site --------------------------------------------------------------------------------------


def token_texts(tokenizer) -> Callable[[int], str]:
    @functools.cache
    def text(token: int) -> str:
        return tokenizer.decode([token])

    return text


def default_out(label: str) -> Path:
    return Path(f"browser_{re.sub(r'[^A-Za-z0-9_.-]+', '-', label)}")


@dataclass
class BrowseInput:
    """What validation of `saeforge browse` produced: the SAE, the model and hook it reads, the
    held-out contexts, the latents asked for."""

    resolved: ResolvedSAE
    stream: StreamSpec
    contexts: np.ndarray
    tokenizer: object
    choice: str
    ids: list[int]

    @property
    def hook(self) -> HookPoint:
        return self.stream.hooks[0]


def run_browse(args: BrowseArgs, progress: Callable[[str], None] | None = print) -> dict:
    """The whole `saeforge browse`: returns a summary (the site's path, what it holds)."""
    say = progress or (lambda _m: None)
    started = time.time()
    given = check_browse(args)
    sae, cfg = given.resolved.sae, given.resolved.cfg
    model_name = args.model or SaeMeta.from_cfg(cfg).model_name
    say(
        f"saeforge: browsing {args.uri} ({cfg['saeforge']['variant']}, d_sae {sae.cfg.d_sae}, {given.hook.name} of "
        f"{model_name}) on {len(given.contexts)} held-out contexts of '{args.dataset}', {args.producers} producer(s)"
    )
    connect_ray(args.address)
    import ray

    settings = {"top_k": args.top_k, "samples": SAMPLES, "seed": args.seed}
    stats, actors = read_on_ray(given.contexts, given.stream, sae_files.to_bytes(sae, cfg), settings, args, say)
    pages = choose_pages(stats, given.choice, given.ids, args.n_latents, args.max_pages, args.seed)
    if given.choice == "all" and len(pages) < int((stats.fire_counts > 0).sum()):
        say(f"saeforge: warning: --latents all: pages for the {len(pages)} most frequent latents (--max-pages)")
    say(f"saeforge: decoder directions through the unembedding ({sae.cfg.d_sae} latents), {len(pages)} pages...")
    data = site_data(args, given, model_name, stats, pages, actors)
    producer_peak = max(ray.get([a.peak_memory_mb.remote() for a in actors]))
    for actor in actors:
        ray.kill(actor)
    out = Path(args.out).expanduser() if args.out else default_out(given.resolved.label)
    index, logged = publish(data, out, given.resolved.run_id if args.log else None)
    return {
        "index": str(index),
        "folder": str(out.resolve()),
        "run_id": given.resolved.run_id,
        "logged": logged,
        "artifact_path": f"{ARTIFACT_DIR}/index.html" if logged else "",
        "tokens": stats.tokens,
        "contexts": len(given.contexts),
        "pages": len(pages),
        "dead": int((stats.fire_counts == 0).sum()),
        "seconds": time.time() - started,
        "peak_memory_mb": {"driver": peak_memory_mb(), "producer": producer_peak},
        "stats": stats,
        "page_latents": pages,
    }


def check_browse(args: BrowseArgs) -> BrowseInput:
    """Every input of `saeforge browse`, before Ray starts: the URI, the latent choice, the SAE
    against the model, the MLflow run to log to, the held-out text."""
    check_ranges(args)
    choice, ids = parse_latents(args.latents)
    resolved = resolve_sae(args.uri, args.run_id)
    meta = SaeMeta.from_cfg(resolved.cfg)
    model_name = args.model or meta.model_name
    check_sae_fits_model(resolved.cfg, model_name)
    check_latents(ids, resolved.sae.cfg.d_sae)  # --n-latents above d_sae just means every latent that fired
    if args.log and args.run_id:
        require_run(args.uri, args.run_id)
    spec = resolve_model(model_name)
    tokenizer = load_tokenizer(spec)
    special = tuple(corpus.special_ids(tokenizer))
    n_contexts = -(-args.tokens // (meta.context_size - 1))
    texts = corpus.split_texts(args.dataset, "eval", args.text_column)
    contexts = corpus.pack_contexts(texts, tokenizer, meta.context_size, n_contexts)
    if len(contexts) == 0 or not corpus.valid_mask(contexts, list(special)).any():
        raise UserError(f"dataset '{args.dataset}' has no held-out text to browse")
    hook = HookPoint.parse(meta.hook_name)
    stream = StreamSpec(spec, (hook,), special, meta.context_size, args.batch_contexts, 1)
    return BrowseInput(resolved, stream, contexts, tokenizer, choice, ids)


def site_data(args: BrowseArgs, given: BrowseInput, model_name: str, stats: LatentStats, pages: list, actors):
    """Everything the site shows: the statistics, each latent's promoted and suppressed tokens
    (on the actors, which hold the unembedding) and most similar latents, the variant's groups."""
    sae, cfg = given.resolved.sae, given.resolved.cfg
    d_sae, hook, size = sae.cfg.d_sae, given.hook, given.stream.context_size
    with torch.no_grad():
        directions = (sae.decoder_directions().detach().float() / sae.act_scale).cpu()
    up, up_v, down, down_v = decoder_effects(actors, directions)
    sim_ids, sim_cos = most_similar(directions, torch.tensor(pages, dtype=torch.long), N_SIMILAR)
    groups = sae.latent_groups()
    return SiteData(
        title=f"{cfg['saeforge']['variant']} SAE, {hook.name} of {model_name}",
        info={
            "SAE": args.uri,
            "variant": cfg["saeforge"]["variant"],
            "hook": hook.name,
            "model": model_name,
            "latents (d_sae)": str(d_sae),
            "text": f"held-out split of '{args.dataset}', {len(given.contexts):,} contexts of {size}",
            "written": time.strftime("%Y-%m-%d %H:%M"),
        },
        stats=stats,
        pages=pages,
        tokens=given.contexts,
        token_text=token_texts(given.tokenizer),
        promoted={i: list(zip(up[i].tolist(), up_v[i].tolist())) for i in range(d_sae)},
        suppressed={i: list(zip(down[i].tolist(), down_v[i].tolist())) for i in pages},
        similar={p: list(zip(sim_ids[j].tolist(), sim_cos[j].tolist())) for j, p in enumerate(pages)},
        cosine_hist=cosine_histogram(directions),
        group_kind=groups.kind if groups else "",
        group_labels=groups.labels.tolist() if groups else [],
    )


def publish(data: SiteData, out: Path, run_id: str | None) -> tuple[Path, bool]:
    """Write the site to `out` (a rerun replaces the old site whole) and log it to the MLflow run
    under browser/ when there is one. Returns (index.html, whether it was logged)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.resolve().parent, prefix=f".{out.name}-"))
    write_site(data, staging)
    sae_files.replace_folder(staging, out)
    index = out.resolve() / "index.html"
    if not run_id:
        return index, False
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().log_artifacts(run_id, str(out), ARTIFACT_DIR)
    except MlflowException as err:
        raise UserError(
            f"site written to {index}, but logging to MLflow run {run_id} failed: {str(err).splitlines()[0]}"
        ) from None
    return index, True
