"""Granulated Kendall tau with group counts and bootstrap intervals (analysis/measures.py) on
synthetic designs: one-at-a-time (qualifying groups), a sparse random sample (none) and a
2x2 grid (2-trial groups only)."""

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.measures import (
    MIN_GROUP,
    granulated_ci,
    granulated_stat,
    group_taus,
    kendall_tau_ci,
    measures_table,
    stratified_se,
)
from study.records import MEASURE_COLUMNS, MEASURE_CSV_COLUMNS

LEVELS = {"a": list("pqrstu"), "b": [1, 2, 4, 8], "c": [0.0, 0.1, 0.2], "d": list("uvwxyz")}
PARAMS = list(LEVELS)
BASES = 6
SEEDS = 2
PER_BASE = 1 + sum(len(v) - 1 for v in LEVELS.values())  # a base and its variations


def _bases() -> list[dict]:
    """BASES base configurations that differ pairwise in >= 3 params (a and d always, b or c
    since i = j mod 4 and mod 3 only for i = j < 12), so that no group of one base picks up a
    trial of another: the design's group count is exactly bases x params."""
    return [{p: v[i % len(v)] for p, v in LEVELS.items()} for i in range(BASES)]


def one_at_a_time(rng_seed: int = 0) -> pd.DataFrame:
    """Every base followed by its variations (one param at each of its other levels), SEEDS
    rows per trial. target: an additive function of the config plus noise; `follows`: the
    target plus small noise (tracks it within every group); `unrelated`: independent noise."""
    rng = np.random.default_rng(rng_seed)
    effect = {p: dict(zip(v, rng.normal(0, 1, len(v)), strict=True)) for p, v in LEVELS.items()}
    configs = []
    for base in _bases():
        configs.append(base)
        configs += [{**base, p: v} for p in PARAMS for v in LEVELS[p] if v != base[p]]
    rows = []
    for i, cfg in enumerate(configs):
        gap = sum(effect[p][cfg[p]] for p in PARAMS) + rng.normal(0, 0.3)
        follows, unrelated = gap + rng.normal(0, 0.05), rng.normal(0, 1)
        for s in range(SEEDS):
            rows.append({"trial_id": f"t{i}", "seed": s, **cfg,
                         "gen_gap_acc": gap + rng.normal(0, 0.01),
                         "follows": follows + rng.normal(0, 0.01),
                         "unrelated": unrelated + rng.normal(0, 0.01)})
    return pd.DataFrame(rows)


def table(trials: pd.DataFrame, **kw) -> pd.DataFrame:
    return measures_table(trials, PARAMS, measures=("follows", "unrelated"),
                          **kw).set_index("measure")


@pytest.fixture(scope="module")
def oat() -> pd.DataFrame:
    return table(one_at_a_time())


def test_columns_keep_the_csv_prefix(oat) -> None:
    assert list(oat.reset_index().columns) == \
        ["measure", *(c for c in MEASURE_COLUMNS if c != "measure")]
    assert MEASURE_CSV_COLUMNS[:6] == ("target", "measure", "kendall_tau",
                                       "granulated_kendall_tau", "p_value", "n")
    assert {"tau_low", "tau_high", "granulated_low", "granulated_high", "n_groups",
            "group_size", "note"} <= set(MEASURE_CSV_COLUMNS)


def test_one_at_a_time_planted_measure(oat) -> None:
    r = oat.loc["follows"]
    assert r["granulated_kendall_tau"] > 0.8
    assert 0 < r["granulated_low"] <= r["granulated_kendall_tau"] <= r["granulated_high"]
    assert r["n_groups"] == BASES * len(PARAMS)  # one group per base and param
    assert r["group_size"] == 5  # per base: groups of 6 (a, d), 4 (b) and 3 (c) trials
    assert r["n_params_granulated"] == len(PARAMS) and r["note"] == ""
    assert r["n"] == BASES * PER_BASE
    assert 0 < r["tau_low"] <= r["kendall_tau"] <= r["tau_high"]


def test_one_at_a_time_unrelated_measure_covers_zero(oat) -> None:
    r = oat.loc["unrelated"]
    assert r["granulated_low"] < 0 < r["granulated_high"]
    assert r["tau_low"] < 0 < r["tau_high"]
    assert r["n_groups"] == BASES * len(PARAMS)
    assert abs(r["granulated_kendall_tau"]) < 0.3


def test_bootstrap_is_seeded() -> None:
    trials = one_at_a_time(1)
    a, b = table(trials, seed=3), table(trials, seed=3)
    pd.testing.assert_frame_equal(a, b)
    c = table(trials, seed=4)
    assert not np.isclose(a.loc["unrelated", "tau_low"], c.loc["unrelated", "tau_low"])
    # the granulated interval is a t interval: no resampling, no seed
    assert a.loc["unrelated", "granulated_low"] == c.loc["unrelated", "granulated_low"]
    none = table(trials, n_boot=0)
    assert none[["tau_low", "tau_high"]].isna().all().all()
    assert none.granulated_low.equals(a.granulated_low)
    assert none.loc["follows", "granulated_kendall_tau"] == \
        a.loc["follows", "granulated_kendall_tau"]


