"""Load one sweep from MLflow into a typed `Sweep` (one row per completed trial x seed).

Only COMPLETED trials are analysed. Early-stopped trials were measured by ASHA at a lower
budget (fewer epochs): their metrics are not comparable with full-budget trials, and since ASHA
stops the trials that look worse, keeping them would bias every comparison. Diverged and
errored trials have no final metrics, and running trials have not finished yet. Every skipped
trial is counted by reason (a key of `study.records.SKIP_WHY`) in `Sweep.skipped`, so a report
can say what was left out. A trial counts once: a trial Ray restarted (a retry after its worker
died, a resume) has a run per attempt, and its finished one is used (`current_runs`); the
unfinished runs of a sweep whose driver is gone (parent run closed, or heartbeat stale: a
killed driver) count as `interrupted`, not running. Runs are decoded as `TrialRecord`s and
the sweep's parsed space as a `SweepSpec`, the records the sweep wrote (`study/records.py`).

Reads are batched: one `search_runs` (paged) for all child runs of the sweep, whose
`run.data.metrics` hold each metric's latest value (the final `seed_<k>/<name>` values are
logged once, at the end), and one artifact download per used run for the `seed_<k>.json`
tables. This module never imports Ray or PyTorch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from study.config import FIELD_NAMES
from study.metrics import ALL_METRICS, HIGHER_IS_BETTER, ROBUSTNESS_METRICS
from study.records import (
    HEARTBEAT_STALE,
    KIND_SWEEP,
    RUN_COLUMNS,
    SKIP_WHY,
    SPACE_ARTIFACT,
    SPEC_ARTIFACT,
    TAG_HEARTBEAT,
    TAG_HEARTBEAT_S,
    TAG_KIND,
    TAG_OBJECTIVE,
    TAG_PARENT,
    TRIAL_ID_COLUMNS,
    Outcome,
    SweepSpec,
    TrialRecord,
    current_runs,
    replicate_seeds,
    split_seed_tables,
)
from study.tracking import resolve_uri

if TYPE_CHECKING:
    from mlflow.entities import Experiment, Run
    from mlflow.tracking import MlflowClient

__all__ = ["HIGHER_IS_BETTER", "ReportError", "Sweep", "load_sweep", "trial_means",
           "varied_params"]

# the targets a report studies: generalization gaps, test accuracy, robustness
DEFAULT_TARGETS: tuple[str, ...] = ("gen_gap_acc", "gen_gap_loss", "test_acc",
                                    *ROBUSTNESS_METRICS)
# `seed` is the replicate seed (trial k of a config runs with seed + k): never a design choice
NOT_DESIGN = ("seed",)
# per-epoch metrics whose learning curves are read (common budgets, imputation of stopped trials)
CURVE_METRICS: tuple[str, ...] = ("val_acc", "val_loss", "test_acc", "test_loss", "train_acc",
                                  "train_loss", "gen_gap_acc", "gen_gap_loss", "ece")
TRIAL_KEY = "trial_id"  # the column naming a trial in every table of a Sweep
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
    used: number of trials used; skipped: reason (a key of `SKIP_WHY`) -> trials left out.
    spec: the sweep's parsed search space (None for a store written without one).
    trial_table: one row per finished trial of ANY outcome (completed, early-stopped, diverged,
        error, interrupted): trial_id, run_id, outcome, last_epoch (the last epoch it logged),
        every TrialConfig field and each metric's last logged seed mean. The estimators use it
        to see what early stopping selected.
    curves: the seed-mean learning curves of completed and early-stopped trials: one row per
        trial x epoch (trial_id, epoch, one column per metric of `CURVE_METRICS` logged).
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
    spec: SweepSpec | None = None
    conditional: list[str] = field(default_factory=list)  # varied but left out (see load_sweep)
    trial_table: pd.DataFrame = field(default_factory=pd.DataFrame)
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def design(self) -> str:
        """The sweep's analysis design (`search` for stores written without one)."""
        return str(getattr(self.spec, "design", "search")) if self.spec else "search"

    def targets(self) -> list[str]:
        """The default targets present in `trials` (gaps, test accuracy, robustness)."""
        return [m for m in DEFAULT_TARGETS if m in self.metrics]

    def skipped_text(self) -> str:
        return skipped_text(self.skipped)

    def seeds(self) -> int:
        """The most replicates any used trial has."""
        if self.trials.empty:
            return 0
        return int(self.trials.groupby(TRIAL_KEY)["seed"].nunique().max())


