"""The console progress view of a sweep (stderr only; it never writes to the store).

What a line says is made by small pure functions (`starting_line`, `format_line`, `eta`,
`best_config`, `outcome_text`, `duration`); `ProgressView` only collects what they need from
Ray's callbacks (counts, wall times, the best trial) and prints one line per finished trial:

    [3/8] elapsed 27s, ETA ~41s | 29c111e1 early_stopped at epoch 1, val_acc 0.1407 |
    running 2, early-stopped 1, failed 0 | best val_acc 0.5167: n_heads=2 qk_norm=l2 ...
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ray.tune import Callback

from study.console import console
from study.records import Outcome, ParamSpec, SweepSpec
from study.sweep.callbacks import RAY_DONE, trial_end

REASON_CHARS = 100  # a failed trial's reason on its line (MLflow has the whole message)
# the ETA's mean wall time is over the trials finished last: it follows a sweep whose trials
# get shorter (the first ones on a worker also start it) or longer (ASHA promotes more)
ETA_WINDOW = 20
_begun: list[float] = []  # when the sweep now starting printed its first line (`announce`)


def announce(line: str) -> None:
    """Print a sweep's first line; the sweep's elapsed time counts from here."""
    _begun[:] = [time.monotonic()]
    console().print(line)


def duration(seconds: float) -> str:
    """A duration as people read it: 42s, 3m07s, 2h05m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta(remaining: int, wall_times: Sequence[float], running_for: Sequence[float] = (),
        concurrency: int = 1) -> float | None:
    """Seconds until the `remaining` trials have finished, estimated; None while no trial has
    finished (nothing to estimate from), 0 when none remain. Each remaining trial is taken to
    need the mean wall time of the finished ones (`wall_times`; early-stopped ones included,
    as later trials will be stopped as often), less what the running ones have already run
    (`running_for`, each counted up to that mean); `concurrency` trials run at once."""
    if remaining <= 0:
        return 0.0
    if not wall_times:
        return None
    mean = math.fsum(wall_times) / len(wall_times)
    done_part = math.fsum(min(t, mean) for t in list(running_for)[:remaining])
    work = max(0.0, remaining * mean - done_part)
    return work / max(1, min(concurrency, remaining))


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def varies(p: ParamSpec) -> bool:
    """Whether a searched param can take more than one value."""
    return len(p.values) > 1 if p.values else p.high > p.low


def best_config(config: Mapping[str, Any], params: Sequence[ParamSpec]) -> str:
    """A trial's configuration as the space's searched fields that vary, in the space's order
    (`n_heads=4 norm=pre_ln attn_dropout=0.12`); a conditional field only where the trial
    has it."""
    return " ".join(f"{p.name}={_value(config[p.name])}" for p in params
                    if varies(p) and p.name in config)


