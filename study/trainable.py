"""The Ray Tune function: a sampled configuration trained with k seeds in lockstep.

Ray's `Repeater` cannot be combined with early stopping, so replicates live inside one trial:
each epoch every seed advances once, then one `TrialReport` goes to the driver with the
seed-mean of every metric (the searcher and ASHA act on it), `<name>_seed_std` and per-seed
values `seed_<k>/<name>`. Replicate k uses `seed + k`, and with `vary_data_seed` also
`data_seed + k` (its own generated data, split and test set, so the spread across seeds includes
test-set sampling noise). The last report of a trial that ends by itself carries its outcome
(completed, diverged or error); a trial stopped by ASHA never sends one.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from study.records import Outcome, TrialReport, completed_message, seed_metric

if TYPE_CHECKING:
    from study.config import TrialConfig


def seed_summary(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Mean over seeds, `<name>_seed_std` (the sample std, ddof=1, as everywhere in the
    analysis; absent with one seed, where it is unknown, not 0) and `seed_<k>/<name>`."""
    out: dict[str, float] = {}
    for name in per_seed[0]:
        vals = np.array([m[name] for m in per_seed], dtype=float)
        out[name] = float(vals.mean())
        if len(vals) > 1:
            out[f"{name}_seed_std"] = float(vals.std(ddof=1))
        for k, v in enumerate(vals):
            out[seed_metric(k, name)] = float(v)
    return out


def replicate(cfg: TrialConfig, k: int, vary_data_seed: bool) -> TrialConfig:
    """The config of replicate k of `cfg` (a TrialConfig): seed + k, and data_seed + k when
    `vary_data_seed`."""
    if vary_data_seed:
        return cfg.replace(seed=cfg.seed + k, data_seed=cfg.data_seed + k)
    return cfg.replace(seed=cfg.seed + k)


def lockstep(config: dict[str, Any], seeds: int,
             vary_data_seed: bool = False) -> Iterator[TrialReport]:
    """One `TrialReport` per epoch for `seeds` replicates of `config` (seed, seed + 1, ...;
    with `vary_data_seed` also data_seed, data_seed + 1, ...)."""
    from study.config import make_config
    from study.tasks import get_task
    from study.train import run_trial

    try:
        cfg = make_config(config)
        # the data is cached by its fields (never `seed`): replicates share it unless each has
        # its own data_seed
        runs = [run_trial(r, get_task(r))
                for r in (replicate(cfg, k, vary_data_seed) for k in range(seeds))]
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


def trainable(config: dict[str, Any], seeds: int = 1, vary_data_seed: bool = False) -> None:
    """Entry point run by Ray Tune workers."""
    from ray import tune

    for report in lockstep(config, seeds, vary_data_seed):
        tune.report(report.to_ray())
