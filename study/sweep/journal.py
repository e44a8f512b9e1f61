"""MLflow as the sweep's journal: trials that finished after Ray's last saved state, replayed.

Ray keeps a sweep's experiment state (every trial's record, the searcher's Optuna study) in one
file that it rewrites whole at each save, so saving whenever a trial ends writes trials^2 x a
record over a sweep. The sweep saves it on a budget instead (`lifecycle.SaveOnTrialEnd`), and a
killed driver's resume recovers what the state missed from MLflow, where the driver closes each
trial's run as the trial ends. A finished run whose trial the restored state has as unfinished,
or does not have at all, is *replayed*, never trained again:

- a trial the state knows (Ray would restart it) gets the run's recorded reports in its config
  (`REPLAY_KEY`, set by `TrackingCallback._sync`);
- a run whose trial the state never knew is offered to the searcher (`offer`), which hands the
  same configuration, with the reports, to the next trial it suggests (`StudySearch.suggest`);
  the run is tagged `TAG_REPLAYED_AS` with that trial's Ray id.

A replaying trial reports the recorded epochs (the objectives each epoch, the outcome with the
last, `recorded_reports`) without building data or a model (`study.trainable.trainable`), so the
searcher learns what it learned before and the trial counts once (ASHA's rungs record a replay
but never stop it, `lifecycle.SaveOnTrialEnd`); the tracking callback logs nothing for it, its
run being the recorded one.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from study.records import (
    REPLAY_KEY,
    Outcome,
    SweepSpec,
    TrialRecord,
    TrialReport,
    mlflow_params,
)


def config_key(config: dict[str, Any]) -> str:
    """A configuration's identity: every TrialConfig field (defaults filled in) as MLflow
    params, the form a run's config is read back from."""
    from study.config import make_config

    config = without_replay(config)
    try:
        config = make_config(config).to_dict()
    except Exception:  # a run's config that no longer parses: compared as it reads
        pass
    return json.dumps(mlflow_params(config), sort_keys=True)


def without_replay(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != REPLAY_KEY}


def with_replay(config: dict[str, Any], run_id: str, reports: list[dict[str, Any]]
                ) -> dict[str, Any]:
    """`config` carrying a run's reports to replay (read by `study.records.replayed` and
    `replayed_run`)."""
    return {**without_replay(config), REPLAY_KEY: {"run": run_id, "reports": reports}}


def recorded_reports(histories: dict[str, dict[int, float]], run: TrialRecord
                     ) -> list[dict[str, Any]]:
    """What the trial of a finished `run` reported, as Ray results: each epoch's objectives
    (`histories`: objective -> epoch -> value, the run's MLflow metric history), and on the
    last its outcome and message, unless ASHA stopped it (such a trial sent none). A run with
    no epoch (it failed in its first) replays its outcome alone."""
    epochs = sorted({e for h in histories.values() for e in h})
    reports = [TrialReport(epoch=e, metrics={m: h[e] for m, h in histories.items() if e in h})
               for e in epochs] or [TrialReport()]
    if run.outcome is not Outcome.EARLY_STOPPED:
        reports[-1].outcome, reports[-1].message = run.outcome, run.message
    return [r.to_ray() for r in reports]


def histories(client: Any, run_id: str, spec: SweepSpec) -> dict[str, dict[int, float]]:
    """The run's objectives, epoch by epoch (the MLflow client's metric history)."""
    return {m: {int(p.step): float(p.value) for p in client.get_metric_history(run_id, m)}
            for m, _ in spec.objectives}


@dataclass
class Offer:
    """A finished run whose trial the restored state does not know, waiting for a trial."""

    run_id: str
    config: dict[str, Any]  # the run's config (every TrialConfig field, typed)
    reports: list[dict[str, Any]]

    @functools.cached_property
    def key(self) -> str:  # compared at every suggestion while offers wait: computed once
        return config_key(self.config)


# the driver's offers (one sweep runs in a driver process at a time): set by the tracking
# callback when the resumed sweep starts, taken by the searcher's suggestions; and the
# configurations of runs the saved state never knew that did not finish (their trials to retry)
_OFFERS: list[Offer] = []
_RETRIES: set[str] = set()


def offer(offers: list[Offer], retries: set[str] | None = None) -> None:
    _OFFERS[:] = offers
    _RETRIES.clear()
    _RETRIES.update(retries or ())


def pending() -> list[Offer]:
    return list(_OFFERS)


def to_retry(key: str) -> bool:
    """Whether `key` is the configuration of an unfinished run the saved state never knew,
    not yet proposed again (taken: each retry is handed out once)."""
    if key in _RETRIES:
        _RETRIES.discard(key)
        return True
    return False


def take(key: str | None = None) -> Offer | None:
    """The oldest offer (of the configuration `key`, when given), removed; None if none."""
    for i, o in enumerate(_OFFERS):
        if key is None or o.key == key:
            return _OFFERS.pop(i)
    return None
