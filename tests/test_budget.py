"""Budget curves (expected best of n trials) and LR sensitivity (analysis/budget.py) recover
exact and planted answers; their figures draw present data and skip absent data."""

import itertools

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from scipy import stats

from analysis import plots
from analysis.budget import (
    BUDGET_COLUMNS,
    LR_COLUMNS,
    LR_SUMMARY_COLUMNS,
    budget_curves,
    expected_max,
    expected_max_curve,
    lr_bins,
    lr_sensitivity,
    lr_sensitivity_summary,
    lr_sensitivity_targets,
    max_weights,
)
from analysis.effects import bin_levels


def _subset_maxima(v: np.ndarray, n: int) -> np.ndarray:
    return np.array([max(c) for c in itertools.combinations(v, n)])


@pytest.mark.parametrize("values", [
    np.random.default_rng(0).normal(size=7),
    np.array([0.5, 0.7, 0.7, 0.2, 0.7, 0.1]),  # ties
    np.array([3.0]),
])
def test_expected_max_is_the_average_over_all_subsets(values):
    N = len(values)
    ns, mean, low, high = expected_max_curve(values)
    assert ns.tolist() == list(range(1, N + 1))
    for n in range(1, N + 1):
        maxima = _subset_maxima(values, n)
        assert expected_max(values, n) == pytest.approx(maxima.mean(), abs=1e-12)
        assert mean[n - 1] == pytest.approx(maxima.mean(), abs=1e-12)
        sd = maxima.std()  # the band: +/- the std of the best over the same draw, clipped
        assert low[n - 1] == pytest.approx(max(maxima.mean() - sd, values.min()), abs=1e-9)
        assert high[n - 1] == pytest.approx(min(maxima.mean() + sd, values.max()), abs=1e-9)
    assert expected_max(values, 1) == pytest.approx(values.mean())
    assert expected_max(values, N) == pytest.approx(values.max())
    assert low[-1] == pytest.approx(values.max()) and high[-1] == pytest.approx(values.max())


def test_with_replacement_matches_monte_carlo_and_is_never_above_the_unbiased():
    rng = np.random.default_rng(1)
    v = rng.gamma(2.0, size=12)
    ns, mean, low, high = expected_max_curve(v, replace=True, n_max=20)
    assert len(ns) == 20  # with replacement a budget beyond N is defined
    for n in (1, 3, 12, 20):
        draws = rng.choice(v, size=(200_000, n), replace=True).max(axis=1)
        se = draws.std() / np.sqrt(len(draws))
        assert abs(expected_max(v, n, replace=True) - draws.mean()) < 5 * se
        assert mean[n - 1] == pytest.approx(expected_max(v, n, replace=True))
        assert high[n - 1] - mean[n - 1] <= draws.std() + 0.02
    assert expected_max(v, 1, replace=True) == pytest.approx(v.mean())
    unbiased = expected_max_curve(v)[1]
    assert (mean[:12] <= unbiased + 1e-12).all()
    assert mean[11] < v.max()  # at n = N the with-replacement curve is below the best


def test_curves_are_monotone_and_stable_for_many_trials():
    rng = np.random.default_rng(2)
    for v in (rng.normal(size=40), rng.normal(size=2000)):
        for replace in (False, True):
            ns, mean, low, high = expected_max_curve(v, replace=replace)
            assert np.isfinite(mean).all() and np.isfinite(low).all()
            assert (np.diff(mean) >= -1e-12).all()
            assert (low <= mean + 1e-12).all() and (mean <= high + 1e-12).all()
            assert low.min() >= v.min() - 1e-12 and high.max() <= v.max() + 1e-12
        mean = expected_max_curve(v)[1]
        assert mean[0] == pytest.approx(v.mean()) and mean[-1] == pytest.approx(v.max())
    for replace in (False, True):
        w = max_weights(2000, np.arange(1, 2001), replace)
        assert np.allclose(w.sum(axis=1), 1.0) and (w >= 0).all()


