"""Validation: arguments in, one typed plan out (or a one-line UserError).

Order matters for the user: everything that can be wrong with the input (numbers, variant,
config fields, model, hooks, suites, dataset, resume target) is checked before Ray starts or
MLflow records anything, so a mistake costs seconds and leaves nothing behind. Train, tune,
bench and study all validate here.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import sys
import time
import urllib.parse
from dataclasses import fields
from pathlib import Path

import variants
from saeforge.core import corpus, eval_suites
from saeforge.core.batches import step_budget, tokens_per_context
from saeforge.core.hooks import HookPoint
from saeforge.core.model import compute_device, load_config, load_tokenizer, resolve_model, resolve_precision
from saeforge.core.sae_files import SaeMeta
from saeforge.core.training import LoopSettings
from saeforge.errors import UserError
from saeforge.jobs.arguments import (
    TrainArgs,
    check_ranges,
    flag_name,
    gpu_request,
    pairs_dict,
    resource_request,
)
from saeforge.jobs.plan import Contexts, CorpusRange, RunPlan, StreamSpec, TrackingTarget
from saeforge.jobs.runtime import storage
from saeforge.jobs.runtime.ray_cluster import attached
from saeforge.jobs.tracking import store
from saeforge.jobs.train import checkpoints


def variant_class(name: str) -> type[variants.Variant]:
    if name not in variants.names():
        raise UserError(str(variants.UnknownVariant(name)))
    return variants.get(name)


def variant_config(name: str, d_in: int, d_sae: int, overrides: dict) -> variants.VariantConfig:
    """The variant's config from `--set` values, built once; sizes a variant cannot take (e.g.
    groups) fail here, not in a worker."""
    cls = variant_class(name)
    try:
        cfg = cls.Config.build(d_in=d_in, d_sae=d_sae, overrides=overrides)
        cls(cfg)
    except (variants.ConfigError, ValueError) as err:
        raise UserError(str(err)) from None
    return cfg


def hook_points(args) -> tuple[HookPoint, ...]:
    """--layer and --site as hook points: one per layer of a comma-separated list (a run of
    several trains one SAE per hook from one model pass); a layer listed twice is refused."""
    layers = [part.strip() for part in str(args.layer).split(",") if part.strip()]
    if not layers or not all(part.isdigit() for part in layers):
        raise UserError(f"--layer: expected a layer number or a comma-separated list of them, got '{args.layer}'")
    numbers = [int(layer) for layer in layers]
    twice = sorted({n for n in numbers if numbers.count(n) > 1})
    if twice:
        raise UserError(f"--layer {args.layer}: layer {', '.join(map(str, twice))} is listed twice")
    return tuple(HookPoint(n, args.site) for n in numbers)


# Flags a resumed run takes from this invocation rather than from its checkpoint: where it runs
# and how many crashes it survives.
RESUME_MAY_CHANGE = (
    "resume",
    "address",
    "max_failures",
    "gpus_per_producer",
    "gpus_per_worker",
    "producer_resources",
    "worker_resources",
)


def resumed_train_args(given: TrainArgs) -> tuple[TrainArgs, dict]:
    """The checkpoint's run arguments for `--resume`, refusing any other flag given with a value
    that differs from the run's own (it would be ignored: a resumed run keeps its arguments)."""
    checkpoint = checkpoints.find_checkpoint(given.resume)
    info = checkpoints.read_info(checkpoint)
    saved, defaults = checkpoints.resumed_args(checkpoint, info), TrainArgs()
    changed = []
    for f in fields(TrainArgs):
        if f.name in RESUME_MAY_CHANGE:
            continue
        value, was, default = (getattr(a, f.name) for a in (given, saved, defaults))
        if f.name == "overrides":
            value, was, default = pairs_dict(value), pairs_dict(was), pairs_dict(default)
        if value != default and value != was:
            changed.append(f"{flag_name(f)} {value!r} (the run has {was!r})")
    if changed:
        raise UserError(
            f"--resume continues a run with its own arguments; drop {', '.join(changed)} or start a new run"
        )
    for name in RESUME_MAY_CHANGE[1:]:  # where and how it runs now: this invocation's
        setattr(saved, name, getattr(given, name))
    return saved, info


def run_name(args: TrainArgs, *hooks: HookPoint) -> str:
    """The run's name: --run-name, else variant-hook-time (several hooks: blocks.3_6_9.hook_SITE);
    a random suffix tells apart runs started in the same second (Ray Train restores whatever it
    finds under a run's name)."""
    stamp, suffix = time.strftime("%Y%m%d-%H%M%S"), secrets.token_hex(3)
    if args.resume:
        return f"{Path(args.resume).parent.name}-resumed-{stamp}-{suffix}"
    label = hooks[0].name if len(hooks) == 1 else f"blocks.{'_'.join(str(h.layer) for h in hooks)}.hook_{hooks[0].site}"
    return args.run_name or f"{args.variant}-{label}-{stamp}-{suffix}"


