"""Checkpoint folders: the SAE (SAELens layout), the loop state and run.json, and finding the one
to resume from.

run.json holds the run's validated arguments, its MLflow run id, its plan length and its
progress, so `--resume PATH` rebuilds the same run and logs into the same MLflow run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch

import variants
from saeforge.core import sae_files
from saeforge.core.sae_files import SAE_DIR, SaeMeta
from saeforge.core.training import LoopState
from saeforge.errors import UserError
from saeforge.jobs.arguments import TrainArgs

LOOP_STATE_FILE = "loop_state.pt"
RUN_INFO_FILE = "run.json"


def save_checkpoint(folder: Path, variant: variants.Variant, state: LoopState, meta: SaeMeta, info: dict) -> None:
    sae_files.save_sae(variant, folder / SAE_DIR, meta)
    torch.save(
        {
            "step": state.step,
            "tokens_seen": state.tokens_seen,
            "optimizer": state.optimizer,
            "scheduler": state.scheduler,
        },
        folder / LOOP_STATE_FILE,
    )
    (folder / RUN_INFO_FILE).write_text(json.dumps({**info, "step": state.step, "tokens_seen": state.tokens_seen}))


def load_checkpoint(folder: str | Path) -> tuple[variants.Variant, LoopState]:
    variant, _ = sae_files.load_sae(Path(folder) / SAE_DIR)
    raw = torch.load(Path(folder) / LOOP_STATE_FILE, weights_only=True, map_location="cpu")
    return variant, LoopState(raw["step"], raw["tokens_seen"], raw["optimizer"], raw["scheduler"])


def is_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return all((folder / name).is_file() for name in (LOOP_STATE_FILE, RUN_INFO_FILE)) and sae_files.is_sae_folder(
        folder / SAE_DIR
    )


def run_info(args: TrainArgs, run_id: str, total_steps: int) -> dict:
    """What run.json records besides the progress."""
    return {"run_id": run_id, "train_args": asdict(args), "total_steps": total_steps}


def find_checkpoint(path: str) -> Path:
    """A checkpoint folder, or the newest complete checkpoint inside a run folder."""
    folder = Path(path).expanduser().resolve()
    if is_checkpoint(folder):
        return folder
    candidates = [p for p in folder.glob("checkpoint_*") if is_checkpoint(p)] if folder.is_dir() else []
    if not candidates:
        raise UserError(f"cannot resume from '{path}': no saeforge checkpoint there")
    return max(candidates, key=lambda p: read_info(p)["step"])


def read_info(checkpoint: Path) -> dict:
    try:
        info = json.loads((checkpoint / RUN_INFO_FILE).read_text())
        info["step"], info["run_id"], info["train_args"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"cannot resume from '{checkpoint}': the checkpoint has no readable {RUN_INFO_FILE}") from None
    return info


def resumed_args(checkpoint: Path, info: dict) -> TrainArgs:
    """The original run's arguments, pointing at this checkpoint."""
    known = {f.name for f in fields(TrainArgs)}
    try:
        args = TrainArgs(**{k: v for k, v in info["train_args"].items() if k in known})
    except TypeError:
        raise UserError(
            f"cannot resume from '{checkpoint}': its {RUN_INFO_FILE} does not hold saeforge's train arguments"
        ) from None
    args.resume = str(checkpoint)
    return args
