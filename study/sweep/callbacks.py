"""The driver's tracking callback: every trial of a sweep logged to MLflow as it happens.

Runs in the driver process (one writer, which works across nodes). It decodes each Ray result
as a `TrialReport` and writes it through `Tracker`: one child run per trial; at every epoch
(`step=epoch`, one point per metric and epoch) the seed means, their std across seeds and each
replicate's `seed_<k>/<name>`; at the end the tables, the outcome as tags, description and run
name; where the attempt ran (node, host, device, worker pid) as tags from its first report.

Nothing here deletes a run. A trial Ray restarts from scratch (a retry after its worker died,
or a resume after its driver stopped) gets a new run per attempt, tagged `retries` (earlier
attempts) and `retry_of` (the previous attempt's run); the earlier attempt's run is kept,
marked `interrupted` with its reason, so every run has one point per metric and epoch and the
analysis counts the trial once (`study.records.current_runs`). Writes the store does not take
wait in the tracker's outbox; when it refuses them, or stays away too long, the sweep stops as
Ctrl-C stops it (`halt`) and says why.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray.tune import Callback

from study.config import make_config
from study.console import redact
from study.records import (
    NODE_TAGS,
    TAG_REPLAYED_AS,
    TAG_RETRIES,
    TAG_RETRY_OF,
    Outcome,
    SweepSpec,
    TrialRecord,
    TrialReport,
    replayed_run,
)
from study.sweep import journal
from study.tracking import Tracker, short_error

# Ray's own statuses of a trial that will not run again
RAY_DONE = ("TERMINATED", "ERROR")
_HALT: list[str] = []


def halt(reason: str) -> None:
    """Stop the running sweep as Ctrl-C does (Ray stops the trials, saves its state one last
    time and returns; running trials stay resumable) and remember why (`halted`). Ray's
    handler of SIGUSR1 does that while `Tuner.fit` runs in the main thread; elsewhere the sweep
    runs on and only the reason is kept. The first reason is kept."""
    if _HALT:
        return
    _HALT.append(reason)
    handler = signal.getsignal(signal.SIGUSR1)
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.raise_signal(signal.SIGUSR1)


def halted() -> str | None:
    """Why the running sweep was stopped by `halt`, else None."""
    return _HALT[0] if _HALT else None


def clear_halt() -> None:
    _HALT.clear()


def attempt_error(trial: Any) -> str:
    """What ended a trial's latest failed attempt: the first line of its last failure in Ray's
    error file."""
    err = getattr(trial, "error_file", None)
    if err and Path(err).is_file():
        last = Path(err).read_text().rsplit("Failure # ", 1)[-1].splitlines()[1:]
        lines = [ln.strip() for ln in last if ln.strip()]
        if lines:
            return lines[0][:300]
    return "its worker failed"


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


def _finished(run: TrialRecord) -> bool:
    return run.outcome is not None and run.outcome is not Outcome.INTERRUPTED


# the resume's tracker while Ray's `Tuner.restore` unpickles the saved run config (`resuming`)
_RESUMING: list[Tracker] = []


@contextlib.contextmanager
def resuming(tracker: Tracker) -> Iterator[None]:
    """While `Tuner.restore` unpickles the callbacks saved when the sweep started, each
    `TrackingCallback` takes `tracker`, the resume's store and spool, not the pickled one (Ray
    restores the run config as saved: a `study resume --tracking-uri` naming the store's new
    address, or a moved experiment folder, would leave the trials writing to the old ones)."""
    _RESUMING.append(tracker)
    try:
        yield
    finally:
        _RESUMING.remove(tracker)


class TrackingCallback(Callback):
    """Logs every trial to MLflow from the driver; `heartbeat_s`: how often it says on the
    parent run that the driver is alive (None: never)."""

    def __init__(self, tracker: Tracker, parent_id: str, spec: SweepSpec,
                 heartbeat_s: float | None = None) -> None:
        self.tracker, self.parent_id, self.spec = tracker, parent_id, spec
        self.runs: dict[str, str] = {}  # Ray trial id -> its attempt's run (`start_child`)
        # Ray trial id -> (the run of its last attempt, how many attempts it had)
        self.previous: dict[str, tuple[str, int]] = {}
        # the same for trials the saved state does not know, by their config (a resumed
        # searcher suggests such a configuration again, under a new trial id)
        self.unclaimed: dict[str, tuple[str, int]] = {}
        self.replaying: set[str] = set()  # trials replaying a recorded run (`journal`)
        self.heartbeat_s = heartbeat_s
        self._beat = float("-inf")
        self._synced = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_synced": False, "_beat": float("-inf")}

    def __setstate__(self, state: dict) -> None:
        # a callback pickled before these existed (`study resume` of an older sweep)
        self.__dict__.update({"previous": {}, "unclaimed": {}, "replaying": set(),
                              "heartbeat_s": None, **state})
        if _RESUMING:
            self.tracker = _RESUMING[-1]

    def get_state(self) -> dict:
        return {}

    def _sync(self, trials: list) -> None:
        """On (re)start, before any trial starts: every child run stays. A trial Ray has as
        finished keeps its finished run (an unfinished one is closed with Ray's record of
        its end); every other unfinished run (its driver was stopped or killed) is marked
        `interrupted`, and its trial, which Ray restarts from scratch, gets a new run linked
        to it. A finished run whose trial Ray does not have as finished (it ended after the
        last saved state) is replayed, not trained again (`study.sweep.journal`): its trial,
        where the state knows it, replays the run's reports; otherwise the searcher hands its
        configuration to a new trial that does."""
        self._synced = True
        journal.offer([])  # nothing of an earlier sweep in this process, even if the read fails
        ray = {t.trial_id: t for t in trials}
        # runs that saved trials were already replaying (their mark may not have reached the
        # store before the driver stopped)
        replays = {rid: t.trial_id for t in trials if (rid := replayed_run(t.config))}
        attempts: dict[str, list[TrialRecord]] = defaultdict(list)
        offers: list[journal.Offer] = []
        try:
            for run in self.tracker.child_runs(self.parent_id):
                attempts[replays.get(run.run_id) or run.replayed_as or run.trial_id].append(run)
            self.runs, self.previous, self.unclaimed, self.replaying = {}, {}, {}, set()
            for tid, runs in attempts.items():
                self._sync_trial(ray.get(tid), tid, runs, offers)
        except Exception as e:  # without the runs it would start unlinked ones: stop
            halt(f"the MLflow store {redact(self.tracker.uri)} could not be read "
                 f"({short_error(e)})")
            return
        journal.offer(offers, set(self.unclaimed))
        self._check()

    def _sync_trial(self, trial: Any, tid: str, runs: list[TrialRecord],
                    offers: list[journal.Offer]) -> None:
        for r in runs:  # closed halfway by a killed driver: its outcome is set, so are its
            if r.outcome is not None and r.status == "RUNNING":  # tables; not its status
                self.tracker.finish_child(r.run_id, r.outcome, r.message)
        done = trial is not None and trial.status in RAY_DONE
        unfinished = [r for r in runs if r.outcome is None]
        # an orphan (left by an earlier version's resume) is an earlier attempt, never the
        # trial's finished run
        finished = [r for r in runs if _finished(r) and not r.orphan]
        if not done and finished:
            # finished after the last state that reached the disk: replayed from its run
            run = finished[-1]
            reports = journal.recorded_reports(
                journal.histories(self.tracker.client, run.run_id, self.spec), run)
            if trial is not None:
                trial.set_config(journal.with_replay(trial.config, run.run_id, reports))
                self.runs[tid] = run.run_id
                self.replaying.add(tid)
                if tid not in (run.trial_id, run.replayed_as):
                    self.tracker.set_tags(run.run_id, {TAG_REPLAYED_AS: tid})
            else:
                offers.append(journal.Offer(run.run_id, run.config, reports))
            for r in unfinished:
                self.tracker.finish_child(
                    r.run_id, Outcome.INTERRUPTED, f"its driver stopped before the attempt "
                    f"finished; the trial finished in run {run.run_id}")
            return
        if trial is None:  # started after the last state that reached the disk
            self.unclaimed[journal.config_key(runs[-1].config)] = (runs[-1].run_id, len(runs))
        if trial is not None and done and unfinished and not finished:
            outcome, message, last = trial_end(trial, trial.status == "ERROR")
            self.tracker.finish_child(unfinished[-1].run_id, outcome, message, last.tables)
            unfinished[-1].outcome = outcome
            unfinished.pop()
        restart = ("the trial restarts from scratch in a new run" if trial is not None
                   else "the saved state does not know the trial; a new trial of the same "
                   "configuration")
        for r in unfinished:
            self.tracker.finish_child(
                r.run_id, Outcome.INTERRUPTED, f"its driver stopped before the trial "
                f"finished; {restart} links to this run (retry_of)")
        finished = [r for r in runs if _finished(r) and not r.orphan]
        if done and finished:
            self.runs[tid] = finished[-1].run_id
        else:
            self.previous[tid] = (runs[-1].run_id, len(runs))

    def _check(self) -> None:
        """Stop the sweep if the store refused its writes or stayed away too long."""
        fault = self.tracker.fault
        if fault:
            halt(fault)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._synced:
            self._sync(trials)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """Re-send writes that wait for the store, say the driver is alive."""
        self.tracker.pump()
        now = time.monotonic()
        if self.heartbeat_s and now - self._beat >= self.heartbeat_s:
            self._beat = now
            self.tracker.heartbeat(self.parent_id)
        self._check()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A new run for each attempt of a trial, linked to its previous attempt's run."""
        if trial.trial_id in self.runs:
            return
        replayed = replayed_run(trial.config)
        if replayed is not None:  # a finished run the saved state never knew: its reports
            self.runs[trial.trial_id] = replayed  # replay as this trial (`journal`)
            self.replaying.add(trial.trial_id)
            self.tracker.set_tags(replayed, {TAG_REPLAYED_AS: trial.trial_id})
            return
        config = make_config(trial.config).to_dict()
        last = (self.previous.get(trial.trial_id)
                or self.unclaimed.pop(journal.config_key(config), None))
        tags = {TAG_RETRIES: str(last[1] if last else 0),
                **({TAG_RETRY_OF: last[0]} if last else {})}
        self.runs[trial.trial_id] = self.tracker.start_child(
            self.parent_id, trial.trial_id, config, self.spec.seeds, tags=tags)
        self._check()

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Ray retries the trial from scratch: the failed attempt's run is kept, marked
        `interrupted` with its error, and the next attempt gets a new run (`on_trial_start`),
        so no epoch is logged twice and no attempt is lost. A replay is retried as it was."""
        if trial.trial_id in self.replaying:
            return
        rid = self.runs.pop(trial.trial_id, None)
        if rid is None:
            return
        n = self.previous.get(trial.trial_id, (None, 0))[1]
        self.previous[trial.trial_id] = (rid, n + 1)
        self.tracker.finish_child(rid, Outcome.INTERRUPTED,
                                  f"attempt {n + 1} failed, Ray retries the trial in a new run: "
                                  f"{attempt_error(trial)}")
        self._check()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        """Every result Ray passes on, the last one included, is logged here and only here
        (a replay's were logged when its run trained)."""
        if trial.trial_id in self.replaying:
            return
        report = TrialReport.from_ray(result)
        metrics = report.logged_metrics()
        if (metrics and report.epoch) or report.node:
            if trial.trial_id not in self.runs:
                self.on_trial_start(iteration, trials, trial)
            # where this attempt runs, from its first report: with its first points
            node = {k: v for k, v in report.node.items() if k in NODE_TAGS}
            if metrics and report.epoch:
                self.tracker.log_metrics(self.runs[trial.trial_id], metrics, step=report.epoch,
                                         tags=node)
            elif node:
                self.tracker.set_tags(self.runs[trial.trial_id], node)
            self._check()

    def _finish(self, trials: list, trial: Any, errored: bool) -> None:
        """The outcome and tables; the last epoch's metrics were logged by `on_trial_result`.
        A replay's run was closed when it finished."""
        if trial.trial_id in self.replaying:
            return
        if trial.trial_id not in self.runs:
            self.on_trial_start(0, trials, trial)
        outcome, message, last = trial_end(trial, errored)
        self.tracker.finish_child(self.runs[trial.trial_id], outcome, message, last.tables)
        self._check()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any,
                          **info: Any) -> None:
        self._finish(trials, trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trials, trial, errored=True)
