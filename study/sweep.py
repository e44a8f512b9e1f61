"""Sweeps: Ray Tune + Optuna (seeded) behind a ConcurrencyLimiter, ASHA early stopping, MLflow
tracking from the driver, and resume.

`run_sweep` starts a sweep named NAME under `--storage` (Ray's experiment directory also holds
`study.json`, the record `study resume NAME` needs); `resume_sweep` continues it with the
searcher state restored.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch
from rich.console import Console

from study.metrics import ALL_METRICS
from study.spaces import SearchSpace, SpaceError, load_space
from study.tracking import TAG_STOP, Tracker, resolve_uri
from study.trainable import ARTIFACTS, STOP_MESSAGE, STOP_REASON, trainable

DEFAULT_STORAGE = "ray_results"
META = "study.json"
MAX_RESAMPLE = 200
# Ray's own output stays quiet; experiment state is saved at every step so a killed driver
# loses nothing; results may omit the objective (a failed trial's last report).
RAY_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
           "TUNE_GLOBAL_CHECKPOINT_S": "0", "RAY_AIR_NEW_OUTPUT": "0",
           "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "1000",
           "RAY_DEDUP_LOGS": "0", "RAY_TRAIN_V2_ENABLED": "0",
           # a trial asking for no GPU sees none (Ray's current default, stated explicitly)
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1", "TUNE_MAX_PENDING_TRIALS_PG": "4",
           "RAY_CHDIR_TO_TRIAL_DIR": "0"}
_LOGGED = set(ALL_METRICS) | {f"{m}_seed_std" for m in ALL_METRICS}


def console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


class SpaceSampler:
    """Optuna define-by-run: conditional params are sampled only when their `when` holds."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: Any) -> dict[str, Any]:
        ctx = dict(self.space.fixed)
        for p in self.space.params:
            if p.active(ctx):
                ctx[p.name] = p.suggest(trial)
        return dict(self.space.fixed)


def make_sampler(space: SearchSpace):
    import optuna
    s = space.searcher_seed
    if space.searcher == "random":
        return optuna.samplers.RandomSampler(seed=s)
    if space.searcher == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s, warn_independent_sampling=False)
    if space.searcher == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s)
    return optuna.samplers.TPESampler(seed=s, multivariate=True, group=True,
                                      constant_liar=True, warn_independent_sampling=False)


class StudySearch(OptunaSearch):
    """OptunaSearch that (1) resamples infeasible points, telling Optuna they failed, (2)
    tells trials that errored or diverged as failed and ASHA-stopped ones as pruned."""

    def __init__(self, space: SearchSpace) -> None:
        multi = len(space.objectives) > 1
        super().__init__(
            space=SpaceSampler(space),
            metric=[m for m, _ in space.objectives] if multi else space.metric,
            mode=[d for _, d in space.objectives] if multi else space.mode,
            sampler=make_sampler(space))
        self.study_space = space

    def suggest(self, trial_id: str) -> dict | None:
        import optuna
        for _ in range(MAX_RESAMPLE):
            cfg = super().suggest(trial_id)
            if not isinstance(cfg, dict):
                return cfg
            sampled = {k: v for k, v in cfg.items() if k not in self.study_space.fixed}
            if self.study_space.infeasible(sampled) is None:
                return cfg
            ot_trial = self._ot_trials.pop(trial_id)
            self._ot_study.tell(ot_trial, None, state=optuna.trial.TrialState.FAIL)
        raise RuntimeError(f"no feasible configuration in {MAX_RESAMPLE} samples")

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric in result:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        reason = (result or {}).get(STOP_REASON)
        if error or reason in ("error", "diverged"):
            return super().on_trial_complete(trial_id, None, True)
        if reason is None:  # stopped by ASHA: pruned at its last reported epoch
            return super().on_trial_complete(trial_id, None, False)
        return super().on_trial_complete(trial_id, result, False)


