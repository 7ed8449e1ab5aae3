"""The typed plans: what validation produced, built once in the driver. A run's `RunPlan` is
shipped whole to every Ray Train worker and Tune trial (frozen and picklable; nothing in it is
re-parsed); a study adds its `StudyPlan`.

A Tune trial derives its own plan with `dataclasses.replace(plan, variant=..., loop=...)` from
the sampled values, once. The token contexts themselves are not in the plan: `Contexts` describes
the training contexts (`CorpusRange`), which a Ray Data read task packs into the activation
dataset's input (`corpus_stream`), and holds the few held-out ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

import variants
from saeforge.core import corpus
from saeforge.core.hooks import HookPoint
from saeforge.core.model import ModelSpec, load_tokenizer
from saeforge.core.sae_files import SaeMeta
from saeforge.core.training import LoopSettings
from saeforge.jobs.arguments import TrainArgs


@dataclass(frozen=True)
class StreamSpec:
    """The activation stream: what a producer actor computes and how a step's batch is cut.
    A row of the stream is one whole context: its id, its activations at every hook, its mask."""

    model: ModelSpec
    hooks: tuple[HookPoint, ...]
    special_ids: tuple[int, ...]
    context_size: int
    contexts_per_step: int  # global, over every data-parallel worker
    workers: int
    first_step: int = 0  # the step the stream's first context belongs to (a resumed run's checkpoint step)
    precision: str = "float32"  # the slice's forward: float32, bfloat16, or auto (each producer decides)

    @property
    def contexts_per_worker(self) -> int:
        return self.contexts_per_step // self.workers


@dataclass(frozen=True)
class Resources:
    """How the run uses the cluster: whether the activations are all made before training
    (`produce_first`) or streamed into it, GPUs per actor and worker, torch threads in each, and
    the custom resources each producer and worker asks for (--producer-resources,
    --worker-resources: they pin producers and workers to the node types that offer them)."""

    produce_first: bool = False

    gpus_per_producer: float = 0.0
    gpus_per_worker: float = 0.0
    producer_threads: int = 1
    worker_threads: int = 1
    producer_resources: dict[str, float] = field(default_factory=dict)
    worker_resources: dict[str, float] = field(default_factory=dict)

    def per_worker(self) -> dict[str, float]:
        """What one SAE worker asks Ray for (a Ray Train worker, or a Tune trial that trains in
        its own process): a CPU, its GPU share, its custom resources."""
        gpus = {"GPU": self.gpus_per_worker} if self.gpus_per_worker > 0 else {}
        return {"CPU": 1, **gpus, **self.worker_resources}


@dataclass(frozen=True)
class TrackingTarget:
    """Where the run is recorded: the MLflow store, its experiment and run, the registered model."""

    uri: str = ""
    experiment_id: str = ""
    run_id: str = ""
    registered_model: str = ""
    hook_run_ids: tuple[str, ...] = ()  # a run of several hooks: each hook's MLflow run, in stream.hooks' order


@dataclass(frozen=True)
class RunPlan:
    args: TrainArgs  # as validated; checkpoints keep them so --resume rebuilds the same plan
    variant_name: str
    variant: variants.VariantConfig
    stream: StreamSpec
    loop: LoopSettings
    sae_meta: SaeMeta
    eval_suites: tuple[str, ...]  # extra suites after the core evaluation, already checked
    max_l0: float
    resources: Resources = Resources()
    tracking: TrackingTarget = TrackingTarget()
    resume_from: str = ""  # a checkpoint folder
    name: str = ""  # the run's name: its folder under --storage, its MLflow run name
    progress_board: str = ""  # the named actor rank 0 posts its progress lines to ("": none)
    model_params: int = 0  # the whole model's parameter count, from its config (GPU defaults read it)

    @property
    def hook(self) -> HookPoint:
        return self.stream.hooks[0]

    @property
    def run_ids(self) -> tuple[str, ...]:
        """The MLflow run of each hook's SAE, in the order of `stream.hooks`."""
        return self.tracking.hook_run_ids or (self.tracking.run_id,)

    def sae_meta_of(self, hook: HookPoint) -> SaeMeta:
        """What cfg.json records for the SAE of `hook`."""
        return dataclasses.replace(self.sae_meta, hook_name=hook.name, hook_layer=hook.layer)

    def for_hook(self, hook: HookPoint) -> RunPlan:
        """The plan of one hook's SAE alone: its stream reads that hook's column (of a stream that
        may carry several), its SaeMeta and MLflow run are the hook's."""
        i = self.stream.hooks.index(hook)
        run_id = self.tracking.hook_run_ids[i] if self.tracking.hook_run_ids else self.tracking.run_id
        return dataclasses.replace(
            self,
            stream=dataclasses.replace(self.stream, hooks=(hook,)),
            sae_meta=self.sae_meta_of(hook),
            tracking=dataclasses.replace(self.tracking, run_id=run_id, hook_run_ids=()),
        )

    def build_variant(self) -> variants.Variant:
        return variants.get(self.variant_name)(self.variant)


@dataclass(frozen=True)
class CorpusRange:
    """The training contexts a run reads, described rather than held: contexts `start` up to
    `stop` (their ids) of the training split of `dataset`, packed by `corpus.iter_contexts` with
    `model`'s tokenizer. Small and picklable: the driver ships it to the Ray Data read task that
    tokenises and packs it (`activation_stream.corpus_dataset`), so the corpus never passes
    through the driver. `counted`: validation counted that the source holds them all (a local
    source); a Hub dataset is streamed and may end sooner, which the read task reports."""

    dataset: str
    text_column: str
    model: ModelSpec
    context_size: int
    start: int
    stop: int
    counted: bool = True

    def __len__(self) -> int:
        return self.stop - self.start

    def blocks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(id of the first context, (n, context_size) int32 contexts) blocks of `size`, in order."""
        texts = corpus.split_texts(self.dataset, "train", self.text_column)
        tokenizer = load_tokenizer(self.model)
        yield from corpus.context_blocks(texts, tokenizer, self.context_size, self.start, self.stop, size)

    def pack(self) -> np.ndarray:
        """Every context of the range in one array, in this process: for local tools and tests on
        small corpora (a training run never calls it)."""
        arrays = [contexts for _, contexts in self.blocks(1024)]
        return np.concatenate(arrays) if arrays else np.zeros((0, self.context_size), dtype=np.int32)


@dataclass(frozen=True)
class Contexts:
    """The token contexts a run reads (driver side): the training contexts described (what is left
    to train: a resumed run starts after its checkpoint's step), the few held-out contexts of the
    evaluation as one (n, context_size) int32 array."""

    train: CorpusRange
    eval: np.ndarray


# The evaluation suites' sizes in a study unless --eval-set says otherwise: smaller than `saeforge
# eval`'s, so that a study's many SAEs fit a CPU; core and groups read --eval-contexts contexts.
STUDY_SUITE_SIZES = {
    "probing": {"train_size": 100, "test_size": 50, "ks": (1, 5)},
    "unlearning": {"train_contexts": 16, "eval_contexts": 8},
    "disentanglement": {"contexts": 16},
}


@dataclass(frozen=True)
class StudyPlan:
    """What a study adds to its RunPlan: the papers, the SAEs, the target L0s, the seeds, the
    `--set` values every SAE that has the field gets, the suites and their options."""

    studies: tuple  # core.study.claims.Study
    variants: tuple[str, ...]
    targets: tuple[float, ...]
    seeds: int
    overrides: dict
    suites: tuple[str, ...]
    suite_options: dict
