"""What crosses a process or storage boundary, defined once (no torch, no Ray).

Every hand-off of a trial encodes and decodes the records of this module:

- the Ray worker (`study/trainable.py`) sends one `TrialReport` per epoch (`to_ray`);
- the driver (`study/sweep/`) decodes it (`TrialReport.from_ray`), tells the searcher and logs it
  to MLflow through `study/tracking.py` (`mlflow_metrics`, `outcome_tags`, `child_tags`);
- the analysis (`analysis/load.py`) reads MLflow runs back as `TrialRecord`s
  (`TrialRecord.from_mlflow`) and the sweep's parsed space as a `SweepSpec` (`SPEC_ARTIFACT`).

Names here are read by other parts and by users' scripts: keep them exactly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from study.metrics import ALL_METRICS, EPOCH, SEED_INVARIANT_METRICS

# --- outcomes -------------------------------------------------------------------------------


class Outcome(StrEnum):
    """How a trial ended. The value is the `stop_reason` tag and the Ray report's field."""

    COMPLETED = "completed"  # trained its whole budget
    EARLY_STOPPED = "early_stopped"  # stopped by ASHA at a lower budget
    DIVERGED = "diverged"  # NaN/inf loss or gradient in some seed
    ERROR = "error"  # the trial raised (bad config for the task, crash)
    INTERRUPTED = "interrupted"  # its driver stopped before it could finish

    @property
    def mlflow_status(self) -> str:
        return _MLFLOW_STATUS[self]

    @property
    def failed(self) -> bool:
        return self in (Outcome.DIVERGED, Outcome.ERROR)

    @property
    def why(self) -> str:
        """One phrase a report prints next to the count of trials with this outcome."""
        return _WHY[self]


_MLFLOW_STATUS = {Outcome.COMPLETED: "FINISHED", Outcome.EARLY_STOPPED: "KILLED",
                  Outcome.DIVERGED: "FAILED", Outcome.ERROR: "FAILED",
                  Outcome.INTERRUPTED: "KILLED"}
_WHY = {Outcome.COMPLETED: "trained the whole budget",
        Outcome.EARLY_STOPPED: "stopped by ASHA before the last epoch",
        Outcome.DIVERGED: "NaN/inf loss or gradient",
        Outcome.ERROR: "the trial raised an error",
        Outcome.INTERRUPTED: "its driver stopped before it finished"}

# why a child run is left out of an analysis (besides its outcome)
SKIP_RUNNING = "running"
SKIP_NO_METRICS = "no_final_metrics"
SKIP_ORPHANED = "orphaned"
SKIP_WHY: dict[str, str] = {**{o.value: o.why for o in Outcome},
                            SKIP_RUNNING: "not finished yet",
                            SKIP_NO_METRICS: "completed without final metrics",
                            SKIP_ORPHANED: "finished after the sweep's last saved state; the "
                                           "resumed sweep may have run its configuration again"}


def parse_outcome(value: Any) -> Outcome | None:
    """The Outcome of a tag or report value; None when absent or unknown."""
    try:
        return Outcome(value)
    except ValueError:
        return None


# --- tag, param and report names --------------------------------------------------------------

TAG_KIND = "study.kind"  # "sweep" on a sweep's parent run
KIND_SWEEP = "sweep"
TAG_PARENT = "mlflow.parentRunId"
TAG_TRIAL = "ray_trial_id"
TAG_OUTCOME = "stop_reason"
TAG_MESSAGE = "stop_message"
TAG_SEEDS = "seeds"
TAG_OBJECTIVE = "objective"  # JSON list of [metric, mode] on the parent run
# MLflow's own tags: the run description shown on the run page, and the experiment kind from
# which MLflow 3 UIs choose an experiment's first tab: runs for "custom_model_development"
# ("Machine learning"), traces for "genai_development" (MLflow's demo sets the latter). The UI
# bundled with MLflow 3.17 follows its global workflow switch instead (README "Tracking").
TAG_NOTE = "mlflow.note.content"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_ML = "custom_model_development"
SPACE_ARTIFACT = "space.yaml"  # the space file as written (parent run)
SPEC_ARTIFACT = "sweep_spec.json"  # the parsed space, typed (parent run)

