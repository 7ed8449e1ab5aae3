"""Saving and loading SAEs in the SAELens layout: cfg.json + sae_weights.safetensors.

cfg.json carries SAELens's keys (so SAELens, SAEBench and dashboards can read what we train)
plus a `saeforge` section that names the variant, its full config and the activation scale.
Weights are safetensors, never pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

import variants
from saeforge.errors import UserError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


def sae_cfg(variant: variants.Variant, meta: dict) -> dict:
    """The cfg.json contents: SAELens keys, the run's metadata, and saeforge's own section."""
    cfg = {
        "architecture": variant.architecture,
        "d_in": variant.cfg.d_in,
        "d_sae": variant.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "expected_average_only_in",
        "prepend_bos": True,
        "hook_head_index": None,
        **meta,  # model_name, hook_name, hook_layer, context_size, dataset_path
        "saeforge": {
            "variant": variant.name,
            "config": variant.cfg.to_dict(),
            "act_scale": float(variant.act_scale),
        },
    }
    if hasattr(variant.cfg, "k"):
        cfg["activation_fn_kwargs"] = {"k": variant.cfg.k}
    return cfg


def save_sae(variant: variants.Variant, folder: str | Path, meta: dict) -> Path:
    """Write the SAE folder atomically (a crash never leaves a half-written SAE behind)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    state = variant.state_dict()
    extras = {k: v for k, v in variant.saelens_tensors().items() if k not in state}
    tensors = {k: v.detach().cpu().contiguous() for k, v in {**state, **extras}.items()}
    save_file(tensors, str(staging / WEIGHTS_FILE))
    (staging / CFG_FILE).write_text(json.dumps(sae_cfg(variant, meta), indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder


def read_cfg(folder: str | Path) -> dict:
    path = Path(folder) / CFG_FILE
    try:
        cfg = json.loads(path.read_text())
        cfg["saeforge"]["variant"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"'{folder}' is not a saved saeforge SAE (no readable {CFG_FILE})") from None
    return cfg


def load_sae(folder: str | Path, device: str = "cpu") -> tuple[variants.Variant, dict]:
    """Rebuild the variant from cfg.json and load its weights (and act_scale)."""
    cfg = read_cfg(folder)
    own = cfg["saeforge"]
    variant = variants.from_config_dict(own["variant"], own["config"])
    tensors = load_file(str(Path(folder) / WEIGHTS_FILE))
    missing = [k for k in variant.state_dict() if k not in tensors]
    if missing:
        raise UserError(f"'{folder}' is missing weights: {', '.join(missing)}")
    variant.load_state_dict({k: tensors[k] for k in variant.state_dict()})  # SAELens-only extras ignored
    return variant.to(device).eval(), cfg



__all__ = ["CFG_FILE", "WEIGHTS_FILE", "load_sae", "read_cfg", "save_sae", "sae_cfg"]