def check_new_run_folder(args: TrainArgs, name: str) -> None:
    """An explicit --run-name whose folder exists holds another run's checkpoints: refused."""
    if not args.run_name or args.resume:
        return
    folder = storage.run_exists(args.storage, name)
    if folder:
        raise UserError(
            f"--run-name {name}: {folder} already exists (another run's checkpoints); "
            f"choose another name, or continue that run with --resume {folder}"
        )


def host_port(address: str, default_port: int) -> tuple[str, int]:
    """(host, port) of 'host:port', 'scheme://host:port/...' or a bare host."""
    parts = urllib.parse.urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        return parts.hostname or "", parts.port or default_port
    except ValueError:  # a port that is not a number
        raise UserError(f"'{store.redact(address)}' is not a host:port address") from None


def check_reachable(address: str, what: str, default_port: int, timeout_s: float = 5.0) -> None:
    """A TCP connection to `address` opens within `timeout_s`, or one line naming it (Ray and
    MLflow would otherwise retry for minutes, after the run has started writing)."""
    host, port = host_port(address, default_port)
    if not host:
        raise UserError(f"{what} '{store.redact(address)}' names no host")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__.replace("Error", "").lower() or "unreachable"
        raise UserError(f"cannot reach {what} at {store.redact(address)}: {reason}") from None


def check_services(address: str) -> None:
    """The Ray cluster (--address or RAY_ADDRESS) and the MLflow store answer, before either is used."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address and address not in ("auto", "local"):
        check_reachable(address, "the Ray cluster", 10001 if address.startswith("ray://") else 6379)
    uri = store.tracking_uri()
    if uri.startswith(("http://", "https://")):
        check_reachable(uri, "the MLflow tracking server", 443 if uri.startswith("https") else 80)
    elif uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).parent.is_dir():
        raise UserError(f"MLflow store {uri}: the folder {Path(uri[len('sqlite:///') :]).parent} does not exist")


def plan_train(args: TrainArgs, progress=None) -> tuple[RunPlan, Contexts]:
    """Check every input, count the training contexts and pack the held-out ones; raises UserError
    on bad input. The training contexts are described (`CorpusRange`), not packed: a Ray Data
    read task packs them as the run reads them."""
    info: dict = {}
    if args.resume:
        args, info = resumed_train_args(args)
    check_ranges(args)
    check_gpu_requests(args)
    check_resource_requests(args)
    variant_class(args.variant)
    hooks = hook_points(args)
    name = run_name(args, *hooks)
    check_new_run_folder(args, name)
    lost = storage.temporary_outputs(args.storage, store.tracking_uri())
    if lost:
        warn(
            f"this run is inside Ray's temporary copy of the job's working directory, which Ray deletes later: "
            f"{' and '.join(lost)} would be lost with it; give --storage a shared folder or URI and set "
            "MLFLOW_TRACKING_URI (see the README's Ray Jobs section)",
            progress,
        )
    spec = resolve_model(args.model)  # prepares (de-quantises) the packaged Gemma the first time
    config = load_config(spec)
    for hook in hooks:
        hook.check(config.num_hidden_layers, args.model)
    d_in = config.hidden_size
    cfg = variant_config(args.variant, d_in, args.d_sae or 8 * d_in, pairs_dict(args.overrides))
    suites = tuple(eval_suites.parse_suites(args.eval_suites)) if args.eval_suites else ()

    tokenizer = load_tokenizer(spec)
    special = tuple(corpus.special_ids(tokenizer))
    budget = step_budget(args.tokens, cfg.batch_size, args.context_size, args.workers)
    step_tokens = budget.contexts_per_step * tokens_per_context(args.context_size)
    if args.tokens < step_tokens:
        raise UserError(
            f"--tokens {args.tokens} is less than one optimiser step ({budget.contexts_per_step} contexts of "
            f"{args.context_size} tokens: {step_tokens} tokens for batch_size {cfg.batch_size}); ask for at least that"
        )
    available, real = count_contexts(args, tokenizer, special, budget.contexts, budget.contexts_per_step)
    if available < budget.contexts_per_step or not real:
        raise UserError(
            f"dataset '{args.dataset}' yields too few tokens to train on (one step needs "
            f"{budget.contexts_per_step} contexts of {args.context_size} tokens)"
        )
    counted = corpus.is_local(args.dataset)
    budget = step_budget(
        args.tokens, cfg.batch_size, args.context_size, args.workers, available_contexts=available if counted else None
    )
    if budget.short:
        warn(
            f"dataset '{args.dataset}' holds {available} contexts: training {budget.total_steps} steps instead of "
            f"the {budget.wanted_steps} that --tokens {args.tokens} asks for",
            progress,
        )
    evals = corpus.pack_contexts(
        corpus.split_texts(args.dataset, "eval", args.text_column), tokenizer, args.context_size, args.eval_contexts
    )
    if len(evals) == 0:
        raise UserError(f"dataset '{args.dataset}' has no held-out documents to evaluate on")
    total_steps = info.get("total_steps") or budget.total_steps
    first_step = int(info.get("step", 0))
    check_services(args.address)  # last: the network, once everything local is known good
    hook = hooks[0]  # the plan's SaeMeta is the first hook's (RunPlan.for_hook gives each hook's)
    hook_runs = info.get("hook_run_ids", {})  # a resumed run of several hooks: each hook's MLflow run
    plan = RunPlan(
        args=args,
        variant_name=args.variant,
        variant=cfg,
        stream=StreamSpec(
            spec,
            hooks,
            special,
            args.context_size,
            budget.contexts_per_step,
            args.workers,
            first_step,
            producer_precision(args),
        ),
        loop=LoopSettings(total_steps, args.log_every, args.checkpoint_every),
        sae_meta=SaeMeta(args.model, hook.name, hook.layer, args.context_size, args.dataset),
        eval_suites=suites,
        max_l0=args.max_l0 or d_in / 2,
        resume_from=args.resume,
        name=name,
        tracking=TrackingTarget(
            run_id=info.get("run_id", ""), hook_run_ids=tuple(hook_runs[h.name] for h in hooks) if hook_runs else ()
        ),
        model_params=parameter_count(config),
    )
    train = CorpusRange(
        args.dataset,
        args.text_column,
        spec,
        args.context_size,
        start=first_step * budget.contexts_per_step,  # a resumed run's stream starts after what it trained
        stop=total_steps * budget.contexts_per_step,
        counted=counted,
    )
    return plan, Contexts(train, evals)


def count_contexts(
    args: TrainArgs, tokenizer, special: tuple[int, ...], wanted: int, per_step: int
) -> tuple[int, bool]:
    """(contexts, whether any holds a real token) of the training split, counted up to what the
    run wants without keeping any (memory stays flat whatever the corpus). A local source is
    counted up to `wanted`, so a run asking for more is shortened and warned about here; a Hub
    dataset (streamed, possibly billions of tokens) only up to one step (`per_step`): reading
    it all up front would cost a whole pass, so a stream that ends before the planned contexts
    fails the run at that point with one line (`corpus_stream.read_contexts`)."""
    limit = wanted if corpus.is_local(args.dataset) else per_step
    texts = corpus.split_texts(args.dataset, "train", args.text_column)
    n, real = 0, False
    for context in itertools.islice(corpus.iter_contexts(texts, tokenizer, args.context_size), limit):
        n += 1
        real = real or bool(corpus.valid_mask(context, list(special)).any())
    return n, real


def producer_precision(args: TrainArgs) -> str:
    """--precision as the producers will run it: decided here, on the machine they run on, for a
    private local Ray (so the run can say which precision ran); left to each producer on an
    attached cluster, whose nodes may differ from the driver's."""
    if attached(args.address):
        return args.precision
    return resolve_precision(args.precision, compute_device()[0])


