"""Every input check that is not a parse, each in one place: flags that name impossible
resources, run folders that exist, services that do not answer, SAEs that do not fit a model.
Each raises a one-line UserError (or warns) before Ray starts or MLflow records anything;
`validate` calls them in order.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.parse
from pathlib import Path

from saeforge.core.hooks import HookPoint
from saeforge.core.model import load_config, resolve_model
from saeforge.core.sae_files import SaeMeta
from saeforge.errors import UserError
from saeforge.jobs.arguments import check_ranges, gpu_request, resource_request
from saeforge.jobs.runtime import storage
from saeforge.jobs.runtime.ray_cluster import attached, local_cpus
from saeforge.jobs.tracking import store


def check_flags(args) -> None:
    """What the flags alone can tell, without reading anything: every number in its range, GPUs
    and custom resources that the cluster named (or this machine) can offer."""
    check_ranges(args)
    check_names(args)
    if hasattr(args, "gpus_per_producer"):
        check_gpu_requests(args)
        check_resource_requests(args)
    if hasattr(args, "workers"):
        check_local_cpus(args)


NAME_FLAGS = {"run_name": "--run-name", "name": "--name"}  # train's run, tune's searches, a study


def check_names(args) -> None:
    """A run, search or study name is one folder under --storage (and one MLflow run name): a
    single path component, so that no name writes outside --storage."""
    for field, flag in NAME_FLAGS.items():
        value = getattr(args, field, "")
        if value and (value in (".", "..") or "/" in value or "\\" in value or not value.isprintable()):
            raise UserError(
                f"{flag} {value!r}: a name is one folder under --storage (no '/', '\\', '.', '..' "
                "or control characters)"
            )


def check_context_fits(context_size: int, config, model: str) -> None:
    """A context longer than the model's positions would be embedded past its rotary range (or
    fail deep inside a producer): refused before any text is read."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions and context_size > positions:
        raise UserError(f"--context-size {context_size} is beyond {model}'s {positions} positions")


def check_local_cpus(args) -> None:
    """Producers and workers stream at once, a CPU each: more than a private local Ray declares
    would wait for ever for the rest to be placed."""
    wanted = args.producers + args.workers
    if not attached(args.address) and wanted > local_cpus():
        raise UserError(
            f"--producers {args.producers} and --workers {args.workers} ask for {wanted} CPUs; a local Ray on "
            f"this machine has {local_cpus()}: ask for fewer, or give --address of a cluster"
        )


def check_gpu_requests(args) -> None:
    """--gpus-per-producer / --gpus-per-worker: 'auto' or a number; a GPU asked for on a private
    local Ray (no --address, no RAY_ADDRESS) needs one on this machine (else the actors would
    wait for it for ever)."""
    import torch

    asked = {name: gpu_request(args, name) for name in ("gpus_per_producer", "gpus_per_worker")}
    if attached(args.address) or torch.cuda.is_available():
        return
    for name, value in asked.items():
        if value:
            raise UserError(
                f"--{name.replace('_', '-')} {value:g} asks for GPUs, but this machine has none and no --address "
                "or RAY_ADDRESS names a cluster"
            )


def check_resource_requests(args) -> None:
    """--producer-resources / --worker-resources: NAME=AMOUNT pairs of custom resources, which only
    an attached cluster's nodes can offer (on a private local Ray the actors would wait for ever)."""
    for name in ("producer_resources", "worker_resources"):
        asked = resource_request(args, name)
        if asked and not attached(args.address):
            raise UserError(
                f"--{name.replace('_', '-')} asks for custom resources ({', '.join(asked)}), which only the nodes "
                "of a cluster offer: give --address or RAY_ADDRESS"
            )


def check_new_run_folder(args, name: str) -> None:
    """An explicit --run-name whose folder exists holds another run's checkpoints: refused."""
    if not args.run_name or args.resume:
        return
    folder = storage.run_exists(args.storage, name)
    if folder:
        raise UserError(
            f"--run-name {name}: {folder} already exists (another run's checkpoints); "
            f"choose another name, or continue that run with --resume {folder}"
        )


def warn_if_temporary(args, progress=None) -> None:
    """A run started inside Ray's temporary copy of a job's working directory, whose outputs
    would be deleted with it, is told so."""
    lost = storage.temporary_outputs(args.storage, store.tracking_uri())
    if lost:
        warn(
            f"this run is inside Ray's temporary copy of the job's working directory, which Ray deletes later: "
            f"{' and '.join(lost)} would be lost with it; give --storage a shared folder or URI and set "
            "MLFLOW_TRACKING_URI (see the README's cluster section)",
            progress,
        )


def host_port(address: str, default_port: int) -> tuple[str, int]:
    """(host, port) of 'host:port', 'scheme://host:port/...' or a bare host."""
    parts = urllib.parse.urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        return parts.hostname or "", parts.port or default_port
    except ValueError:  # a port that is not a number
        raise UserError(f"'{store.redact(address)}' is not a host:port address") from None


def check_reachable(address: str, what: str, default_port: int, timeout_s: float = 5.0) -> None:
    """A TCP connection to `address` opens within `timeout_s`, or one line naming it (Ray and
    MLflow would otherwise retry for minutes, after the run has started writing)."""
    host, port = host_port(address, default_port)
    if not host:
        raise UserError(f"{what} '{store.redact(address)}' names no host")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__.replace("Error", "").lower() or "unreachable"
        raise UserError(f"cannot reach {what} at {store.redact(address)}: {reason}") from None


def check_services(address: str) -> None:
    """The Ray cluster (--address or RAY_ADDRESS) and the MLflow store answer, before either is used."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address and address not in ("auto", "local"):
        check_reachable(address, "the Ray cluster", 10001 if address.startswith("ray://") else 6379)
    uri = store.tracking_uri()
    if uri.startswith(("http://", "https://")):
        check_reachable(uri, "the MLflow tracking server", 443 if uri.startswith("https") else 80)
    elif uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).parent.is_dir():
        raise UserError(f"MLflow store {uri}: the folder {Path(uri[len('sqlite:///') :]).parent} does not exist")


def check_sae_fits_model(cfg: dict, model_name: str):
    """The model has the saved SAE's hook layer and the width it reads, or one line (before the
    model loads). Returns the model's config."""
    if not model_name:
        raise UserError("the SAE's cfg.json names no model_name: pass --model")
    config = load_config(resolve_model(model_name))
    HookPoint.parse(SaeMeta.from_cfg(cfg).hook_name).check(config.num_hidden_layers, model_name)
    if config.hidden_size != cfg["d_in"]:
        raise UserError(
            f"the SAE reads activations of width {cfg['d_in']}, but model '{model_name}' has width "
            f"{config.hidden_size}: pass the --model it was trained on"
        )
    return config


def warn(message: str, progress=None) -> None:
    (progress or (lambda m: print(m, file=sys.stderr)))(f"saeforge: warning: {message}")
