"""A sweep's lifecycle: start, resume, finish.

`run_sweep` starts a sweep named NAME under `--storage` (Ray's experiment directory also holds
`study.json`, the record `study resume NAME` needs); `resume_sweep` continues it with the
searcher state restored; `finish` counts what MLflow holds and closes the parent run.
Everything a sweep changes in the process (environment variables, warning filters, log levels,
a Ray session it started) is put back when it returns (`sweep_environment`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from study.preflight import OVERRIDE_FLAGS, check_cluster, check_overrides, check_start
from study.records import TAG_HEARTBEAT_S, TAG_OBJECTIVE, Outcome, SweepSpec, replayed
from study.spaces import SpaceError, load_space, parse_space
from study.sweep.callbacks import clear_halt, halt, halted, resuming
from study.sweep.progress import announce, console, first_step_warning, starting_line
from study.tracking import (
    StoreFault,
    Tracker,
    checkpoint_sqlite,
    prepare_sqlite,
    resolve_uri,
    short_error,
)

DEFAULT_STORAGE = "ray_results"
META = "study.json"
# the child-run writes the store has not taken yet (study/tracking.py `Outbox`), delivered by
# the driver when the store is back, or by `study resume`
SPOOL = "mlflow_spool.jsonl"
# how often (s) the driver says on the parent run that it is alive (README "What survives")
HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S = "STUDY_HEARTBEAT_S", 60.0
# Ray's own output stays quiet; results may omit the objective (a failed trial's last report).
# Experiment state (every trial's record and last result, the searcher's Optuna study) is one
# file that Ray rewrites whole at every save: saved at every driver step (ten a second), a sweep
# wrote trials^2 x its size (29 GB for `make sweep`). It is saved every STATE_PERIOD_S seconds,
# and, once a trial has finished, at the end of the first driver step at which the forced saves
# stay under STATE_MB_PER_EPOCH written per epoch result (`SaveOnTrialEnd`); a trial that
# finished after the last save is replayed from its MLflow run on resume (`study.sweep.journal`),
# so a killed driver never loses or reruns a finished trial. Each trial's record keeps only what
# a resume reads (`CompactResults`: MLflow holds the rest).
STATE_PERIOD_S = 60
STATE_MB_ENV, STATE_MB_PER_EPOCH = "STUDY_STATE_MB_PER_EPOCH", 0.1
ACCEL_ZERO = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"
RAY_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
           "TUNE_GLOBAL_CHECKPOINT_S": str(STATE_PERIOD_S), "RAY_AIR_NEW_OUTPUT": "0",
           "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "1000",
           "RAY_DEDUP_LOGS": "0", "RAY_TRAIN_V2_ENABLED": "0",
           # a trial asking for no GPU sees none (Ray 2.60 defaults to leaving every GPU
           # visible to it; each worker reads this, so a cluster's get it in the job's
           # runtime env too: `init_ray`)
           ACCEL_ZERO: "1", "TUNE_MAX_PENDING_TRIALS_PG": "4",
           "RAY_CHDIR_TO_TRIAL_DIR": "0",
           # an MLflow call that cannot reach its server fails within seconds, not minutes:
           # the tracker's outbox keeps the write and re-sends it (study/tracking.py)
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# what study.json says of a sweep whose tuner saves its state when a trial finishes; a sweep
# started before (without it) is resumed with the state saved at every step, as it ran
STATE_SAVES = "on_trial_end"
QUIET_LOGGERS = ("ray", "ray.tune", "optuna", "mlflow")
# failures the sweep detects and reports itself in one line (a state save that did not reach
# the storage, an MLflow server that is away), instead of Ray's and urllib3's tracebacks
SILENCED_LOGGERS = ("ray.tune.execution.experiment_state", "ray.train._internal.syncer",
                    "ray.tune.tune", "urllib3.connectionpool", "mlflow.store.db.utils")


class SweepFault(RuntimeError):
    """A sweep that could not go on, or a resume that cannot start: one line saying why and
    what to do. `exit_code`: 1 for a fault during the sweep, 2 for a resume refused before it
    changed anything."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# Ray Tune hands these driver variables to every trial actor in its runtime env, which Ray's
# runtime-env agent writes in clear to its log (RAY_TMPDIR/ray/session_*/logs); trials need
# none of them (a local Ray's workers inherit the driver's environment anyway), so a sweep
# passes none (tests/test_secrets.py)
KEPT_FROM_TRIALS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                              "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"})


