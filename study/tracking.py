"""MLflow tracking from the driver: one parent run per sweep, one child run per trial.

One writer (the driver) works across nodes; every call is a batch (`log_batch`). What is
written is encoded by `study/records.py`: child-run params are exactly the `TrialConfig` field
names, metrics use the names of `study/metrics.py`, tags and artifacts the names of records.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from study.records import (
    EXPERIMENT_KIND_ML,
    KIND_SWEEP,
    SPACE_ARTIFACT,
    SPEC_ARTIFACT,
    TAG_EXPERIMENT_KIND,
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
    mlflow_params,
    outcome_tags,
    seed_tables_artifact,
)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 900, 90, 90


def resolve_uri(uri: str | None) -> str:
    """`sqlite:///mlflow.db` at the current directory unless given; relative sqlite paths are
    made absolute so Ray workers and `study ui` see the same file."""
    uri = uri or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


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

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._client: _RetryingClient | None = None

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "_client": None}

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
        (an experiment created before the tag existed gets it here too)."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            return self.client.create_experiment(
                name, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND_ML})
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

    def children(self, parent_id: str) -> dict[str, TrialRecord]:
        """Child runs of a sweep by Ray trial id (deleted runs excluded)."""
        run = self.client.get_run(parent_id)
        runs = self.client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}'",
            max_results=5000)
        records = (TrialRecord.from_mlflow(r) for r in runs)
        return {rec.trial_id: rec for rec in records}

    def start_child(self, parent_id: str, trial_id: str, config: dict[str, Any],
                    seeds: int) -> str:
        from mlflow.entities import Param
        parent = self.client.get_run(parent_id)
        run = self.client.create_run(parent.info.experiment_id, run_name=trial_run_name(trial_id),
                                     tags=child_tags(parent_id, trial_id, seeds))
        rid = run.info.run_id
        items = [Param(k, v) for k, v in mlflow_params(config).items()]
        for chunk in _chunks(items, MAX_PARAMS):
            self.client.log_batch(rid, params=chunk)
        return rid

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for chunk in _chunks(items, MAX_METRICS):
            self.client.log_batch(run_id, metrics=chunk)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag
        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_TAGS):
            self.client.log_batch(run_id, tags=chunk)

    def finish_child(self, run_id: str, outcome: Outcome, message: str = "",
                     tables: dict[int, dict[str, Table]] | None = None) -> None:
        """Record how a trial ended: tags `stop_reason`/`stop_message`, the run's description
        (e.g. "early_stopped: stopped by ASHA at epoch 4"), a run name that says any outcome
        but completed (`trial_<id> (early_stopped)`), each replicate's tables
        (`seed_<k>.json`) and the MLflow status."""
        outcome = Outcome(outcome)
        tags = outcome_tags(outcome, message)
        self.set_tags(run_id, {**tags, TAG_NOTE: f"{outcome.value}: {tags[TAG_MESSAGE]}"})
        run = self.client.get_run(run_id)
        trial_id = run.data.tags.get(TAG_TRIAL)
        if trial_id is not None:
            self.client.update_run(run_id, name=trial_run_name(trial_id, outcome))
        for k, seed_tables in (tables or {}).items():
            self.client.log_text(run_id, json.dumps(seed_tables, indent=1),
                                 seed_tables_artifact(k))
        self.client.set_terminated(run_id, status=outcome.mlflow_status)

    def delete(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    def finish_parent(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