def short_reason(message: str, limit: int = REASON_CHARS) -> str:
    """The first non-empty line of a failure message, cut to `limit` characters."""
    line = next((ln.strip() for ln in message.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[:limit - 3].rstrip() + "..."


# a sweep whose every finished trial diverged at its first step (at least this many trials)
FIRST_STEP_SUSPECT = 4
_FIRST_STEP = re.compile(r"diverged at step 1(?!\d)")


def first_step_warning(ended: Iterable[tuple[Outcome | None, str]]) -> str | None:
    """A warning when at least `FIRST_STEP_SUSPECT` trials ended (outcome, message) and every
    one diverged at its first step: configurations that differ do not all blow up on their
    first batch, so the cause is likely common to them (the device's code path, the data, the
    task), and the sweep's numbers say nothing about the choices. On an H200 every trial of
    the default study once did so, from a bug in the batched seeds' attention. None otherwise
    (interrupted and unfinished trials are left out)."""
    done = [(o, m) for o, m in ended if o is not None and o is not Outcome.INTERRUPTED]
    if len(done) < FIRST_STEP_SUSPECT:
        return None
    if not all(o is Outcome.DIVERGED and _FIRST_STEP.search(m) for o, m in done):
        return None
    return (f"warning: all {len(done)} finished trials diverged at their first step, which "
            "points at something they share (device, data, a code path), not at the "
            "configurations; run one of them alone with `study trial --config FILE` and "
            "`--set device=cpu` to compare")


def outcome_text(outcome: Outcome, epoch: int = 0, message: str = "") -> str:
    """How a trial ended: `completed`, `early_stopped at epoch 4`, `error: <short reason>`."""
    if outcome is Outcome.EARLY_STOPPED and epoch:
        return f"{outcome.value} at epoch {epoch}"
    if outcome.failed and short_reason(message):
        return f"{outcome.value}: {short_reason(message)}"
    return outcome.value


def format_line(*, done: int, total: int, elapsed: float, eta_s: float | None, trial_id: str,
                outcome: str, metric: str, value: float | None, running: int,
                early_stopped: int, failed: int, best: tuple[float, str] | None) -> str:
    """One finished trial's line: `[done/total] elapsed, ETA | trial outcome, objective |
    counts | best objective: its configuration`. No ETA before a trial finished or after the
    last one."""
    clock = f"elapsed {duration(elapsed)}"
    if eta_s is not None and done < total:
        clock += f", ETA ~{duration(eta_s)}"
    obj = f", {metric} {value:.4f}" if value is not None and math.isfinite(value) else ""
    line = (f"[{done}/{total}] {clock} | {trial_id} {outcome}{obj} | running {running}, "
            f"early-stopped {early_stopped}, failed {failed}")
    if best is not None:
        line += f" | best {metric} {best[0]:.4f}" + (f": {best[1]}" if best[1] else "")
    return line


def starting_line(name: str, spec: SweepSpec) -> str:
    """The sweep's first line, printed before Ray starts: what runs, over which space."""
    space = ", ".join(p.name for p in spec.params if varies(p)) or "no searched params"
    how = (f"searcher {spec.searcher}, ASHA early stopping" if spec.early_stopping
           else f"design {spec.design}, no early stopping")
    return (f"sweep {name}: {spec.num_trials} trials x {spec.seeds} seeds, {spec.epochs} "
            f"epochs each, of {spec.path} over {space} ({how}, {spec.max_concurrent} at a "
            "time); starting Ray")


class ProgressView(Callback):
    """One line per finished trial (`format_line`): done/total, elapsed time and ETA, its
    outcome and objective, how many run, were early-stopped or failed, and the best objective
    so far with its configuration. Times are the driver's: the elapsed time runs from the
    sweep's first line (`announce`), a trial's wall time from its start to its end as the
    driver sees them (the ETA uses the last ETA_WINDOW of them)."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self._reset()

    def _reset(self) -> None:
        self.counts = dict.fromkeys(Outcome, 0)
        self.best: tuple[float, str] | None = None
        self.started: float | None = None  # time.monotonic() of `announce`, else first step
        self.starts: dict[str, float] = {}  # running trial id -> its start
        self.walls: list[float] = []  # wall times of the trials finished in this process
        self.peak = 0  # the most trials seen running at once
        self._synced = False

    def __getstate__(self) -> dict:
        # times of one process mean nothing in another (`study resume` unpickles the view)
        return {"spec": self.spec}

    def __setstate__(self, state: dict) -> None:
        self.spec = state["spec"]
        self._reset()

    def get_state(self) -> dict:
        return {}

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._synced:
            return
        self._synced = True  # on resume: count the trials Ray restored as finished
        if self.started is None:
            self.started = _begun.pop() if _begun else time.monotonic()
        self.counts = dict.fromkeys(Outcome, 0)
        for t in trials:
            if t.status in RAY_DONE:
                self._count(t, t.status == "ERROR")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.starts.setdefault(trial.trial_id, time.monotonic())
        self.peak = max(self.peak, len(self.starts))

    def _count(self, trial: Any, errored: bool) -> tuple[Outcome, str, Any]:
        outcome, message, last = trial_end(trial, errored)
        self.counts[outcome] += 1
        value = last.metrics.get(self.spec.metric)
        if value is not None and outcome in (Outcome.COMPLETED, Outcome.EARLY_STOPPED):
            sign = 1.0 if self.spec.mode == "max" else -1.0
            if self.best is None or sign * value > sign * self.best[0]:
                self.best = (value, best_config(trial.config or {}, self.spec.params))
        return outcome, message, last

    def _show(self, trials: list, trial: Any, errored: bool) -> None:
        now = time.monotonic()
        started = self.started if self.started is not None else now
        self.walls.append(now - self.starts.pop(trial.trial_id, started))
        outcome, message, last = self._count(trial, errored)
        c = self.counts
        done = sum(c.values())
        epoch = last.epoch or int((trial.last_result or {}).get("training_iteration") or 0)
        concurrency = min(self.spec.max_concurrent, max(self.peak, 1))
        # Ray still has the finishing trial as RUNNING when its end is reported
        running = sum(1 for t in trials if t.status == "RUNNING" and t is not trial)
        console().print(format_line(
            done=done, total=self.spec.num_trials, elapsed=now - started,
            eta_s=eta(self.spec.num_trials - done, self.walls[-ETA_WINDOW:],
                      [now - s for s in self.starts.values()], concurrency),
            trial_id=trial.trial_id, outcome=outcome_text(outcome, epoch, message),
            metric=self.spec.metric, value=last.metrics.get(self.spec.metric),
            running=running, early_stopped=c[Outcome.EARLY_STOPPED],
            failed=c[Outcome.DIVERGED] + c[Outcome.ERROR], best=self.best))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any,
                          **info: Any) -> None:
        self._show(trials, trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._show(trials, trial, errored=True)
