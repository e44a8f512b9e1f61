"""One sweep in its own process, timed from inside: `python -m benchmarks.sweep_child SPACE
NAME STORAGE URI OUT.json [TRIALS EPOCHS]` (the last two, when not 0, override the space's).
The process tree is what `benchmarks.diskio` measures; OUT.json
gets the Tuner's fit window, every result's own seconds (`compute_s`, what the trial measured
computing that epoch: training, evaluation, and for the first one the model and data set-up;
Ray's `time_this_iter_s` leaves out what was computed ahead, during the previous report's
round trip), every result's
arrival (time, worker pid, trial id, own seconds), the command's own wall time and when each
phase before the Tuner's start ended (`marks`: imports, Ray's start, the MLflow store, the
Tuner built; seconds from the command's start)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> None:
    space, name, storage, uri, out, *budget = argv
    trials, epochs = (int(budget[0]) or None, int(budget[1]) or None) if budget else (None, None)
    t0 = time.time()
    from study.sweep.lifecycle import RAY_ENV
    # Ray's environment before Ray is imported (ray.train reads some of it on import)
    os.environ.update({k: v for k, v in RAY_ENV.items() if k not in os.environ})
    from ray.tune import Callback

    from study.records import REPORT_COMPUTE_S
    from study.sweep import lifecycle
    from study.sweep.lifecycle import run_sweep

    # where the time before the Tuner's start goes: each phase's end, as seconds since t0
    marks: dict[str, float] = {"imports": time.time() - t0}

    def marked(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            marks[name] = time.time() - t0
            return out
        return call

    for phase in ("init_ray", "open_store", "_tuner"):
        setattr(lifecycle, phase, marked(phase, getattr(lifecycle, phase)))

    class Timer(Callback):
        def __init__(self) -> None:
            self.fit_start = self.fit_end = 0.0
            self.iter_s: list[float] = []
            self.results: list[tuple[float, str, str, float]] = []

        def setup(self, **info: Any) -> None:
            self.fit_start = time.time()

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                            **info: Any) -> None:
            # the trial's own seconds for the epoch: what it measured computing it (epochs
            # are computed one ahead: Ray's time_this_iter_s leaves out what was computed
            # during the previous report's round trip)
            own = result.get(REPORT_COMPUTE_S) or result.get("time_this_iter_s", 0.0)
            self.iter_s.append(float(own))
            # when it came, from which worker process (a slot: actors are reused) and trial
            self.results.append((time.time(), str(result.get("pid")), str(trial.trial_id),
                                 self.iter_s[-1]))

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.fit_end = time.time()

    timer = Timer()
    summary = run_sweep(space, name=name, storage=storage, tracking_uri=uri, trials=trials,
                        overrides={"epochs": epochs}, callbacks=[timer])
    Path(out).write_text(json.dumps({
        "fit_start": timer.fit_start, "fit_end": timer.fit_end, "iter_s": timer.iter_s,
        "results": timer.results,
        "command_start": t0, "command_end": time.time(), "done": summary["done"],
        "marks": marks}))


if __name__ == "__main__":
    main(sys.argv[1:])