def skipped_text(skipped: dict[str, int]) -> str:
    """e.g. "2 early_stopped (stopped by ASHA ...), 1 diverged (...)": the reasons that
    occurred, most frequent first; "none" if none did."""
    parts = [f"{n} {r} ({SKIP_WHY.get(r, r)})"
             for r, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])) if n]
    return ", ".join(parts) if parts else "none"


def trial_means(trials: pd.DataFrame, columns: Sequence[str],
                group: str = TRIAL_KEY) -> pd.DataFrame:
    """One row per trial: the seed means of `columns`, the trial's other (constant) columns
    kept, in the order trials first appear."""
    if group not in trials:
        return trials
    columns = [c for c in dict.fromkeys(columns) if c in trials]
    first = trials.drop_duplicates(group).set_index(group)
    if trials[group].duplicated().any():
        means = trials.groupby(group, sort=False)[columns].mean()
        first[columns] = means.reindex(first.index)
    return first.reset_index()


def _client(uri: str) -> MlflowClient:
    import logging

    from mlflow.tracking import MlflowClient
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def _search_all(client: MlflowClient, exp_ids: list[str], filter_string: str,
                order_by: list[str] | None = None,
                max_results: int | None = None) -> list[Run]:
    out: list[Run] = []
    token = None
    while True:
        n = PAGE if max_results is None else min(PAGE, max_results - len(out))
        page = client.search_runs(exp_ids, filter_string=filter_string, max_results=n,
                                  order_by=order_by, page_token=token)
        out.extend(page)
        token = page.token
        if not token or (max_results is not None and len(out) >= max_results):
            return out


def _find_parent(client: MlflowClient, uri: str, experiment: str | None,
                 run_id: str | None) -> tuple[Experiment, Run]:
    from mlflow.exceptions import MlflowException

    sweep_filter = f"tags.`{TAG_KIND}` = '{KIND_SWEEP}'"
    newest = ["attributes.start_time DESC"]
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ReportError(f"--run: no run {run_id!r} in {uri}") from None
        if run.data.tags.get(TAG_KIND) != KIND_SWEEP:
            raise ReportError(f"--run: run {run_id!r} is not a sweep's parent run "
                              f"(tag {TAG_KIND}=sweep); pass the parent run id")
        exp = client.get_experiment(run.info.experiment_id)
        if experiment and exp.name != experiment:
            raise ReportError(f"--run: run {run_id!r} belongs to experiment {exp.name!r}, "
                              f"not {experiment!r}")
        return exp, run
    if experiment:
        named = client.get_experiment_by_name(experiment)
        if named is None:
            names = [e.name for e in client.search_experiments() if e.name != "Default"]
            known = ", ".join(sorted(names)) or "none"
            raise ReportError(f"--experiment: no experiment {experiment!r} in {uri} "
                              f"(known: {known})")
        runs = _search_all(client, [named.experiment_id], sweep_filter, newest, 1)
        if not runs:
            raise ReportError(f"--experiment: {experiment!r} in {uri} holds no sweep "
                              f"(no run tagged {TAG_KIND}=sweep); run `study sweep` first")
        return named, runs[0]
    exps = client.search_experiments()
    runs = _search_all(client, [e.experiment_id for e in exps], sweep_filter, newest, 1) \
        if exps else []
    if not runs:
        raise ReportError(f"no sweep in {uri}: run `study sweep SPACE` first, or pass "
                          "--tracking-uri where a sweep was logged")
    exp = client.get_experiment(runs[0].info.experiment_id)
    return exp, runs[0]


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


