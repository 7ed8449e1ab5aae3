"""The one argument model: what every verb accepts, as dataclasses whose fields carry their help.

The drivers take these dataclasses; the command line generates each verb's flags and help from
the same fields (`saeforge.cli.flags`), so no flag is declared twice and train, tune and bench
share the groups they have in common. A field's metadata: `help`; optionally `flag` (default
--field-name), `choices`, `metavar`, `minimum` (checked by `check_ranges`), `pairs` (a repeatable
NAME=VALUE flag), `positional`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from saeforge.core.corpus import BUILTIN
from saeforge.core.hooks import SITES
from saeforge.core.model import DEFAULT_MODEL, PRECISIONS
from saeforge.errors import UserError

DEFAULT_MAX_FAILURES = 3  # --max-failures


def opt(default: Any, help: str, **meta) -> Any:
    """A field of the argument model: its default, its help text and how the flag looks."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def model_uri() -> Any:
    """The positional MODEL_URI of the verbs that read a registered or saved SAE (eval, browse)."""
    return opt(
        "",
        "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID[/PATH] or a saved SAE folder",
        positional=True,
        metavar="MODEL_URI",
    )


@dataclass
class SourceArgs:
    """Where the activations come from: the model, the hook point and the text."""

    model: str = opt(
        DEFAULT_MODEL,
        "'gemma-3-270m' (packaged, default), 'tiny' / 'tiny-gemma2' (random, for tests), "
        "a Hugging Face id (e.g. google/gemma-2-2b) or a local model folder",
    )
    layer: str = opt(
        "6",
        "layer whose output is hooked (default %(default)s); train and tune take a comma-separated list "
        "(e.g. 3,6,9): one model pass, one SAE per layer",
        metavar="LAYER[,LAYER...]",
    )
    site: str = opt("resid_post", "what to read at that layer (default %(default)s)", choices=tuple(SITES))
    dataset: str = opt(
        BUILTIN,
        "'wiki' (built-in Wikipedia summaries), a datasets Hub id, "
        "or local .txt/.jsonl/.parquet files (default %(default)s)",
    )
    text_column: str = opt("text", "text column of a dataset (default %(default)s)")
    context_size: int = opt(128, "tokens per context, BOS included (default %(default)s)", minimum=2)
    precision: str = opt(
        "auto",
        "how the producers run the model slice: float32, or bfloat16 (on a GPU the weights; on a CPU the "
        "matmuls only, under autocast, norms and residual stream in float32); 'auto' (default): bfloat16 on "
        "a GPU, and on a CPU where its bfloat16 matmuls measure at least 1.3x faster than float32",
        choices=PRECISIONS,
    )


@dataclass
class ClusterArgs:
    """Where and how wide the run goes on Ray."""

    producers: int = opt(1, "model-slice actors (default %(default)s)", minimum=1)
    workers: int = opt(1, "data-parallel SAE workers per run or trial (default %(default)s)", minimum=1)
    storage: str = opt("saeforge_runs", "folder for Ray Train / Tune runs and checkpoints (default %(default)s)")
    address: str = opt("", "Ray cluster address (default: RAY_ADDRESS, else a private local Ray)")
    gpus_per_producer: str = opt(
        "auto",
        "GPUs each producer actor asks Ray for, e.g. 1 or 0.5 (default auto: shares of the GPUs the "
        "cluster has; on an attached cluster with none yet, 1 for a model of a billion parameters or more, "
        "so an autoscaler adds GPU nodes)",
    )
    gpus_per_worker: str = opt("auto", "GPUs each SAE worker asks Ray for (default auto, as --gpus-per-producer)")
    producer_resources: list = opt(
        [],
        "a custom Ray resource each producer actor asks for (repeatable), e.g. producer=1: producers then "
        "run only on nodes that offer it (`ray start --resources`, a node type's `resources` in cluster.yaml)",
        metavar="NAME=AMOUNT",
        pairs=True,
    )
    worker_resources: list = opt(
        [],
        "a custom Ray resource each SAE worker asks for (repeatable), e.g. trainer=1: as --producer-resources",
        metavar="NAME=AMOUNT",
        pairs=True,
    )
    max_failures: int = opt(
        DEFAULT_MAX_FAILURES,
        "crashes survived before the run fails (default %(default)s): Ray Train restarts lost SAE "
        "workers from the latest checkpoint up to N times per run (per trial in a search; Tune restarts "
        "a one-worker trial from its start), and each producer actor is restarted and its batch "
        "retried up to N times; 0: the first crash ends the run",
        minimum=0,
        metavar="N",
    )


