"""Effects whose truth is known: early-stopping bias removed, intervals that cover, calls that
hold their error rates. Stores are seeded simulations written through the project's own
`Tracker` (the layout `study sweep` writes), then read back by `analysis.load`."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from analysis.effects import effects_report, effects_table
from analysis.estimators import ESTIMATOR_IMPUTED, outcome_table
from analysis.load import load_sweep
from study.config import TrialConfig
from study.records import Outcome, rung_epochs, seed_metric
from study.spaces import parse_space
from study.tracking import Tracker

ASHA_SPACE = """
name: asha_planted
task: digits
params:
  norm: [pre_ln, post_ln]        # post_ln learns faster, ends the same (no final effect)
  n_heads: [2, 4]                # n_heads=4 raises the final test accuracy by REAL
  qk_norm: [none, l2]            # null
budget: {epochs: 12, grace_period: 4, reduction_factor: 2}
seeds: 1
objective: {metric: val_acc, mode: max}
searcher: tpe
num_trials: 160
"""
EPOCHS, GRACE, RF = 12, 4, 2
REAL = 0.06
SLOW_GAP, FAST_GAP = 0.10, 0.02  # how far below its final value a level is at epoch 0


def _curve(final: float, gap: float, epoch: int, rng: np.random.Generator) -> float:
    """Additive learning curve: `gap` below the final value at the start, none at the end."""
    return final - gap * (1 - epoch / EPOCHS) + float(rng.normal(0, 0.005))


def asha_trials(rng: np.random.Generator, n_trials: int
                ) -> Iterator[tuple[dict[str, Any], list[dict[str, float]], Outcome]]:
    """A TPE+ASHA-like sweep's trials in arrival order, each its params, its epochs' values and
    its outcome: at each rung a trial continues only if its val_acc is in the top 1/RF of the
    values seen at that rung so far (asynchronous successive halving), else it is
    early-stopped there. n_heads=4 raises every epoch by REAL; post_ln learns faster and ends
    the same."""
    seen: dict[int, list[float]] = {r: [] for r in rung_epochs(GRACE, RF, EPOCHS)}
    for _ in range(n_trials):
        p = {"norm": str(rng.choice(["pre_ln", "post_ln"])), "n_heads": int(rng.choice([2, 4])),
             "qk_norm": str(rng.choice(["none", "l2"]))}
        final = 0.8 + REAL * (p["n_heads"] == 4) + float(rng.normal(0, 0.03))
        gap = FAST_GAP if p["norm"] == "post_ln" else SLOW_GAP
        points, outcome = [], Outcome.COMPLETED
        for e in range(1, EPOCHS + 1):
            test = _curve(final, gap, e, rng)
            val = test + float(rng.normal(0, 0.005))
            points.append({"val_acc": val, "test_acc": test, "epoch": float(e)})
            if e in seen:
                seen[e].append(val)
                if val < np.quantile(seen[e], 1 - 1 / RF) and len(seen[e]) > 1:
                    outcome = Outcome.EARLY_STOPPED
                    break
        yield p, points, outcome


def build_asha_store(uri: str, n_trials: int = 160, seed: int = 0) -> dict:
    """`asha_trials` logged to an MLflow store as a sweep's child runs."""
    spec = parse_space(ASHA_SPACE, "asha_planted.yaml")
    tracker = Tracker(uri)
    parent = tracker.start_parent("asha", "sweep_asha", spec,
                                  {"objective": '[["val_acc", "max"]]'})
    counts = {"completed": 0, "early_stopped": 0}
    for i, (p, points, outcome) in enumerate(asha_trials(np.random.default_rng(seed),
                                                         n_trials)):
        cfg = TrialConfig(task="digits", epochs=EPOCHS, **p).to_dict()
        rid = tracker.start_child(parent, f"t{i:04d}", cfg, 1)
        for m in points:
            e = int(m["epoch"])
            tracker.log_metrics(rid, {**m, **{seed_metric(0, k): v for k, v in m.items()}}, e)
        counts[outcome.value] += 1
        tracker.finish_child(rid, outcome, outcome.value)
    tracker.finish_parent(parent)
    return counts


@pytest.fixture(scope="module")
def asha_sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("asha")
    uri = f"sqlite:///{d / 'asha.db'}"
    counts = build_asha_store(uri)
    return load_sweep(uri), counts