@contextlib.contextmanager
def _credentials_kept_from_trials() -> Iterator[None]:
    """Leave KEPT_FROM_TRIALS out of the variables Ray Tune propagates to trials (its
    `class_cache.ENV_VARS_TO_PROPAGATE`, read when a trial's actor class is made), for the
    duration of a sweep."""
    from ray.tune.execution import class_cache
    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(propagated, set):
        class_cache.ENV_VARS_TO_PROPAGATE = propagated - KEPT_FROM_TRIALS
    try:
        yield
    finally:
        if isinstance(propagated, set):
            class_cache.ENV_VARS_TO_PROPAGATE = propagated


@contextlib.contextmanager
def sweep_environment(env: dict[str, str] | None = None) -> Iterator[None]:
    """Ray's settings (RAY_ENV, updated by `env`, where the user has not set them), quiet
    loggers and warning filters for the duration of a sweep; all of them restored afterwards,
    and a Ray session started here shut down."""
    import ray

    ray_env = {**RAY_ENV, **(env or {})}
    saved_env = {k: os.environ.get(k) for k in ray_env}
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS + SILENCED_LOGGERS}
    had_ray = ray.is_initialized()
    os.environ.update({k: v for k, v in ray_env.items() if saved_env[k] is None})
    try:
        with warnings.catch_warnings(), _credentials_kept_from_trials():
            import optuna
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", message="The reported value is ignored")
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            for name in ("optuna", "mlflow"):
                logging.getLogger(name).setLevel(logging.WARNING)
            for name in SILENCED_LOGGERS:
                logging.getLogger(name).setLevel(logging.CRITICAL)
            yield
    finally:
        if not had_ray and ray.is_initialized():
            ray.shutdown()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def storage_dir(storage: str | Path | None) -> Path:
    """The folder that holds sweeps' Ray experiments: `--storage`, else ./ray_results."""
    return Path(storage or DEFAULT_STORAGE).expanduser().resolve()


def init_ray(address: str | None, quiet: bool = True) -> dict[str, float]:
    """Connect to (or start) Ray quietly; returns the cluster resources."""
    import ray
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": not quiet,
                                  "logging_level": logging.ERROR if quiet else logging.INFO,
                                  "configure_logging": True}
        if address:
            kwargs["address"] = address
            # the nodes' workers did not inherit this process's environment (a local Ray's do)
            kwargs["runtime_env"] = {"py_modules": [str(Path(__file__).parents[1])],
                                     "env_vars": {ACCEL_ZERO: "1"}}
        ray.init(**kwargs)
    # quiet: not even Ray's errors (a failed trial's traceback): the sweep reports them itself
    level = logging.CRITICAL if quiet else logging.INFO
    logging.getLogger("ray").setLevel(level)
    logging.getLogger("ray.tune").setLevel(level)
    return {k: float(v) for k, v in ray.cluster_resources().items()
            if k in ("CPU", "GPU", "memory") or k.startswith("accelerator_type:")}


def _trainable(spec: SweepSpec) -> Any:
    from ray import tune

    from study.trainable import trainable
    return tune.with_resources(tune.with_parameters(trainable, seeds=spec.seeds,
                                                    vary_data_seed=spec.vary_data_seed,
                                                    seed_batching=spec.seed_batching,
                                                    cpus=spec.cpu, gpu=spec.gpu),
                               {"cpu": spec.cpu, "gpu": spec.gpu})


