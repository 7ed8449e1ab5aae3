"""The SAE artifact: one folder in SAELens's layout, cfg.json + sae_weights.safetensors.

This module owns every convention of that folder: its file names, its cfg.json (SAELens's keys,
the run's metadata, and a `saeforge` section naming the variant, its full config and the
activation scale), safetensors for weights (never pickle), and replacing a folder atomically (the
old one survives a crash at any point). What SAELens needs beyond the state dict comes from the
variant's own hooks (`saelens_fields`, `saelens_tensors`), never from reading its config here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file

import variants
from saeforge.errors import UserError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAE_DIR = "sae"  # the SAE folder's name inside a checkpoint and among a run's MLflow artifacts


@dataclass(frozen=True)
class SaeMeta:
    """What cfg.json records about where an SAE reads: the model, the hook, the contexts, the data."""

    model_name: str
    hook_name: str
    hook_layer: int
    context_size: int
    dataset_path: str


def sae_cfg(variant: variants.Variant, meta: SaeMeta) -> dict:
    """The cfg.json contents: SAELens keys, the run's metadata, and saeforge's own section."""
    return {
        "architecture": variant.architecture,
        "d_in": variant.cfg.d_in,
        "d_sae": variant.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "expected_average_only_in",
        "prepend_bos": True,
        "hook_head_index": None,
        **asdict(meta),
        **variant.saelens_fields(),
        "saeforge": {
            "variant": variant.name,
            "config": variant.cfg.to_dict(),
            "act_scale": float(variant.act_scale),
        },
    }


def _tensors(variant: variants.Variant) -> dict[str, torch.Tensor]:
    state = variant.state_dict()
    extras = {k: v for k, v in variant.saelens_tensors().items() if k not in state}
    return {k: v.detach().cpu().contiguous() for k, v in {**state, **extras}.items()}


def replace_folder(staging: Path, folder: Path) -> None:
    """Move the complete folder `staging` to `folder`. An existing `folder` is first renamed
    aside and deleted only once the new one is in place, so a crash at any point leaves either
    the old folder or the new one, and `readable_folder` finds it."""
    backup = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(folder, backup)
    os.replace(staging, folder)
    shutil.rmtree(backup, ignore_errors=True)


def readable_folder(folder: str | Path) -> Path:
    """`folder`, or its backup when a crash interrupted `replace_folder` between its two renames."""
    folder = Path(folder)
    backup = folder.with_name(f".{folder.name}.old")
    return backup if not folder.exists() and backup.exists() else folder


def save_sae(variant: variants.Variant, folder: str | Path, meta: SaeMeta) -> Path:
    """Write the SAE folder atomically (a crash never leaves a half-written SAE behind)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    save_file(_tensors(variant), str(staging / WEIGHTS_FILE))
    (staging / CFG_FILE).write_text(json.dumps(sae_cfg(variant, meta), indent=2))
    replace_folder(staging, folder)
    return folder


def is_sae_folder(folder: str | Path) -> bool:
    folder = readable_folder(folder)
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def read_cfg(folder: str | Path) -> dict:
    path = readable_folder(folder) / CFG_FILE
    try:
        cfg = json.loads(path.read_text())
        cfg["saeforge"]["variant"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"'{folder}' is not a saved saeforge SAE (no readable {CFG_FILE})") from None
    return cfg


def _rebuild(cfg: dict, tensors: dict[str, torch.Tensor], where: str) -> variants.Variant:
    own = cfg["saeforge"]
    variant = variants.from_config_dict(own["variant"], own["config"])
    missing = [k for k in variant.state_dict() if k not in tensors]
    if missing:
        raise UserError(f"'{where}' is missing weights: {', '.join(missing)}")
    variant.load_state_dict({k: tensors[k] for k in variant.state_dict()})  # SAELens-only extras ignored
    return variant


def load_sae(folder: str | Path, device: str = "cpu") -> tuple[variants.Variant, dict]:
    """Rebuild the variant from cfg.json and load its weights (and act_scale)."""
    cfg = read_cfg(folder)
    tensors = load_file(str(readable_folder(folder) / WEIGHTS_FILE))
    return _rebuild(cfg, tensors, str(folder)).to(device).eval(), cfg


def to_bytes(variant: variants.Variant, cfg: dict) -> dict:
    """The SAE as plain bytes and JSON, to ship to a Ray task without a shared folder."""
    return {"cfg": cfg, "weights": save(_tensors(variant))}


def from_bytes(payload: dict) -> variants.Variant:
    return _rebuild(payload["cfg"], load(payload["weights"]), "payload").eval()