def _load_tables(used: list[TrialRecord], params: list[str],
                 tracking_uri: str | None = None) -> dict[str, pd.DataFrame]:
    """The `seed_<k>.json` tables of the used runs, read through each run's artifact repository
    (one listing per run; no per-file run lookups; `tracking_uri` resolves the artifacts a
    tracking server proxies)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    rows: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="study_report_") as tmp, _no_progress_bars():
        for u in used:
            if not u.artifact_uri:
                continue
            # Any: MLflow leaves `download_artifacts` unannotated
            repo: Any = get_artifact_repository(u.artifact_uri, tracking_uri=tracking_uri)
            try:
                names = [a.path for a in repo.list_artifacts()
                         if split_seed_tables(a.path) is not None]
            except Exception:  # an unreachable artifact store: metrics are still usable
                continue
            dst = Path(tmp) / u.run_id
            dst.mkdir()
            extra = {p: u.config[p] for p in params}
            for name in sorted(names):
                k = split_seed_tables(name)
                try:
                    data = json.loads(Path(repo.download_artifacts(name, str(dst))).read_text())
                except (OSError, ValueError):
                    continue
                ids = {"run_id": u.run_id, "trial_id": u.trial_id,
                       "seed": u.config["seed"] + k, "seed_index": k}
                for tname, table in (data if isinstance(data, dict) else {}).items():
                    if not isinstance(table, list):
                        continue
                    for r in table:
                        if isinstance(r, dict):
                            rows.setdefault(tname, []).append(
                                {**ids, **r, **{p: v for p, v in extra.items() if p not in r}})
    return {name: pd.DataFrame(r) for name, r in sorted(rows.items())}


def _load_spec(artifact_uri: str | None,
               tracking_uri: str | None = None) -> SweepSpec | None:
    """The parent run's `sweep_spec.json`, typed; for a store written before it existed, its
    `space.yaml` parsed again. None when neither can be read. `tracking_uri` resolves the
    artifacts a tracking server proxies (`mlflow-artifacts:/...`)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from study.spaces import parse_space

    if not artifact_uri:
        return None
    # `download_artifacts` is untyped
    repo: Any = get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="study_report_") as tmp, _no_progress_bars():
        try:
            return SweepSpec.from_json(Path(repo.download_artifacts(SPEC_ARTIFACT, tmp))
                                       .read_text())
        except Exception:  # absent (an older store) or unreadable: try the space file
            pass
        try:
            text = Path(repo.download_artifacts(SPACE_ARTIFACT, tmp)).read_text()
            return parse_space(text, SPACE_ARTIFACT)
        except Exception:  # absent or no longer valid: distributions fall back to observed
            return None


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
    records = sorted((TrialRecord.from_mlflow(r) for r in children),
                     key=lambda r: (r.start_time or 0, r.run_id))
    if driver_gone(parent):  # its unfinished runs will not finish: they were interrupted
        records = [dataclasses.replace(r, outcome=Outcome.INTERRUPTED)
                   if r.outcome is None else r for r in records]
    runs = pd.DataFrame([{
        "run_id": r.run_id, "trial_id": r.trial_id, "status": r.status,
        "stop_reason": r.outcome.value if r.outcome else None,
        "stop_message": r.message or None,
        "start_time": pd.to_datetime(r.start_time, unit="ms", utc=True)
        if r.start_time else pd.NaT} for r in records], columns=list(RUN_COLUMNS))
    skipped = {k: 0 for k in (Outcome.EARLY_STOPPED, Outcome.DIVERGED, Outcome.ERROR,
                              "running")}
    used: list[TrialRecord] = []
    # one run per trial: a trial Ray restarted has a run per attempt (`current_runs`)
    chosen = {id(r) for r in current_runs(records).values()}
    current = [r for r in records if id(r) in chosen]
    for r in current:
        why = r.skip_reason
        if why is None:
            used.append(r)
        else:
            skipped[why] = skipped.get(why, 0) + 1
    skipped = {str(k): n for k, n in skipped.items()}
    where = f"sweep {exp.name!r} (parent run {pid})"
    if not used:
        n_skip = sum(skipped.values())
        why = skipped_text(skipped) if n_skip else "no child runs yet"
        raise ReportError(f"{where}: no completed trials to analyse; {n_skip} skipped: {why}")
    finished = [r for r in current if not r.orphan
                and (r.outcome is not None or r.skip_reason != "running")]
    analysable = [r for r in finished
                  if r.outcome in (Outcome.COMPLETED, Outcome.EARLY_STOPPED)]
    configs = pd.DataFrame([u.config for u in analysable])
    spec = _load_spec(parent.info.artifact_uri, uri)
    vary = bool(spec and spec.vary_data_seed)  # sweeps without a spec shared one data seed
    # a conditional param (`when:` in the space) holds its default where inactive, which would
    # make one of its levels stand for "the condition is off": it is left out of the analysis
    conditional = set(spec.conditional) if spec else set()
    varied = varied_params(configs)
    params = [p for p in varied if p not in conditional]
    names: set[str] = set()
    rows = []
    for u in used:
        for k, m in sorted(u.seeds.items()):
            names |= set(m)
            epoch = m.get("epoch", u.config.get("epochs"))
            seed, data_seed = replicate_seeds(u.config["seed"], u.config["data_seed"], k, vary)
            rows.append({**u.config, "run_id": u.run_id, "trial_id": u.trial_id,
                         "seed": seed, "data_seed": data_seed, "seed_index": k,
                         "status": u.status,
                         "stop_reason": u.outcome.value if u.outcome else None,
                         "epoch": int(epoch) if epoch is not None else None,
                         **{n: v for n, v in m.items() if n != "epoch"}})
    metrics = _ordered_metrics(names - {"epoch"})
    columns = [*TRIAL_ID_COLUMNS, *[f for f in FIELD_NAMES if f != "seed"], *metrics]
    trials = pd.DataFrame(rows).reindex(columns=columns)
    try:
        objectives = [(str(m), str(d)) for m, d in json.loads(parent.data.tags[TAG_OBJECTIVE])]
    except (KeyError, TypeError, ValueError):
        objectives = []
    return Sweep(experiment=exp.name, parent_run_id=pid, trials=trials, runs=runs,
                 params=params, metrics=metrics, objectives=objectives,
                 tables=_load_tables(used, params, uri), used=len(used), skipped=skipped,
                 tracking_uri=uri, spec=spec, conditional=sorted(conditional & set(varied)),
                 trial_table=_trial_table(finished), curves=_curves(client, analysable))


