"""The Ray Tune function: a sampled configuration trained with k seeds in lockstep.

Ray's `Repeater` cannot be combined with early stopping, so replicates live inside one trial:
each epoch every seed advances once, then the seed-mean of every metric is reported (the
searcher and ASHA act on it), with `<name>_seed_std` and per-seed values `seed_<k>/<name>`.
The last report carries `stop_reason` in {completed, diverged, error} and `stop_message`; a trial
stopped by ASHA never sends one, which is how the driver tells it was early-stopped.
"""

from __future__ import annotations

import json
import traceback
from typing import Any

import numpy as np

STOP_REASON, STOP_MESSAGE, ARTIFACTS = "stop_reason", "stop_message", "artifacts_json"


def seed_summary(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Mean over seeds, `<name>_seed_std` (population std) and `seed_<k>/<name>` values."""
    out: dict[str, float] = {}
    for name in per_seed[0]:
        vals = np.array([m[name] for m in per_seed], dtype=float)
        out[name] = float(vals.mean())
        out[f"{name}_seed_std"] = float(vals.std())
        for k, v in enumerate(vals):
            out[f"seed_{k}/{name}"] = float(v)
    return out


def lockstep(config: dict[str, Any], seeds: int) -> Any:
    """Yield one Ray report (a dict) per epoch for `seeds` replicates of `config`."""
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
                yield {"epoch": epoch, STOP_REASON: "diverged", STOP_MESSAGE: f"seed {k}: {why}"}
                return
            report = seed_summary([r.metrics for r in results])
            if epoch == cfg.epochs:
                report[STOP_REASON] = "completed"
                report[ARTIFACTS] = json.dumps(
                    {f"seed_{k}": r.artifacts for k, r in enumerate(results) if r.artifacts})
            yield report
    except Exception as e:  # a trial's own error: recorded, never retried
        tb = traceback.format_exc(limit=-3).strip().splitlines()
        yield {STOP_REASON: "error", STOP_MESSAGE: f"{type(e).__name__}: {e}"[:500],
               "traceback": "\n".join(tb[-6:])}


def trainable(config: dict[str, Any], seeds: int = 1) -> None:
    """Entry point run by Ray Tune workers."""
    from ray import tune

    for report in lockstep(config, seeds):
        tune.report(report)