def test_expected_max_edge_cases():
    assert np.isnan(expected_max([], 1))
    assert expected_max([np.nan, 1.0, 3.0], 2) == pytest.approx(3.0)  # non-finite dropped
    assert all(len(a) == 0 for a in expected_max_curve([np.nan]))
    with pytest.raises(ValueError):
        expected_max([1.0, 2.0], 3)
    with pytest.raises(ValueError):
        expected_max([1.0, 2.0], 0)
    assert expected_max([1.0, 2.0], 3, replace=True) == pytest.approx(2 - 1 / 8)


def _trials(rows: list[dict], seeds: int = 2, noise: float = 0.0,
            seed: int = 0) -> pd.DataFrame:
    """One row per trial x seed: the trial's values plus seed noise on the metric columns."""
    rng = np.random.default_rng(seed)
    out = []
    for i, r in enumerate(rows):
        for s in range(seeds):
            row = {"trial_id": f"t{i}", "seed": s, **r}
            for k in ("val_acc", "test_acc", "gen_gap_acc"):
                if k in row:
                    row[k] = row[k] + rng.normal(0, noise)
            out.append(row)
    return pd.DataFrame(out)


def test_budget_curves_rank_a_planted_better_level_higher():
    rng = np.random.default_rng(3)
    rows = [{"norm": norm, "attn_dropout": float(rng.uniform(0, 0.3)),
             "val_acc": float(rng.normal(0.80 if norm == "pre_ln" else 0.70, 0.03))}
            for norm in ["pre_ln"] * 15 + ["post_ln"] * 25]
    trials = _trials(rows, seeds=3, noise=0.01)
    table = budget_curves(trials, ["norm", "attn_dropout", "absent"], "val_acc", "max")
    assert list(table.columns) == list(BUDGET_COLUMNS)
    assert any("absent" in n for n in table.attrs["notes"])
    norm = table[table["param"] == "norm"]
    pre = norm[norm["level"] == "pre_ln"].set_index("n_trials")
    post = norm[norm["level"] == "post_ln"].set_index("n_trials")
    assert pre.index.max() == 15 and post.index.max() == 25
    assert (pre["n_level"] == 15).all() and (post["n_level"] == 25).all()
    assert (pre["mean"] > post["mean"].loc[pre.index]).all()
    per_trial = trials.groupby("trial_id", sort=False)["val_acc"].mean()
    pre_vals = per_trial[[f"t{i}" for i in range(15)]].to_numpy()
    assert pre["mean"].loc[1] == pytest.approx(pre_vals.mean())  # seed means, one per trial
    assert pre["mean"].loc[15] == pytest.approx(pre_vals.max())
    # numeric params are binned exactly as in the effects table
    levels = bin_levels(trials.drop_duplicates("trial_id")["attn_dropout"])
    drop = table[table["param"] == "attn_dropout"]
    assert list(dict.fromkeys(drop["level"])) == list(levels.cat.categories)
    # mode=min: the expected lowest, band swapped accordingly
    low = budget_curves(trials, ["norm"], "val_acc", "min")
    lpre = low[low["level"] == "pre_ln"].set_index("n_trials")
    assert lpre["mean"].loc[15] == pytest.approx(pre_vals.min())
    assert (lpre["low"] <= lpre["mean"]).all() and (lpre["mean"] <= lpre["high"]).all()
    assert (np.diff(lpre["mean"].to_numpy()) <= 1e-12).all()
    assert budget_curves(trials, ["norm"], "missing", "max").empty
    with pytest.raises(ValueError):
        budget_curves(trials, ["norm"], "val_acc", "best")


