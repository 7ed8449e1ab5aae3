"""Checkpoints survive crashes: a save killed at any step leaves the old checkpoint or the new
one, complete; a checkpoint whose copy was cut short is skipped for the one before it."""

import json
import shutil

import pytest
import torch

import variants
from conftest import crash_during, crash_points, tiny_args
from saeforge.core.sae_files import SaeMeta
from saeforge.core.training import LoopState
from saeforge.errors import UserError
from saeforge.jobs.train import checkpoints

META = SaeMeta("tiny", "blocks.3.hook_resid_post", 3, 16, "wiki")


def save(folder, step: int):
    variant = variants.build("relu", d_in=16, d_sae=32)
    info = checkpoints.run_info(tiny_args(folder.parent), "run-id", total_steps=20)
    checkpoints.save_checkpoint(folder, [(variant, LoopState(step, 100 * step), META)], info)
    return folder


def test_a_crash_at_any_step_of_a_checkpoint_save_keeps_a_complete_one(tmp_path):
    """A real process dies at each file operation of save_checkpoint in turn (and half-way
    through each file it writes): the checkpoint is always complete, at the old step or the new."""
    folder = save(tmp_path / "checkpoint", 5)
    crashes = 0
    for step, torn in crash_points():
        outcome = crash_during(lambda: save(folder, 10), step, torn)
        if outcome == "completed":
            break
        crashes += outcome == "crashed"
        assert checkpoints.is_checkpoint(folder), (step, torn)
        assert checkpoints.load_checkpoint(folder, [META.hook_name])[0][1].step in (5, 10), (step, torn)
        assert checkpoints.read_info(folder)["step"] in (5, 10)
        save(folder, 5)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"], (step, torn)
    assert crashes >= 20
    assert checkpoints.load_checkpoint(folder, [META.hook_name])[0][1].step == 10


@pytest.mark.parametrize("cut", ["no marker", "a file missing", "a file truncated", "a byte changed"])
def test_a_half_copied_checkpoint_is_skipped_for_the_previous_one(tmp_path, cut):
    """Ray Train copies a checkpoint into the run folder in no fixed order: whichever part of the
    copy is missing, the newest checkpoint whose files all match complete.json is resumed."""
    run = tmp_path / "run"
    save(run / "checkpoint_000000", 5)
    newest = shutil.copytree(save(tmp_path / "staged", 10), run / "checkpoint_000001")
    if cut == "no marker":
        (newest / checkpoints.COMPLETE_FILE).unlink()
    elif cut == "a file missing":
        (newest / "sae" / "saeforge_state.safetensors").unlink()
    elif cut == "a file truncated":
        with open(newest / checkpoints.LOOP_STATE_FILE, "r+b") as f:
            f.truncate(100)
    else:  # damaged in place, its size unchanged
        path = newest / "sae" / "saeforge_state.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    assert checkpoints.find_checkpoint(str(run)) == run / "checkpoint_000000"
    with pytest.raises(UserError, match="incomplete"):
        checkpoints.find_checkpoint(str(newest))


def test_a_checkpoint_listing_sizes_only_still_resumes(tmp_path):
    """complete.json of a checkpoint written before content hashes lists bare sizes: checked as such."""
    folder = save(tmp_path / "checkpoint", 5)
    complete = json.loads((folder / checkpoints.COMPLETE_FILE).read_text())
    complete["files"] = {name: size for name, (size, _) in complete["files"].items()}
    (folder / checkpoints.COMPLETE_FILE).write_text(json.dumps(complete))
    assert checkpoints.is_checkpoint(folder)
    with open(folder / checkpoints.LOOP_STATE_FILE, "r+b") as f:
        f.truncate(100)
    assert not checkpoints.is_checkpoint(folder)


def test_the_newest_complete_checkpoint_is_taken(tmp_path):
    run = tmp_path / "run"
    save(run / "checkpoint_000000", 5)
    save(run / "checkpoint_000001", 10)
    assert checkpoints.find_checkpoint(str(run)) == run / "checkpoint_000001"


def test_a_checkpoint_of_several_hooks_keeps_each_sae_in_its_hook_folder(tmp_path):
    """A k-hook run's checkpoint: one subfolder per hook (SAE + loop state), one run.json; it is
    complete only when every hook's files are, and each hook's SAE and state load back."""
    hooks = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    saes = [variants.build("relu", d_in=16, d_sae=32, overrides={"seed": str(i)}) for i in range(2)]
    metas = [SaeMeta("tiny", hook, int(hook.split(".")[1]), 16, "wiki") for hook in hooks]
    info = checkpoints.run_info(tiny_args(tmp_path, layer="1,3"), "", 20, dict(zip(hooks, ("run-a", "run-b"))))
    run = tmp_path / "run"
    for n, step in enumerate((5, 10)):
        parts = [(sae, LoopState(step, 100 * step), meta) for sae, meta in zip(saes, metas)]
        checkpoints.save_checkpoint(run / f"checkpoint_00000{n}", parts, info)
    newest = run / "checkpoint_000001"
    assert sorted(p.name for p in newest.iterdir()) == sorted([*hooks, "complete.json", "run.json"])
    assert checkpoints.is_checkpoint(newest) and checkpoints.find_checkpoint(str(run)) == newest
    loaded = checkpoints.load_checkpoint(newest, hooks)
    for (sae, state), want, meta in zip(loaded, saes, metas):
        assert state.step == 10 and torch.equal(sae.W_dec, want.W_dec)
        assert (
            json.loads((newest / meta.hook_name / "sae" / "cfg.json").read_text())["metadata"]["hook_name"]
            == meta.hook_name
        )
    assert checkpoints.read_info(newest)["hook_run_ids"] == {hooks[0]: "run-a", hooks[1]: "run-b"}
    (newest / hooks[1] / "sae" / "saeforge_state.safetensors").unlink()  # one hook's copy cut short
    assert checkpoints.find_checkpoint(str(run)) == run / "checkpoint_000000"
    with pytest.raises(UserError, match="incomplete"):
        checkpoints.find_checkpoint(str(newest))
