"""Checks made before a sweep starts anything (README "Search spaces": what is refused).

`check_start` runs in `run_sweep` and `resume_sweep` before Ray, MLflow or any file: the sweep
name, the per-trial resources against this machine (a local Ray) or the address of a cluster,
the MLflow tracking URI, the storage folder and the user data file of `task: text_file`.
`check_cluster` compares the resources with the cluster once Ray is connected, before MLflow
or any file. Every refusal is a one-line `SpaceError` naming the key or flag and the fix (exit
code 2); nothing is written by any check.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from study.config import ConfigError, field_limit_error, make_config
from study.records import SweepSpec
from study.spaces import LIMITS, SpaceError, check_name, check_resource
from study.tracking import sqlite_file, sqlite_in_memory

MIN_FREE_MB = 100  # free space a sweep's storage (and a SQLite store) must have to start
NET_TIMEOUT_S = 3.0  # reaching an MLflow server or a Ray cluster
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql",
                    "databricks", "databricks-uc", "uc")
SYSTEM_DIRS = ("/proc", "/sys", "/dev")
MAX_DATA_CHECKS = 16  # (data_path, text_column, label_column) combinations read before start


def check_start(spec: SweepSpec, name: str, *, storage: str | Path | None,
                tracking_uri: str | None, address: str | None, resume: bool = False) -> None:
    """Everything a sweep needs that can be checked before it starts; raises `SpaceError`."""
    from study.sweep.lifecycle import storage_dir
    from study.tracking import resolve_uri

    check_name(name, name_where(spec, name, resume))
    if address:
        check_address(address)
    elif os.environ.get("RAY_ADDRESS"):  # ray.init() connects to it
        check_address(os.environ["RAY_ADDRESS"], "RAY_ADDRESS")
    if _local(address):
        check_local_resources(spec)
    check_tracking_uri(resolve_uri(tracking_uri))
    store = storage_dir(storage)
    check_storage(store, "--storage")
    exp_dir = store / name
    if exp_dir.exists() and not exp_dir.is_dir():
        raise SpaceError(f"--storage: {exp_dir} is a file, where the sweep's folder goes; move "
                         "it or choose another --name")
    check_data(spec)


def name_where(spec: SweepSpec, name: str, resume: bool) -> str:
    """Where the sweep name `name` comes from, as an error names it."""
    if resume:
        return "NAME"
    if name != spec.name:
        return "--name"
    if name == Path(spec.path).stem:
        return f"{spec.path}: the sweep name (the file's name; set name: or pass --name)"
    return f"{spec.path}: name"


OVERRIDE_FLAGS = {"num_trials": "--trials", "epochs": "--epochs", "gpu": "--gpu",
                  "max_concurrent": "--max-concurrent"}


def check_overrides(values: dict[str, Any]) -> None:
    """Command-line overrides of a space (`OVERRIDE_FLAGS`' keys; None: not given) on their
    own, before any space is read, held to the limits of the file's own keys: a one-line
    `SpaceError` naming the flag. The one check of them, for the CLI, `run_sweep` and resume."""
    for key in ("num_trials", "max_concurrent"):
        value = values.get(key)
        if value is not None and not 1 <= value <= LIMITS[key]:
            raise SpaceError(f"{OVERRIDE_FLAGS[key]}: {value} is outside 1..{LIMITS[key]}")
    epochs = values.get("epochs")
    if epochs is not None:
        err = (f"epochs: must be >= 1, got {epochs}" if epochs < 1
               else field_limit_error("epochs", epochs))
        if err:
            raise SpaceError(f"--epochs / budget.{err}")
    if values.get("gpu") is not None:
        check_resource("--gpu", "gpu", values["gpu"])


def _local(address: str | None) -> bool:
    """Whether the sweep starts a Ray of its own on this machine."""
    if address not in (None, "", "local"):
        return False
    return address == "local" or not os.environ.get("RAY_ADDRESS")


# --- resources -------------------------------------------------------------------------------
def local_capacity(count_gpus: bool = True) -> tuple[float, int]:
    """(CPUs, GPUs) a local Ray would get here, without starting it: Ray's own CPU count (it
    honours container limits), else the CPUs this process may run on; the visible CUDA
    devices (0 without `count_gpus`: counting imports torch, 1.5 s of a driver's start)."""
    try:
        from ray._private.utils import get_num_cpus
        cpus = float(get_num_cpus())
    except Exception:  # a Ray without this helper: what the scheduler lets this process use
        cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else os.cpu_count() or 1)
    gpus = 0
    if count_gpus:
        try:
            import torch
            gpus = int(torch.cuda.device_count())
        except Exception:
            gpus = 0
    return cpus, gpus


