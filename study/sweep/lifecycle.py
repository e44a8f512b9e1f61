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
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from study.records import TAG_OBJECTIVE, Outcome, SweepSpec
from study.spaces import SpaceError, load_space
from study.sweep.progress import console
from study.tracking import Tracker, resolve_uri

DEFAULT_STORAGE = "ray_results"
META = "study.json"
# Ray's own output stays quiet; results may omit the objective (a failed trial's last report).
# Experiment state (every trial's record and last result, the searcher's Optuna study) is one
# file that Ray rewrites whole at every save: saved at every driver step (ten a second), a sweep
# wrote trials^2 x its size (29 GB for `make sweep`). It is saved every STATE_PERIOD_S seconds,
# and at the end of every driver step in which a trial finished (`SaveOnTrialEnd`), so a killed
# driver still never loses or reruns a finished trial; each trial's record keeps only what a
# resume reads (`CompactResults`: MLflow holds the rest).
STATE_PERIOD_S = 60
RAY_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
           "TUNE_GLOBAL_CHECKPOINT_S": str(STATE_PERIOD_S), "RAY_AIR_NEW_OUTPUT": "0",
           "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "1000",
           "RAY_DEDUP_LOGS": "0", "RAY_TRAIN_V2_ENABLED": "0",
           # a trial asking for no GPU sees none (Ray's current default, stated explicitly)
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1", "TUNE_MAX_PENDING_TRIALS_PG": "4",
           "RAY_CHDIR_TO_TRIAL_DIR": "0"}
# what study.json says of a sweep whose tuner saves its state when a trial finishes; a sweep
# started before (without it) is resumed with the state saved at every step, as it ran
STATE_SAVES = "on_trial_end"
QUIET_LOGGERS = ("ray", "ray.tune", "optuna", "mlflow")


@contextlib.contextmanager
def sweep_environment(env: dict[str, str] | None = None) -> Iterator[None]:
    """Ray's settings (RAY_ENV, updated by `env`, where the user has not set them), quiet
    loggers and warning filters for the duration of a sweep; all of them restored afterwards,
    and a Ray session started here shut down."""
    import ray

    ray_env = {**RAY_ENV, **(env or {})}
    saved_env = {k: os.environ.get(k) for k in ray_env}
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    had_ray = ray.is_initialized()
    os.environ.update({k: v for k, v in ray_env.items() if saved_env[k] is None})
    try:
        with warnings.catch_warnings():
            import optuna
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", message="The reported value is ignored")
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            for name in ("optuna", "mlflow"):
                logging.getLogger(name).setLevel(logging.WARNING)
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


def init_ray(address: str | None, quiet: bool = True) -> dict[str, float]:
    """Connect to (or start) Ray quietly; returns the cluster resources."""
    import ray
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": not quiet,
                                  "logging_level": logging.ERROR, "configure_logging": True}
        if address:
            kwargs["address"] = address
            kwargs["runtime_env"] = {"py_modules": [str(Path(__file__).parents[1])]}
        ray.init(**kwargs)
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    return {k: float(v) for k, v in ray.cluster_resources().items()
            if k in ("CPU", "GPU", "memory") or k.startswith("accelerator_type:")}


def _trainable(spec: SweepSpec) -> Any:
    from ray import tune

    from study.trainable import trainable
    return tune.with_resources(tune.with_parameters(trainable, seeds=spec.seeds,
                                                    vary_data_seed=spec.vary_data_seed,
                                                    seed_batching=spec.seed_batching,
                                                    cpus=spec.cpu),
                               {"cpu": spec.cpu, "gpu": spec.gpu})


def run_sweep(space_path: str | Path, name: str | None = None, trials: int | None = None,
              address: str | None = None, tracking_uri: str | None = None,
              storage: str | Path | None = None,
              overrides: dict[str, Any] | None = None,
              callbacks: list[Any] | None = None) -> dict:
    """Start a sweep; returns its summary (see `finish`). `overrides` may set `epochs`, `gpu`
    and `max_concurrent` of the space (None leaves a value as the file has it); `callbacks`
    are more Ray Tune callbacks (the benchmarks' timers), called after the sweep's own."""
    cli_values = {"num_trials": trials, **(overrides or {})}
    spec = override(load_space(space_path), cli_values)
    name = name or spec.name
    store = Path(storage or DEFAULT_STORAGE).resolve()
    exp_dir = store / name
    if (exp_dir / META).exists():
        raise SpaceError(f"--name: a sweep {name!r} already exists in {store}; continue it with "
                         f"`study resume {name}` or choose another --name")
    uri = resolve_uri(tracking_uri)
    with sweep_environment():
        resources = init_ray(address)
        tracker = Tracker(uri)
        parent = tracker.start_parent(name, f"sweep_{name}", spec, {
            "space_file": spec.path, "space_name": spec.name,
            "num_trials": str(spec.num_trials), "seeds": str(spec.seeds),
            "ray_cluster_resources": json.dumps(resources),
            TAG_OBJECTIVE: json.dumps(spec.objectives)})
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / "space.yaml").write_text(spec.text)
        (exp_dir / META).write_text(json.dumps({
            "name": name, "space_path": spec.path, "tracking_uri": uri,
            "parent_run_id": parent, "num_trials": spec.num_trials, "address": address,
            "created": time.time(), "state_saves": STATE_SAVES,
            "overrides": {k: v for k, v in cli_values.items() if v is not None}}, indent=1))
        console().print(
            f"sweep {name}: {spec.num_trials} trials x {spec.seeds} seeds of {spec.path} on "
            f"{resources.get('CPU', 0):g} CPUs / {resources.get('GPU', 0):g} GPUs; "
            f"MLflow {uri} (parent run {parent})")
        _tuner(spec, name, store, tracker, parent, callbacks).fit()
        return finish(tracker, parent, spec, name)