@pytest.mark.slow
def test_early_stopping_bias_is_removed_and_the_early_advantage_shows(asha_sweep) -> None:
    sweep, counts = asha_sweep
    assert counts["early_stopped"] > 30 and counts["completed"] > 20  # ASHA did select
    e = effects_report(sweep, ["test_acc"], n_boot=400, seed=0)
    final = e[e.budget == "final"].set_index(["param", "level"])
    assert (final.estimator == ESTIMATOR_IMPUTED).all()
    fast = final.loc[("norm", "post_ln")]
    # the estimate that uses the stopped trials' curves: no final effect, and not called one
    assert fast.contrast_low <= 0 <= fast.contrast_high
    assert fast.call != "effect"
    heads = final.loc[("n_heads", "4")]
    assert heads.contrast_low <= REAL <= heads.contrast_high and heads.call != "negligible"
    # completed trials only: ASHA kept the n_heads=2 trials that happened to be strong, so the
    # real effect shrinks (survivorship), below the interval of the estimate that uses them all
    assert heads.contrast_completed_only < heads.contrast_low
    analysed = sweep.trial_table.outcome.isin(["completed", "early_stopped"])
    assert heads.n == (analysed & (sweep.trial_table.n_heads == 4)).sum()
    assert heads.n_imputed > 0
    rung = e[e.budget == str(GRACE)].set_index(["param", "level"])
    early = rung.loc[("norm", "post_ln")]
    assert early.call == "effect" and early.contrast > 0  # the early advantage, at the rung
    assert early.n_imputed == 0  # every trial reached the first rung
    # n_rows: the trial x seed rows behind the observed values (one seed a trial here): at the
    # rung every trial's, stopped ones too; at the final budget none for the imputed trials
    assert early.n_rows == early.n
    assert heads.n_rows == heads.n - heads.n_imputed


def _synthetic(rng: np.random.Generator, n_trials: int, effects: dict[str, dict[str, float]],
               targets: list[str], seeds: int = 2, trial_sd: float = 0.02,
               seed_sd: float = 0.01) -> pd.DataFrame:
    """Trial x seed rows: each param's level shifts every target by `effects[param][level]`."""
    rows = []
    for i in range(n_trials):
        levels = {p: str(rng.choice(list(lv))) for p, lv in effects.items()}
        base = sum(effects[p][lv] for p, lv in levels.items())
        mu = {t: 0.5 + base + rng.normal(0, trial_sd) for t in targets}
        for k in range(seeds):
            rows.append({"trial_id": f"t{i}", "seed": k, **levels,
                         **{t: mu[t] + rng.normal(0, seed_sd) for t in targets}})
    return pd.DataFrame(rows)


def _contrast_sweep(job: tuple[int, pd.DataFrame]) -> pd.DataFrame:
    rep, t = job
    return effects_table(t, ["a", "b", "c"], ["m"], n_boot=300, seed=rep)


def _null_sweep(job: tuple[int, pd.DataFrame]) -> pd.DataFrame:
    rep, t = job
    return effects_table(t, ["a", "b", "c", "d"], ["m1", "m2", "m3"], n_boot=200, seed=rep,
                         min_effect={"m1": 0.005, "m2": 0.005, "m3": 0.005})