def _lr_sweep(seed: int = 4) -> pd.DataFrame:
    """lr log-uniform over [1e-4, 1e-1]. norm: pre_ln peaks at 1e-3, post_ln at 1e-2 (val_acc),
    and the gap is lowest there. qk_norm: off adds a sharper peak at the same optimum."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(600):
        lr = float(10 ** rng.uniform(-4, -1))
        norm = str(rng.choice(["pre_ln", "post_ln"]))
        qk = bool(rng.random() < 0.5)
        opt = -3.0 if norm == "pre_ln" else -2.0
        acc = 0.9 - 0.08 * (np.log10(lr) - opt) ** 2
        if not qk:
            acc -= 0.15 * (np.log10(lr) - opt) ** 2
        rows.append({"lr": lr, "norm": norm, "qk_norm": qk, "val_acc": float(acc),
                     "gen_gap_acc": float(0.05 + 0.04 * (np.log10(lr) - opt) ** 2)})
    return _trials(rows, seeds=2, noise=0.005, seed=seed)


def test_lr_sensitivity_recovers_planted_optima_and_ranks_flat_below_peaked():
    trials = _lr_sweep()
    table = lr_sensitivity(trials, ["lr", "norm", "qk_norm"], "val_acc", n_bins=7)
    assert list(table.columns) == list(LR_COLUMNS)
    assert set(table["param"]) == {"norm", "qk_norm"}  # lr itself is the x axis
    assert table["n"].sum() == 2 * 600  # every trial once per param
    half = 3 / 7 / 2  # half a bin, in decades
    summary = lr_sensitivity_summary(table)
    assert list(summary.columns) == list(LR_SUMMARY_COLUMNS)
    s = summary.set_index(["param", "level"])
    assert abs(np.log10(s.loc[("norm", "pre_ln"), "lr_best"]) + 3) <= half
    assert abs(np.log10(s.loc[("norm", "post_ln"), "lr_best"]) + 2) <= half
    assert (s["support"] == "shared").all() and (s["n_bins"] == 7).all()
    assert s.loc[("qk_norm", "True"), "sensitivity"] < s.loc[("qk_norm", "False"),
                                                              "sensitivity"]
    # the gap is lower-is-better: its best bin is its lowest, at the same planted optima
    gap = lr_sensitivity_summary(lr_sensitivity(trials, ["lr", "norm"], "gen_gap_acc",
                                                n_bins=7)).set_index("level")
    assert abs(np.log10(gap.loc["pre_ln", "lr_best"]) + 3) <= half
    assert abs(np.log10(gap.loc["post_ln", "lr_best"]) + 2) <= half
    assert gap.loc["pre_ln", "best"] == pytest.approx(0.05, abs=0.01)


def test_lr_sensitivity_of_a_report_counts_each_target_once():
    """The report's LR tables: its objective and the gap, each once, also when the objective
    is the gap itself (it was counted twice: every n and n_bins doubled)."""
    trials = _lr_sweep()
    gap = lr_sensitivity(trials, ["lr", "norm"], "gen_gap_acc", n_bins=5)
    once = lr_sensitivity_targets(trials, ["lr", "norm"], ("gen_gap_acc", "gen_gap_acc"))
    pd.testing.assert_frame_equal(once, gap)
    assert once["n"].sum() == 600  # every trial once
    pd.testing.assert_frame_equal(lr_sensitivity_summary(once), lr_sensitivity_summary(gap))
    both = lr_sensitivity_targets(trials, ["lr", "norm"], ("val_acc", "gen_gap_acc", "absent"))
    assert list(dict.fromkeys(both["target"])) == ["val_acc", "gen_gap_acc"]
    assert lr_sensitivity_targets(trials, ["lr", "norm"], ("absent",)).empty


def test_lr_sensitivity_intervals_bins_and_skips():
    trials = _lr_sweep()
    table = lr_sensitivity(trials, ["lr", "norm"], "val_acc", n_bins=5)
    row = table.iloc[0]
    per = trials.groupby("trial_id", sort=False).agg(
        lr=("lr", "first"), norm=("norm", "first"), val_acc=("val_acc", "mean"))
    cell = per[(per["norm"] == row["level"]) & (per["lr"] >= row["lr_low"])
               & (per["lr"] < row["lr_high"])]["val_acc"].to_numpy()
    assert len(cell) == row["n"]
    half = stats.t.ppf(0.975, len(cell) - 1) * cell.std(ddof=1) / np.sqrt(len(cell))
    assert row["mean"] == pytest.approx(cell.mean())
    assert row["high"] - row["mean"] == pytest.approx(half)
    assert row["lr_bin"] == pytest.approx(np.sqrt(row["lr_low"] * row["lr_high"]))
    # a grid of at most n_bins LRs keeps its own values; one trial in a cell: no interval
    grid = pd.DataFrame({"trial_id": ["a", "b", "c", "d"], "lr": [1e-3, 1e-2, 1e-3, 1e-2],
                         "norm": ["x", "x", "y", "y"], "val_acc": [0.8, 0.9, 0.7, 0.6]})
    g = lr_sensitivity(grid, ["lr", "norm"], "val_acc")
    assert sorted(set(g["lr_bin"])) == [1e-3, 1e-2] and g["low"].isna().all()
    gs = lr_sensitivity_summary(g).set_index("level")
    assert gs.loc["x", "sensitivity"] == pytest.approx(0.05)
    assert gs.loc["y", "lr_best"] == pytest.approx(1e-3)
    idx, centre, _, _ = lr_bins([1e-4, 1e-1, np.nan, -1.0, 3e-2, 2e-4], n_bins=3)
    assert idx.tolist() == [0, 2, -1, -1, 2, 0]
    assert centre == pytest.approx([10**-3.5, 10**-2.5, 10**-1.5])
    # no lr among the params, or no other param: an empty table that says why
    none = lr_sensitivity(trials, ["norm"], "val_acc")
    assert none.empty and list(none.columns) == list(LR_COLUMNS) and none.attrs["notes"]
    only = lr_sensitivity(trials, ["lr"], "val_acc")
    assert only.empty and any("no param other than lr" in n for n in only.attrs["notes"])
    assert lr_sensitivity_summary(none).empty


def test_figures_draw_present_data_with_the_legend_outside_and_skip_absent_data():
    trials = _lr_sweep()
    budget = budget_curves(trials, ["norm", "qk_norm"], "val_acc", "max")
    lr_table = lr_sensitivity(trials, ["lr", "norm", "qk_norm"], "val_acc")
    for fig in (plots.budget_curve_figure(budget, "norm"),
                plots.lr_sensitivity_figure(lr_table, "qk_norm")):
        assert isinstance(fig, Figure)
        fig.canvas.draw()
        ax = fig.axes[0]
        legend = ax.get_legend()
        assert legend is not None and len(legend.get_texts()) == 2
        assert legend.get_window_extent().x0 >= ax.get_window_extent().x1
    assert "sensitivity" in plots.lr_sensitivity_figure(lr_table, "norm").axes[0] \
        .get_legend().get_texts()[0].get_text()
    empty = pd.DataFrame(columns=list(BUDGET_COLUMNS))
    assert plots.budget_curve_figure(empty, "norm") is None
    assert plots.budget_curve_figure(None, "norm") is None
    assert plots.budget_curve_figure(budget, "absent") is None
    assert plots.lr_sensitivity_figure(pd.DataFrame(columns=list(LR_COLUMNS)), "norm") is None
    assert plots.lr_sensitivity_figure(lr_table, "norm", target="test_acc") is None
    figs = plots.budget_figures(budget, lr_table)
    assert set(figs) == {"budget_norm", "budget_qk_norm", "lr_sensitivity_val_acc_norm",
                         "lr_sensitivity_val_acc_qk_norm"}
    assert plots.budget_figures(None, None) == {}
    assert "{metric}" in plots.CAPTIONS["budget"]
    assert "{target}" in plots.CAPTIONS["lr_sensitivity"]


def test_lr_sensitivity_noise_floor_is_what_a_flat_curve_shows():
    """val_acc ignores the LR (0.8 plus trial noise) for both levels, one with 5x the trials:
    their sensitivities are noise, larger for the level with fewer trials, and each level's
    noise floor estimates it (its mean over sweeps within 25%)."""
    sens: dict[str, list[float]] = {"many": [], "few": []}
    floor: dict[str, list[float]] = {"many": [], "few": []}
    for sweep in range(40):
        rng = np.random.default_rng(100 + sweep)
        rows = [{"lr": float(10 ** rng.uniform(-4, -1)), "arm": arm,
                 "val_acc": float(0.8 + 0.02 * rng.normal())}
                for arm, n in (("many", 150), ("few", 30)) for _ in range(n)]
        s = lr_sensitivity_summary(lr_sensitivity(_trials(rows, seeds=1), ["lr", "arm"],
                                                  "val_acc", n_bins=5)).set_index("level")
        for arm, values in sens.items():
            values.append(s.loc[arm, "sensitivity"])
            floor[arm].append(s.loc[arm, "noise_floor"])
    assert np.mean(sens["few"]) > 1.5 * np.mean(sens["many"])  # noise, not the LR
    for arm, values in sens.items():
        assert np.mean(floor[arm]) == pytest.approx(np.mean(values), rel=0.25), arm
