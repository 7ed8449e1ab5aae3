"""The activation stream: Ray Data actors host a Gemma slice and emit activations into the object
store, where Ray Train workers read them.

Ray Data's streaming executor is the buffer between producers and trainers (backpressure,
retries, actor restarts); there is no hand-written queue. Two batch layouts leave a producer:
"tokens" (one row per real token, BOS/padding dropped) and "contexts" (whole contexts with a mask,
for variants that need token order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from saeforge.corpus import valid_mask
from saeforge.hooks import HookPoint, capture, layers_needed
from saeforge.model import ModelSpec, load_model, run_slice

MASK_COLUMN = "mask"


@dataclass(frozen=True)
class ProducerSpec:
    """Everything a producer actor needs (picklable, sent to every actor)."""

    model: ModelSpec
    hooks: tuple[HookPoint, ...]
    special_ids: tuple[int, ...]
    layout: str = "tokens"  # "tokens" | "contexts"
    threads: int = 2


def producer_device() -> tuple[str, torch.dtype]:
    """bf16 on GPU; fp32 on CPU, where bf16 measured slower (NOTES-APIS.md)."""
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


class ActivationProducer:
    """Ray Data actor class: loads the model slice once, then maps token batches to activations."""

    def __init__(self, spec: ProducerSpec):
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.device, dtype = producer_device()
        self.model = load_model(spec.model, n_layers=layers_needed(list(spec.hooks)), dtype=dtype, device=self.device)
        self.batches_done = 0

    def activations(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode(), capture(self.model, list(self.spec.hooks)) as captured:
            run_slice(self.model, input_ids)
        return {name: t.float() for name, t in captured.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = torch.from_numpy(np.asarray(batch["input_ids"], dtype=np.int64)).to(self.device)
        mask = valid_mask(ids, list(self.spec.special_ids))
        acts = self.activations(ids)
        self.batches_done += 1
        if self.spec.layout == "tokens":
            return {name: a[mask].cpu().numpy() for name, a in acts.items()}
        return {**{name: a.cpu().numpy() for name, a in acts.items()}, MASK_COLUMN: mask.cpu().numpy()}


def activation_dataset(contexts: np.ndarray, spec: ProducerSpec, *, producers: int, batch_contexts: int = 16,
                       gpus_per_producer: float = 0.0, cpus_per_producer: float = 1.0,
                       producer: type | None = None):
    """A lazy Ray Dataset of activations for `contexts` ((n, context_size) token ids).
    `producer`: an ActivationProducer subclass to use instead (e.g. one that counts batches)."""
    import ray

    n_blocks = max(producers * 4, len(contexts) // (batch_contexts * 8), 1)
    blocks = [b for b in np.array_split(contexts, min(n_blocks, len(contexts))) if len(b)]
    ds = ray.data.from_numpy(blocks).rename_columns({"data": "input_ids"})
    return ds.map_batches(
        producer or ActivationProducer,
        fn_constructor_kwargs={"spec": spec},
        batch_size=batch_contexts,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=producers),
        num_gpus=gpus_per_producer,
        num_cpus=cpus_per_producer,
    )


def iterate_batches(shard, spec: ProducerSpec, column: str, batch_rows: int, shuffle_rows: int,
                    device: str | torch.device = "cpu"):
    """(activations, mask) torch batches on `device` from a Ray Data shard (mask is None for
    token rows). Token rows are shuffled locally (buffer of `shuffle_rows`); contexts keep their
    order.
    """
    contexts = spec.layout == "contexts"
    for batch in shard.iter_torch_batches(
        batch_size=batch_rows, drop_last=True, device=device,
        local_shuffle_buffer_size=None if contexts else shuffle_rows,
    ):
        yield batch[column], (batch[MASK_COLUMN].bool() if contexts else None)
