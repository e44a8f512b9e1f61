"""Importance with uncertainty: bootstrap intervals, a permutation null, the log scale and
PED-ANOVA's top-set rule, on synthetic per-trial tables with a known truth (small n_boot and
n_perm keep each call to a few seconds)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.importance import (
    MIN_TOP,
    distributions,
    fanova_scale,
    importance_table,
    ped_quantile,
    ped_top_size,
)
from study.records import IMPORTANCE_COLUMNS, IMPORTANCE_CSV_COLUMNS, ParamSpec, SweepSpec

PARAMS = ["norm", "n_heads", "attn_dropout", "lr"]
TARGET = "gen_gap_acc"  # lower is better
N = 40
FAST = {"n_boot": 15, "n_perm": 19}  # 19 shuffles: the smallest p, 1/20, can be <= 0.05


def _trials(n: int = N, seed: int = 0) -> tuple[pd.DataFrame, np.random.Generator]:
    """One row per trial (one seed each): a binary, a 4-level, a uniform and a log-uniform
    param, all sampled independently."""
    rng = np.random.default_rng(seed)
    d = pd.DataFrame({
        "trial_id": [f"t{i:03d}" for i in range(n)], "seed": 0,
        "norm": rng.choice(["pre_ln", "post_ln"], n),
        "n_heads": rng.choice([1, 2, 4, 8], n),
        "attn_dropout": rng.uniform(0.0, 0.3, n),
        "lr": np.exp(rng.uniform(math.log(1e-4), math.log(1e-1), n))})
    return d, rng


def _spec(lr_log: bool) -> SweepSpec:
    return SweepSpec(name="synthetic", path="", text="", fixed={}, params=(
        ParamSpec("norm", "categorical", values=("pre_ln", "post_ln")),
        ParamSpec("n_heads", "categorical", values=(1, 2, 4, 8)),
        ParamSpec("attn_dropout", "float", low=0.0, high=0.3),
        ParamSpec("lr", "float", low=1e-4, high=1e-1, log=lr_log)))


def _by(imp: pd.DataFrame, evaluator: str) -> pd.DataFrame:
    return imp[imp.evaluator == evaluator].set_index("param")


def test_columns() -> None:
    assert IMPORTANCE_COLUMNS[:6] == ("target", "param", "importance", "evaluator", "rank",
                                      "n_trials")
    assert IMPORTANCE_CSV_COLUMNS == ("target", "param", "importance", "evaluator",
                                      "importance_low", "importance_high", "null_high",
                                      "important", "p_value")


def test_pure_noise_is_within_its_null() -> None:
    d, rng = _trials(seed=1)
    d[TARGET] = rng.normal(0.0, 0.01, N)
    imp = importance_table(d, PARAMS, [TARGET], seed=1, spec=_spec(True), **FAST)
    assert list(imp.columns) == list(IMPORTANCE_COLUMNS)
    assert set(imp.evaluator) == {"fanova", "ped_anova"} and len(imp) == 2 * len(PARAMS)
    assert not imp.important.any()
    # every interval reaches down to its null baseline
    assert (imp.importance_low <= imp.null_high).all()
    assert (imp.importance_low <= imp.importance_high).all()
    assert imp.p_value.between(1 / 20, 1).all()
    assert imp.attrs["n_boot"] == 15 and imp.attrs["n_perm"] == 19


def test_planted_param_beats_its_null_and_null_params_do_not() -> None:
    d, rng = _trials(seed=2)
    d[TARGET] = 0.08 * (d.norm == "post_ln") + rng.normal(0.0, 0.01, N)
    imp = importance_table(d, PARAMS, [TARGET], seed=2, spec=_spec(True), **FAST)
    fa = _by(imp, "fanova")
    assert fa.loc["norm", "rank"] == 1 and bool(fa.loc["norm", "important"])
    assert fa.loc["norm", "importance_low"] > fa.loc["norm", "null_high"]
    assert fa.loc["norm", "p_value"] == pytest.approx(1 / 20)  # beats every shuffle
    nulls = fa.loc[["n_heads", "attn_dropout", "lr"]]
    assert not nulls.important.any()
    assert (nulls.importance_low <= nulls.null_high).all()
    assert (nulls.p_value > 0.5).all()
    # PED-ANOVA: noisier (5 top trials), but it never calls a null param important
    assert not _by(imp, "ped_anova").loc[["n_heads", "attn_dropout", "lr"]].important.any()


def test_log_uniform_param_is_found_on_the_log_scale() -> None:
    d, rng = _trials(seed=3)
    d[TARGET] = 0.02 * np.log10(d.lr) + rng.normal(0.0, 0.01, N)
    log = importance_table(d, PARAMS, [TARGET], seed=3, spec=_spec(True), **FAST)
    fa = _by(log, "fanova")
    assert bool(fa.loc["lr", "important"])
    assert fa.loc["lr", "importance_low"] > fa.loc["lr", "null_high"]
    assert not fa.loc[["norm", "n_heads", "attn_dropout"]].important.any()
    # declared linear, fANOVA integrates over raw lr, where 90% of the range is lr > 1e-2 and
    # the effect (linear in log lr) is mostly flat: lr's share shrinks
    lin = _by(importance_table(d, PARAMS, [TARGET], seed=3, spec=_spec(False),
                               n_boot=0, n_perm=0), "fanova")
    assert fa.loc["lr", "importance"] > lin.loc["lr", "importance"] + 0.1
    # without a spec the log-uniform sample is detected and analysed on the log scale too
    auto = _by(importance_table(d, PARAMS, [TARGET], seed=3, n_boot=0, n_perm=0), "fanova")
    assert auto.loc["lr", "importance"] == pytest.approx(fa.loc["lr", "importance"], abs=0.02)


def test_fanova_scale_logs_log_params_only() -> None:
    d, _ = _trials(seed=4)
    dists, values = distributions(d, PARAMS, _spec(True))
    assert dists["lr"].log
    fd, fv = fanova_scale(dists, values)
    assert not fd["lr"].log
    assert fd["lr"].low == pytest.approx(math.log(1e-4))
    assert fd["lr"].high == pytest.approx(math.log(1e-1))
    assert np.allclose(fv["lr"], np.log(d["lr"]))
    assert fd["attn_dropout"] is dists["attn_dropout"] and fd["norm"] is dists["norm"]
    assert (fv["attn_dropout"] == values["attn_dropout"]).all()


def test_ped_anova_top_set_size() -> None:
    assert MIN_TOP == 5
    assert ped_top_size(18) == 5  # not the best 10% (2 trials)
    assert ped_top_size(10) == 5 and ped_top_size(9) is None
    assert ped_top_size(50) == 5 and ped_top_size(55) == 6 and ped_top_size(60) == 6
    assert ped_top_size(100) == 10 and ped_top_size(101) == 11
    for n in range(10, 400):
        k, q = ped_top_size(n), ped_quantile(n)
        assert k is not None and q is not None
        assert k == max(MIN_TOP, math.ceil(n / 10))
        assert math.ceil(q * n) == k  # Optuna keeps the best ceil(q * n) trials
    # the rule as Optuna applies it, on a study of 18 distinct values
    import optuna
    from optuna.importance._ped_anova.evaluator import _QuantileFilter

    study = optuna.create_study(direction="minimize")
    study.add_trials([optuna.trial.create_trial(value=float(v)) for v in range(18)])
    top = _QuantileFilter(ped_quantile(18) or 0, True, None).filter(study.trials)
    assert sorted(t.value for t in top) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_ped_anova_is_skipped_on_few_trials_and_its_top_set_noted() -> None:
    d, rng = _trials(n=18, seed=5)
    d[TARGET] = rng.normal(0.0, 0.01, 18)
    imp = importance_table(d.iloc[:8], PARAMS, [TARGET], seed=5, n_boot=0, n_perm=0)
    assert set(imp.evaluator) == {"fanova"}
    assert any("PED-ANOVA skipped" in n and "fewer than 10" in n for n in imp.attrs["notes"])
    assert imp.importance_low.isna().all() and imp.p_value.isna().all()
    assert not imp.important.any()
    imp = importance_table(d, PARAMS, [TARGET], seed=5, n_boot=0, n_perm=0)
    assert set(imp.evaluator) == {"fanova", "ped_anova"}
    assert any("best 5 of 18" in n for n in imp.attrs["notes"])


def test_replicates_are_deterministic_per_seed() -> None:
    d, rng = _trials(n=20, seed=6)
    d[TARGET] = 0.05 * (d.norm == "post_ln") + rng.normal(0.0, 0.01, 20)
    small = {"n_boot": 4, "n_perm": 4}
    a = importance_table(d, ["norm", "attn_dropout"], [TARGET], seed=6, workers=1, **small)
    b = importance_table(d, ["norm", "attn_dropout"], [TARGET], seed=6, workers=1, **small)
    pd.testing.assert_frame_equal(a, b)
    # the fits spread over processes give exactly what one process gives
    c = importance_table(d, ["norm", "attn_dropout"], [TARGET], seed=6, workers=2, **small)
    pd.testing.assert_frame_equal(a, c)


def test_importance_bars_draws_interval_and_null_outside_the_axes() -> None:
    from matplotlib.collections import LineCollection

    from analysis.plots import importance_bars

    rows = [dict(target=TARGET, param=p, importance=v, evaluator=ev, importance_low=v * 0.8,
                 importance_high=min(1.0, v * 1.2), null_high=0.3, important=v * 0.8 > 0.3,
                 p_value=0.05)
            for ev in ("fanova", "ped_anova")
            for p, v in zip(PARAMS, (0.7, 0.2, 0.06, 0.04))]
    table = pd.DataFrame(rows)[list(IMPORTANCE_CSV_COLUMNS)]
    fig = importance_bars(table, [TARGET])
    assert fig is not None
    ax = fig.axes[0]
    assert ax.get_legend() is None and len(fig.legends) == 1  # below the panels, not on bars
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("null" in t for t in labels) and any("interval" in t for t in labels)
    segments = [c for c in ax.collections if isinstance(c, LineCollection)]
    # per bar: the interval, its 2 caps and the null tick
    assert sum(len(c.get_segments()) for c in segments) == 2 * len(PARAMS) * 4
    assert [t.get_text() for t in ax.get_yticklabels()] == PARAMS  # most important on top
    # a table without the uncertainty columns still draws
    assert importance_bars(table[["target", "param", "importance", "evaluator"]]) is not None


def test_few_shuffles_never_call_a_param_important() -> None:
    """With 10 shuffles the smallest permutation p is 1/11 > 0.05: nothing is `important`,
    however far the interval lies above the coarse null quantile."""
    rng = np.random.default_rng(0)
    rows = [{"trial_id": f"t{i}", "seed": 0, "norm": str(rng.choice(["pre_ln", "post_ln"])),
             "n_heads": int(rng.choice([1, 2, 4]))} for i in range(40)]
    for r in rows:
        r["gen_gap_acc"] = (0.3 if r["norm"] == "post_ln" else 0.1) + 0.01 * rng.normal()
    imp = importance_table(pd.DataFrame(rows), ["norm", "n_heads"], ["gen_gap_acc"], seed=0,
                           n_boot=10, n_perm=10)
    assert (imp.p_value >= 1 / 11 - 1e-12).all()
    assert not imp.important.any()
