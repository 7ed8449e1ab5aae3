"""Hook points: where in the model an SAE reads (and, in evaluation, writes) activations.

A HookPoint is (layer, site). Sites are the residual stream after a block and the outputs of the
block's attention and MLP modules; adding a site is one entry in SITES. Several hook points can
be captured in one forward pass, and the deepest one decides how much of the model is loaded.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from saeforge.core.model import decoder_layers
from saeforge.errors import UserError

# site -> how to find the module whose output is the activation, given the decoder block
SITES: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "resid_post": lambda block: block,
    "attn_out": lambda block: block.self_attn,
    "mlp_out": lambda block: block.mlp,
}


@dataclass(frozen=True)
class HookPoint:
    layer: int
    site: str = "resid_post"

    @property
    def name(self) -> str:
        """SAELens-style hook name, e.g. blocks.6.hook_resid_post."""
        return f"blocks.{self.layer}.hook_{self.site}"

    @classmethod
    def parse(cls, text: str) -> HookPoint:
        """Accept '6', 'resid_post:6', 'mlp_out:3' or 'blocks.6.hook_resid_post'."""
        text = str(text).strip()
        match = re.fullmatch(r"blocks\.(\d+)\.hook_(\w+)", text) or re.fullmatch(r"(?:(\w+):)?(\d+)", text)
        if not match:
            raise UserError(f"bad hook '{text}': use LAYER, SITE:LAYER or blocks.LAYER.hook_SITE")
        if text.startswith("blocks."):
            layer, site = int(match.group(1)), match.group(2)
        else:
            site, layer = match.group(1) or "resid_post", int(match.group(2))
        if site not in SITES:
            raise UserError(f"unknown hook site '{site}' (known: {', '.join(SITES)})")
        return cls(layer, site)

    def check(self, n_layers: int, model_name: str) -> None:
        if not 0 <= self.layer < n_layers:
            raise UserError(
                f"layer {self.layer} is out of range: {model_name} has {n_layers} layers (0-{n_layers - 1})"
            )

    def module(self, model) -> torch.nn.Module:
        return SITES[self.site](decoder_layers(model)[self.layer])


def layers_needed(hooks: list[HookPoint]) -> int:
    """How many decoder blocks a producer must load to compute every hook."""
    return max(h.layer for h in hooks) + 1


def _output_tensor(output):
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture(model, hooks: list[HookPoint]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of every hook point during forward passes inside the block."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for hook in hooks:

        def record(module, inputs, output, name=hook.name):
            captured[name] = _output_tensor(output)

        handles.append(hook.module(model).register_forward_hook(record))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def replace(model, hook: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the hook point's output with fn(output) during forward passes inside the block
    (splicing an SAE in, or ablating the site)."""

    def swap(module, inputs, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = hook.module(model).register_forward_hook(swap)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def block_input(model, layer: int) -> Iterator[dict[str, torch.Tensor]]:
    """Record the hidden states entering decoder block `layer` during forward passes inside the
    block (key "hidden"), for `skip_blocks_before` to hand to later passes over the same ids."""
    seen: dict[str, torch.Tensor] = {}

    def record(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    handle = decoder_layers(model)[layer].register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def skip_blocks_before(model, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """During forward passes inside the block, decoder blocks 0..layer-1 are not run: each
    returns `hidden`, what entered block `layer` in an earlier pass over the same token ids
    (`block_input`). A pass that only changes a hook at `layer` or later (the evaluation's
    spliced and zero-ablated passes) then costs the blocks from `layer` on, and computes exactly
    what the whole pass would: those blocks see the same input."""
    blocks = list(decoder_layers(model))[:layer]
    for block in blocks:
        block.forward = lambda *args, **kwargs: hidden  # an instance attribute shadows the method
    try:
        yield
    finally:
        for block in blocks:
            del block.forward