# fields of a Ray report besides metrics
REPORT_OUTCOME = TAG_OUTCOME
REPORT_MESSAGE = TAG_MESSAGE
REPORT_TABLES = "artifacts_json"
REPORT_TRACEBACK = "traceback"
REPORT_NODE = "node_json"  # an attempt's first report: where it runs (the NODE_TAGS, as JSON)
# seconds the trial spent computing the epoch (its first: since the trial began), in its own
# thread: with epochs computed ahead (`study.ahead`) Ray's time_this_iter_s leaves out the part
# of the epoch computed while the previous report waited for the driver
REPORT_COMPUTE_S = "compute_s"

# a child run: where its attempt ran, set once from the attempt's first report
TAG_NODE_ID = "node_id"  # Ray's node id
TAG_HOSTNAME = "hostname"
TAG_DEVICE = "device"  # "CPU" or the GPU's name
TAG_WORKER_PID = "worker_pid"  # the Ray worker process that trained it
NODE_TAGS = (TAG_NODE_ID, TAG_HOSTNAME, TAG_DEVICE, TAG_WORKER_PID)
# a child run is one attempt of its trial: a trial Ray restarts (retried after its worker died,
# or resumed after its driver stopped) gets a new run, and the earlier attempt's run is kept,
# marked `interrupted` with the reason; nothing deletes a run
TAG_RETRY_OF = "retry_of"  # the run of the trial's previous attempt
TAG_RETRIES = "retries"  # how many earlier attempts (runs) the trial had: 0 for most
TAG_ATTEMPT = "study.attempt"  # the driver's id of the attempt (re-sent writes stay idempotent)
# the attempt's config (its MLflow params as JSON), written with the run itself: a driver killed
# between creating the run and logging its params leaves a run whose config is still known (a
# resumed sweep links the trial's next attempt to it by that config)
TAG_CONFIG = "study.config"
MAX_TAG_CHARS = 8000  # MLflow's longest tag value
# a finished run whose trial the resumed sweep's saved state did not know, which a resume by an
# earlier version ran again (now such runs are replayed, `study.sweep.journal`): kept, left out
# of the analysis and of the trial count
TAG_ORPHAN = "study.orphan"
# a finished run whose trial the resumed sweep's saved state did not know, replayed there as a
# new trial (`study.sweep.journal`): that trial's Ray id (the run keeps its own `TAG_TRIAL`)
TAG_REPLAYED_AS = "study.replayed_as"
# the config key under which the driver hands a trial the recorded reports it replays instead
# of training (`study.sweep.journal`); never a TrialConfig field
REPLAY_KEY = "_study_replay"


def _replay(config: dict[str, Any] | None) -> dict[str, Any] | None:
    payload = (config or {}).get(REPLAY_KEY)
    return payload if isinstance(payload, dict) else None


