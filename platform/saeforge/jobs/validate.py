"""Validation: parsed flags in, one typed plan out (or a one-line UserError), in one pass.

`plan_train` is the pass every verb that trains goes through: flags, hooks, run name, the
model (prepared the first time), the variant's config, the step budget from the counted corpus,
the held-out contexts, the services. `plan_tune` and `plan_study` add what only they take (tune
spaces; a paper's study) before and after it. Order matters for the user: everything that can be
wrong with the input is checked before Ray starts or MLflow records anything, so a mistake costs
seconds and leaves nothing behind. The checks themselves live in `checks`.
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from dataclasses import dataclass, fields
from pathlib import Path

import variants
from saeforge.core import corpus, eval_suites
from saeforge.core.batches import StepBudget, step_budget, tokens_per_context
from saeforge.core.eval_suites.runner import parse_options
from saeforge.core.hooks import HookPoint
from saeforge.core.model import ModelSpec, compute_device, load_config, load_tokenizer, resolve_model, resolve_precision
from saeforge.core.sae_files import SaeMeta
from saeforge.core.study import claims
from saeforge.core.training import LoopSettings
from saeforge.errors import UserError
from saeforge.jobs import checks
from saeforge.jobs.arguments import StudyArgs, TrainArgs, TuneArgs, flag_name, pairs_dict, train_args_of
from saeforge.jobs.data.activation_cache import check_cache
from saeforge.jobs.plan import STUDY_SUITE_SIZES, Contexts, CorpusRange, RunPlan, StreamSpec, StudyPlan, TrackingTarget
from saeforge.jobs.runtime.ray_cluster import attached
from saeforge.jobs.train import checkpoints
from saeforge.jobs.tune import search_space
from saeforge.jobs.tune.search_space import TuneSpace

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


@dataclass(frozen=True)
class Source:
    """The model a run reads and what validation learnt from it: its config and tokenizer."""

    spec: ModelSpec
    config: object
    tokenizer: object
    special: tuple[int, ...]

    @property
    def d_in(self) -> int:
        return self.config.hidden_size


# -- the passes ----------------------------------------------------------------------------------


def plan_train(args: TrainArgs, progress=None) -> tuple[RunPlan, Contexts]:
    """Check every input of a training run, count its training contexts and pack the held-out
    ones. The training contexts are described (`CorpusRange`), not packed: a Ray Data read task
    packs them as the run reads them."""
    info: dict = {}
    if args.resume:
        args, info = resumed_train_args(args)
    checks.check_flags(args)
    variant_class(args.variant)
    hooks = hook_points(args)
    name = run_name(args, *hooks)
    checks.check_new_run_folder(args, name)
    checks.warn_if_temporary(args, progress)
    source = open_source(args.model, hooks)
    checks.check_context_fits(args.context_size, source.config, args.model)
    cfg = variant_config(args.variant, source.d_in, args.d_sae or 8 * source.d_in, pairs_dict(args.overrides))
    budget = plan_budget(args, cfg.batch_size, source, progress)
    evals = held_out_contexts(args, source)
    checks.check_services(args.address)  # last: the network, once everything local is known good
    plan = build_plan(args, info, name, hooks, source, cfg, budget)
    first_step, per_step = plan.stream.first_step, budget.contexts_per_step
    train = CorpusRange(
        args.dataset,
        args.text_column,
        source.spec,
        args.context_size,
        start=first_step * per_step,  # a resumed run's stream starts after what it trained
        stop=plan.loop.total_steps * per_step,
        counted=corpus.is_local(args.dataset),
    )
    return plan, Contexts(train, evals)


def plan_tune(args: TuneArgs, progress=None) -> tuple[RunPlan, Contexts, list[TuneSpace]]:
    """A search's spaces, then the training pass on its shared flags (the first space's variant
    and fixed values, a trial's token budget), then every space built at the run's sizes."""
    checks.check_flags(args)
    spaces = load_spaces(args)
    first = spaces[0]
    plan, contexts = plan_train(train_args_of(args, first.variant, dict(first.fixed), args.tokens_per_trial), progress)
    for space in spaces:
        search_space.check_builds(space, plan.variant.d_in, plan.variant.d_sae)
    if args.activations:
        check_cache(args.activations, plan)
    return plan, contexts, spaces


def plan_study(args: StudyArgs, progress=None) -> tuple[StudyPlan, RunPlan, Contexts]:
    """A study's papers, SAEs, targets and overrides, then the training pass on its shared flags,
    then every SAE built at the run's sizes with the values it is given."""
    checks.check_flags(args)
    studies = study_papers(args.study)
    names = tuple(dict.fromkeys(v for s in studies for v in s.variants))
    if args.only:
        names = variant_names(args.only, "--only", among=names)
    if len(hook_points(args)) > 1:
        raise UserError(f"--layer {args.layer}: a study reads one layer (train and tune take a list)")
    overrides = {"batch_size": str(args.batch_size), **pairs_dict(args.overrides)}
    study = StudyPlan(
        studies,
        names,
        parse_targets(args.targets),
        args.seeds,
        overrides,
        tuple(dict.fromkeys(s for st in studies for s in st.suites)),
        study_suite_options(args),
    )
    batch = {"batch_size": str(args.batch_size)}
    plan, contexts = plan_train(train_args_of(args, names[0], batch, args.tokens), progress)
    check_study_overrides(study, plan.variant.d_in, plan.variant.d_sae)
    if args.activations:
        check_cache(args.activations, plan)
    return study, plan, contexts