class SweepCallback(Callback):
    """Logs every trial to MLflow from the driver and prints a compact progress view."""

    def __init__(self, tracker: Tracker, parent_id: str, space: SearchSpace) -> None:
        self.tracker, self.parent_id, self.space = tracker, parent_id, space
        self.runs: dict[str, str] = {}
        self.counts = {"completed": 0, "early_stopped": 0, "diverged": 0, "error": 0}
        self.best: tuple[float, str] | None = None
        self._synced = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_synced": False}

    def get_state(self) -> dict:
        return {}

    def _sync(self, trials: list) -> None:
        """On (re)start: adopt finished child runs; drop unfinished ones, whose trials Ray
        restarts from scratch, and orphans Ray never recorded."""
        self._synced = True
        known = {t.trial_id for t in trials}
        self.counts = dict.fromkeys(self.counts, 0)
        self.runs = {}
        for tid, run in self.tracker.children(self.parent_id).items():
            reason = run.data.tags.get(TAG_STOP)
            if reason in self.counts and tid in known:
                self.runs[tid] = run.info.run_id
                self.counts[reason] += 1
                self._update_best(tid, run.data.metrics)
            else:
                self.tracker.delete(run.info.run_id)

    def _update_best(self, tid: str, metrics: dict) -> None:
        v = metrics.get(self.space.metric)
        if v is None:
            return
        sign = 1.0 if self.space.mode == "max" else -1.0
        if self.best is None or sign * v > sign * self.best[0]:
            self.best = (v, tid)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._synced:
            self._sync(trials)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from study.config import make_config
        if trial.trial_id in self.runs:
            return
        params = make_config(trial.config).to_dict()
        self.runs[trial.trial_id] = self.tracker.start_child(
            self.parent_id, trial.trial_id, params, {"seeds": str(self.space.seeds)})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        rid = self.runs.get(trial.trial_id)
        metrics = {k: v for k, v in result.items() if k in _LOGGED}
        if rid and metrics and "epoch" in result:
            self.tracker.log_metrics(rid, metrics, step=int(result["epoch"]))

    def _finish(self, trials: list, trial: Any, reason: str, message: str) -> None:
        rid = self.runs.get(trial.trial_id)
        last = trial.last_result or {}
        if rid is None:
            self.on_trial_start(0, trials, trial)
            rid = self.runs[trial.trial_id]
        per_seed = {k: v for k, v in last.items() if k.startswith("seed_")
                    and k.split("/", 1)[-1] in ALL_METRICS}
        if per_seed:
            self.tracker.log_metrics(rid, per_seed, step=int(last.get("epoch", 0)))
        artifacts = json.loads(last.get(ARTIFACTS) or "{}")
        self.tracker.finish_child(rid, reason, message, artifacts)
        self.counts[reason] += 1
        if reason in ("completed", "early_stopped"):
            self._update_best(trial.trial_id, last)
        self._progress(trials, trial.trial_id, reason, last)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any,
                          **info: Any) -> None:
        last = trial.last_result or {}
        reason = last.get(STOP_REASON) or "early_stopped"
        message = last.get(STOP_MESSAGE) or (
            f"stopped by ASHA at epoch {int(last.get('epoch', 0))}"
            if reason == "early_stopped" else f"completed {int(last.get('epoch', 0))} epochs")
        self._finish(trials, trial, reason, message)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        msg = "trial failed in Ray after retries"
        err = getattr(trial, "error_file", None)
        if err and Path(err).is_file():
            lines = Path(err).read_text().strip().splitlines()
            msg = lines[-1][:500] if lines else msg
        self._finish(trials, trial, "error", msg)

    def _progress(self, trials: list, tid: str, reason: str, last: dict) -> None:
        c = self.counts
        done = sum(c.values())
        running = sum(1 for t in trials if t.status == "RUNNING")
        failed = c["diverged"] + c["error"]
        obj = last.get(self.space.metric)
        val = f" {self.space.metric}={obj:.4f}" if isinstance(obj, float) else ""
        best = (f" | best {self.space.metric} {self.best[0]:.4f} ({self.best[1]})"
                if self.best else "")
        console().print(
            f"[{done}/{self.space.num_trials}] {tid} {reason}{val} | running {running} "
            f"early-stopped {c['early_stopped']} failed {failed}{best}")


def init_ray(address: str | None, quiet: bool = True) -> dict:
    """Connect to (or start) Ray quietly; returns the cluster resources."""
    os.environ.update({k: v for k, v in RAY_ENV.items() if k not in os.environ})
    import ray
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": not quiet,
                                  "logging_level": logging.ERROR, "configure_logging": True}
        if address:
            kwargs["address"] = address
            kwargs["runtime_env"] = {"py_modules": [str(Path(__file__).parent)]}
        ray.init(**kwargs)
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    return {k: float(v) for k, v in ray.cluster_resources().items()
            if k in ("CPU", "GPU", "memory") or k.startswith("accelerator_type:")}


def _quiet_optuna() -> None:
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="The reported value is ignored")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _trainable(space: SearchSpace):
    from ray import tune
    return tune.with_resources(tune.with_parameters(trainable, seeds=space.seeds),
                               {"cpu": space.cpu, "gpu": space.gpu})


