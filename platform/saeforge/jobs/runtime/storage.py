"""Where a run's Ray Train / Tune folders and checkpoints go (`--storage`): a local folder, or a
URI Ray Train accepts (s3://, gs://, file://, through pyarrow's filesystems).

On a cluster the storage must outlive every node: a local folder on an autoscaled node is lost
with the node, and under `ray job submit --working-dir .` a relative folder (and the default
SQLite MLflow store) lands inside Ray's temporary copy of the working directory, which Ray deletes
later. `temporary_outputs` names what would land there, so the run can warn before it starts.
"""

from __future__ import annotations

import os
from pathlib import Path

RAY_WORKING_DIR_MARK = ("runtime_resources", "working_dir_files")  # Ray's unpacked --working-dir


def is_uri(storage: str) -> bool:
    return "://" in storage


def storage_path(storage: str | Path) -> str:
    """What Ray Train's `storage_path` gets: a URI as given, a local folder made absolute."""
    text = str(storage)
    return text if is_uri(text) else str(Path(text).expanduser().resolve())


def run_exists(storage: str, name: str) -> str:
    """The run folder `name` under `storage` if something is there, else ""."""
    if not is_uri(storage):
        folder = Path(storage_path(storage)) / name
        return str(folder) if folder.exists() else ""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    path = f"{root.rstrip('/')}/{name}"
    return f"{storage.rstrip('/')}/{name}" if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound else ""


def local_checkpoint(checkpoint) -> Path:
    """A Ray Train checkpoint as a local folder: its own path on a local filesystem, else a
    downloaded copy (remote storage)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    return Path(checkpoint.to_directory())


def temporary_outputs(storage: str, tracking_uri: str, cwd: str | None = None) -> list[str]:
    """What a run started in Ray's temporary copy of a job's working directory would write
    there (and so lose): a relative or local --storage, a SQLite store in that folder."""
    cwd = os.path.realpath(cwd or os.getcwd())
    parts = Path(cwd).parts
    if not all(mark in parts for mark in RAY_WORKING_DIR_MARK):
        return []
    lost = []
    if not is_uri(storage) and os.path.realpath(os.path.join(cwd, os.path.expanduser(storage))).startswith(cwd):
        lost.append(f"--storage {storage}")
    if tracking_uri.startswith("sqlite:") and os.path.realpath(tracking_uri.split(":///", 1)[-1]).startswith(cwd):
        lost.append(f"the MLflow store {tracking_uri} and its artifacts")
    return lost