def _in_parallel(fn: Any, jobs: list) -> list:
    """`fn` over `jobs` on every core (forked workers; the same results as a loop: each job
    carries its own data and bootstrap seed)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as ex:
        return list(ex.map(fn, jobs, chunksize=max(1, len(jobs) // (4 * workers))))


@pytest.mark.slow
def test_contrast_intervals_cover_the_truth() -> None:
    """Over 200 synthetic sweeps the 95% trial-bootstrap interval of each contrast covers its
    planted value 92-98% of the time."""
    rng = np.random.default_rng(1)
    effects = {"a": {"x": 0.0, "y": 0.03, "z": -0.01}, "b": {"p": 0.0, "q": 0.02},
               "c": {"u": 0.0, "v": 0.0}}
    truth = {("a", lv): v - np.mean([w for k, w in effects["a"].items() if k != lv])
             for lv, v in effects["a"].items()}
    hits, total = 0, 0
    tables = [_synthetic(rng, 40, effects, ["m"]) for _ in range(200)]
    for e in _in_parallel(_contrast_sweep, list(enumerate(tables))):
        for r in e[e.param == "a"].itertuples():
            total += 1
            hits += r.contrast_low <= truth[("a", r.level)] <= r.contrast_high
    coverage = hits / total
    assert 0.92 <= coverage <= 0.98, coverage


@pytest.mark.slow
def test_global_null_rarely_calls_an_effect() -> None:
    """No param has any effect on any target: across 100 reports the share with any `effect`
    call stays within 5% (plus Monte Carlo error)."""
    rng = np.random.default_rng(2)
    effects = {p: {"l0": 0.0, "l1": 0.0, "l2": 0.0} for p in ("a", "b", "c", "d")}
    tables = [_synthetic(rng, 40, effects, ["m1", "m2", "m3"]) for _ in range(100)]
    any_effect = sum(bool((e.call == "effect").any())
                     for e in _in_parallel(_null_sweep, list(enumerate(tables))))
    assert any_effect / 100 <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 100), any_effect


def _small_null_sweep(job: tuple[int, pd.DataFrame]) -> pd.DataFrame:
    rep, t = job
    return effects_table(t, ["a", "b"], ["m1", "m2", "m3"], n_boot=400, seed=rep, min_trials=1,
                         min_effect={"m1": 0.0, "m2": 0.0, "m3": 0.0})


@pytest.mark.slow
def test_small_sweeps_keep_their_error_rates_under_the_null() -> None:
    """12 trials of 2 params x 3 levels (7 residual degrees of freedom), nothing planted, delta
    0 so that the calls rest on the tests alone: across 300 reports, the share with any
    `effect` call and the share with any Bonferroni interval excluding 0 stay within 5% (plus
    twice the Monte Carlo error), and so do the rates at which the omnibus and the row tests
    reject at 5% (three times: rows of a report are correlated). With normal quantiles and
    the omnibus's raw covariance against chi2 they were 0.22, 0.19 and 0.07."""
    rng = np.random.default_rng(5)
    effects = {p: {"l0": 0.0, "l1": 0.0, "l2": 0.0} for p in ("a", "b")}
    tables = [_synthetic(rng, 12, effects, ["m1", "m2", "m3"]) for _ in range(300)]
    reports = _in_parallel(_small_null_sweep, list(enumerate(tables)))
    # (a level no trial drew has no row)
    assert np.mean([len(e) == 18 for e in reports]) > 0.9

    def within(rate: float, n: int, k: float = 2.0) -> bool:
        return rate <= 0.05 + k * np.sqrt(0.05 * 0.95 / n)

    any_effect = np.mean([bool((e.call == "effect").any()) for e in reports])
    any_excluded = np.mean([bool(((e.adj_low > 0) | (e.adj_high < 0)).any()) for e in reports])
    fams = pd.concat([e.drop_duplicates(["target", "param"]) for e in reports])
    rows = pd.concat(reports)
    assert within(any_effect, 300), any_effect
    assert within(any_excluded, 300), any_excluded
    assert within(float((fams.p_family < 0.05).mean()), len(fams), 3), fams.p_family.describe()
    assert within(float((rows.p_value < 0.05).mean()), len(rows), 3), rows.p_value.describe()


def _asha_like(seed: int, n: int = 160) -> tuple[pd.DataFrame, pd.DataFrame, list[int]]:
    """`asha_trials` as the tables `budget_data` reads (no store): the trial table, the
    curves and ASHA's rungs."""
    trials, curves = [], []
    for i, (p, points, outcome) in enumerate(asha_trials(np.random.default_rng(seed), n)):
        curves += [{"trial_id": f"t{i}", **m} for m in points]
        trials.append({"trial_id": f"t{i}", "outcome": outcome.value,
                       "last_epoch": int(points[-1]["epoch"]), **p, **points[-1]})
    return pd.DataFrame(trials), pd.DataFrame(curves), rung_epochs(GRACE, RF, EPOCHS)


def test_imputation_recovers_planted_effects_at_a_later_rung() -> None:
    """At epoch 8 of planted ASHA-like sweeps (rungs 4 and 8, half the trials stopped at each)
    the imputed contrasts average to the truth: norm=post_ln +0.0267 (it learns faster),
    n_heads=4 +0.06.
    With the imputation's former ridge (1e-3 of the mean diagonal, as large as a rung value's
    variance) they came out 0.021 and 0.055."""
    from analysis.effects import _budget_rows, studied_levels
    from analysis.estimators import budget_data

    got: dict[str, list[float]] = {"post_ln": [], "4": []}
    for seed in range(30):
        trials, curves, rungs = _asha_like(seed)
        levels, _ = studied_levels(trials.set_index("trial_id"), ["norm", "n_heads"])
        bd = budget_data(trials, curves, "test_acc", 8, False, "search", rungs, "val_acc")
        assert bd is not None and bd.estimator == ESTIMATOR_IMPUTED
        rows, _ = _budget_rows(bd, levels, 20, np.random.default_rng(seed), 3)
        for r in rows:
            if r["level"] in got:
                got[r["level"]].append(r["contrast"])
    # the pre_ln - post_ln gap closes linearly to 0 at the last epoch
    truth = {"post_ln": (SLOW_GAP - FAST_GAP) * (1 - 8 / EPOCHS), "4": REAL}
    for level, values in got.items():
        assert len(values) == 30
        assert abs(np.mean(values) - truth[level]) < 0.003, (level, np.mean(values))


