"""The driver's tracking callback: every trial of a sweep logged to MLflow as it happens.

Runs in the driver process (one writer, which works across nodes). It decodes each Ray result
as a `TrialReport` and writes it through `Tracker`: one child run per trial; at every epoch
(`step=epoch`, one point per metric and epoch) the seed means, their std across seeds and each
replicate's `seed_<k>/<name>`; at the end the tables, the outcome as tags, description and run
name. A trial Ray retries after an infrastructure failure restarts from scratch, so its run is
replaced rather than given a second point per epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback

from study.config import make_config
from study.records import Outcome, SweepSpec, TrialReport
from study.tracking import Tracker


def trial_end(trial: Any, errored: bool) -> tuple[Outcome, str, TrialReport]:
    """How a finished Ray trial ended: its outcome, message and last report. A trial Ray
    marks as errored (its worker died, after retries) reads its error file for the message."""
    last = TrialReport.from_ray(trial.last_result)
    if not errored:
        return (*last.ended(), last)
    msg = "trial failed in Ray after retries"
    err = getattr(trial, "error_file", None)
    if err and Path(err).is_file():
        lines = Path(err).read_text().strip().splitlines()
        msg = lines[-1][:500] if lines else msg
    return Outcome.ERROR, msg, last


class TrackingCallback(Callback):
    """Logs every trial to MLflow from the driver."""

    def __init__(self, tracker: Tracker, parent_id: str, spec: SweepSpec) -> None:
        self.tracker, self.parent_id, self.spec = tracker, parent_id, spec
        self.runs: dict[str, str] = {}  # Ray trial id -> MLflow run id
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
        self.runs = {}
        for tid, run in self.tracker.children(self.parent_id).items():
            if run.outcome is not None and tid in known:
                self.runs[tid] = run.run_id
            else:
                self.tracker.delete(run.run_id)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._synced:
            self._sync(trials)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id not in self.runs:
            self.runs[trial.trial_id] = self.tracker.start_child(
                self.parent_id, trial.trial_id, make_config(trial.config).to_dict(),
                self.spec.seeds)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Ray retries the trial from scratch: a fresh run, so no epoch is logged twice."""
        rid = self.runs.pop(trial.trial_id, None)
        if rid is not None:
            self.tracker.delete(rid)
        self.on_trial_start(iteration, trials, trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        """Every result Ray passes on, the last one included, is logged here and only here."""
        report = TrialReport.from_ray(result)
        metrics = report.logged_metrics()
        if metrics and report.epoch:
            if trial.trial_id not in self.runs:
                self.on_trial_start(iteration, trials, trial)
            self.tracker.log_metrics(self.runs[trial.trial_id], metrics, step=report.epoch)

    def _finish(self, trials: list, trial: Any, errored: bool) -> None:
        """The outcome and tables; the last epoch's metrics were logged by `on_trial_result`."""
        if trial.trial_id not in self.runs:
            self.on_trial_start(0, trials, trial)
        outcome, message, last = trial_end(trial, errored)
        self.tracker.finish_child(self.runs[trial.trial_id], outcome, message, last.tables)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any,
                          **info: Any) -> None:
        self._finish(trials, trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trials, trial, errored=True)