def check_gpu_requests(args) -> None:
    """--gpus-per-producer / --gpus-per-worker: 'auto' or a number; a GPU asked for on a private
    local Ray (no --address, no RAY_ADDRESS) needs one on this machine (else the actors would
    wait for it for ever)."""
    import torch

    asked = {name: gpu_request(args, name) for name in ("gpus_per_producer", "gpus_per_worker")}
    if attached(args.address) or torch.cuda.is_available():
        return
    for name, value in asked.items():
        if value:
            raise UserError(
                f"--{name.replace('_', '-')} {value:g} asks for GPUs, but this machine has none and no --address "
                "or RAY_ADDRESS names a cluster"
            )


def check_resource_requests(args) -> None:
    """--producer-resources / --worker-resources: NAME=AMOUNT pairs of custom resources, which only
    an attached cluster's nodes can offer (on a private local Ray the actors would wait for ever)."""
    for name in ("producer_resources", "worker_resources"):
        asked = resource_request(args, name)
        if asked and not attached(args.address):
            raise UserError(
                f"--{name.replace('_', '-')} asks for custom resources ({', '.join(asked)}), which only the nodes "
                "of a cluster offer: give --address or RAY_ADDRESS"
            )


def parameter_count(config) -> int:
    """About how many parameters the whole model has, from its config (embeddings, attention
    and MLP weights; norms left out): what the GPU defaults call a large model."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    attention = 2 * hidden * config.num_attention_heads * head_dim + 2 * hidden * kv_heads * head_dim
    return int(config.vocab_size * hidden + layers * (attention + 3 * hidden * config.intermediate_size))


def warn(message: str, progress=None) -> None:
    (progress or (lambda m: print(m, file=sys.stderr)))(f"saeforge: warning: {message}")
