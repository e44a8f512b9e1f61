"""MLflow tracking from the driver: one parent run per sweep, one child run per trial.

One writer (the driver) works across nodes; every call is a batch (`log_batch`). What is
written is encoded by `study/records.py`: child-run params are exactly the `TrialConfig` field
names, metrics use the names of `study/metrics.py`, tags and artifacts the names of records.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import re
import sqlite3
import subprocess
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from study.console import redact
from study.records import (
    EXPERIMENT_KIND_ML,
    KIND_SWEEP,
    SPACE_ARTIFACT,
    SPEC_ARTIFACT,
    TAG_ATTEMPT,
    TAG_EXPERIMENT_KIND,
    TAG_HEARTBEAT,
    TAG_KIND,
    TAG_MESSAGE,
    TAG_NOTE,
    TAG_PARENT,
    TAG_TRIAL,
    Outcome,
    SweepSpec,
    Table,
    TrialRecord,
    child_tags,
    current_runs,
    mlflow_params,
    outcome_tags,
    seed_tables_artifact,
)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACTS_DIR = "mlartifacts"  # next to a SQLite store: its experiments' artifacts
SQLITE_PAGE_SIZE = 1024  # bytes; a new SQLite store's pages (`prepare_sqlite`)
# pages the write-ahead log of this process's SQLite connections grows to before a checkpoint
# copies it into the store (SQLite's default 1000; `prepare_sqlite`)
WAL_CHECKPOINT_PAGES = 10_000
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 900, 90, 90
# how long a sweep waits for an unreachable store (its writes kept, re-sent with backoff of
# at most MAX_BACKOFF_S) before it stops; the environment variable overrides it
OUTAGE_ENV, DEFAULT_OUTAGE_S, MAX_BACKOFF_S = "STUDY_STORE_OUTAGE_S", 600.0, 20.0
# a failed call that means the store could not be reached (it may come back), not a refusal
_OUTAGE = re.compile(r"connection (refused|reset|aborted)|max retries exceeded|timed? ?out|"
                     r"temporarily unavailable|failed to establish|name or service not known|"
                     r"remote end closed|database is locked|error code 50[234]|"
                     # a database server restarting under a direct postgresql:// store
                     r"server closed the connection|terminating connection|"
                     r"could not connect to server|the database system is (starting|shutting)",
                     re.I)


def resolve_uri(uri: str | None) -> str:
    """`sqlite:///mlflow.db` at the current directory unless given; relative sqlite paths are
    made absolute so Ray workers and `study ui` see the same file."""
    uri = uri or DEFAULT_TRACKING_URI
    if (uri.startswith("sqlite:///") and not uri.startswith("sqlite:////")
            and not sqlite_in_memory(uri)):  # in memory: no file to resolve
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


_SQLITE_URI = re.compile(r"sqlite(\+\w+)?:///")  # sqlite:///, sqlite+pysqlite:///, ...


def sqlite_in_memory(uri: str) -> bool:
    """A SQLite URI of an in-memory database (`sqlite://`, `sqlite:///:memory:`, with or
    without a driver or query): nothing in it outlives the process that opened it."""
    m = re.match(r"sqlite(\+\w+)?:", uri)
    return m is not None and uri[m.end():].split("?", 1)[0] in ("", "//", "///:memory:")


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` store URI (None for any other store, an in-memory
    one, or a path no file can have)."""
    m = _SQLITE_URI.match(uri)
    if m is None:
        return None
    path = urllib.parse.unquote(uri[m.end():].split("?", 1)[0])  # as SQLAlchemy reads it
    if not path or path == ":memory:":
        return None
    try:
        return Path(path).resolve()
    except (ValueError, OSError):  # a NUL byte, a loop of links
        return None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: `mlartifacts/<experiment>`
    next to the database file (a file URI), rather than MLflow's default, `./mlruns` of whatever
    directory the driver runs in. None (MLflow's default) for any other store: a tracking
    server decides where its artifacts go (`study server`: its `--artifacts-destination`)."""
    path = sqlite_file(uri)
    if path is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).lstrip(".") or "_"
    return (path.parent / ARTIFACTS_DIR / folder).as_uri()


def prepare_sqlite(uri: str) -> None:
    """Before a sweep writes to a SQLite store: write-ahead logging (WAL), and 1 KiB pages for
    a store not created yet. Every MLflow write rewrites whole pages of several indexes; with
    the default rollback journal each changed page is written twice per transaction (journal,
    then database), and WAL writes it once, coalescing repeated changes at checkpoints
    (`make bench`: 1.17 MB written per 2-epoch tiny trial, against 1.78 in the rollback
    journal with 4 KiB pages). `checkpoint_sqlite` puts the store back in the rollback
    journal when the sweep ends. A store another process holds busy, or one that cannot be
    written, is left as it is (its writes go on, in its journal mode); never raises."""
    path = sqlite_file(uri)
    try:
        if path is None or not path.parent.is_dir():
            return
        new = not path.exists() or path.stat().st_size == 0
        with contextlib.closing(sqlite3.connect(path, timeout=1.0)) as db:
            if new:
                db.execute(f"PRAGMA page_size = {SQLITE_PAGE_SIZE}")
            db.execute("PRAGMA journal_mode = WAL")
    except (sqlite3.Error, OSError):
        return
    _longer_wal()
    _close_pooled(uri)  # connections opened before take it when reopened


@functools.cache
def _longer_wal() -> None:
    """Let every SQLite connection this process opens through SQLAlchemy (MLflow's) grow its
    write-ahead log to WAL_CHECKPOINT_PAGES pages (about 10 MB) before a checkpoint. A
    checkpoint writes every page the log changed since the last one into the store, so fewer
    checkpoints write a page changed by many trials once instead of many times: a driver
    logging 200 trials of 2 epochs wrote 423 MB at SQLite's default of 1000 pages and 211 MB
    at 10,000 (the log's pages are written once either way). The setting is the connection's
    own; a store not in WAL ignores it."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        if isinstance(dbapi_connection, sqlite3.Connection):
            dbapi_connection.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")


def checkpoint_sqlite(uri: str) -> None:
    """When a sweep ends: fold the write-ahead log into the SQLite store's file and put the
    store back in the rollback journal, so the file alone holds every write (a copy of it is
    complete) and opens on read-only media too (a WAL file needs its `-shm` beside it). This
    process's pooled MLflow connections are closed first (they would keep the log open; MLflow
    opens new ones when needed). Best effort, never raises: while another process (`study
    ui`) reads the store, it stays in WAL, its log folded in as far as that reader allows."""
    path = sqlite_file(uri)
    try:
        if path is None or not path.exists():
            return
        _close_pooled(uri)
        with contextlib.closing(sqlite3.connect(path, timeout=1.0)) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.execute("PRAGMA journal_mode = DELETE")
    except (sqlite3.Error, OSError):
        pass


def _close_pooled(uri: str) -> None:
    """Close the idle connections of MLflow's cached engine for `uri` (if MLflow keeps one)."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        engine = SqlAlchemyStore._engine_map.get(uri)
    except Exception:  # an MLflow without the engine cache: nothing is pooled there
        return
    if engine is not None:
        engine.dispose()


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "ray", "optuna", "mlflow", "numpy", "attention-study"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)] or [[]]


def _retry(fn, *args: Any, **kwargs: Any) -> Any:
    """Call an MLflow client method, retrying while a SQLite store is locked by a reader
    (`study ui`, `study report`) so that a sweep never dies of a transient lock."""
    for attempt in range(8):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if "locked" not in str(e) or attempt == 7:
                raise
            time.sleep(0.25 * 2**attempt)
    return None


class StoreFault(RuntimeError):
    """The MLflow store did not take a sweep's writes (one line: which store, why)."""


def is_outage(e: BaseException) -> bool:
    """Whether a failed store call means the store could not be reached (a stopped server, a
    lock held too long: the writes wait for it) rather than that it refused the write (a
    read-only or full database, a rejected request: the sweep stops)."""
    return isinstance(e, ConnectionError | TimeoutError) or bool(_OUTAGE.search(str(e)))


def short_error(e: BaseException) -> str:
    """An exception in one line of at most 200 characters: its first line that names an
    error (an MLflow error wraps the database's), else its first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if re.search(r"Error\)|Error:|error code", ln)]
    text = redact(f"{type(e).__name__}: {(named or lines or [''])[0]}")  # URLs it echoes
    return text if len(text) <= 200 else text[:197] + "..."


class _RetryingClient:
    """An MlflowClient whose calls go through `_retry`."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return lambda *a, **k: _retry(attr, *a, **k)


def trial_run_name(trial_id: str, outcome: Outcome | None = None) -> str:
    """A child run's name: `trial_<id>`, with the outcome appended once the trial ended any
    other way than completed, e.g. `trial_ab12 (early_stopped)`, so the runs table tells
    stopped and failed trials apart at a glance."""
    name = f"trial_{trial_id}"
    return name if outcome in (None, Outcome.COMPLETED) else f"{name} ({Outcome(outcome).value})"


class Tracker:
    """Batched MLflow logging; the client is created lazily so the object pickles (Ray stores
    the run config, callbacks included, for `study resume`)."""

    spool: str | None = None  # (a class default: trackers pickled before it existed)

    def __init__(self, uri: str, spool: str | Path | None = None) -> None:
        self.uri = uri
        self.spool = None if spool is None else str(spool)
        self._client: _RetryingClient | None = None

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "spool": self.spool, "_client": None}

    @property
    def outbox(self) -> Outbox:
        """The process's one outbox for this store (every Tracker of it shares it: a resumed
        sweep's callback is unpickled with its own Tracker)."""
        box = _OUTBOXES.get(self.uri)
        if box is None:
            box = _OUTBOXES[self.uri] = Outbox(self)
        if self.spool is not None and box.spool is None:
            box.open_spool(Path(self.spool))
        return box

    @property
    def fault(self) -> str | None:
        """Why the store's writes stopped (refused, or unreachable too long), else None."""
        box = _OUTBOXES.get(self.uri)
        return box.fault if box is not None else None

    def pump(self) -> bool:
        """Re-send waiting writes whose retry is due; True when none wait."""
        box = _OUTBOXES.get(self.uri)
        return box.pump() if box is not None else True

    def flush(self) -> None:
        """Deliver every waiting write, waiting out an outage up to its limit; raises
        `StoreFault` (one line: the store, why, and where the writes are kept)."""
        box = self.outbox  # with the spool an earlier driver left
        while not box.pump():
            if box.fault:
                raise StoreFault(f"{box.fault}; {box.kept()}")
            time.sleep(min(max(box.next_try - time.monotonic(), 0.05), 2.0))

    def release(self) -> None:
        """Forget the process's outbox for this store when a sweep ends, unless it holds
        writes kept nowhere else (its spool could not be written)."""
        box = _OUTBOXES.get(self.uri)
        if box is not None and (not box.pending or (box.spool and not box.spool_error)):
            del _OUTBOXES[self.uri]

    def run_id(self, ref: str) -> str:
        """The MLflow run id of a child run reference (`start_child`'s return value)."""
        box = _OUTBOXES.get(self.uri)
        return box.ids.get(ref, ref) if box is not None else ref

    @property
    def client(self):
        if self._client is None:
            import logging

            from mlflow.tracking import MlflowClient
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            self._client = _RetryingClient(_retry(MlflowClient, tracking_uri=self.uri))
        return self._client

    def experiment_id(self, name: str) -> str:
        """The experiment `name`, created if absent, tagged `mlflow.experimentKind` =
        `custom_model_development` so that MLflow 3 opens it on its runs, not on GenAI traces
        (an experiment created before the tag existed gets it here too). On a SQLite store a
        new experiment keeps its artifacts next to the database (`artifact_location`)."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            return self.client.create_experiment(
                name, artifact_location=artifact_location(self.uri, name),
                tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND_ML})
        if TAG_EXPERIMENT_KIND not in (exp.tags or {}):
            self.client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND,
                                           EXPERIMENT_KIND_ML)
        return exp.experiment_id

    def start_parent(self, experiment: str, run_name: str, spec: SweepSpec,
                     tags: dict[str, str]) -> str:
        """The sweep's parent run, holding the space file and its parsed `SweepSpec`."""
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags={
            TAG_KIND: KIND_SWEEP, "git_commit": git_commit(),
            **{f"version.{k}": v for k, v in package_versions().items()}, **tags})
        self.client.log_text(run.info.run_id, spec.text, SPACE_ARTIFACT)
        self.client.log_text(run.info.run_id, spec.to_json(), SPEC_ARTIFACT)
        return run.info.run_id

    def child_runs(self, parent_id: str) -> list[TrialRecord]:
        """Every child run of a sweep, oldest first (a trial Ray restarted has one per
        attempt; deleted runs excluded)."""
        run = self.client.get_run(parent_id)
        runs = self.client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}'",
            max_results=5000)
        return sorted((TrialRecord.from_mlflow(r) for r in runs),
                      key=lambda r: (r.start_time or 0, r.run_id))

    def children(self, parent_id: str) -> dict[str, TrialRecord]:
        """Each trial's run (`current_runs`: its finished attempt), by Ray trial id."""
        return current_runs(self.child_runs(parent_id))

    def heartbeat(self, parent_id: str) -> None:
        """Say the driver is alive (tag `study.heartbeat` on the parent run); best effort,
        skipped while writes wait for the store."""
        if self.pump():
            try:
                self.client.set_tag(parent_id, TAG_HEARTBEAT, str(int(time.time())))
            except Exception:  # the store's trouble shows in the next write
                pass

    # --- child-run writes go through the outbox: sent at once, kept and re-sent if the store
    # does not take them. A child run is referred to by what `start_child` returns: its run id,
    # or, while the store has not created it yet, its attempt id (`run_id` resolves both)

    def start_child(self, parent_id: str, trial_id: str, config: dict[str, Any],
                    seeds: int, tags: dict[str, str] | None = None) -> str:
        attempt = uuid.uuid4().hex
        params = mlflow_params(config)
        self.outbox.submit({"op": "create", "ref": attempt, "parent": parent_id,
                            "trial": trial_id, "params": params,
                            "tags": {**child_tags(parent_id, trial_id, seeds, params),
                                     **(tags or {}), TAG_ATTEMPT: attempt}})
        return self.run_id(attempt)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int,
                    tags: dict[str, str] | None = None) -> None:
        """One point per metric at `step` (and `tags`, in the same write); the timestamp is
        fixed here, so a re-sent batch is the same points again (the store keeps one)."""
        ts = int(time.time() * 1000)
        items = [(k, float(v)) for k, v in metrics.items()]
        for i, chunk in enumerate(_chunks(items, MAX_METRICS) if items else []):
            self.outbox.submit({"op": "metrics", "ref": run_id, "step": int(step), "ts": ts,
                                "metrics": dict(chunk), "tags": {} if i else (tags or {})})

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.outbox.submit({"op": "tags", "ref": run_id,
                            "tags": {k: str(v)[:5000] for k, v in tags.items()}})

    def finish_child(self, run_id: str, outcome: Outcome, message: str = "",
                     tables: dict[int, dict[str, Table]] | None = None) -> None:
        """Record how a trial ended: tags `stop_reason`/`stop_message`, the run's description
        (e.g. "early_stopped: stopped by ASHA at epoch 4"), a run name that says any outcome
        but completed (`trial_<id> (early_stopped)`), each replicate's tables
        (`seed_<k>.json`) and the MLflow status."""
        self.outbox.submit({"op": "finish", "ref": run_id, "outcome": Outcome(outcome).value,
                            "message": message, "tables": tables or {}})

    # --- what the outbox sends (each one idempotent)

    def _create_child(self, parent_id: str, trial_id: str, params: dict[str, str],
                      tags: dict[str, str]) -> str:
        parent = self.client.get_run(parent_id)
        run = self.client.create_run(parent.info.experiment_id, run_name=trial_run_name(trial_id),
                                     tags=tags)
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param
        items = [Param(k, v) for k, v in params.items()]
        for chunk in _chunks(items, MAX_PARAMS):
            self.client.log_batch(run_id, params=chunk)  # the same values again are accepted

    def _find_attempt(self, parent_id: str, attempt: str) -> str | None:
        """The run an earlier, unconfirmed create made for this attempt, if it was made."""
        parent = self.client.get_run(parent_id)
        runs = self.client.search_runs([parent.info.experiment_id],
                                       filter_string=f"tags.`{TAG_ATTEMPT}` = '{attempt}'")
        return runs[0].info.run_id if runs else None

    def _log_points(self, run_id: str, metrics: dict[str, float], step: int, ts: int,
                    resent: bool, tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, RunTag
        if resent and metrics:
            # a batch is one transaction: any point of it at this step means it arrived
            first = next(iter(metrics))
            if any(m.step == step for m in self.client.get_metric_history(run_id, first)):
                return
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step)
                                               for k, v in metrics.items()],
                              tags=[RunTag(k, v) for k, v in (tags or {}).items()])

    def _set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag
        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_TAGS):
            self.client.log_batch(run_id, tags=chunk)

    def _finish_child(self, run_id: str, outcome: Outcome, message: str = "",
                      tables: dict[int, dict[str, Table]] | None = None) -> None:
        # the tables first: a run whose outcome tag is set has them (a driver killed midway
        # leaves a run that looks unfinished, or one `TrackingCallback._sync` closes)
        outcome = Outcome(outcome)
        for k, seed_tables in (tables or {}).items():
            self.client.log_text(run_id, json.dumps(seed_tables, indent=1),
                                 seed_tables_artifact(k))
        tags = outcome_tags(outcome, message)
        self._set_tags(run_id, {**tags, TAG_NOTE: f"{outcome.value}: {tags[TAG_MESSAGE]}"})
        run = self.client.get_run(run_id)
        trial_id = run.data.tags.get(TAG_TRIAL)
        if trial_id is not None:
            self.client.update_run(run_id, name=trial_run_name(trial_id, outcome))
        self.client.set_terminated(run_id, status=outcome.mlflow_status)

    def finish_parent(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)