@dataclass
class SaeSizeArgs:
    d_sae: int = opt(0, "number of latents (default 8 x d_in)", minimum=0)
    eval_contexts: int = opt(16, "held-out contexts for the core evaluation (default %(default)s)", minimum=1)
    max_l0: float = opt(0.0, "highest L0 a champion may have (default d_in / 2)", minimum=0)


@dataclass
class TrainArgs(SourceArgs, ClusterArgs, SaeSizeArgs):
    """Everything `saeforge train` accepts."""

    variant: str = opt("topk", "SAE variant (default %(default)s; `saeforge variants` lists them)")
    overrides: list = opt(
        [],
        "set a variant config field (repeatable; `saeforge variants NAME` lists them)",
        flag="--set",
        metavar="NAME=VALUE",
        pairs=True,
    )
    tokens: int = opt(300_000, "activation tokens to train on (default %(default)s)", minimum=1)
    eval_contexts: int = opt(
        64, "held-out contexts for the core evaluation (default %(default)s, 8k tokens)", minimum=1
    )
    eval_suites: str = opt(
        "",
        "more evaluation suites after the core one, e.g. probing,unlearning or all (see `saeforge eval --help`)",
        flag="--eval",
        metavar="SUITES",
    )
    checkpoint_every: int = opt(100, "steps between checkpoints (default %(default)s)", minimum=1)
    log_every: int = opt(10, "steps between progress lines and logged metrics (default %(default)s)", minimum=1)
    stream: str = opt(
        "auto",
        "'on': producers stream activations into training as they are made; 'off': make them all "
        "first (every core on each phase in turn), then train on them from the object store; "
        "'auto' (default): off on a private local Ray when they fit in a third of its object "
        "store, on otherwise",
        choices=("auto", "on", "off"),
    )
    run_name: str = opt("", "name of the run (default: variant-hook-time)")
    resume: str = opt("", "resume from a checkpoint folder or a run folder under --storage", metavar="PATH")


@dataclass
class TuneArgs(SourceArgs, ClusterArgs, SaeSizeArgs):
    """Everything `saeforge tune` accepts."""

    variant: str = opt("relu", "variant, comma-separated variants, or 'all' (default %(default)s)")
    space: str = opt("", "tune-space YAML (default tune_spaces/VARIANT.yaml)", metavar="FILE")
    samples: int = opt(8, "trials per variant (default %(default)s)", minimum=1)
    max_concurrent: int = opt(0, "trials at once (default: from the resources)", minimum=0)
    scheduler: str = opt(
        "asha", "asha stops bad trials early (default); fifo runs every trial to the end", choices=("asha", "fifo")
    )
    search_alg: str = opt("optuna", "search algorithm (default %(default)s)", choices=("optuna", "random"))
    objective: str = opt(
        "space",
        "space: as the space file says (default); single: CE loss recovered under the "
        "constraints; pareto: (L0 min, CE loss recovered max)",
        choices=("space", "single", "pareto"),
    )
    tokens_per_trial: int = opt(100_000, "activation tokens each trial trains on (default %(default)s)", minimum=1)
    activations: str = opt(
        "", "activation cache folder: reused if it holds one, else written (default: object store only)", metavar="PATH"
    )
    report_every: int = opt(0, "steps between intermediate reports (default: ~10 per trial)", minimum=0)
    grace_period: int = opt(
        0, "steps before ASHA may stop a trial (default: the space's, else a quarter of a trial)", minimum=0
    )
    seed: int = opt(0, "seed of the search algorithm (default %(default)s)")
    name: str = opt("", "prefix of the search names (default 'tune')")


@dataclass
class StudyArgs(SourceArgs, ClusterArgs, SaeSizeArgs):
    """Everything `saeforge study` accepts (docs/study.md)."""

    study: str = opt(
        "",
        "seed paper to reproduce: group_ib, mi_ortho, cubic_ortho, contrastive_hier, hsae, or all",
        positional=True,
        metavar="SEED",
    )
    targets: str = opt("32,64,128", "target L0s, comma-separated: every SAE is brought to each (default %(default)s)")
    seeds: int = opt(3, "seeds of each final SAE (default %(default)s)", minimum=1)
    tokens: int = opt(100_000, "activation tokens every SAE trains on, produced once (default %(default)s)", minimum=1)
    batch_size: int = opt(
        1024, "activation tokens per optimiser step, the same for every SAE (default %(default)s)", minimum=1
    )
    tolerance: float = opt(0.15, "relative L0 tolerance of the match (default %(default)s)", minimum=0.0)
    rounds: int = opt(4, "rounds of the L0 search per target after the first (default %(default)s)", minimum=0)
    only: str = opt("", "only these of the study's variants, comma-separated (default: all of them)", metavar="A,B")
    overrides: list = opt(
        [],
        "set a config field of every SAE that has it (repeatable), e.g. lr=1e-3",
        flag="--set",
        metavar="NAME=VALUE",
        pairs=True,
    )
    eval_options: list = opt(
        [],
        "an evaluation suite option for every SAE (repeatable; `saeforge eval --help` lists them)",
        flag="--eval-set",
        metavar="SUITE.OPTION=VALUE",
        pairs=True,
    )
    activations: str = opt(
        "", "activation cache folder: reused if it holds one, else written (default: object store only)", metavar="PATH"
    )
    max_concurrent: int = opt(0, "SAEs trained at once (default: from the resources)", minimum=0)
    name: str = opt("", "name of the study run and its folder under --storage (default study-SEED-time)")


