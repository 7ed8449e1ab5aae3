"""Checkpoint folders: the SAE (SAELens layout), the loop state and run.json, and finding the one
to resume from.

run.json holds the run's validated arguments, its MLflow run id, its plan length and its
progress, so `--resume PATH` rebuilds the same run and logs into the same MLflow run.

A run of k hooks (one model pass, k SAEs) keeps each SAE and its loop state in a subfolder named
by its hook (`blocks.3.hook_resid_post/sae`, `.../loop_state.pt`), beside the one run.json and
complete.json (which lists the hooks); a one-hook checkpoint keeps them at the top, as always.

A checkpoint is written into a staging folder and renamed into place (`sae_files.replace_folder`),
and its last file is complete.json: every other file's path and size. Ray Train copies the folder
into the run's storage afterwards, in no order saeforge controls, so a copy cut short (the driver
or a node dying) is told apart by that list, not by which files exist: a checkpoint whose files
do not all match it is incomplete, and `find_checkpoint` takes the newest complete one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import torch

import variants
from saeforge.core import sae_files
from saeforge.core.sae_files import SAE_DIR, SaeMeta
from saeforge.core.training import ContextTally, LoopState
from saeforge.errors import UserError
from saeforge.jobs.arguments import TrainArgs

LOOP_STATE_FILE = "loop_state.pt"
RUN_INFO_FILE = "run.json"
COMPLETE_FILE = "complete.json"  # written last: {"files": {relative path: [size in bytes, sha256]}}


def save_checkpoint(folder: Path, saes: Sequence[tuple[variants.Variant, LoopState, SaeMeta]], info: dict) -> None:
    """Write the checkpoint of SAEs trained side by side, one per hook (`meta.hook_name`), at
    the same step, atomically: an existing checkpoint there survives a crash at any point. One
    SAE: the one-hook layout."""
    folder = Path(folder)
    staging = sae_files.staging_folder(folder)
    names = [meta.hook_name for _, _, meta in saes]
    state = saes[0][1]  # the step, tokens and contexts are the same for every SAE
    try:
        for (variant, sae_state, meta), sub in zip(saes, hook_folders(names), strict=True):
            sae_files.save_sae(variant, staging / sub / SAE_DIR, meta)
            torch.save(
                {
                    "step": sae_state.step,
                    "tokens_seen": sae_state.tokens_seen,
                    "optimizer": sae_state.optimizer,
                    "scheduler": sae_state.scheduler,
                    **sae_state.contexts.as_dict(),
                },
                staging / sub / LOOP_STATE_FILE,
            )
        progress = {"step": state.step, "tokens_seen": state.tokens_seen, **state.contexts.as_dict()}
        (staging / RUN_INFO_FILE).write_text(json.dumps({**info, **progress}))
        files = {str(p.relative_to(staging)): file_print(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        hooks = {"hooks": names} if len(names) > 1 else {}
        (staging / COMPLETE_FILE).write_text(json.dumps({"files": files, **hooks, **progress}))
        sae_files.replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless something failed


def hook_folders(hook_names: Sequence[str]) -> list[str]:
    """Where each hook's SAE and loop state sit in a checkpoint: at the top for one hook, else in
    a subfolder named by the hook."""
    return [""] if len(hook_names) == 1 else list(hook_names)


def load_checkpoint(folder: str | Path, hook_names: Sequence[str]) -> list[tuple[variants.Variant, LoopState]]:
    """Each hook's (SAE, loop state) from a checkpoint, in the order of `hook_names`."""
    folder = sae_files.readable_folder(folder)
    loaded = []
    for sub in hook_folders(hook_names):
        variant, _ = sae_files.load_sae(folder / sub / SAE_DIR)
        raw = torch.load(folder / sub / LOOP_STATE_FILE, weights_only=True, map_location="cpu")
        state = LoopState(
            raw["step"], raw["tokens_seen"], raw["optimizer"], raw["scheduler"], ContextTally.from_dict(raw)
        )
        loaded.append((variant, state))
    return loaded


def is_checkpoint(folder: str | Path) -> bool:
    """True for a complete checkpoint: complete.json is there and every file it lists has its size
    and content hash."""
    folder = sae_files.readable_folder(folder)
    try:
        complete = json.loads((folder / COMPLETE_FILE).read_text())
        files = complete["files"]
        required = {RUN_INFO_FILE}
        for sub in hook_folders(complete.get("hooks") or [""]):
            prefix = f"{sub}/" if sub else ""
            required |= {f"{prefix}{LOOP_STATE_FILE}", *(f"{prefix}{SAE_DIR}/{name}" for name in sae_files.SAE_FILES)}
        return required <= set(files) and all(matches(folder / name, listed) for name, listed in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def file_print(path: Path) -> list:
    """[size, sha256] of a file: what complete.json lists, so a damaged file of the same size is seen."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return [path.stat().st_size, digest.hexdigest()]


def matches(path: Path, listed) -> bool:
    """Whether a file is as complete.json lists it (a bare size: a checkpoint from before hashes)."""
    if isinstance(listed, int):
        return path.stat().st_size == listed
    return path.stat().st_size == listed[0] and file_print(path) == list(listed)


def run_info(args: TrainArgs, run_id: str, total_steps: int, hook_run_ids: dict[str, str] | None = None) -> dict:
    """What run.json records besides the progress; a run of several hooks adds each hook's
    MLflow run (`hook_run_ids`, hook name -> run id)."""
    return {
        "run_id": run_id,
        "train_args": asdict(args),
        "total_steps": total_steps,
        **({"hook_run_ids": hook_run_ids} if hook_run_ids else {}),
    }


def find_checkpoint(path: str) -> Path:
    """A complete checkpoint folder, or the newest complete checkpoint inside a run folder (one a
    crash left half-written is skipped for the one before it)."""
    folder = Path(path).expanduser().resolve()
    if is_checkpoint(folder):
        return folder
    if (folder / RUN_INFO_FILE).is_file() or (folder / SAE_DIR).is_dir():
        raise UserError(
            f"cannot resume from '{path}': the checkpoint is incomplete (cut short while it was written); "
            "resume from its run folder to take the newest complete one"
        )
    candidates = [p for p in folder.glob("checkpoint_*") if is_checkpoint(p)] if folder.is_dir() else []
    if not candidates:
        raise UserError(f"cannot resume from '{path}': no saeforge checkpoint there")
    return max(candidates, key=lambda p: read_info(p)["step"])


def read_info(checkpoint: Path) -> dict:
    try:
        info = json.loads((sae_files.readable_folder(checkpoint) / RUN_INFO_FILE).read_text())
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