def run_sweep(space_path: str | Path, name: str | None = None, trials: int | None = None,
              address: str | None = None, tracking_uri: str | None = None,
              storage: str | Path | None = None,
              overrides: dict[str, Any] | None = None) -> dict:
    """Start a sweep; returns its summary (see `finish`). `overrides` may set `epochs`, `gpu`
    and `max_concurrent` of the space (None leaves a value as the file has it)."""
    cli_values = {"num_trials": trials, **(overrides or {})}
    space = override(load_space(space_path), cli_values)
    name = name or space.name
    store = Path(storage or DEFAULT_STORAGE).resolve()
    exp_dir = store / name
    if (exp_dir / META).exists():
        raise SpaceError(f"--name: a sweep {name!r} already exists in {store}; continue it with "
                         f"`study resume {name}` or choose another --name")
    uri = resolve_uri(tracking_uri)
    resources = init_ray(address)
    _quiet_optuna()
    tracker = Tracker(uri)
    parent = tracker.start_parent(name, f"sweep_{name}", space.text, {
        "space_file": space.path, "space_name": space.name, "num_trials": str(space.num_trials),
        "seeds": str(space.seeds), "ray_cluster_resources": json.dumps(resources),
        "objective": json.dumps(space.objectives)})
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / "space.yaml").write_text(space.text)
    (exp_dir / META).write_text(json.dumps({
        "name": name, "space_path": space.path, "tracking_uri": uri, "parent_run_id": parent,
        "num_trials": space.num_trials, "address": address, "created": time.time(),
        "overrides": {k: v for k, v in cli_values.items() if v is not None}}, indent=1))
    console().print(
        f"sweep {name}: {space.num_trials} trials x {space.seeds} seeds of {space.path} on "
        f"{resources.get('CPU', 0):g} CPUs / {resources.get('GPU', 0):g} GPUs; "
        f"MLflow {uri} (parent run {parent})")
    from ray import tune
    from ray.tune.schedulers import AsyncHyperBandScheduler
    from ray.tune.search import ConcurrencyLimiter

    search = ConcurrencyLimiter(StudySearch(space), max_concurrent=space.max_concurrent)
    scheduler = AsyncHyperBandScheduler(
        metric=space.metric, mode=space.mode, max_t=space.epochs,
        grace_period=space.grace_period, reduction_factor=space.reduction_factor)
    callback = SweepCallback(tracker, parent, space)
    tuner = tune.Tuner(
        _trainable(space),
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler,
                                    num_samples=space.num_trials, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(store), callbacks=[callback],
                                  verbose=0, log_to_file=False,
                                  failure_config=tune.FailureConfig(max_failures=2)))
    tuner.fit()
    return finish(tracker, parent, space, name)


def override(space: SearchSpace, values: dict[str, Any]) -> SearchSpace:
    """Command-line overrides of a parsed space, checked like the file's own values."""
    values = {k: v for k, v in values.items() if v is not None}
    for key in ("num_trials", "epochs", "max_concurrent"):
        if key in values and values[key] < 1:
            flag = "trials" if key == "num_trials" else key.replace("_", "-")
            raise SpaceError(f"--{flag}: must be >= 1, got {values[key]}")
    if values.get("gpu", 0) < 0:
        raise SpaceError(f"--gpu: must be >= 0, got {values['gpu']}")
    if "epochs" in values:
        if space.grace_period > values["epochs"]:
            raise SpaceError(f"--epochs: {values['epochs']} is below the space's grace_period "
                             f"({space.grace_period})")
        values["fixed"] = {**space.fixed, "epochs": values["epochs"]}
    return replace(space, **values)


def resume_sweep(name: str, storage: str | Path | None = None,
                 tracking_uri: str | None = None, address: str | None = None) -> dict:
    """Continue an interrupted sweep: finished trials are kept, unfinished ones restart."""
    store = Path(storage or DEFAULT_STORAGE).resolve()
    exp_dir = store / name
    if not (exp_dir / META).exists():
        raise SpaceError(f"NAME: no sweep {name!r} in {store}; pass --storage DIR where it ran")
    meta = json.loads((exp_dir / META).read_text())
    space = override(load_space(exp_dir / "space.yaml"), meta.get("overrides", {}))
    uri = tracking_uri or meta["tracking_uri"]
    init_ray(address or meta.get("address"))
    _quiet_optuna()
    tracker = Tracker(uri)
    tracker.client.update_run(meta["parent_run_id"], status="RUNNING")
    console().print(f"resuming sweep {name} from {exp_dir}")
    from ray import tune
    tuner = tune.Tuner.restore(str(exp_dir), trainable=_trainable(space),
                               resume_unfinished=True, resume_errored=False)
    tuner.fit()
    return finish(tracker, meta["parent_run_id"], space, name)


def finish(tracker: Tracker, parent: str, space: SearchSpace, name: str) -> dict:
    """Count the sweep's trials in MLflow, close the parent run if all are done, and say so."""
    children = tracker.children(parent)
    reasons = [r.data.tags.get(TAG_STOP) for r in children.values()]
    counts = {k: reasons.count(k) for k in ("completed", "early_stopped", "diverged", "error")}
    done = sum(counts.values())
    complete = done >= space.num_trials
    tracker.finish_parent(parent, "FINISHED" if complete else "KILLED")
    con = console()
    con.print(f"sweep {name}: {done}/{space.num_trials} trials recorded "
              + " ".join(f"{k}={v}" for k, v in counts.items()))
    if not complete:
        con.print(f"interrupted: continue with `study resume {name}`")
    return {"name": name, "parent_run_id": parent, "done": done, "complete": complete,
            "counts": counts, "tracking_uri": tracker.uri}