# -- the steps of plan_train ---------------------------------------------------------------------


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


def run_name(args: TrainArgs, *hooks: HookPoint) -> str:
    """The run's name: --run-name, else variant-hook-time (several hooks: blocks.3_6_9.hook_SITE);
    a random suffix tells apart runs started in the same second (Ray Train restores whatever it
    finds under a run's name)."""
    stamp, suffix = time.strftime("%Y%m%d-%H%M%S"), secrets.token_hex(3)
    if args.resume:
        return f"{Path(args.resume).parent.name}-resumed-{stamp}-{suffix}"
    label = hooks[0].name if len(hooks) == 1 else f"blocks.{'_'.join(str(h.layer) for h in hooks)}.hook_{hooks[0].site}"
    return args.run_name or f"{args.variant}-{label}-{stamp}-{suffix}"


def open_source(model: str, hooks: tuple[HookPoint, ...]) -> Source:
    """The model (the packaged Gemma is prepared the first time), its config and tokenizer; every
    hook within its layers."""
    spec = resolve_model(model)
    config = load_config(spec)
    for hook in hooks:
        hook.check(config.num_hidden_layers, model)
    tokenizer = load_tokenizer(spec)
    return Source(spec, config, tokenizer, tuple(corpus.special_ids(tokenizer)))


def plan_budget(args: TrainArgs, batch_size: int, source: Source, progress=None) -> StepBudget:
    """The run's steps: --tokens in steps of whole contexts, never more than a local corpus holds
    (counted here; shortened with a warning); one step at least, and one step's worth of text."""
    budget = step_budget(args.tokens, batch_size, args.context_size, args.workers)
    step_tokens = budget.contexts_per_step * tokens_per_context(args.context_size)
    if args.tokens < step_tokens:
        raise UserError(
            f"--tokens {args.tokens} is less than one optimiser step ({budget.contexts_per_step} contexts of "
            f"{args.context_size} tokens: {step_tokens} tokens for batch_size {batch_size}); ask for at least that"
        )
    available, real = count_contexts(args, source, budget.contexts, budget.contexts_per_step)
    if available < budget.contexts_per_step or not real:
        raise UserError(
            f"dataset '{args.dataset}' yields too few tokens to train on (one step needs "
            f"{budget.contexts_per_step} contexts of {args.context_size} tokens)"
        )
    counted = available if corpus.is_local(args.dataset) else None
    budget = step_budget(args.tokens, batch_size, args.context_size, args.workers, available_contexts=counted)
    if budget.short:
        checks.warn(
            f"dataset '{args.dataset}' holds {available} contexts: training {budget.total_steps} steps instead of "
            f"the {budget.wanted_steps} that --tokens {args.tokens} asks for",
            progress,
        )
    return budget