def test_stopped_trials_are_imputed_without_the_spec_rungs() -> None:
    """A store read without its spec passes no rungs: the epochs its trials were stopped at
    stand for them, so every stopped trial is still imputed (they were dropped, the estimate
    still labelled imputed)."""
    from analysis.estimators import budget_data

    trials, curves, rungs = _asha_like(0)
    stopped = int((trials["outcome"] == Outcome.EARLY_STOPPED.value).sum())
    assert stopped > 0
    for given in (rungs, []):
        bd = budget_data(trials, curves, "test_acc", 12, True, "search", given, "val_acc")
        assert bd is not None and bd.estimator == ESTIMATOR_IMPUTED
        assert len(bd.y) == len(trials) and int((~bd.observed).sum()) == stopped
        assert [st.rung for st in bd.steps] == [8, 4]


def test_a_thin_level_leaves_its_whole_param_inconclusive() -> None:
    """Two levels, one held by 2 trials: the other row is the same contrast with its sign
    flipped, so it is inconclusive too (it was called an effect while its mirror was not)."""
    rng = np.random.default_rng(4)
    t = _synthetic(rng, 40, {"a": {"y": 0.05}, "b": {"p": 0.0, "q": 0.0}}, ["m"],
                   trial_sd=0.005, seed_sd=0.002)
    thin = t.trial_id.isin(["t0", "t1"])
    t.loc[thin, "a"] = "x"
    t.loc[thin, "m"] -= 0.05
    e = effects_table(t, ["a", "b"], ["m"], n_boot=200, min_effect={"m": 0.01})
    a = e[e.param == "a"].set_index("level")
    assert set(a.call) == {"inconclusive"}
    assert "2 trials (fewer than min_trials=3)" in a.loc["x", "note"]
    assert a.loc["y", "note"].startswith("its contrast rests on a=x too (2 trials")
    assert a.loc["y", "contrast_low"] > 0.04  # clearly non-zero: the support decides


def test_a_planted_zero_is_called_negligible_and_a_thin_level_inconclusive() -> None:
    rng = np.random.default_rng(3)
    t = _synthetic(rng, 300, {"a": {"x": 0.0, "y": 0.0}, "b": {"p": 0.0, "q": 0.05}}, ["m"],
                   trial_sd=0.005, seed_sd=0.002)
    e = effects_table(t, ["a", "b"], ["m"], n_boot=300, min_effect={"m": 0.01})
    assert set(e[e.param == "a"].call) == {"negligible"}
    assert set(e[e.param == "b"].call) == {"effect"}
    # a level held by one trial: no effect call, and the note says why
    thin = t.copy()
    first = thin.trial_id == "t0"
    thin.loc[first, "b"] = "r"
    thin.loc[first, "m"] += 0.5
    e = effects_table(thin, ["a", "b"], ["m"], n_boot=200, min_effect={"m": 0.01})
    row = e[(e.param == "b") & (e.level == "r")].iloc[0]
    assert row.call == "inconclusive" and "1 trial" in row.note and row.n == 1
    assert row.n_rows == 2


def test_aliased_levels_are_inconclusive() -> None:
    rng = np.random.default_rng(4)
    t = _synthetic(rng, 60, {"a": {"x": 0.0, "y": 0.1}}, ["m"])
    t["b"] = t["a"].map({"x": "p", "y": "q"})  # b always moves with a
    e = effects_table(t, ["a", "b"], ["m"], n_boot=200)
    assert (e.call == "inconclusive").all()
    assert e.note.str.contains("aliased").all()


def test_outcome_table_keeps_levels_only_stopped_trials_reached() -> None:
    table = pd.DataFrame({"trial_id": ["a", "b", "c", "d"],
                          "outcome": ["completed", "early_stopped", "early_stopped", "diverged"],
                          "init": ["x", "x", "small", "small"]})
    levels = {"init": pd.Series(pd.Categorical(table["init"]), index=table.index)}
    out = outcome_table(table, levels).set_index("level")
    assert out.loc["small", "completed"] == 0 and out.loc["small", "stop_rate"] == 0.5
    assert out.loc["small", "divergence_rate"] == 0.5 and out.loc["x", "n_trials"] == 2


def test_rung_epochs_follow_asha() -> None:
    assert rung_epochs(4, 2, 12) == [4, 8]
    assert rung_epochs(1, 3, 10) == [1, 3, 9]
    assert rung_epochs(8, 2, 8) == []


def test_asha_store_helper_is_importable_without_ray(tmp_path: Path) -> None:
    """The planted ASHA store is written by the product's tracker only (no Ray needed)."""
    uri = f"sqlite:///{tmp_path / 'small.db'}"
    counts = build_asha_store(uri, n_trials=12, seed=5)
    assert sum(counts.values()) == 12
    sweep = load_sweep(uri)
    assert len(sweep.trial_table) == 12 and set(sweep.curves.columns) >= {"trial_id", "epoch"}
    assert sweep.design == "search"
    shutil.rmtree(tmp_path, ignore_errors=True)