def check_local_resources(spec: SweepSpec, capacity: tuple[float, int] | None = None) -> None:
    """Refuse per-trial resources this machine cannot give a trial (it would wait forever)."""
    cpus, gpus = capacity or local_capacity(count_gpus=spec.gpu > 0)
    if spec.cpu > cpus:
        raise SpaceError(f"{spec.path}: resources.cpu: each trial asks for {spec.cpu:g} CPUs, "
                         f"but this machine has {cpus:g} (a local Ray); lower resources.cpu to "
                         f"at most {cpus:g}, or pass --address of a cluster with larger nodes")
    if spec.gpu > gpus:
        have = f"{gpus} CUDA GPU{'s' if gpus != 1 else ''}" if gpus else "no CUDA GPU"
        raise SpaceError(f"{spec.path}: resources.gpu (or --gpu): each trial asks for "
                         f"{spec.gpu:g} GPU, but this machine has {have} (a local Ray); use "
                         f"--gpu {min(gpus, 1) if gpus else 0}, or run where GPUs are")


def check_cluster(spec: SweepSpec, address: str | None) -> None:
    """Once Ray is connected (before MLflow or any file): refuse a trial that fits on no node
    of the cluster."""
    import ray

    try:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    except Exception:  # a client without the node table: the cluster as one node
        nodes = [dict(ray.cluster_resources())]
    if any(float(n.get("CPU", 0)) >= spec.cpu and float(n.get("GPU", 0)) >= spec.gpu
           for n in nodes):
        return
    big_cpu = max((float(n.get("CPU", 0)) for n in nodes), default=0.0)
    big_gpu = max((float(n.get("GPU", 0)) for n in nodes), default=0.0)
    at = f"the Ray cluster at {address}" if address else "the local Ray"
    raise SpaceError(f"{spec.path}: resources: each trial asks for {spec.cpu:g} CPUs and "
                     f"{spec.gpu:g} GPUs on one node, but no node of {at} has them ({len(nodes)} "
                     f"node(s), the largest {big_cpu:g} CPUs / {big_gpu:g} GPUs); lower "
                     "resources.cpu / resources.gpu (--gpu) or add larger nodes")