@dataclass
class EvalArgs:
    """Everything `saeforge eval` accepts."""

    uri: str = model_uri()
    suites: str = opt("all", "comma-separated suites, or 'all' (default)", flag="--suite")
    out: str = opt("", "JSON report file (default ./eval_<name>.json)")
    run_id: str = opt("", "MLflow run to log to (required to log a bare SAE folder)")
    log: bool = opt(True, "log the metrics to MLflow (--no-log: do not)")
    model: str = opt("", "model to run (default: model_name in the SAE's cfg.json)")
    dataset: str = opt(
        "", "text source of the held-out contexts of core and disentanglement (default: the SAE's training source)"
    )
    options: list = opt(
        [], "a suite option (repeatable; options listed below)", flag="--set", metavar="SUITE.OPTION=VALUE", pairs=True
    )
    batch_contexts: int = opt(8, "sequences per activation forward pass (default %(default)s)", minimum=1)
    use_ray: bool = opt(False, "run each suite as its own Ray task", flag="--ray")
    address: str = opt("", "Ray cluster address with --ray (default: RAY_ADDRESS, else local)")


@dataclass
class BrowseArgs:
    """Everything `saeforge browse` accepts."""

    uri: str = model_uri()
    out: str = opt("", "folder of the site (default ./browser_<name>)", metavar="FOLDER")
    tokens: int = opt(100_000, "held-out tokens to read (default %(default)s)", minimum=1)
    latents: str = opt(
        "frequent",
        "latents that get a page: 'frequent' (the most frequent, default), 'random', 'all' (up to "
        "--max-pages) or comma-separated latent ids",
        metavar="WHICH",
    )
    n_latents: int = opt(100, "pages with --latents frequent or random (default %(default)s)", minimum=1)
    max_pages: int = opt(2048, "the most pages --latents all writes (default %(default)s)", minimum=1)
    top_k: int = opt(20, "top activating contexts kept per latent (default %(default)s)", minimum=1)
    model: str = opt("", "model to run (default: model_name in the SAE's cfg.json)")
    dataset: str = opt(
        BUILTIN, "text whose held-out split is read: 'wiki' (built in, default) or as `saeforge train --dataset`"
    )
    text_column: str = opt("text", "text column of a dataset (default %(default)s)")
    producers: int = opt(1, "model-slice actors reading the text (default %(default)s)", minimum=1)
    batch_contexts: int = opt(16, "contexts per producer forward pass (default %(default)s)", minimum=1)
    seed: int = opt(0, "seed of --latents random and of the quantile samples (default %(default)s)")
    run_id: str = opt("", "MLflow run to log the site to (required to log a bare SAE folder)")
    log: bool = opt(True, "log the site to MLflow as artifacts under browser/ (--no-log: do not)")
    address: str = opt("", "Ray cluster address (default: RAY_ADDRESS, else a private local Ray)")


@dataclass
class CompareArgs:
    """Everything `saeforge compare` accepts."""

    model: str = opt("", "only this model's registered SAEs (e.g. gemma-3-270m)")
    hook: str = opt("", "only this hook point (e.g. blocks.6.hook_resid_post)")
    search: str = opt(
        "", "also list and plot this search's trials (the parent run id `saeforge tune` prints)", metavar="RUN_ID"
    )
    out: str = opt("l0_vs_ce_loss_recovered.png", "plot file (default %(default)s)")
    log: bool = opt(True, "log the plot to MLflow (--no-log: do not)")