def test_sparse_random_sample_has_no_groups() -> None:
    """A random sample over 6 params (4 of them continuous, binned in 3): no 3 trials share
    the other 5 params' levels."""
    rng = np.random.default_rng(2)
    n = 40
    trials = pd.DataFrame({"trial_id": [f"t{i}" for i in range(n)],
                           "a": rng.choice(LEVELS["a"], n), "d": rng.choice(LEVELS["d"], n),
                           **{p: rng.uniform(0, 1, n) for p in "bcef"}})
    trials["gen_gap_acc"] = trials["b"] + rng.normal(0, 0.1, n)
    trials["follows"] = trials["gen_gap_acc"] + rng.normal(0, 0.01, n)
    trials["unrelated"] = rng.normal(0, 1, n)
    m = measures_table(trials, list("abcdef"), measures=("follows", "unrelated"))
    m = m.set_index("measure")
    for r in m.itertuples():
        assert np.isnan(r.granulated_kendall_tau) and np.isnan(r.granulated_low)
        assert np.isnan(r.granulated_high) and np.isnan(r.group_size)
        assert r.n_groups == 0 and r.n_params_granulated == 0
        assert "granulated tau undefined" in r.note and "one_at_a_time" in r.note
    assert m.loc["follows", "tau_low"] > 0.5  # tau over all trials is still defined


def test_two_trial_groups_are_not_counted() -> None:
    grid = pd.DataFrame([{"trial_id": f"t{i}", "a": a, "b": b, "gen_gap_acc": float(i),
                          "follows": float(i)}
                         for i, (a, b) in enumerate(itertools.product([0, 1], ["x", "y"]))])
    m = measures_table(grid, ["a", "b"], measures=("follows",)).iloc[0]
    assert m["n_groups"] == 0 and np.isnan(m["granulated_kendall_tau"])
    assert "4 smaller groups not counted" in m["note"]
    # Jiang et al.'s definition (min_group=2) uses them
    m2 = measures_table(grid, ["a", "b"], measures=("follows",), min_group=2).iloc[0]
    assert m2["n_groups"] == 4 and m2["granulated_kendall_tau"] == pytest.approx(1.0)
    # a group of MIN_GROUP trials with 2 values of the varied param counts
    three = pd.concat([grid, grid.iloc[[1]].assign(trial_id="t4", gen_gap_acc=4.0,
                                                    follows=4.0)], ignore_index=True)
    taus, small = group_taus(three, "follows", "gen_gap_acc", ["a", "b"],
                             min_group=MIN_GROUP)
    assert [[k for _, k in g] for g in taus.values()] == [[3], [3]] and small == 2


def test_single_group_param_has_no_interval() -> None:
    trials = one_at_a_time()
    base = trials[trials["trial_id"].isin(trials["trial_id"].unique()[:PER_BASE])]  # base 0
    m = table(base)
    r = m.loc["follows"]
    assert r["n_groups"] == len(PARAMS) and np.isfinite(r["granulated_kendall_tau"])
    assert np.isnan(r["granulated_low"]) and "fewer than 3 groups" in r["note"]


def test_statistic_apart_from_its_interval() -> None:
    taus = [np.array([1.0, 0.0, 0.5]), np.array([-1.0, -1.0, 1.0])]
    assert float(granulated_stat(taus)) == pytest.approx((0.5 - 1 / 3) / 2)
    se, df = stratified_se(taus)
    assert se == pytest.approx(np.sqrt(0.25 / 3 + (4 / 3) / 3) / 2)
    assert 2 < df < 4  # Welch-Satterthwaite: between the smaller and the summed group df
    lo, hi = granulated_ci(taus)
    assert -1 <= lo <= float(granulated_stat(taus)) <= hi <= 1
    assert np.isnan(granulated_ci([np.array([0.5, 0.1])])[0])  # 2 groups: no interval
    assert np.isnan(kendall_tau_ci([1, 1, 1, 1], [1, 2, 3, 4])[0])


@pytest.mark.parametrize(("n_params", "groups"), [
    pytest.param(1, 3, id="1x3"), pytest.param(1, 6, id="1x6"), pytest.param(3, 3, id="3x3"),
    pytest.param(2, 10, id="2x10")])
def test_granulated_interval_covers_the_truth(n_params: int, groups: int) -> None:
    """Groups of 4 trials whose measure and target are bivariate normal with correlation 0.5:
    each group's tau has mean 2/pi arcsin(0.5) = 1/3 (Kendall's tau is unbiased); the 95%
    interval covers it about 95% of the time (a percentile bootstrap over groups covered 61%
    at 1 x 3)."""
    rng = np.random.default_rng(7)

    def group_tau() -> float:
        t = rng.normal(size=4)
        return float(stats.kendalltau(0.5 * t + np.sqrt(0.75) * rng.normal(size=4), t)[0])

    reps = 300
    hits = 0
    for _ in range(reps):
        lo, hi = granulated_ci([np.array([group_tau() for _ in range(groups)])
                                for _ in range(n_params)])
        hits += lo <= 1 / 3 <= hi
    assert 0.90 <= hits / reps <= 0.99
