"""The console progress view of a sweep (stderr only; it never writes to the store)."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from rich.console import Console

from study.records import Outcome, SweepSpec
from study.sweep.callbacks import trial_end


def console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


class ProgressView(Callback):
    """One line per finished trial: done/total, its outcome and objective, how many run, were
    early-stopped or failed, and the best objective so far."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self.counts = dict.fromkeys(Outcome, 0)
        self.best: tuple[float, str] | None = None
        self._synced = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_synced": False}

    def get_state(self) -> dict:
        return {}

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._synced:
            return
        self._synced = True  # on resume: count the trials Ray restored as finished
        self.counts = dict.fromkeys(Outcome, 0)
        for t in trials:
            if t.status in ("TERMINATED", "ERROR"):
                self._count(t, t.status == "ERROR")

    def _count(self, trial: Any, errored: bool) -> tuple[Outcome, dict]:
        outcome, _, last = trial_end(trial, errored)
        self.counts[outcome] += 1
        value = last.metrics.get(self.spec.metric)
        if value is not None and outcome in (Outcome.COMPLETED, Outcome.EARLY_STOPPED):
            sign = 1.0 if self.spec.mode == "max" else -1.0
            if self.best is None or sign * value > sign * self.best[0]:
                self.best = (value, trial.trial_id)
        return outcome, last.metrics

    def _show(self, trials: list, trial: Any, errored: bool) -> None:
        outcome, metrics = self._count(trial, errored)
        c = self.counts
        done = sum(c.values())
        running = sum(1 for t in trials if t.status == "RUNNING")
        failed = c[Outcome.DIVERGED] + c[Outcome.ERROR]
        metric = self.spec.metric
        obj = metrics.get(metric)
        val = f" {metric}={obj:.4f}" if isinstance(obj, float) else ""
        best = f" | best {metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else ""
        console().print(
            f"[{done}/{self.spec.num_trials}] {trial.trial_id} {outcome.value}{val} | running "
            f"{running} early-stopped {c[Outcome.EARLY_STOPPED]} failed {failed}{best}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any,
                          **info: Any) -> None:
        self._show(trials, trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._show(trials, trial, errored=True)