def count_contexts(args: TrainArgs, source: Source, wanted: int, per_step: int) -> tuple[int, bool]:
    """(contexts, whether any holds a real token) of the training split, counted up to what the
    run wants without keeping any (memory stays flat whatever the corpus). A local source is
    counted up to `wanted`, so a run asking for more is shortened and warned about; a Hub
    dataset (streamed, possibly billions of tokens) only up to one step: reading it all up front
    would cost a whole pass, so a stream that ends before the planned contexts fails the run at
    that point with one line (`corpus_stream.read_contexts`)."""
    limit = wanted if corpus.is_local(args.dataset) else per_step
    texts = corpus.split_texts(args.dataset, "train", args.text_column)
    n, real = 0, False
    for context in itertools.islice(corpus.iter_contexts(texts, source.tokenizer, args.context_size), limit):
        n += 1
        real = real or bool(corpus.valid_mask(context, list(source.special)).any())
    return n, real


def held_out_contexts(args: TrainArgs, source: Source):
    """The held-out contexts of the evaluation, packed here ((n, context_size) token ids)."""
    texts = corpus.split_texts(args.dataset, "eval", args.text_column)
    evals = corpus.pack_contexts(texts, source.tokenizer, args.context_size, args.eval_contexts)
    if len(evals) == 0:
        raise UserError(f"dataset '{args.dataset}' has no held-out documents to evaluate on")
    return evals


def build_plan(args: TrainArgs, info: dict, name: str, hooks, source: Source, cfg, budget: StepBudget) -> RunPlan:
    """The RunPlan from what the pass learnt; a resumed run keeps its length, step and MLflow runs."""
    hook = hooks[0]  # the plan's SaeMeta is the first hook's (RunPlan.for_hook gives each hook's)
    hook_runs = info.get("hook_run_ids", {})  # a resumed run of several hooks: each hook's MLflow run
    stream = StreamSpec(
        source.spec,
        hooks,
        source.special,
        args.context_size,
        budget.contexts_per_step,
        args.workers,
        first_step=int(info.get("step", 0)),
        precision=producer_precision(args),
    )
    return RunPlan(
        args=args,
        variant_name=args.variant,
        variant=cfg,
        stream=stream,
        loop=LoopSettings(info.get("total_steps") or budget.total_steps, args.log_every, args.checkpoint_every),
        sae_meta=SaeMeta(args.model, hook.name, hook.layer, args.context_size, args.dataset),
        eval_suites=tuple(eval_suites.parse_suites(args.eval_suites)) if args.eval_suites else (),
        max_l0=args.max_l0 or source.d_in / 2,
        resume_from=args.resume,
        name=name,
        tracking=TrackingTarget(
            run_id=info.get("run_id", ""), hook_run_ids=tuple(hook_runs[h.name] for h in hooks) if hook_runs else ()
        ),
        model_params=parameter_count(source.config),
    )


def producer_precision(args: TrainArgs) -> str:
    """--precision as the producers will run it: decided here, on the machine they run on, for a
    private local Ray (so the run can say which precision ran); left to each producer on an
    attached cluster, whose nodes may differ from the driver's."""
    if attached(args.address):
        return args.precision
    return resolve_precision(args.precision, compute_device()[0])