def driver_gone(parent: Run, now: float | None = None) -> bool:
    """Whether a sweep's driver is gone: the sweep has a heartbeat (tag `study.heartbeat`,
    written every `study.heartbeat_s` seconds while its driver runs) and its parent run is
    closed, or the heartbeat is more than HEARTBEAT_STALE periods old (a killed driver). A
    sweep recorded before the heartbeat existed is taken as its runs say."""
    try:
        beat = float(parent.data.tags[TAG_HEARTBEAT])
        period = float(parent.data.tags[TAG_HEARTBEAT_S])
    except (KeyError, TypeError, ValueError):
        return False
    stale = (time.time() if now is None else now) - beat > HEARTBEAT_STALE * period
    return parent.info.status != "RUNNING" or stale


def _trial_table(records: list[TrialRecord]) -> pd.DataFrame:
    rows = []
    for r in records:
        outcome = r.outcome or Outcome.INTERRUPTED
        last = r.metrics.get("epoch")
        rows.append({"trial_id": r.trial_id, "run_id": r.run_id, "outcome": outcome.value,
                     "last_epoch": int(last) if last is not None else 0, **r.config,
                     **{k: v for k, v in r.metrics.items() if k != "epoch"}})
    return pd.DataFrame(rows)


def _curves(client: MlflowClient, records: list[TrialRecord]) -> pd.DataFrame:
    """Seed-mean learning curves (one metric-history read per run and curve metric)."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for r in records:
        for key in CURVE_METRICS:
            if key not in r.metrics:
                continue
            for m in client.get_metric_history(r.run_id, key):
                rows.setdefault((r.trial_id, int(m.step)), {})[key] = float(m.value)
    out = pd.DataFrame([{"trial_id": t, "epoch": e, **v} for (t, e), v in rows.items()])
    return out.sort_values(["trial_id", "epoch"]).reset_index(drop=True) if len(out) else out