def run_sweep(space_path: str | Path, name: str | None = None, trials: int | None = None,
              address: str | None = None, tracking_uri: str | None = None,
              storage: str | Path | None = None,
              overrides: dict[str, Any] | None = None,
              callbacks: list[Any] | None = None, verbose: bool = False) -> dict:
    """Start a sweep; returns its summary (see `finish`). `overrides` may set `epochs`, `gpu`
    and `max_concurrent` of the space (None leaves a value as the file has it); `callbacks`
    are more Ray Tune callbacks (the benchmarks' timers), called after the sweep's tracking
    and progress, before its results are compacted (so they see every key of a result);
    `verbose` shows Ray's own output (`init_ray`)."""
    cli_values = {"num_trials": trials, **(overrides or {})}
    spec = override(load_space(space_path), cli_values)
    name = name or spec.name
    check_start(spec, name, storage=storage, tracking_uri=tracking_uri, address=address)
    store = storage_dir(storage)
    exp_dir = store / name
    if (exp_dir / META).exists():
        raise SpaceError(f"--name: a sweep {name!r} already exists in {store}; continue it with "
                         f"`study resume {name}` or choose another --name")
    uri = resolve_uri(tracking_uri)
    announce(starting_line(name, spec))
    with sweep_environment(), ThreadPoolExecutor(1) as pool:
        warm = pool.submit(import_mlflow)  # a second of imports, while Ray starts
        resources = init_ray(address, quiet=not verbose)
        check_cluster(spec, address)  # a trial that fits on no node would wait forever
        tracker = Tracker(uri, spool=exp_dir / SPOOL)
        beat = heartbeat_s()
        warm.result()
        try:
            open_store(tracker)
            parent = tracker.start_parent(name, f"sweep_{name}", spec, {
                "space_file": spec.path, "space_name": spec.name,
                "num_trials": str(spec.num_trials), "seeds": str(spec.seeds),
                "ray_cluster_resources": json.dumps(resources),
                TAG_OBJECTIVE: json.dumps(spec.objectives), TAG_HEARTBEAT_S: f"{beat:g}"})
        except Exception as e:
            raise SweepFault(f"the MLflow store {uri} did not take the sweep's parent run "
                             f"({short_error(e)}); nothing was started") from None
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / "space.yaml").write_text(spec.text)
        (exp_dir / META).write_text(json.dumps({
            "name": name, "space_path": spec.path, "tracking_uri": uri,
            "parent_run_id": parent, "num_trials": spec.num_trials, "address": address,
            "created": time.time(), "state_saves": STATE_SAVES,
            "cwd": os.getcwd(),  # where the space's relative paths were found (resume)
            "overrides": {k: v for k, v in cli_values.items() if v is not None}}, indent=1))
        console().print(
            f"sweep {name}: Ray on {resources.get('CPU', 0):g} CPUs / "
            f"{resources.get('GPU', 0):g} GPUs; MLflow {uri} (parent run {parent}); one line "
            "per finished trial follows")
        clear_halt()
        _fit(_tuner(spec, name, store, tracker, parent, callbacks, beat))
        return _end(tracker, parent, spec, name, exp_dir)


def import_mlflow() -> None:
    """Import MLflow's client and SQL store (nothing is opened or written)."""
    import mlflow.store.tracking.sqlalchemy_store
    import mlflow.tracking  # noqa: F401


def open_store(tracker: Tracker) -> None:
    """Ready the sweep's MLflow store for writing (`prepare_sqlite`) and connect to it."""
    prepare_sqlite(tracker.uri)
    tracker.client  # noqa: B018 (the property connects, creating a new store's schema)


def _fit(tuner: Any) -> None:
    """`tuner.fit()`; an error it raises after the sweep was halted for a fault (Ray reads
    back a state it could not save) is that fault's consequence, which `_end` reports."""
    try:
        tuner.fit()
    except Exception:
        if halted() is None:
            raise


def heartbeat_s() -> float:
    return float(os.environ.get(HEARTBEAT_ENV) or DEFAULT_HEARTBEAT_S)


def _end(tracker: Tracker, parent: str, spec: SweepSpec, name: str, exp_dir: Path) -> dict:
    """After `fit`: the summary (`finish`), or a `SweepFault` saying why the sweep stopped
    early (its state could not be saved; the store refused writes or stayed away) and what
    to do."""
    reason = halted()
    clear_halt()
    try:
        summary = finish(tracker, parent, spec, name)
    except StoreFault as e:
        raise SweepFault(f"{e}; the sweep stopped with its state saved: once the store takes "
                         f"writes again, `study resume {name}`") from None
    except Exception as e:  # a call outside the outbox (counting runs, closing the parent)
        raise SweepFault(f"the MLflow store {tracker.uri} failed ({short_error(e)}); once it "
                         f"takes writes again, `study resume {name}`") from None
    finally:
        tracker.release()
        checkpoint_sqlite(tracker.uri)
    damaged = state_problem(exp_dir)
    if reason is None and damaged is None:
        return summary
    reason = reason or f"the sweep's state in {exp_dir} is unusable"
    if damaged is None:
        raise SweepFault(f"{reason}; continue with `study resume {name}` once fixed")
    raise SweepFault(f"{reason}; its saved state is damaged ({damaged}), so it cannot be "
                     "resumed: start a new sweep with --name (the finished runs stay in MLflow)")


# --- the experiment state on the storage --------------------------------------------------
# Ray rewrites each state file in place (truncate, then write), so a save that fails midway (a
# full disk) leaves it truncated. Each save the sweep checks (`unsaved`) is then moved aside
# (`.saved-<name>`, a rename: no byte written), so the next save writes new files and the last
# copy known whole survives it; `study resume` falls back on it (`restore_state`).
STATE_FILES = ("experiment_state-*.json", "searcher-state-*.pkl", "search_gen_state-*.json")
SAVED, DAMAGED = ".saved-", ".damaged-"