def replayed(config: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The reports a trial replays instead of training (None: it trains)."""
    payload = _replay(config)
    return None if payload is None else list(payload["reports"])


def replayed_run(config: dict[str, Any] | None) -> str | None:
    """The recorded run a replaying trial stands for (None: it trains)."""
    payload = _replay(config)
    return None if payload is None else str(payload["run"])


# the parent run: the driver's heartbeat (unix seconds), written every `heartbeat_s` seconds
# while it runs; a RUNNING sweep whose heartbeat is HEARTBEAT_STALE periods old lost its driver
TAG_HEARTBEAT = "study.heartbeat"
TAG_HEARTBEAT_S = "study.heartbeat_s"
HEARTBEAT_STALE = 3

SEED_STD_SUFFIX = "_seed_std"
_SEED_METRIC = re.compile(r"^seed_(\d+)/(.+)$")
_SEED_TABLES = re.compile(r"^seed_(\d+)\.json$")


def seed_metric(k: int, name: str) -> str:
    """The name under which replicate k's value of metric `name` is logged."""
    return f"seed_{k}/{name}"


def split_seed_metric(key: str) -> tuple[int, str] | None:
    """(k, name) of a `seed_<k>/<name>` key, else None."""
    m = _SEED_METRIC.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


def seed_tables_artifact(k: int) -> str:
    """The artifact holding replicate k's tables ({table name: rows})."""
    return f"seed_{k}.json"


def split_seed_tables(path: str) -> int | None:
    m = _SEED_TABLES.match(path.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


# every metric key a trial logs: seed means, their std across seeds (not for metrics that are
# the same in every replicate by construction, `SEED_INVARIANT_METRICS`), per-seed values
LOGGED_METRICS = frozenset(ALL_METRICS) | {m + SEED_STD_SUFFIX for m in ALL_METRICS
                                           if m not in SEED_INVARIANT_METRICS}


def is_constant_series(key: str) -> bool:
    """True for `<name>_seed_std` of a metric that cannot vary across seeds (identically 0:
    never reported nor logged)."""
    return key.endswith(SEED_STD_SUFFIX) and \
        key[:-len(SEED_STD_SUFFIX)] in SEED_INVARIANT_METRICS


def is_logged_metric(key: str) -> bool:
    if key in LOGGED_METRICS:
        return True
    s = split_seed_metric(key)
    return s is not None and s[1] in ALL_METRICS


# --- table schemas (report CSVs) --------------------------------------------------------------

TRIAL_ID_COLUMNS = ("run_id", "trial_id", "seed", "seed_index", "status", "stop_reason", "epoch")
RUN_COLUMNS = ("run_id", "trial_id", "status", "stop_reason", "stop_message", "start_time")
EFFECT_COLUMNS = ("target", "param", "level", "mean", "ci_low", "ci_high", "n", "beyond_noise",
                  "contrast", "contrast_low", "contrast_high", "noise_floor", "raw_mean",
                  "budget", "estimator", "p_value", "q_value", "call", "n_trials", "n_rows",
                  "n_imputed", "se", "adj_low", "adj_high", "delta", "p_family", "q_family",
                  "mde", "contrast_completed_only", "note")
IMPORTANCE_COLUMNS = ("target", "param", "importance", "evaluator", "rank", "n_trials",
                      "importance_low", "importance_high", "null_high", "important", "p_value")
MEASURE_COLUMNS = ("target", "measure", "kendall_tau", "granulated_kendall_tau", "p_value", "n",
                   "tau_low", "tau_high", "granulated_low", "granulated_high", "n_groups",
                   "group_size", "n_params_granulated", "note")
# the columns `effects.csv`, `importance.csv` and `measures.csv` hold
EFFECT_CSV_COLUMNS = EFFECT_COLUMNS
IMPORTANCE_CSV_COLUMNS = (*IMPORTANCE_COLUMNS[:4], *IMPORTANCE_COLUMNS[6:])
# measures.csv: + the intervals of tau and granulated tau, group counts, why a value is empty
MEASURE_CSV_COLUMNS = (*MEASURE_COLUMNS[:12], "note")


# --- the parsed search space ------------------------------------------------------------------

PARAM_TYPES = ("categorical", "int", "float")
SEARCHERS = ("tpe", "random", "cmaes", "nsga2")
MULTI_OBJECTIVE_SEARCHERS = ("tpe", "random", "nsga2")
# how a sweep chooses its trials (README "Designs"): an adaptive searcher with ASHA early
# stopping, random sampling at the full budget, a (fractional) factorial grid, or
# one-at-a-time variations around random base configurations (the last three: no early stopping)
DESIGNS = ("search", "random", "factorial", "one_at_a_time")
FIXED_DESIGNS = ("factorial", "one_at_a_time")  # a fixed list of configurations
# the smallest difference of a metric that counts as an effect (README "Search spaces",
# `analysis: {min_effect: ...}` overrides per metric): accuracies and fractions 0.01, losses
# 0.02 nats, ECE 0.01, ratios 0.02; metrics without an entry have no minimum
DEFAULT_MIN_EFFECT: dict[str, float] = {
    **{m: 0.01 for m in ("train_acc", "val_acc", "test_acc", "gen_gap_acc", "id_len_acc",
                         "ood_len_acc", "balanced_acc", "macro_f1", "many_shot_acc",
                         "medium_shot_acc", "few_shot_acc", "corrupt_acc")},
    **{m: 0.02 for m in ("train_loss", "val_loss", "test_loss", "gen_gap_loss")},
    "ece": 0.01, "len_gen_ratio": 0.02, "corrupt_rel": 0.02,
}
DEFAULT_MIN_TRIALS = 3
# how a trial trains its seed replicates (README "Sweeps"): as one batched computation
# (`study.replicas`, falling back to lockstep where it cannot apply), or k models in lockstep
SEED_BATCHING = ("vmap", "lockstep")


@dataclass(frozen=True)
class ParamSpec:
    """One searched config field: a categorical set of values, an int/float range, or an
    int/float with explicit `values` (levels: `low`/`high` are their min and max)."""

    name: str
    kind: str
    values: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # sampled only if every (key in values)

    @property
    def levels(self) -> tuple[Any, ...]:
        """The explicit values (categorical, or numeric with `values`); () for a range."""
        return self.values

    def suggest(self, trial: Any) -> Any:
        """Sample from an Optuna trial (define-by-run)."""
        if self.values:  # categorical, or numeric levels (chosen among as a set)
            return trial.suggest_categorical(self.name, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def sample(self, rng: random.Random) -> Any:
        """Sample uniformly (in log space where `log`), for feasibility checks."""
        if self.values:
            return rng.choice(self.values)
        if self.step:  # on the grid low, low + step, ... <= high, as Optuna suggests
            v = self.low + self.step * rng.randint(0, int((self.high - self.low) / self.step
                                                          + 1e-9))
        elif self.log:
            v = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            v = rng.uniform(self.low, self.high)
        return int(round(v)) if self.kind == "int" else v

    def active(self, context: dict[str, Any]) -> bool:
        """Whether every condition holds in `context` (the fixed and sampled values); a field
        not in it (a conditional param left unsampled) has its default, as the trial will."""
        defaults = _field_defaults()
        return all((context[k] if k in context else defaults.get(k)) in vals
                   for k, vals in self.when)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "values": list(self.values),
                "when": [[k, list(v)] for k, v in self.when]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ParamSpec:
        """The inverse of `to_json`: values (and `when` values) back in their config field's
        type, as `SweepSpec.from_json` does for `fixed` (JSON has lists where a tuple-valued
        field such as `ood_len_factors` holds tuples)."""
        from study.config import coerce

        name = str(d["name"])
        return cls(name=name, kind=str(d["kind"]),
                   values=tuple(coerce(name, v) for v in d.get("values", ())),
                   low=d.get("low", 0.0), high=d.get("high", 0.0), log=bool(d.get("log", False)),
                   step=d.get("step"),
                   when=tuple((str(k), tuple(coerce(str(k), x) for x in v))
                              for k, v in d.get("when", ())))


def rung_epochs(grace_period: int, reduction_factor: int, max_t: int) -> list[int]:
    """The epochs at which ASHA (Li et al. 2020, "A System for Massively Parallel
    Hyperparameter Tuning") may stop a trial: grace * rf^k below max_t."""
    out, r = [], max(1, grace_period)
    while r < max_t:
        out.append(r)
        r *= max(2, reduction_factor)
    return out


def replicate_seeds(seed: int, data_seed: int, k: int, vary_data_seed: bool
                    ) -> tuple[int, int]:
    """Replicate k's (seed, data_seed) for a trial's (seed, data_seed): seed + k, and
    data_seed + k when `vary_data_seed` (else the shared data_seed)."""
    return seed + k, (data_seed + k if vary_data_seed else data_seed)


@functools.cache
def _field_defaults() -> dict[str, Any]:
    from study.config import field_defaults

    return field_defaults()


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, validated search space: what a sweep runs and what its report analyses.

    Built by `study.spaces.load_space`; stored with the sweep as the parent run's
    `sweep_spec.json` and read back typed by `analysis.load`."""

    name: str
    path: str
    text: str
    fixed: dict[str, Any]
    params: tuple[ParamSpec, ...]
    constraints: tuple[str, ...] = ()
    epochs: int = 10
    grace_period: int = 1
    reduction_factor: int = 3
    seeds: int = 1
    objectives: tuple[tuple[str, str], ...] = (("val_acc", "max"),)
    searcher: str = "tpe"
    searcher_seed: int = 0
    num_trials: int = 8
    max_concurrent: int = 2
    cpu: float = 1.0
    gpu: float = 0.0
    description: str = ""
    design: str = "search"  # one of DESIGNS
    design_fraction: float | None = None  # factorial: the fraction of the grid run
    design_bases: int | None = None  # one_at_a_time: the number of base configurations
    # factorial / one_at_a_time: the sampled params of every trial, in the order they run
    design_points: tuple[dict[str, Any], ...] = ()
    design_note: str = ""  # how the design's trials were counted (grid size, dropped points)
    min_effect: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIN_EFFECT))
    min_trials: int = DEFAULT_MIN_TRIALS  # the fewest trials per level for a call
    vary_data_seed: bool = True  # replicate k also uses data_seed + k (its own test set)
    seed_batching: str = "vmap"  # one of SEED_BATCHING

    @property
    def early_stopping(self) -> bool:
        """ASHA stops trials early only in the `search` design."""
        return self.design == "search"

    @property
    def metric(self) -> str:
        return self.objectives[0][0]

    @property
    def mode(self) -> str:
        return self.objectives[0][1]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def conditional(self) -> tuple[str, ...]:
        """Params sampled only under a condition (`when:`): they hold their default elsewhere."""
        return tuple(p.name for p in self.params if p.when)

    def resolve(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Fixed values plus a sample: the trial's config values."""
        return {**self.fixed, **sampled}

    def sample(self, rng: random.Random) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.params:
            if p.active({**self.fixed, **out}):
                out[p.name] = p.sample(rng)
        return out

    def replace(self, **changes: Any) -> SweepSpec:
        return replace(self, **changes)

    def to_json(self) -> str:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["params"] = [p.to_json() for p in self.params]
        d["objectives"] = [list(o) for o in self.objectives]
        d["constraints"] = list(self.constraints)
        d["fixed"] = _plain_values(self.fixed)
        d["design_points"] = [_plain_values(p) for p in self.design_points]
        d["min_effect"] = dict(self.min_effect)
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SweepSpec:
        from study.config import coerce

        d = json.loads(text)
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["params"] = tuple(ParamSpec.from_json(p) for p in d.get("params", ()))
        d["objectives"] = tuple((str(m), str(o)) for m, o in d.get("objectives", ()))
        d["constraints"] = tuple(d.get("constraints", ()))
        d["fixed"] = {k: coerce(k, v) for k, v in d.get("fixed", {}).items()}
        d["design_points"] = tuple({k: coerce(k, v) for k, v in p.items()}
                                   for p in d.get("design_points", ()))
        d["min_effect"] = {**DEFAULT_MIN_EFFECT,
                           **{str(k): float(v) for k, v in d.get("min_effect", {}).items()}}
        # sweeps stored before the field existed shared one data split across replicates
        d["vary_data_seed"] = bool(d.get("vary_data_seed", False))
        # ... and trained their replicates in lockstep
        d["seed_batching"] = str(d.get("seed_batching", "lockstep"))
        return cls(**d)

    def summary(self) -> str:
        search = self.early_stopping
        lines = [f"space {self.name} ({self.path})",
                 f"  task: {self.fixed.get('task')}  epochs: {self.epochs}  "
                 + (f"grace_period: {self.grace_period}  " if search else "")
                 + f"seeds: {self.seeds}",
                 "  objective: " + ", ".join(f"{m} ({d})" for m, d in self.objectives)
                 + (f"  searcher: {self.searcher} (seed {self.searcher_seed})" if search else ""),
                 f"  num_trials: {self.num_trials}  max_concurrent: {self.max_concurrent}  "
                 f"resources: cpu={self.cpu} gpu={self.gpu}",
                 "  fixed: " + ", ".join(f"{k}={v}" for k, v in self.fixed.items()),
                 "  params:"]
        for p in self.params:
            dom = (f"{list(p.values)}" if p.values
                   else f"[{p.low}, {p.high}]" + (" log" if p.log else ""))
            cond = (" when " + ", ".join(f"{k} in {list(v)}" for k, v in p.when)) if p.when else ""
            lines.append(f"    {p.name}: {p.kind} {dom}{cond}")
        if self.constraints:
            lines.append("  constraints: " + "; ".join(self.constraints))
        if search:
            how = (f"{self.searcher} searcher, ASHA early stopping (grace_period "
                   f"{self.grace_period}, reduction_factor {self.reduction_factor})")
        elif self.design == "random":
            how = (f"{self.num_trials} configurations sampled at random (seed "
                   f"{self.searcher_seed})")
        else:
            how = self.design_note + f" -> {self.num_trials} trials"
        lines.append(f"  design: {self.design}: {how}"
                     + ("" if search else "; no early stopping (every trial trains "
                        f"{self.epochs} epochs)"))
        changed = {k: v for k, v in sorted(self.min_effect.items())
                   if DEFAULT_MIN_EFFECT.get(k) != v}
        lines.append(f"  vary_data_seed: {str(self.vary_data_seed).lower()}  "
                     f"min_trials: {self.min_trials}  min_effect: "
                     + (", ".join(f"{k}={v:g}" for k, v in changed.items()) + " (others default)"
                        if changed else "defaults"))
        return "\n".join(lines)


def _plain_values(values: dict[str, Any]) -> dict[str, Any]:
    """Config values as JSON (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# --- a trial's report to Ray (one per epoch) --------------------------------------------------

Table = list[dict[str, Any]]


@dataclass
class TrialReport:
    """What a trial sends to the driver after an epoch (or when it fails).

    `metrics` holds seed means, `<name>_seed_std` and `seed_<k>/<name>` values. The last report
    of a trial that ran to its end carries `outcome` (completed, diverged or error) and a
    message; a trial stopped by ASHA never sends one, which is how the driver tells it was
    early-stopped. `tables` (final epoch only): seed index -> table name -> rows.
    The spread across seeds of a seed-invariant metric (`SEED_INVARIANT_METRICS`: n_params,
    flops_per_sample, epoch) is identically 0 and is dropped when the report is built, so it is
    neither reported nor logged."""

    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    outcome: Outcome | None = None
    message: str = ""
    tables: dict[int, dict[str, Table]] = field(default_factory=dict)
    traceback: str = ""
    node: dict[str, str] = field(default_factory=dict)  # NODE_TAGS: an attempt's first report
    compute_s: float = 0.0  # REPORT_COMPUTE_S; 0: not measured

    def __post_init__(self) -> None:
        self.metrics = {k: v for k, v in self.metrics.items() if not is_constant_series(k)}

    def to_ray(self) -> dict[str, Any]:
        """A flat dict for `tune.report` (the scheduler and searcher read metrics by name)."""
        out: dict[str, Any] = dict(self.metrics)
        if self.epoch:
            out[EPOCH] = float(self.epoch)
        if self.outcome is not None:
            out[REPORT_OUTCOME] = self.outcome.value
            out[REPORT_MESSAGE] = self.message
        if self.tables:
            out[REPORT_TABLES] = json.dumps({f"seed_{k}": t for k, t in self.tables.items()})
        if self.traceback:
            out[REPORT_TRACEBACK] = self.traceback
        if self.node:
            out[REPORT_NODE] = json.dumps(self.node)
        if self.compute_s:
            out[REPORT_COMPUTE_S] = float(self.compute_s)
        return out

    @classmethod
    def from_ray(cls, result: dict[str, Any] | None) -> TrialReport:
        """Decode a Ray result (Ray adds its own bookkeeping keys, which are dropped)."""
        result = result or {}
        tables: dict[int, dict[str, Table]] = {}
        raw = result.get(REPORT_TABLES)
        if raw:
            for key, t in json.loads(raw).items():
                tables[int(key.split("_", 1)[1])] = t
        metrics = {k: float(v) for k, v in result.items()
                   if is_logged_metric(k) and isinstance(v, int | float)}
        epoch = result.get(EPOCH)
        raw_node = json.loads(result.get(REPORT_NODE) or "{}")
        node = {str(k): str(v) for k, v in raw_node.items() if k in NODE_TAGS} \
            if isinstance(raw_node, dict) else {}
        return cls(epoch=int(epoch) if isinstance(epoch, int | float) else 0, metrics=metrics,
                   outcome=parse_outcome(result.get(REPORT_OUTCOME)),
                   message=str(result.get(REPORT_MESSAGE) or ""), tables=tables,
                   traceback=str(result.get(REPORT_TRACEBACK) or ""), node=node,
                   compute_s=float(result.get(REPORT_COMPUTE_S) or 0.0))

    def mean_metrics(self) -> dict[str, float]:
        """Seed means and their std."""
        return {k: v for k, v in self.metrics.items() if split_seed_metric(k) is None}

    def logged_metrics(self) -> dict[str, float]:
        """What the driver logs for this epoch (`step=epoch`), once: seed means, their std
        across seeds and every replicate's `seed_<k>/<name>`; only logged names
        (`is_logged_metric`), so never the std of a seed-invariant metric."""
        return {k: v for k, v in self.metrics.items() if is_logged_metric(k)}

    def seed_metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.metrics.items() if split_seed_metric(k) is not None}

    def ended(self) -> tuple[Outcome, str]:
        """The outcome of a finished trial whose last report this is, and its message: a
        trial that sent no outcome was stopped by ASHA."""
        if self.outcome is not None:
            return self.outcome, self.message or self.outcome.value
        return Outcome.EARLY_STOPPED, f"stopped by ASHA at epoch {self.epoch}"


def completed_message(epochs: int) -> str:
    return f"completed {epochs} epochs"


# --- a trial as stored in MLflow --------------------------------------------------------------


def mlflow_params(config: dict[str, Any]) -> dict[str, str]:
    """A config as MLflow params: every TrialConfig field under its own name (tuples as
    comma-separated values)."""
    return {k: ",".join(str(x) for x in v) if isinstance(v, tuple | list) else str(v)
            for k, v in config.items()}


def child_tags(parent_id: str, trial_id: str, seeds: int,
               params: dict[str, str] | None = None) -> dict[str, str]:
    """A child run's tags at creation; with `params`, also `TAG_CONFIG` (left out where it would
    pass MLflow's 8000-character tag limit: the params alone then say the config)."""
    tags = {TAG_PARENT: parent_id, TAG_TRIAL: trial_id, TAG_SEEDS: str(seeds)}
    config = json.dumps(params, sort_keys=True) if params else ""
    if config and len(config) <= MAX_TAG_CHARS:
        tags[TAG_CONFIG] = config
    return tags


def outcome_tags(outcome: Outcome, message: str) -> dict[str, str]:
    return {TAG_OUTCOME: outcome.value, TAG_MESSAGE: message or outcome.value}


@dataclass
class TrialRecord:
    """One trial as the analysis reads it back from MLflow.

    config: every TrialConfig field, typed (missing fields take their defaults);
    outcome: None while it runs; metrics: each metric's latest seed mean; seeds: replicate
    index -> {metric: latest value} from `seed_<k>/<name>` (a run logged by hand without them
    falls back to its means as seed 0)."""

    run_id: str
    trial_id: str
    status: str
    outcome: Outcome | None
    message: str
    config: dict[str, Any]
    metrics: dict[str, float]
    seeds: dict[int, dict[str, float]]
    artifact_uri: str = ""
    start_time: int | None = None
    orphan: bool = False  # TAG_ORPHAN: the resumed sweep does not know its trial
    retry_of: str | None = None  # TAG_RETRY_OF: the run of the previous attempt
    replayed_as: str | None = None  # TAG_REPLAYED_AS: the Ray trial a resume replayed it as

    @property
    def skip_reason(self) -> str | None:
        """None when the trial has final metrics to analyse, else a key of `SKIP_WHY`."""
        if self.orphan:
            return SKIP_ORPHANED
        if self.outcome is Outcome.COMPLETED:
            return None if self.seeds else SKIP_NO_METRICS
        if self.outcome is not None:
            return self.outcome.value
        if self.status == "RUNNING":
            return SKIP_RUNNING
        return Outcome.INTERRUPTED.value

    @classmethod
    def from_mlflow(cls, run: Any) -> TrialRecord:
        """Decode an MLflow run (an `mlflow.entities.Run`)."""
        from study.config import FIELD_NAMES, ConfigError, coerce, field_defaults

        tags, raw = run.data.tags, dict(run.data.params)
        if TAG_CONFIG in tags:  # params not logged (a driver killed in between): from the tag
            with contextlib.suppress(ValueError, TypeError):
                raw = {**json.loads(tags[TAG_CONFIG]), **raw}
        config = field_defaults()
        for name in FIELD_NAMES:
            if name in raw:
                try:
                    config[name] = coerce(name, raw[name])
                except ConfigError:
                    config[name] = raw[name]
        seeds: dict[int, dict[str, float]] = {}
        means: dict[str, float] = {}
        for key, value in run.data.metrics.items():
            s = split_seed_metric(key)
            if s is not None:
                seeds.setdefault(s[0], {})[s[1]] = float(value)
            elif not key.endswith(SEED_STD_SUFFIX) and "/" not in key:
                means[key] = float(value)
        if not seeds and means:
            seeds[0] = dict(means)
        return cls(run_id=run.info.run_id, trial_id=tags.get(TAG_TRIAL, run.info.run_id),
                   status=run.info.status, outcome=parse_outcome(tags.get(TAG_OUTCOME)),
                   message=tags.get(TAG_MESSAGE) or "", config=config, metrics=means,
                   seeds=seeds, artifact_uri=run.info.artifact_uri or "",
                   start_time=run.info.start_time, orphan=TAG_ORPHAN in tags,
                   retry_of=tags.get(TAG_RETRY_OF), replayed_as=tags.get(TAG_REPLAYED_AS))


def current_runs(records: Iterable[TrialRecord]) -> dict[str, TrialRecord]:
    """One run per trial, by trial id. A trial Ray restarted (a retry after its worker died, a
    resume after its driver stopped) has one run per attempt: its run is the newest finished
    one (an outcome other than `interrupted`), else the newest one still running, else its
    newest run; an orphan (it finished after the saved state the resume ran from, and Ray ran
    its trial again) only when it is the trial's only run. A trial the resumed sweep ran again
    under a new trial id (its saved state did not know it) has the new trial's run as its retry
    (`retry_of`): it counts as that trial."""
    records = list(records)
    out: dict[str, TrialRecord] = {}
    for r in records:
        cur = out.get(r.trial_id)
        if cur is None or _run_rank(r) > _run_rank(cur):
            out[r.trial_id] = r
    retried = {r.retry_of: r.trial_id for r in records if r.retry_of}
    return {tid: r for tid, r in out.items() if retried.get(r.run_id, tid) == tid}


def _run_rank(r: TrialRecord) -> tuple[bool, bool, bool, int, str]:
    finished = r.outcome is not None and r.outcome is not Outcome.INTERRUPTED
    return (not r.orphan, finished, r.outcome is not Outcome.INTERRUPTED, r.start_time or 0,
            r.run_id)