def _tuner(spec: SweepSpec, name: str, store: Path, tracker: Tracker, parent: str,
           extra: list[Any] | None = None) -> Any:
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from study.sweep.callbacks import TrackingCallback
    from study.sweep.progress import ProgressView

    search = ConcurrencyLimiter(_study_search(spec), max_concurrent=spec.max_concurrent)
    saver = _ray_class("SaveOnTrialEnd")(_scheduler(spec))
    # CompactResults comes after every callback that reads a result's per-seed values
    callbacks = [TrackingCallback(tracker, parent, spec), ProgressView(spec),
                 _ray_class("CompactResults")(spec), saver.callback, *(extra or [])]
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
    the trial ends)."""
    from study.records import REPORT_TABLES, is_logged_metric
    if key == REPORT_TABLES:
        return not finished
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
        finished (`TrackingCallback._sync` keeps those and deletes the rest). Ray hands its
        controller to a scheduler's end-of-trial hooks only, hence a scheduler."""

        def __init__(self, policy: Any) -> None:
            self.policy = policy
            self.controller: Any = None
            self.pending = False
            self.callback = _StepEnd(self)

        def __getstate__(self) -> dict:
            return {**self.__dict__, "controller": None, "pending": False}

        def _ended(self, controller: Any) -> None:
            self.controller, self.pending = controller, True

        def save_if_pending(self) -> None:
            if self.pending and self.controller is not None:
                self.pending = False
                self.controller.checkpoint(force=True, wait=True)

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
            return str(self.policy.on_trial_result(controller, trial, result))

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


def override(spec: SweepSpec, values: dict[str, Any]) -> SweepSpec:
    """Command-line overrides of a parsed space, checked like the file's own values."""
    values = {k: v for k, v in values.items() if v is not None}
    for key in ("num_trials", "epochs", "max_concurrent"):
        if key in values and values[key] < 1:
            flag = "trials" if key == "num_trials" else key.replace("_", "-")
            raise SpaceError(f"--{flag}: must be >= 1, got {values[key]}")
    if (spec.design_points and "num_trials" in values
            and values["num_trials"] != spec.num_trials):
        raise SpaceError(f"--trials: design {spec.design} runs exactly {spec.num_trials} trials "
                         f"({spec.design_note}); drop --trials")
    if values.get("gpu", 0) < 0:
        raise SpaceError(f"--gpu: must be >= 0, got {values['gpu']}")
    if "epochs" in values:
        if spec.grace_period > values["epochs"]:
            raise SpaceError(f"--epochs: {values['epochs']} is below the space's grace_period "
                             f"({spec.grace_period})")
        values["fixed"] = {**spec.fixed, "epochs": values["epochs"]}
    return spec.replace(**values)


def resume_sweep(name: str, storage: str | Path | None = None,
                 tracking_uri: str | None = None, address: str | None = None) -> dict:
    """Continue an interrupted sweep: finished trials are kept, unfinished ones restart."""
    store = Path(storage or DEFAULT_STORAGE).resolve()
    exp_dir = store / name
    if not (exp_dir / META).exists():
        raise SpaceError(f"NAME: no sweep {name!r} in {store}; pass --storage DIR where it ran")
    meta = json.loads((exp_dir / META).read_text())
    spec = override(load_space(exp_dir / "space.yaml"), meta.get("overrides", {}))
    uri = tracking_uri or meta["tracking_uri"]
    # a sweep started before its tuner saved the state at each trial's end: every step, as then
    old = {} if meta.get("state_saves") == STATE_SAVES else {"TUNE_GLOBAL_CHECKPOINT_S": "0"}
    with sweep_environment(old):
        init_ray(address or meta.get("address"))
        tracker = Tracker(uri)
        tracker.client.update_run(meta["parent_run_id"], status="RUNNING")
        console().print(f"resuming sweep {name} from {exp_dir}")
        from ray import tune
        tuner = tune.Tuner.restore(str(exp_dir), trainable=_trainable(spec),
                                   resume_unfinished=True, resume_errored=False)
        tuner.fit()
        return finish(tracker, meta["parent_run_id"], spec, name)


def finish(tracker: Tracker, parent: str, spec: SweepSpec, name: str) -> dict:
    """Count the sweep's trials in MLflow, close the parent run if all are done, and say so."""
    outcomes = [r.outcome for r in tracker.children(parent).values()]
    counts = {o.value: outcomes.count(o) for o in Outcome if o is not Outcome.INTERRUPTED}
    done = sum(counts.values())
    complete = done >= spec.num_trials
    tracker.finish_parent(parent, "FINISHED" if complete else "KILLED")
    con = console()
    con.print(f"sweep {name}: {done}/{spec.num_trials} trials recorded "
              + " ".join(f"{k}={v}" for k, v in counts.items()))
    if not complete:
        con.print(f"interrupted: continue with `study resume {name}`")
    return {"name": name, "parent_run_id": parent, "done": done, "complete": complete,
            "counts": counts, "tracking_uri": tracker.uri,
            "experiment_id": tracker.experiment_id(name)}