def _check_state(exp_dir: Path, prefix: str = "") -> str | None:
    """Why the state files named `prefix` + Ray's name cannot restore the sweep, else None."""
    tuner = exp_dir / "tuner.pkl"
    if not tuner.is_file():
        return "tuner.pkl is missing"
    states = sorted(exp_dir.glob(prefix + STATE_FILES[0]))
    if not states:
        return f"no {STATE_FILES[0]}"
    newest = [sorted(exp_dir.glob(prefix + g))[-1:] for g in STATE_FILES[1:]]
    for path in [tuner, states[-1], *newest[0], *newest[1]]:
        try:
            data = path.read_bytes()
            if path in states:
                json.loads(data)
            elif not data.endswith(b"."):  # the others are pickles, which end with STOP
                raise ValueError("truncated")
        except (OSError, ValueError) as e:
            return f"{path.name}: {short_error(e)}"
    return None


def _session(name: str) -> str:
    """The Ray session a state file belongs to (the date and time in its name)."""
    m = re.search(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", name)
    return m.group(0) if m else ""


def state_problem(exp_dir: Path) -> str | None:
    """Why Ray's saved state in `exp_dir` cannot restore the sweep (a missing, truncated or
    corrupt `tuner.pkl`, experiment state or searcher state, and no copy known whole set
    aside), else None."""
    problem = _check_state(exp_dir)
    if problem is None or problem.startswith("tuner.pkl") or not any(exp_dir.glob(SAVED + "*")):
        return problem
    saved = _check_state(exp_dir, SAVED)
    return None if saved is None else f"{problem}; the last copy known whole: {saved}"


def restore_state(exp_dir: Path) -> str | None:
    """Where the newest state is damaged or missing and the last copy known whole was set
    aside, put that copy back (the unchecked files moved aside as `.damaged-<name>`) and say
    so; else None. Renames only."""
    problem = _check_state(exp_dir)
    if problem is None or _check_state(exp_dir, SAVED) is not None:
        return None
    saved = sorted(exp_dir.glob(SAVED + "*"))
    state = sorted(exp_dir.glob(SAVED + STATE_FILES[0]))[-1]
    since = _session(state.name)
    for f in (p for g in STATE_FILES for p in exp_dir.glob(g)):
        if _session(f.name) >= since:  # written at or after the copy: not known whole
            os.replace(f, exp_dir / (DAMAGED + f.name))
    when = time.strftime("%H:%M:%S", time.localtime(state.stat().st_mtime))
    for f in saved:
        os.replace(f, exp_dir / f.name[len(SAVED):])
    if problem.startswith("no "):  # moved aside whole, and not saved again before the end
        return f"resuming from the state last checked whole (saved {when})"
    return (f"the newest state in {exp_dir} cannot be read ({problem}); resuming from the last "
            f"one known whole (saved {when}): trials that ended after it are replayed from "
            f"their runs")


def state_budget() -> float:
    """Bytes the forced saves of the state may write per epoch result (`STATE_MB_ENV`, default
    STATE_MB_PER_EPOCH MB; 0: Ray's periodic saves only)."""
    return float(os.environ.get(STATE_MB_ENV) or STATE_MB_PER_EPOCH) * 1e6


def saved_bytes(controller: Any) -> int:
    """Bytes one save of the state writes: its files, staged on the driver, then copied."""
    staging = Path(controller.experiment_state_path).parent
    return 2 * sum(p.stat().st_size for g in STATE_FILES for p in staging.glob(g))


def set_aside(controller: Any) -> None:
    """Move the state files of a save just checked aside as `.saved-<name>` (the previous
    ones replaced)."""
    staging = Path(controller.experiment_state_path).parent
    target = Path(controller.experiment_path)
    names = [p.name for g in STATE_FILES for p in staging.glob(g)]
    with contextlib.suppress(OSError):  # a read-only disk: the files stay where they are
        for old in target.glob(SAVED + "*"):
            old.unlink()
        for name in names:
            os.replace(target / name, target / (SAVED + name))


def drop_saved(controller: Any) -> None:
    """The last save was checked whole where Ray left it: no copy aside is needed."""
    with contextlib.suppress(OSError):
        for old in Path(controller.experiment_path).glob(SAVED + "*"):
            old.unlink()


def unsaved(controller: Any) -> str | None:
    """Which file of the state Ray just saved (staged on the driver, then copied to the
    storage) did not reach the storage whole, and why (a write probe's error), else None."""
    staging = Path(controller.experiment_state_path).parent
    target = Path(controller.experiment_path)
    for f in sorted(p for p in staging.iterdir() if p.is_file()):
        try:
            same = (target / f.name).read_bytes() == f.read_bytes()
        except OSError as e:
            same, missing = False, short_error(e)
        else:
            missing = ""
        if not same:
            why = _write_error(target) or missing
            return f"{f.name} was not written whole" + (f": {why}" if why else "")
    return None


def _write_error(d: Path) -> str:
    """Why 64 kB cannot be written in directory `d` (e.g. a full or read-only disk), or ""."""
    probe = d / ".write_probe"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        return ""
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink()
        return short_error(e)


def _tuner(spec: SweepSpec, name: str, store: Path, tracker: Tracker, parent: str,
           extra: list[Any] | None = None, beat: float | None = None) -> Any:
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from study.sweep.callbacks import TrackingCallback
    from study.sweep.progress import ProgressView

    search = ConcurrencyLimiter(_study_search(spec), max_concurrent=spec.max_concurrent)
    saver = _ray_class("SaveOnTrialEnd")(_scheduler(spec))
    # CompactResults comes after every callback that reads a result's per-seed values or
    # `compute_s` (the extra ones: the benchmarks' timers)
    callbacks = [TrackingCallback(tracker, parent, spec, beat), ProgressView(spec),
                 *(extra or []), _ray_class("CompactResults")(spec), saver.callback]
    return tune.Tuner(
        _trainable(spec),
        tune_config=tune.TuneConfig(search_alg=search, scheduler=saver,
                                    num_samples=spec.num_trials, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(store), callbacks=callbacks,
                                  verbose=0, log_to_file=False,
                                  failure_config=tune.FailureConfig(max_failures=2)))


def _study_search(spec: SweepSpec) -> Any:
    from study.sweep.searcher import StudySearch
    return StudySearch(spec)


def _scheduler(spec: SweepSpec) -> Any:
    """ASHA on the first objective for the `search` design; otherwise FIFO: no early stopping,
    every trial trains the whole budget (a report over completed trials is then unbiased)."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    if not spec.early_stopping:
        return FIFOScheduler()
    return AsyncHyperBandScheduler(
        metric=spec.metric, mode=spec.mode, max_t=spec.epochs,
        grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)


# --- the experiment state: small records, saved when a trial finishes --------------------------
# These classes subclass Ray's, and Ray may only be imported once `sweep_environment` has set
# its environment (ray.train reads RAY_TRAIN_V2_ENABLED when imported): they are defined on
# first use, as attributes of this module (`__getattr__`), so that the tuner's pickle
# (`tuner.pkl`, what `study resume` restores) names them by reference.
_RAY_CLASSES = ("SaveOnTrialEnd", "_StepEnd", "CompactResults")


def __getattr__(name: str) -> Any:
    if name in _RAY_CLASSES:
        return _ray_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ray_class(name: str) -> Any:
    return _ray_classes()[name]


def kept_in_state(key: str, spec: SweepSpec, finished: bool = True) -> bool:
    """Whether Ray's record of a trial keeps this key of its results: Ray's own keys, the
    objectives (the searcher and ASHA read them from a finished trial's last result, and so
    does the progress view on resume), `epoch` and the outcome; not the other metrics, their
    seed std and per-seed values (MLflow has them once the result was logged), nor the tables
    once the trial is `finished` (the tracking callback logs them from the last result when
    the trial ends), nor `compute_s` (the benchmarks' callbacks read it before; Ray would keep
    its statistics in every trial's record)."""
    from study.records import REPORT_COMPUTE_S, REPORT_TABLES, is_logged_metric
    if key == REPORT_TABLES:
        return not finished
    if key == REPORT_COMPUTE_S:
        return False
    return not is_logged_metric(key) or key == "epoch" or key in dict(spec.objectives)


@functools.cache
def _ray_classes() -> dict[str, type]:
    from ray.tune import Callback
    from ray.tune.schedulers import TrialScheduler

    class SaveOnTrialEnd(TrialScheduler):
        """The sweep's scheduler (`policy`, which decides everything) and, through
        `callback`, one forced save of the experiment state at the end of each driver step
        in which a trial finished (completed, stopped, failed): after its MLflow run was
        closed and its status set, so a resumed sweep knows every trial MLflow has as
        finished (`TrackingCallback._sync` keeps those, and marks the unfinished runs
        interrupted; it deletes nothing). Each forced save is checked (`unsaved`): one that
        did not reach the storage whole stops the sweep (`halt`); one that did is set aside
        (`set_aside`), out of reach of the next save. Ray hands its controller to a
        scheduler's end-of-trial hooks only, hence a scheduler."""

        def __init__(self, policy: Any) -> None:
            self.policy = policy
            self.controller: Any = None
            self.pending = False
            self.callback = _StepEnd(self)
            self.epochs = 0  # epoch results this driver has received
            self.written = 0  # bytes its forced saves wrote
            self.size = 0  # bytes the last one wrote

        def __getstate__(self) -> dict:
            return {**self.__dict__, "controller": None, "pending": False, "epochs": 0,
                    "written": 0, "size": 0}

        def __setstate__(self, state: dict) -> None:
            self.__dict__.update({"epochs": 0, "written": 0, "size": 0, **state})

        def _ended(self, controller: Any) -> None:
            self.controller, self.pending = controller, True

        def within_budget(self) -> bool:
            """Whether one more forced save keeps them under `state_budget` bytes per epoch
            result (the state grows with the trials, so a long sweep saves less often; a
            trial that ends after the last save is replayed on resume)."""
            budget = state_budget()
            return budget > 0 and self.written + self.size <= budget * self.epochs

        def save_if_pending(self) -> None:
            """The forced save, checked: a state that did not reach the storage whole (a
            full or read-only disk; Ray only logs it) stops the sweep (`halt`)."""
            if self.pending and self.controller is not None and self.within_budget():
                self.pending = False
                try:
                    self.controller.checkpoint(force=True, wait=True)
                except Exception as e:
                    problem: str | None = short_error(e)
                else:
                    problem = unsaved(self.controller)
                if problem:
                    self._fault(problem)
                else:
                    self.size = saved_bytes(self.controller)
                    self.written += self.size
                    set_aside(self.controller)

        def check_final_save(self) -> None:
            """Check Ray's last save, made when `fit` ends (left where Ray wrote it)."""
            if self.controller is None:
                return
            if problem := unsaved(self.controller):
                self._fault(problem)
            else:
                drop_saved(self.controller)

        def _fault(self, problem: str) -> None:
            halt(f"the sweep's state could not be saved in {self.controller.experiment_path} "
                 f"({problem})")

        # everything else is the policy's
        @property
        def metric(self) -> Any:
            return self.policy.metric

        @property
        def supports_buffered_results(self) -> bool:
            return bool(self.policy.supports_buffered_results)

        def set_search_properties(self, metric: Any, mode: Any, **spec: Any) -> bool:
            return bool(self.policy.set_search_properties(metric, mode, **spec))

        def on_trial_add(self, controller: Any, trial: Any) -> None:
            self.policy.on_trial_add(controller, trial)

        def on_trial_result(self, controller: Any, trial: Any, result: dict) -> str:
            """The policy's decision; a replay (`study.sweep.journal`) goes on to its run's
            end whatever it decides, as that run did (the policy, whose rungs a resume
            does not restore, still learns its results)."""
            self.epochs += 1
            decision = str(self.policy.on_trial_result(controller, trial, result))
            if replayed(getattr(trial, "config", None)) is not None:
                return str(TrialScheduler.CONTINUE)
            return decision

        def on_trial_complete(self, controller: Any, trial: Any, result: dict) -> None:
            self._ended(controller)
            self.policy.on_trial_complete(controller, trial, result)

        def on_trial_error(self, controller: Any, trial: Any) -> None:
            self._ended(controller)
            self.policy.on_trial_error(controller, trial)

        def on_trial_remove(self, controller: Any, trial: Any) -> None:
            self._ended(controller)
            self.policy.on_trial_remove(controller, trial)

        def choose_trial_to_run(self, controller: Any) -> Any:
            return self.policy.choose_trial_to_run(controller)

        def debug_string(self) -> str:
            return str(self.policy.debug_string())

        def save(self, checkpoint_path: str) -> None:
            self.policy.save(checkpoint_path)

        def restore(self, checkpoint_path: str) -> None:
            self.policy.restore(checkpoint_path)

    class _StepEnd(Callback):
        """Runs the forced save after the step's own (throttled) one."""

        def __init__(self, owner: SaveOnTrialEnd) -> None:
            self.owner = owner

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            self.owner.save_if_pending()

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.owner.check_final_save()

    class CompactResults(Callback):
        """Keeps in Ray's record of a trial only what a resume reads (`kept_in_state`): the
        other keys are dropped from each result once the callbacks before this one (MLflow)
        have it, before Ray stores it (the hook Ray leaves for editing a result in place),
        and the tables leave the last result once the trial's run is closed. A trial's
        record is then a few kB, whatever the number of seeds and metrics."""

        def __init__(self, spec: SweepSpec) -> None:
            self.spec = spec

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                            **info: Any) -> None:
            for key in [k for k in result if not kept_in_state(k, self.spec, finished=False)]:
                del result[key]

        def _drop_tables(self, trial: Any) -> None:
            meta: Any = getattr(trial, "run_metadata", None)
            last = getattr(meta, "last_result", None)
            if isinstance(last, dict) and not all(kept_in_state(k, self.spec) for k in last):
                # assigned, not edited: Ray caches the record's JSON until an attribute is set
                meta.last_result = {k: v for k, v in last.items()
                                    if kept_in_state(k, self.spec)}

        def on_trial_complete(self, iteration: int, trials: list, trial: Any,
                              **info: Any) -> None:
            self._drop_tables(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any,
                           **info: Any) -> None:
            self._drop_tables(trial)

    classes: dict[str, type] = {"SaveOnTrialEnd": SaveOnTrialEnd, "_StepEnd": _StepEnd,
                                "CompactResults": CompactResults}
    for key, cls in classes.items():
        cls.__module__, cls.__qualname__ = __name__, key
    return classes


def override(spec: SweepSpec, values: dict[str, Any],
             base: str | Path | None = None) -> SweepSpec:
    """Command-line overrides of a parsed space, checked like the file's own values: the
    file's text with them written in is parsed again (so the checks and the defaults that
    depend on them, e.g. `seed_batching` on `resources.gpu`, constraints and design points on
    the epochs, follow them); a problem names the flags. `--trials` only sets the number of
    trials. `base`: where the space's relative paths are found (`load_space`)."""
    import yaml

    from study.config import parse_yaml_mapping

    values = {k: v for k, v in values.items() if v is not None}
    check_overrides(values)
    if not values:
        return spec
    if (spec.design_points and "num_trials" in values
            and values["num_trials"] != spec.num_trials):
        raise SpaceError(f"--trials: design {spec.design} runs exactly {spec.num_trials} trials "
                         f"({spec.design_note}); drop --trials")
    if "epochs" in values and spec.grace_period > values["epochs"]:
        raise SpaceError(f"--epochs: {values['epochs']} is below the space's grace_period "
                         f"({spec.grace_period})")
    raw = parse_yaml_mapping(spec.text, spec.path)
    if "epochs" in values:
        fixed = raw.get("fixed") or {}
        if "epochs" in fixed:
            raw["fixed"] = {**fixed, "epochs": values["epochs"]}
        else:
            raw["budget"] = {**(raw.get("budget") or {}), "epochs": values["epochs"]}
    if "gpu" in values:
        raw["resources"] = {**(raw.get("resources") or {}), "gpu": values["gpu"]}
    if "max_concurrent" in values:
        raw["max_concurrent"] = values["max_concurrent"]
    flags = " ".join(f"{OVERRIDE_FLAGS[k]} {v:g}" for k, v in values.items())
    try:
        new = parse_space(yaml.safe_dump(raw, sort_keys=False), spec.path,
                          Path(spec.path).stem, base)
    except SpaceError as e:
        raise SpaceError(f"{flags}: {e}") from None
    # the file as the user wrote it; --trials below the file's analysis.min_trials is allowed
    # (a short trial run: the report then says no level has the trials for a call)
    return new.replace(name=spec.name, text=spec.text,
                       num_trials=values.get("num_trials", new.num_trials))


def resume_sweep(name: str, storage: str | Path | None = None,
                 tracking_uri: str | None = None, address: str | None = None,
                 verbose: bool = False) -> dict:
    """Continue an interrupted sweep: finished trials are kept, unfinished ones restart (in
    new runs linked to their interrupted ones). A sweep whose saved state cannot be restored
    is refused (`SweepFault`, exit code 2) before anything changes. `verbose` shows Ray's
    own output."""
    store = storage_dir(storage)
    exp_dir = store / name
    if not (exp_dir / META).exists():
        raise SpaceError(f"NAME: no sweep {name!r} in {store}; pass --storage DIR where it ran")
    meta = json.loads((exp_dir / META).read_text())
    problem = state_problem(exp_dir)
    if problem:
        raise SweepFault(
            f"cannot resume {name}: Ray's saved state in {exp_dir} is damaged ({problem}); "
            f"nothing was changed. Start a new sweep instead: `study sweep "
            f"{meta.get('space_path', 'SPACE.yaml')} --name NEW_NAME` (the finished runs of "
            f"{name} stay in MLflow)", exit_code=2)
    # the space as it started: relative paths found where they were then
    base = meta.get("cwd")
    spec = override(load_space(exp_dir / "space.yaml", base=base), meta.get("overrides", {}),
                    base)
    uri = resolve_uri(tracking_uri) if tracking_uri else meta["tracking_uri"]
    check_start(spec, name, storage=store, tracking_uri=uri,
                address=address or meta.get("address"), resume=True)
    # a sweep started before its tuner saved the state at each trial's end: every step, as then
    old = {} if meta.get("state_saves") == STATE_SAVES else {"TUNE_GLOBAL_CHECKPOINT_S": "0"}
    announce(f"resuming sweep {name} from {exp_dir} ({spec.num_trials} trials x {spec.seeds} "
             f"seeds of {spec.path}); starting Ray")
    note = restore_state(exp_dir)  # a damaged last save: the copy known whole, put back
    if note:
        console().print(note)
    with sweep_environment(old):
        init_ray(address or meta.get("address"), quiet=not verbose)
        check_cluster(spec, address or meta.get("address"))
        tracker = Tracker(uri, spool=exp_dir / SPOOL)
        try:
            open_store(tracker)
            tracker.flush()  # the writes an earlier driver could not deliver, first
            tracker.client.update_run(meta["parent_run_id"], status="RUNNING")
        except StoreFault as e:
            raise SweepFault(f"{e}; nothing was resumed: once the store takes writes, "
                             f"`study resume {name}` again") from None
        except Exception as e:
            raise SweepFault(f"the MLflow store {uri} failed ({short_error(e)}); nothing was "
                             f"resumed: once it takes writes, `study resume {name}` again"
                             ) from None
        from ray import tune
        with resuming(tracker):  # the trials write where this resume does
            tuner = tune.Tuner.restore(str(exp_dir), trainable=_trainable(spec),
                                       resume_unfinished=True, resume_errored=False)
        clear_halt()
        _fit(tuner)
        return _end(tracker, meta["parent_run_id"], spec, name, exp_dir)


def finish(tracker: Tracker, parent: str, spec: SweepSpec, name: str) -> dict:
    """Deliver the writes that wait for the store, count the sweep's trials in MLflow (one
    run each), close the parent run if all are done, and say so. A sweep that stopped early
    marks the runs of its unfinished trials `interrupted` (`study resume` restarts them in new
    runs)."""
    tracker.flush()
    runs = tracker.children(parent)
    outcomes = [r.outcome for r in runs.values() if not r.orphan]
    counts = {o.value: outcomes.count(o) for o in Outcome if o is not Outcome.INTERRUPTED}
    done = sum(counts.values())
    complete = done >= spec.num_trials
    if not complete:
        for r in runs.values():
            if r.outcome is None:
                tracker.finish_child(r.run_id, Outcome.INTERRUPTED, "the sweep stopped before "
                                     "the trial finished; `study resume` restarts it in a new "
                                     "run (retry_of)")
        tracker.flush()
    tracker.finish_parent(parent, "FINISHED" if complete else "KILLED")
    # an incomplete sweep's `study resume` line is the command line's last (study/cli.py)
    console().print(f"sweep {name}: {done}/{spec.num_trials} trials recorded "
                    + " ".join(f"{k}={v}" for k, v in counts.items()))
    warning = first_step_warning((r.outcome, r.message) for r in runs.values() if not r.orphan)
    if warning is not None:
        console().print(warning)
    return {"name": name, "parent_run_id": parent, "done": done, "complete": complete,
            "counts": counts, "tracking_uri": tracker.uri,
            "experiment_id": tracker.experiment_id(name)}


def discard_unstarted(exp_dir: Path) -> bool:
    """After Ctrl-C before Ray Tune's first save of a new sweep (no experiment state, no
    trial): close its parent run as KILLED and remove its directory, so that the same
    command starts it again; False (nothing done) for a sweep that can be resumed or that
    was never recorded."""
    meta_path = exp_dir / META
    if (not meta_path.is_file() or any(exp_dir.glob("experiment_state-*"))
            or any(p.is_dir() for p in exp_dir.iterdir())):
        return False
    with contextlib.suppress(Exception):  # best effort: the parent run has no trial
        meta = json.loads(meta_path.read_text())
        Tracker(meta["tracking_uri"]).finish_parent(meta["parent_run_id"], "KILLED")
    shutil.rmtree(exp_dir, ignore_errors=True)
    return True