class Outbox:
    """A sweep's child-run writes to one store, in order (one per process and store).

    Each write is sent at once. One the store does not take waits, with every write after it,
    in memory and in the spool file (`spool`, JSON lines in the sweep's experiment directory,
    so that a driver that dies does not lose them either), and is re-sent with backoff
    (0.5 s doubling up to MAX_BACKOFF_S). Re-sending is idempotent: a run is created once per
    attempt (tag `study.attempt`), a metric batch keeps the timestamp it was made with and is
    skipped if its step arrived, tags and outcomes overwrite themselves. `fault` says why the
    writes stopped: the store refused one (read-only or full database, a rejected request), or
    stayed unreachable longer than its limit (`STUDY_STORE_OUTAGE_S`, default 600 s)."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.spool: Path | None = None
        self.spool_error = ""
        self.pending: list[dict[str, Any]] = []
        self.ids: dict[str, str] = {}  # attempt id -> run id, once the store created the run
        self.down_since: float | None = None
        self.next_try = 0.0
        self.failures = 0
        self.fault: str | None = None
        self.outage_s = float(os.environ.get(OUTAGE_ENV) or DEFAULT_OUTAGE_S)

    def open_spool(self, path: Path) -> None:
        """Use `path` as the spool, taking up the writes a previous driver left in it (each
        counts as sent once: its re-send checks the store first)."""
        self.spool = path
        if not path.is_file():
            return
        ops: dict[str, dict[str, Any]] = {}
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # the last line of a driver killed while writing it
                continue
            if "ids" in rec:  # attempt -> run of writes delivered before this spool began
                self.ids.update(rec["ids"])
            elif "done" in rec:
                op = ops.pop(rec["done"], None)
                if op is not None and rec.get("run_id"):
                    self.ids[op["ref"]] = rec["run_id"]
            else:
                ops[rec["id"]] = {**rec, "resent": True}
        known = {op["id"] for op in self.pending}
        self.pending[:0] = [op for op in ops.values() if op["id"] not in known]

    def kept(self) -> str:
        where = f"in {self.spool}" if self.spool and not self.spool_error else "in memory only"
        n = len(self.pending)
        return f"{n} write{'' if n == 1 else 's'} kept {where}"

    def submit(self, op: dict[str, Any]) -> None:
        op["id"] = uuid.uuid4().hex
        if self.pending:
            self._keep(op)
            self.pump()
            return
        try:
            self._deliver(op)
        except Exception as e:
            op["resent"] = True
            self._keep(op)
            self._failed(e)

    def pump(self) -> bool:
        """Re-send the waiting writes if their retry is due; True when none wait."""
        if not self.pending:
            return True
        if time.monotonic() < self.next_try:
            return False
        while self.pending:
            op = self.pending[0]
            try:
                self._deliver(op)
            except Exception as e:
                op["resent"] = True  # it may have reached the store: check before re-sending
                self._failed(e)
                return False
            self.pending.pop(0)
            done: dict[str, Any] = {"done": op["id"]}
            if op["op"] == "create":
                done["run_id"] = self.ids[op["ref"]]
            self._write(done)
        self.down_since, self.failures, self.next_try = None, 0, 0.0
        if self.spool is not None and not self.spool_error:
            self.spool.unlink(missing_ok=True)
        return True

    def _keep(self, op: dict[str, Any]) -> None:
        self.pending.append(op)
        self._write(op)

    def _write(self, rec: dict[str, Any]) -> None:
        if self.spool is None or self.spool_error:
            return
        try:
            fresh = not self.spool.exists()
            with self.spool.open("a") as f:
                if fresh and self.ids:  # a new spool first says which runs the refs are
                    f.write(json.dumps({"ids": self.ids}) + "\n")
                f.write(json.dumps(rec) + "\n")
        except OSError as e:  # the writes still wait in memory
            self.spool_error = short_error(e)

    def _failed(self, e: BaseException) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
        self.failures += 1
        self.next_try = now + min(MAX_BACKOFF_S, 0.25 * 2 ** min(self.failures, 10))
        store = f"the MLflow store {redact(self.tracker.uri)}"
        if not is_outage(e):
            self.fault = self.fault or f"{store} refused a write ({short_error(e)})"
        elif now - self.down_since > self.outage_s:
            self.fault = self.fault or (f"{store} was unreachable for "
                                        f"{now - self.down_since:.0f} s ({short_error(e)})")

    def _deliver(self, op: dict[str, Any]) -> None:
        tr, kind = self.tracker, op["op"]
        if kind == "create":
            rid = tr._find_attempt(op["parent"], op["ref"]) if op.get("resent") else None
            if rid is None:
                tags = {k: self.ids.get(v, v) for k, v in op["tags"].items()}  # retry_of
                rid = tr._create_child(op["parent"], op["trial"], op["params"], tags)
            else:  # created before the store's answer was lost: its params may be missing
                tr._log_params(rid, op["params"])
            self.ids[op["ref"]] = rid
            return
        rid = self.ids.get(op["ref"], op["ref"])
        if kind == "metrics":
            tr._log_points(rid, op["metrics"], op["step"], op["ts"], bool(op.get("resent")),
                           op.get("tags"))
        elif kind == "tags":
            tr._set_tags(rid, op["tags"])
        elif kind == "finish":
            tables = {int(k): v for k, v in op["tables"].items()}
            tr._finish_child(rid, Outcome(op["outcome"]), op["message"], tables)
        else:
            raise ValueError(f"unknown outbox write {kind!r}")


_OUTBOXES: dict[str, Outbox] = {}
