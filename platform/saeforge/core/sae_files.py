"""The SAE artifact: one folder that SAELens 6.x loads, plus saeforge's own state beside it.

- `cfg.json`: SAELens's 6.x keys (architecture, sizes, `normalize_activations: "none"`, the run's
  metadata under `metadata`) and a `saeforge` section (variant, full config, activation scale),
  which SAELens ignores.
- `sae_weights.safetensors`: what SAELens reads, exactly: for the variants that export to a
  SAELens architecture, its tensors in SAELens's names with the activation scale folded into the
  weights (SAELens's convention: W_enc * s, W_dec / s, b_dec / s), so SAELens's `encode` on raw
  activations equals ours; for the others, their parameters under an architecture name of their
  own ("saeforge_<variant>"), which cannot collide with SAELens's.
- `saeforge_state.safetensors`: the variant's whole state dict (normalised units, buffers such as
  act_scale and tokens_since_fired included): what saeforge loads and resumes from, never inside
  the SAELens file.
This module owns those names, safetensors (never pickle) and replacing a folder atomically (the
old one survives a crash at any point). What SAELens needs comes from the variant's own hooks
(`saelens_fields`, `saelens_tensors`), never from reading its config here. See
docs/saelens-interop-notes.md for what SAELens checks.
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
STATE_FILE = "saeforge_state.safetensors"
SAELENS_FORMAT = "6.0.0"  # the cfg.json format written: SAELens reads >= 6.0 without conversion
SAE_FILES = (CFG_FILE, WEIGHTS_FILE, STATE_FILE)
SAE_DIR = "sae"  # the SAE folder's name inside a checkpoint and among a run's MLflow artifacts


@dataclass(frozen=True)
class SaeMeta:
    """What cfg.json records about where an SAE reads: the model, the hook, the contexts, the data."""

    model_name: str
    hook_name: str
    hook_layer: int
    context_size: int
    dataset_path: str

    @classmethod
    def from_cfg(cls, cfg: dict) -> SaeMeta:
        m = cfg["metadata"]
        return cls(m["model_name"], m["hook_name"], int(m["hook_layer"]), int(m["context_size"]), m["dataset_path"])


def sae_cfg(variant: variants.Variant, meta: SaeMeta) -> dict:
    """The cfg.json contents: SAELens 6.x keys, the run's metadata, and saeforge's own section."""
    return {
        "sae_lens_version": SAELENS_FORMAT,
        "architecture": variant.architecture,
        "d_in": variant.cfg.d_in,
        "d_sae": variant.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # the activation scale is folded into the weights
        "reshape_activations": "none",
        "metadata": {
            **asdict(meta),
            "hook_head_index": None,
            "prepend_bos": True,
            "sae_lens_version": SAELENS_FORMAT,
            "sae_lens_training_version": None,
        },
        **variant.saelens_fields(),
        "saeforge": {
            "variant": variant.name,
            "config": variant.cfg.to_dict(),
            "act_scale": float(variant.act_scale),
        },
    }


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to disk: a rename only makes
    a folder durable once what it holds is."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            fsync_path(path)
    for path in [*sorted(p for p in folder.rglob("*") if p.is_dir()), folder]:
        fsync_path(path)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_of(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def replace_folder(staging: Path, folder: Path) -> None:
    """Move the complete folder `staging` to `folder`. An existing `folder` is first renamed
    aside and deleted only once the new one is in place, so a crash at any point leaves either
    the old folder or the new one, and `readable_folder` finds it. Everything is flushed to disk
    before each rename, so a power cut cannot leave a renamed folder of empty files either."""
    backup = backup_of(folder)
    fsync_tree(staging)
    if folder.exists():
        shutil.rmtree(backup, ignore_errors=True)  # a stale backup: `folder` is the good copy
        os.replace(folder, backup)
        fsync_path(folder.parent)
    os.replace(staging, folder)
    fsync_path(folder.parent)
    shutil.rmtree(backup, ignore_errors=True)


def readable_folder(folder: str | Path) -> Path:
    """`folder`, or its backup when a crash interrupted `replace_folder` between its two renames."""
    folder = Path(folder)
    backup = backup_of(folder)
    return backup if not folder.exists() and backup.exists() else folder


def staging_folder(folder: Path) -> Path:
    """A fresh empty folder beside `folder` to write its next version into. Staging folders an
    earlier crash left behind are removed first (one writer per folder)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))


def save_sae(variant: variants.Variant, folder: str | Path, meta: SaeMeta) -> Path:
    """Write the SAE folder atomically (a crash never leaves a half-written SAE behind)."""
    folder = Path(folder)
    staging = staging_folder(folder)
    try:
        with torch.no_grad():
            save_file(_plain(variant.saelens_tensors()), str(staging / WEIGHTS_FILE))
        save_file(_plain(variant.state_dict()), str(staging / STATE_FILE))
        (staging / CFG_FILE).write_text(json.dumps(sae_cfg(variant, meta), indent=2))
        replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless something failed
    return folder


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
    variant.load_state_dict({k: tensors[k] for k in variant.state_dict()})
    return variant


def load_sae(folder: str | Path, device: str = "cpu") -> tuple[variants.Variant, dict]:
    """Rebuild the variant from cfg.json and load its whole state (saeforge_state.safetensors)."""
    cfg = read_cfg(folder)
    path = readable_folder(folder) / STATE_FILE
    if not path.is_file():
        raise UserError(f"'{folder}' is not a saved saeforge SAE (no {STATE_FILE})")
    tensors = load_file(str(path))
    return _rebuild(cfg, tensors, str(folder)).to(device).eval(), cfg


def to_bytes(variant: variants.Variant, cfg: dict) -> dict:
    """The SAE as plain bytes and JSON, to ship to a Ray task without a shared folder."""
    return {"cfg": cfg, "weights": save(_plain(variant.state_dict()))}


def from_bytes(payload: dict) -> variants.Variant:
    return _rebuild(payload["cfg"], load(payload["weights"]), "payload").eval()
