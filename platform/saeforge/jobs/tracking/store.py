"""The MLflow store: its URI, its lock, its experiments.

Without MLFLOW_TRACKING_URI the store is SQLite in the working directory with artifacts in
./mlartifacts (never inside Ray's temporary session folders, which are deleted). One experiment
per model + hook. Two drivers may share a store: what they do to it together is serialised by
`store_lock`, a file lock (flock) beside a SQLite store, or a file in saeforge's cache keyed by
the URI for a remote server (which serialises the drivers of one machine only). `redact` keeps
a URI's credentials (user:password, secret query values) out of what is printed or logged,
`redact_text` those of every URI quoted in an error text.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from saeforge.errors import UserError


def tracking_uri(workdir: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite store in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(workdir or Path.cwd()).resolve() / 'mlflow.db'}"


def artifact_root(uri: str, workdir: Path | None = None) -> str | None:
    """Where a new experiment's artifacts go: next to a SQLite/file store; the server's choice
    for an http(s) tracking server."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return ((workdir or Path.cwd()).resolve() / "mlartifacts").as_uri()


def clean_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def experiment_name(model_name: str, hook_name: str) -> str:
    return f"saeforge/{clean_name(model_name)}/{hook_name}"


def use_store(workdir: Path | None = None) -> str:
    import mlflow

    uri = tracking_uri(workdir)
    mlflow.set_tracking_uri(uri)
    return uri


def require_store(what: str) -> str:
    """The store, refusing (instead of creating an empty SQLite file) when none is there."""
    store = tracking_uri()
    if store.startswith("sqlite:///") and not Path(store[len("sqlite:///") :]).is_file():
        raise UserError(
            f"cannot read '{what}': no MLflow store at {redact(store)} (set MLFLOW_TRACKING_URI or run where "
            "the SAE was trained)"
        )
    return use_store()


# A query parameter whose name holds one of these carries a credential (AWS, Azure SAS, GCS, tokens).
SECRET_QUERY_NAMES = ("token", "key", "secret", "password", "passwd", "sig", "credential", "auth")
# A URI inside free text (an error message): scheme://, then anything up to a space or a quote.
URI_IN_TEXT = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>]+""")


def redact(uri: str) -> str:
    """`uri` with its user name and password, and the values of query parameters that carry a
    credential, replaced by '***' (for printing, logging as a param, writing to a file)."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:  # not a URI urllib can read (a stray bracket): show none of it
        return "***"
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    secret_query = any(secret in k.lower() for k, _ in pairs for secret in SECRET_QUERY_NAMES)
    if "@" not in parts.netloc and not secret_query:
        return uri  # as given: a round trip through urllib would change some (sqlite:////abs)
    if "@" in parts.netloc:
        parts = parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1])
    if secret_query:
        hidden = [(k, "***" if any(s in k.lower() for s in SECRET_QUERY_NAMES) else v) for k, v in pairs]
        parts = parts._replace(query=urllib.parse.urlencode(hidden, safe="*"))
    return urllib.parse.urlunsplit(parts)


def redact_text(text: str) -> str:
    """`text` with every URI in it redacted (MLflow's, Ray's and fsspec's error messages quote the
    URI they failed on, credentials included)."""
    return URI_IN_TEXT.sub(lambda match: redact(match.group(0)), text)


def lock_path(uri: str) -> Path:
    """The lock file of a store: beside a SQLite database, else in the cache, keyed by the URI."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return db.with_name(db.name + ".lock")
    from saeforge.core.model import cache_root

    return cache_root() / "locks" / f"mlflow-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold the store's lock (an exclusive flock; released when the block ends or the process dies)."""
    path = lock_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_experiment(name: str, uri: str) -> str:
    """The experiment's id, creating it with an explicit artifact location if needed. Under the
    store's lock (a fresh SQLite store is created by the first access, whose migrations must not
    run twice at once), and tolerant of another process having created it first."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with store_lock(uri):
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        root = artifact_root(uri)
        location = f"{root}/{clean_name(name)}" if root else None
        try:
            return mlflow.create_experiment(name, artifact_location=location)
        except MlflowException:
            experiment = mlflow.get_experiment_by_name(name)  # created meanwhile, by a driver elsewhere
            if experiment is None:
                raise
            return experiment.experiment_id