@dataclass
class BenchArgs:
    """Everything `saeforge bench` accepts."""

    model: str = opt(DEFAULT_MODEL, "model (default %(default)s)")
    layer: str = opt("6", "hooked layer (default %(default)s)")
    tokens: int = opt(60_000, "tokens per measurement (default %(default)s)", minimum=1)
    d_sae: int = opt(0, "SAE width (default 8 x d_in)", minimum=0)
    variant: str = opt("relu", "variant (default %(default)s)")
    producers: int = opt(1, "producer actors (default %(default)s)", minimum=1)
    variants: str = opt("", "instead: one full training run per variant and a comparison table", metavar="all|A,B")
    eval_contexts: int = opt(16, "held-out contexts per variant run (--variants)", minimum=1)
    step_cost: bool = opt(False, "instead: milliseconds per optimiser step of every variant on the same activations")
    same_work: bool = opt(
        False,
        "instead: a plain single-process loop and `saeforge train` on the same work (--variant, "
        "--tokens, --d-sae, --eval-contexts), each a fresh process timed whole, --rounds times",
    )
    layers: str = opt(
        "",
        "instead: `saeforge train --layer LAYERS` (one model pass, one SAE per layer) and one `saeforge train` "
        "per layer on the same work (--variant, --tokens, --d-sae, --eval-contexts), each a fresh process timed "
        "whole, --rounds times; prints the ratio of wall times",
        metavar="A,B,...",
    )
    rounds: int = opt(2, "rounds of --same-work and --layers (default %(default)s)", minimum=1)
    search: int = opt(
        0,
        "instead: an N-trial `saeforge tune` of --variant (its tune space, FIFO) against the same N trials "
        "as N separate `saeforge train` runs (--tokens each, --eval-contexts), each a fresh process timed whole",
        minimum=0,
        metavar="N",
    )


def train_args_of(args, variant: str, overrides: dict, tokens: int) -> TrainArgs:
    """A search's or a study's flags as a training run's: the groups the verbs share (source,
    cluster, sizes), with the variant, `--set` values and token budget of one SAE."""
    shared = {f.name: getattr(args, f.name) for cls in (SourceArgs, ClusterArgs, SaeSizeArgs) for f in fields(cls)}
    return TrainArgs(**shared, variant=variant, overrides=overrides, tokens=tokens)


def check_ranges(args) -> None:
    """Every field with a `minimum` meets it, or one line naming the flag (before anything runs)."""
    for f in fields(args):
        low = f.metadata.get("minimum")
        if low is not None and getattr(args, f.name) < low:
            raise UserError(f"{flag_name(f)} must be at least {low:g}, got {getattr(args, f.name)}")


def gpu_request(args, name: str) -> float | None:
    """A --gpus-per-* flag as a number of GPUs (None: auto), or one line naming the flag."""
    text = str(getattr(args, name)).strip()
    if text == "auto":
        return None
    flag = "--" + name.replace("_", "-")
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{flag} must be 'auto' or a number of GPUs (e.g. 1 or 0.5), got '{text}'") from None
    if not 0 <= value < 1e6:
        raise UserError(f"{flag} must be 'auto' or a number of GPUs at least 0, got '{text}'")
    return value


RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")  # Ray's own: not custom resources


def resource_request(args, name: str) -> dict[str, float]:
    """A --*-resources flag as {resource: amount}, or one line naming the flag: custom resources
    only (GPUs have their own flags), each a positive number."""
    flag = "--" + name.replace("_", "-")
    out = {}
    for resource, text in pairs_dict(getattr(args, name), "NAME=AMOUNT").items():
        if not resource or resource in RESERVED_RESOURCES:
            raise UserError(
                f"{flag}: '{resource}' is not a custom resource name (GPUs: --gpus-per-producer / --gpus-per-worker)"
            )
        try:
            amount = float(text)
        except ValueError:
            raise UserError(f"{flag} {resource}: the amount must be a number, got '{text}'") from None
        if not 0 < amount < 1e9:
            raise UserError(f"{flag} {resource}: the amount must be above 0, got '{text}'")
        out[resource] = amount
    return out


def flag_name(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def pairs_dict(pairs, what: str = "NAME=VALUE") -> dict[str, Any]:
    """{name: value}, [(name, value), ...] or ['name=value', ...] -> {name: value}."""
    if isinstance(pairs, dict):
        return dict(pairs)
    out = {}
    for item in pairs:  # a pair is a tuple, or a list when read back from JSON (a checkpoint's run.json)
        name, value = item if isinstance(item, (tuple, list)) else split_pair(item, what)
        out[name] = value
    return out


def split_pair(text: str, what: str = "NAME=VALUE") -> tuple[str, str]:
    if "=" not in text:
        raise UserError(f"expected {what}, got '{text}'")
    name, value = text.split("=", 1)
    return name.strip(), value.strip()