def parameter_count(config) -> int:
    """About how many parameters the whole model has, from its config (embeddings, attention
    and MLP weights; norms left out): what the GPU defaults call a large model."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    attention = 2 * hidden * config.num_attention_heads * head_dim + 2 * hidden * kv_heads * head_dim
    return int(config.vocab_size * hidden + layers * (attention + 3 * hidden * config.intermediate_size))


# -- variants ------------------------------------------------------------------------------------


def variant_class(name: str) -> type[variants.Variant]:
    if name not in variants.names():
        raise UserError(str(variants.UnknownVariant(name)))
    return variants.get(name)


def variant_names(text: str, flag: str = "--variant", among: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """A variant list flag: NAME, a comma-separated list or 'all' (every registered variant, or
    `among`: a study's), each a known variant (and one of `among`), in order, once each."""
    known = tuple(among) if among is not None else tuple(variants.names())
    if text.strip() == "all":
        return known
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UserError(f"{flag}: expected a variant name, a comma-separated list or 'all'")
    for name in names:
        variant_class(name)
        if name not in known:
            raise UserError(f"{flag}: {name} is not in this study ({', '.join(known)})")
    return names


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


# -- what tune and study add ---------------------------------------------------------------------


def load_spaces(args: TuneArgs) -> list[TuneSpace]:
    """--variant's tune spaces (tune_spaces/NAME.yaml, or --space for one variant), as --objective
    and --search-alg will search them."""
    names = variant_names(args.variant)
    if args.space and len(names) > 1:
        raise UserError("--space: expected one variant with a space file (a list or 'all' uses tune_spaces/NAME.yaml)")
    spaces = []
    for name in names:
        path = Path(args.space) if args.space else search_space.default_space_path(name)
        if not path.is_file():
            raise UserError(f"{path}: no tune space for variant '{name}' (pass --space FILE)")
        space = search_space.load(path, name)
        if args.objective == "pareto":
            space = space.as_pareto()
        elif args.objective == "single":
            space = space.as_single()
        if args.search_alg == "optuna" and space.has_grid:
            field_name = next(k for k, v in space.params.items() if v["sampler"] == "grid")
            raise UserError(
                f"{path}: params.{field_name}.sampler: expected a sampler Optuna can draw from "
                "(choice, uniform, loguniform, randint); grid needs --search-alg random"
            )
        spaces.append(space)
    return spaces


def study_papers(seed: str) -> tuple[claims.Study, ...]:
    """SEED of `saeforge study`: one paper's study, or every paper's ('all')."""
    if seed == "all":
        return tuple(claims.STUDIES.values())
    if seed not in claims.STUDIES:
        raise UserError(f"unknown study '{seed}' (known: {', '.join(claims.seed_names())}, all)")
    return (claims.STUDIES[seed],)


def parse_targets(text: str) -> tuple[float, ...]:
    try:
        targets = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UserError(f"--targets: expected comma-separated numbers, got '{text}'") from None
    if not targets:
        raise UserError("--targets: expected at least one target L0, e.g. 32,64,128")
    if any(not math.isfinite(t) or t < 1 for t in targets):
        raise UserError(f"--targets: every target L0 must be at least 1, got '{text}'")
    return tuple(dict.fromkeys(targets))


def study_suite_options(args: StudyArgs) -> dict[str, dict]:
    """The study's suite sizes (`STUDY_SUITE_SIZES`; core and groups on the --eval-contexts
    held-out contexts), then what --eval-set gives."""
    given = parse_options(args.eval_options)
    held_out = {"contexts": args.eval_contexts}
    base = {**STUDY_SUITE_SIZES, "core": held_out, "groups": held_out}
    return {k: {**base.get(k, {}), **given.get(k, {})} for k in {*base, *given}}


def check_study_overrides(study: StudyPlan, d_in: int, d_sae: int) -> None:
    """Every --set names a field some SAE of the study has, and every SAE builds at the run's
    sizes with the values it is given."""
    fields_of = {name: variants.get(name).Config.field_types() for name in study.variants}
    for key in study.overrides:
        if not any(key in f for f in fields_of.values()):
            raise UserError(f"--set {key}: no SAE of this study has that config field")
    for name in study.variants:
        variant_config(name, d_in, d_sae, {k: v for k, v in study.overrides.items() if k in fields_of[name]})
