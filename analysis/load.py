"""Load one sweep from MLflow into tidy tables (one row per completed trial x seed).

Only COMPLETED trials are analysed. Early-stopped trials were measured by ASHA at a lower
budget (fewer epochs): their metrics are not comparable with full-budget trials, and since ASHA
stops the trials that look worse, keeping them would bias every comparison. Diverged and
errored trials have no final metrics, and running trials have not finished yet. Every skipped
trial is counted by reason in `Sweep.skipped`, so a report can say what was left out.

Reads are batched: one `search_runs` (paged) for all child runs of the sweep, whose
`run.data.metrics` hold each metric's latest value (the final `seed_<k>/<name>` values are
logged once, at the end), and one artifact download per used run for the `seed_<k>.json`
tables. This module never imports Ray or PyTorch (metric names come from `study.metrics`,
which loads torch only inside its computations).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from study.config import FIELD_NAMES, ConfigError, coerce, field_defaults
from study.metrics import (  # noqa: F401 (re-exported for analysis modules)
    ALL_METRICS,
    CORE_METRICS,
    HIGHER_IS_BETTER,
    ROBUSTNESS_METRICS,
)
from study.tracking import (
    TAG_KIND,
    TAG_PARENT,
    TAG_STOP,
    TAG_STOP_MSG,
    TAG_TRIAL,
    resolve_uri,
)

# the targets a report studies: generalization gaps, test accuracy, robustness
DEFAULT_TARGETS: tuple[str, ...] = ("gen_gap_acc", "gen_gap_loss", "test_acc",
                                    *ROBUSTNESS_METRICS)

SKIP_EARLY = "early_stopped (stopped by ASHA at a lower budget)"
SKIP_DIVERGED = "diverged"
SKIP_ERROR = "error"
SKIP_RUNNING = "running (not finished yet)"
SKIP_REASONS = {"early_stopped": SKIP_EARLY, "diverged": SKIP_DIVERGED, "error": SKIP_ERROR}
SKIP_NO_METRICS = "completed without final metrics"
ID_COLUMNS = ("run_id", "trial_id", "seed", "seed_index", "status", "stop_reason", "epoch")
_SEED_METRIC = re.compile(r"^seed_(\d+)/(.+)$")
_SEED_ARTIFACT = re.compile(r"^seed_(\d+)\.json$")
# `seed` is the replicate seed (trial k of a config runs with seed + k): never a design choice
NOT_DESIGN = ("seed",)
PAGE = 1000


class ReportError(ValueError):
    """The sweep cannot be analysed: a one-line message says why and what to do."""


@dataclass
class Sweep:
    """One sweep, ready for analysis.

    trials: one row per completed trial x seed: `run_id, trial_id, seed` (the replicate's
        actual seed, config seed + k), `seed_index` (k), `status, stop_reason, epoch`, every
        `TrialConfig` field (typed), and every final metric (from `seed_<k>/<name>`).
    runs: one row per child run (all statuses): run_id, trial_id, status, stop_reason,
        stop_message, start_time.
    params: the `TrialConfig` fields that vary across the used trials (the studied choices).
    metrics: the metric columns of `trials`.
    objectives: (metric, mode) pairs of the sweep's objective.
    tables: name -> long table from the used runs' `seed_<k>.json` artifacts (columns run_id,
        trial_id, seed, seed_index, the table's own columns, and the varied params).
    used: number of trials used; skipped: reason -> number of trials left out.
    space: the sweep's search-space file (the parent's `space.yaml`) as a dict ({} if absent).
    """

    experiment: str
    parent_run_id: str
    trials: pd.DataFrame
    runs: pd.DataFrame
    params: list[str]
    metrics: list[str]
    objectives: list[tuple[str, str]]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    tracking_uri: str = ""
    space: dict = field(default_factory=dict)
    conditional: list[str] = field(default_factory=list)  # varied but left out (see load_sweep)

    def targets(self) -> list[str]:
        """The default targets present in `trials` (gaps, test accuracy, robustness)."""
        return [m for m in DEFAULT_TARGETS if m in self.metrics]

    def skipped_text(self) -> str:
        """e.g. "2 early_stopped (...), 1 diverged" (only reasons that occurred)."""
        parts = [f"{n} {r}" for r, n in self.skipped.items() if n]
        return ", ".join(parts) if parts else "none"


def _client(uri: str):
    import logging

    from mlflow.tracking import MlflowClient
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def _search_all(client, exp_ids: list[str], filter_string: str,
                order_by: list[str] | None = None, max_results: int | None = None) -> list:
    out: list = []
    token = None
    while True:
        n = PAGE if max_results is None else min(PAGE, max_results - len(out))
        page = client.search_runs(exp_ids, filter_string=filter_string, max_results=n,
                                  order_by=order_by, page_token=token)
        out.extend(page)
        token = page.token
        if not token or (max_results is not None and len(out) >= max_results):
            return out


def _find_parent(client, uri: str, experiment: str | None, run_id: str | None):
    from mlflow.exceptions import MlflowException

    sweep_filter = f"tags.`{TAG_KIND}` = 'sweep'"
    newest = ["attributes.start_time DESC"]
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ReportError(f"--run: no run {run_id!r} in {uri}") from None
        if run.data.tags.get(TAG_KIND) != "sweep":
            raise ReportError(f"--run: run {run_id!r} is not a sweep's parent run "
                              f"(tag {TAG_KIND}=sweep); pass the parent run id")
        exp = client.get_experiment(run.info.experiment_id)
        if experiment and exp.name != experiment:
            raise ReportError(f"--run: run {run_id!r} belongs to experiment {exp.name!r}, "
                              f"not {experiment!r}")
        return exp, run
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = [e.name for e in client.search_experiments() if e.name != "Default"]
            known = ", ".join(sorted(names)) or "none"
            raise ReportError(f"--experiment: no experiment {experiment!r} in {uri} "
                              f"(known: {known})")
        runs = _search_all(client, [exp.experiment_id], sweep_filter, newest, 1)
        if not runs:
            raise ReportError(f"--experiment: {experiment!r} in {uri} holds no sweep "
                              f"(no run tagged {TAG_KIND}=sweep); run `study sweep` first")
        return exp, runs[0]
    exps = client.search_experiments()
    runs = _search_all(client, [e.experiment_id for e in exps], sweep_filter, newest, 1) \
        if exps else []
    if not runs:
        raise ReportError(f"no sweep in {uri}: run `study sweep SPACE` first, or pass "
                          "--tracking-uri where a sweep was logged")
    exp = client.get_experiment(runs[0].info.experiment_id)
    return exp, runs[0]


def _typed_params(raw: dict[str, str]) -> dict[str, Any]:
    """Every TrialConfig field, typed; a field missing from the run takes its default."""
    out = field_defaults()
    for name in FIELD_NAMES:
        if name in raw:
            try:
                out[name] = coerce(name, raw[name])
            except ConfigError:
                out[name] = raw[name]
    return out


def _status_of(run) -> str | None:
    """None for a completed run, else the skip reason."""
    reason = run.data.tags.get(TAG_STOP)
    if reason == "completed":
        return None
    if reason in SKIP_REASONS:
        return SKIP_REASONS[reason]
    if run.info.status == "RUNNING":
        return SKIP_RUNNING
    if reason is None:  # ended without a reason: its driver stopped before recording one
        return f"interrupted (status {run.info.status}, no stop_reason)"
    return f"unknown stop_reason {reason!r}"


def _seed_rows(run) -> dict[int, dict[str, float]]:
    """Final per-seed metrics `seed_<k>/<name>` -> {k: {name: value}}; a run without them
    (e.g. logged by hand) falls back to its seed means as seed 0."""
    per: dict[int, dict[str, float]] = {}
    for key, value in run.data.metrics.items():
        m = _SEED_METRIC.match(key)
        if m:
            per.setdefault(int(m.group(1)), {})[m.group(2)] = float(value)
    if not per:
        means = {k: float(v) for k, v in run.data.metrics.items()
                 if not k.endswith("_seed_std") and "/" not in k}
        if means:
            per[0] = means
    return per


def _ordered_metrics(names: set[str]) -> list[str]:
    known = [m for m in ALL_METRICS if m in names]
    return known + sorted(names - set(known))


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _load_tables(used: list[dict], params: list[str]) -> dict[str, pd.DataFrame]:
    """The `seed_<k>.json` tables of the used runs, read through each run's artifact repository
    (one listing per run; no per-file run lookups)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="study_report_") as tmp, _no_progress_bars():
        for u in used:
            if not u["artifact_uri"]:
                continue
            repo = get_artifact_repository(u["artifact_uri"])
            try:
                names = [a.path for a in repo.list_artifacts()
                         if _SEED_ARTIFACT.match(Path(a.path).name)]
            except Exception:  # an unreachable artifact store: metrics are still usable
                continue
            dst = Path(tmp) / u["run_id"]
            dst.mkdir()
            extra = {p: u["config"][p] for p in params}
            for name in sorted(names):
                k = int(_SEED_ARTIFACT.match(Path(name).name).group(1))
                try:
                    data = json.loads(Path(repo.download_artifacts(name, str(dst))).read_text())
                except (OSError, ValueError):
                    continue
                ids = {"run_id": u["run_id"], "trial_id": u["trial_id"],
                       "seed": u["config"]["seed"] + k, "seed_index": k}
                for tname, table in (data if isinstance(data, dict) else {}).items():
                    if not isinstance(table, list):
                        continue
                    for r in table:
                        if isinstance(r, dict):
                            rows.setdefault(tname, []).append(
                                {**ids, **r, **{p: v for p, v in extra.items() if p not in r}})
    return {name: pd.DataFrame(r) for name, r in sorted(rows.items())}