# --- Ray address -----------------------------------------------------------------------------
def check_address(address: str | None, flag: str = "--address") -> None:
    """`auto` must find a running cluster; HOST:PORT and ray://HOST:PORT must answer."""
    if address in (None, "", "local"):
        return
    assert address is not None
    if address == "auto":
        try:
            from ray._private.services import get_ray_address_from_environment
            found = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            raise SpaceError(f"{flag} auto: no running Ray cluster found on this machine "
                             "(RAY_ADDRESS is unset and no `ray start` session is up); start "
                             "one with `ray start --head`, pass --address ray://HOST:PORT, or "
                             "leave --address out for a local Ray") from None
        except Exception:  # Ray's lookup changed: ray.init says what it finds
            return
        target = str(found)
    else:
        target = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpaceError(f"{flag}: {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=NET_TIMEOUT_S):
            pass
    except OSError as e:
        raise SpaceError(f"{flag} {address}: nothing answers at {host}:{port} "
                         f"({_reason(e)}); start the cluster (`ray start --head`) or fix the "
                         "address") from None


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    if isinstance(e, TimeoutError):
        return f"no answer in {NET_TIMEOUT_S:g} s"
    text = getattr(e, "strerror", None) or " ".join(str(e).split()) or type(e).__name__
    return str(text)


# --- MLflow tracking URI ---------------------------------------------------------------------
def check_tracking_uri(uri: str, existing: bool = False) -> None:
    """A scheme MLflow knows; a SQLite file in an existing, writable folder (and a SQLite
    database if it exists; with `existing`, as `study report` and `study ui` read one, an
    MLflow store that exists); no file store (MLflow 3 serves none); an answering http(s)
    server."""
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    base = scheme.split("+", 1)[0]
    if len(scheme) == 1:  # a Windows drive letter: a plain path
        base = ""
    if base not in ("", *TRACKING_SCHEMES):
        raise SpaceError(f"--tracking-uri: unknown scheme {scheme!r} in {uri!r}; use "
                         "sqlite:///PATH.db, http(s)://HOST:PORT (an MLflow server) "
                         "or a database URI (postgresql://, mysql://, mssql://)")
    if base == "sqlite":
        _check_sqlite(uri, existing)
    elif base in ("", "file"):  # MLflow 3 refuses every call to a file store ("maintenance")
        raise SpaceError(f"--tracking-uri: {uri!r} is a file store, which MLflow 3 no longer "
                         "serves; use a SQLite file, e.g. sqlite:///mlflow.db (`mlflow "
                         "migrate-filestore` converts an existing one)")
    elif base in ("http", "https"):
        _check_server(uri)


def _check_sqlite(uri: str, existing: bool = False) -> None:
    if sqlite_in_memory(uri):
        raise SpaceError(f"--tracking-uri: {uri!r} is an in-memory store: nothing would be kept "
                         "when the command ends; name a file, e.g. sqlite:///mlflow.db")
    db = sqlite_file(uri)  # the file MLflow (SQLAlchemy) will open
    if db is None:
        raise SpaceError(f"--tracking-uri: {uri!r}: write sqlite:///RELATIVE.db or "
                         "sqlite:////ABSOLUTE.db")
    if db.exists():
        if not db.is_file():
            raise SpaceError(f"--tracking-uri: {db} is a folder, not a SQLite file; name a "
                             "file, e.g. sqlite:///mlflow.db")
        if not os.access(db, os.R_OK | os.W_OK):
            raise SpaceError(f"--tracking-uri: {db} is not writable; fix its permissions or "
                             "use another file")
        with db.open("rb") as f:
            head = f.read(16)
        if head and head != b"SQLite format 3\x00":
            raise SpaceError(f"--tracking-uri: {db} is not a SQLite database; name a new or "
                             "an MLflow SQLite file")
        if existing and not _mlflow_tables(db):  # opening it would write MLflow's schema
            raise SpaceError(f"--tracking-uri: {db} holds no MLflow store; pass the file a "
                             "sweep logged to")
        check_storage(db.parent, "--tracking-uri")
        return
    if existing:
        raise SpaceError(f"--tracking-uri: no MLflow store at {db}: run `study sweep SPACE` "
                         "first, or pass --tracking-uri where a sweep was logged")
    parent = db.parent
    if not parent.is_dir():
        raise SpaceError(f"--tracking-uri: the folder {parent} of the SQLite file does not "
                         "exist; create it or fix the URI")
    check_storage(parent, "--tracking-uri")


def _mlflow_tables(db: Path) -> bool:
    """Whether the SQLite file `db` holds MLflow's tables (read only)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
            names = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = "
                                             "'table'")}
    except sqlite3.Error:
        return False
    return {"experiments", "runs"} <= names


def _check_server(uri: str) -> None:
    """An MLflow server answers: /health, or the experiments API (which may ask for login)."""
    root = uri.rstrip("/")
    problem = ""
    for path, ok in (("/health", (200,)),
                     ("/api/2.0/mlflow/experiments/search?max_results=1", (200, 401, 403))):
        try:
            with urllib.request.urlopen(root + path, timeout=NET_TIMEOUT_S) as r:
                if r.status in ok:
                    return
                problem = f"HTTP {r.status} from {path.split('?')[0]}"
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return
            problem = f"HTTP {e.code} from {path.split('?')[0]}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            problem = _reason(e)
            break  # nothing answers: the second request would not either
    raise SpaceError(f"--tracking-uri {uri}: no MLflow server answers ({problem}); start it "
                     "(`study server` or `mlflow server`) or fix the URI")


# --- storage ---------------------------------------------------------------------------------
def check_storage(path: Path, where: str) -> None:
    """A folder that exists or can be created, not a file, not a system folder, writable, with
    at least MIN_FREE_MB MB free."""
    path = Path(os.path.abspath(path))
    for root in SYSTEM_DIRS:
        if path == Path(root) or path.is_relative_to(root):
            raise SpaceError(f"{where}: {path} is under {root}, a system folder; choose a "
                             "folder of your own")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise SpaceError(f"{where}: {path} {what}; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SpaceError(f"{where}: {existing} is not writable; fix its permissions or choose "
                         "another folder")
    free_mb = shutil.disk_usage(existing).free / 2**20
    if free_mb < MIN_FREE_MB:
        raise SpaceError(f"{where}: {free_mb:.0f} MB free on the disk of {existing}, below the "
                         f"{MIN_FREE_MB} MB a sweep needs; free space or choose another folder")


# --- user data -------------------------------------------------------------------------------
def check_data(spec: SweepSpec) -> None:
    """`task: text_file`: read each data file once and check its columns and classes (as every
    trial will), so a bad file is refused before anything starts."""
    def levels(field: str) -> tuple[Any, ...]:
        p = next((p for p in spec.params if p.name == field), None)
        if p is not None and p.values:
            return tuple(p.values)
        return (spec.fixed[field],) if field in spec.fixed else ()

    if "text_file" not in (levels("task") or ("",)):
        return
    from study.tasks.text_file import prepare

    keys = ("data_path", "text_column", "label_column")
    combos = itertools.product(*(levels(k) or (None,) for k in keys))
    for combo in itertools.islice(combos, MAX_DATA_CHECKS):
        values = {**spec.fixed, "task": "text_file",
                  **{k: v for k, v in zip(keys, combo) if v is not None}}
        try:
            cfg = make_config(values)
        except ConfigError:
            continue  # not a config any trial runs (the searcher resamples it)
        try:
            prepare(cfg)
        except ConfigError as e:
            raise SpaceError(f"{spec.path}: {e}") from None
