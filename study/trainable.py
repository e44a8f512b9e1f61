"""The Ray Tune function: a sampled configuration trained with k seeds in lockstep.

Ray's `Repeater` cannot be combined with early stopping, so replicates live inside one trial:
each epoch every seed advances once, then one `TrialReport` goes to the driver with the
seed-mean of every metric (the searcher and ASHA act on it), `<name>_seed_std` and per-seed
values `seed_<k>/<name>`. The last report of a trial that ends by itself carries its outcome
(completed, diverged or error); a trial stopped by ASHA never sends one.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np

from study.records import Outcome, TrialReport, completed_message, seed_metric


def seed_summary(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Mean over seeds, `<name>_seed_std` (population std) and `seed_<k>/<name>` values."""
    out: dict[str, float] = {}
    for name in per_seed[0]:
        vals = np.array([m[name] for m in per_seed], dtype=float)
        out[name] = float(vals.mean())
        out[f"{name}_seed_std"] = float(vals.std())
        for k, v in enumerate(vals):
            out[seed_metric(k, name)] = float(v)
    return out


def lockstep(config: dict[str, Any], seeds: int) -> Iterator[TrialReport]:
    """One `TrialReport` per epoch for `seeds` replicates of `config` (seed, seed + 1, ...)."""
    from study.config import make_config
    from study.tasks import get_task
    from study.train import run_trial

    try:
        cfg = make_config(config)
        data = get_task(cfg)
        runs = [run_trial(cfg.replace(seed=cfg.seed + k), data) for k in range(seeds)]
        for epoch in range(1, cfg.epochs + 1):
            results = [next(r) for r in runs]
            bad = [(k, r.diverged) for k, r in enumerate(results) if r.diverged]
            if bad:
                k, why = bad[0]
                yield TrialReport(epoch, outcome=Outcome.DIVERGED, message=f"seed {k}: {why}")
                return
            report = TrialReport(epoch, seed_summary([r.metrics for r in results]))
            if epoch == cfg.epochs:
                report.outcome, report.message = Outcome.COMPLETED, completed_message(epoch)
                report.tables = {k: r.artifacts for k, r in enumerate(results) if r.artifacts}
            yield report
    except Exception as e:  # a trial's own error: recorded, never retried
        tb = traceback.format_exc(limit=-3).strip().splitlines()
        yield TrialReport(outcome=Outcome.ERROR, message=f"{type(e).__name__}: {e}"[:500],
                          traceback="\n".join(tb[-6:]))


def trainable(config: dict[str, Any], seeds: int = 1) -> None:
    """Entry point run by Ray Tune workers."""
    from ray import tune

    for report in lockstep(config, seeds):
        tune.report(report.to_ray())