def _load_space(artifact_uri: str | None) -> dict:
    """The parent run's `space.yaml` (plain YAML; `study.spaces` would import torch)."""
    import yaml
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if not artifact_uri:
        return {}
    try:
        with tempfile.TemporaryDirectory(prefix="study_report_") as tmp, _no_progress_bars():
            local = get_artifact_repository(artifact_uri).download_artifacts("space.yaml", tmp)
            data = yaml.safe_load(Path(local).read_text())
    except Exception:  # absent or unreadable: distributions fall back to observed ranges
        return {}
    return data if isinstance(data, dict) else {}


def varied_params(configs: pd.DataFrame) -> list[str]:
    """TrialConfig fields with more than one value across trials (one row per trial)."""
    out = []
    for name in FIELD_NAMES:
        if name in NOT_DESIGN or name not in configs:
            continue
        values = configs[name].map(lambda v: v if not isinstance(v, list) else tuple(v))
        if values.nunique(dropna=False) > 1:
            out.append(name)
    return out


def load_sweep(tracking_uri: str | None = None, experiment: str | None = None,
               run_id: str | None = None) -> Sweep:
    """Load a sweep: by parent `run_id`, else the newest sweep of `experiment`, else the newest
    sweep (tag `study.kind=sweep`) in the store. Raises `ReportError` with a one-line reason."""
    uri = resolve_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ReportError(f"no MLflow store at {uri[len('sqlite:///'):]}: run `study sweep "
                          "SPACE` first, or pass --tracking-uri where a sweep was logged")
    client = _client(uri)
    exp, parent = _find_parent(client, uri, experiment, run_id)
    pid = parent.info.run_id
    children = _search_all(client, [exp.experiment_id], f"tags.`{TAG_PARENT}` = '{pid}'")
    children.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
    runs = pd.DataFrame([{
        "run_id": r.info.run_id, "trial_id": r.data.tags.get(TAG_TRIAL, r.info.run_id),
        "status": r.info.status, "stop_reason": r.data.tags.get(TAG_STOP),
        "stop_message": r.data.tags.get(TAG_STOP_MSG),
        "start_time": pd.to_datetime(r.info.start_time, unit="ms", utc=True)
        if r.info.start_time else pd.NaT} for r in children],
        columns=["run_id", "trial_id", "status", "stop_reason", "stop_message", "start_time"])
    skipped = dict.fromkeys((SKIP_EARLY, SKIP_DIVERGED, SKIP_ERROR, SKIP_RUNNING), 0)
    used: list[dict] = []
    for r in children:
        why = _status_of(r)
        per_seed = _seed_rows(r) if why is None else {}
        if why is None and not per_seed:
            why = SKIP_NO_METRICS
        if why is not None:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        used.append({"run_id": r.info.run_id,
                     "trial_id": r.data.tags.get(TAG_TRIAL, r.info.run_id),
                     "status": r.info.status, "stop_reason": r.data.tags.get(TAG_STOP),
                     "artifact_uri": r.info.artifact_uri,
                     "config": _typed_params(r.data.params), "per_seed": per_seed})
    where = f"sweep {exp.name!r} (parent run {pid})"
    if not used:
        n_skip = sum(skipped.values())
        why = ", ".join(f"{n} {k}" for k, n in skipped.items() if n) or "no child runs yet"
        raise ReportError(f"{where}: no completed trials to analyse; {n_skip} skipped: {why}")
    configs = pd.DataFrame([u["config"] for u in used])
    space = _load_space(parent.info.artifact_uri)
    # a conditional param (`when:` in the space) holds its default where inactive, which would
    # make one of its levels stand for "the condition is off": it is left out of the analysis
    conditional = {n for n, spec in (space.get("params") or {}).items()
                   if isinstance(spec, dict) and spec.get("when")}
    params = [p for p in varied_params(configs) if p not in conditional]
    names: set[str] = set()
    rows = []
    for u in used:
        for k, m in sorted(u["per_seed"].items()):
            names |= set(m)
            epoch = m.get("epoch", u["config"].get("epochs"))
            rows.append({**u["config"], "run_id": u["run_id"], "trial_id": u["trial_id"],
                         "seed": u["config"]["seed"] + k, "seed_index": k,
                         "status": u["status"], "stop_reason": u["stop_reason"],
                         "epoch": int(epoch) if epoch is not None else None,
                         **{n: v for n, v in m.items() if n != "epoch"}})
    metrics = _ordered_metrics(names - {"epoch"})
    columns = [*ID_COLUMNS, *[f for f in FIELD_NAMES if f != "seed"], *metrics]
    trials = pd.DataFrame(rows).reindex(columns=columns)
    try:
        objectives = [(str(m), str(d)) for m, d in json.loads(parent.data.tags["objective"])]
    except (KeyError, TypeError, ValueError):
        objectives = []
    return Sweep(experiment=exp.name, parent_run_id=pid, trials=trials, runs=runs,
                 params=params, metrics=metrics, objectives=objectives,
                 tables=_load_tables(used, params), used=len(used), skipped=skipped,
                 tracking_uri=uri, space=space,
                 conditional=sorted(conditional & set(varied_params(configs))))
