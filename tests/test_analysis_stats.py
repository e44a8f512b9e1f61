"""The analysis recovers planted truth from a synthetic sweep (tests/planted.py) in MLflow."""

import shutil
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import load as L
from analysis.effects import bin_levels, effects_table, noise_floor
from analysis.importance import importance_table
from analysis.load import ReportError, load_sweep
from analysis.measures import (
    granulated_kendall_tau,
    granulated_psi,
    kendall_tau,
    measures_table,
)
from study.records import EFFECT_COLUMNS, SKIP_WHY, SweepSpec
from study.tracking import Tracker
from tests.planted import NORM_EFFECT, SEED_NOISE, build_planted_store

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["gen_gap_acc", "gen_gap_loss", "test_acc"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict:
    """An empty store, a planted sweep and a sweep with no completed trial. MLflow's schema
    migrations take seconds per new SQLite file, so one migrated file is copied."""
    from mlflow.tracking import MlflowClient

    d = tmp_path_factory.mktemp("stores")
    MlflowClient(f"sqlite:///{d / 'empty.db'}").search_experiments()
    for name in ("planted.db", "failed.db"):
        shutil.copy(d / "empty.db", d / name)
    uri = f"sqlite:///{d / 'planted.db'}"
    truth = build_planted_store(uri)
    failed = f"sqlite:///{d / 'failed.db'}"
    tr = Tracker(failed)
    spec = SweepSpec(name="all_failed", path="", text="name: all_failed\n", fixed={},
                     params=())
    pid = tr.start_parent("all_failed", "sweep_all_failed", spec,
                          {"objective": '[["val_acc", "max"]]'})
    tr.finish_child(tr.start_child(pid, "t0", {"n_heads": 2}, 1), "early_stopped", "ASHA")
    tr.finish_child(tr.start_child(pid, "t1", {"n_heads": 4}, 1), "diverged", "nan loss")
    tr.start_child(pid, "t2", {"n_heads": 8}, 1)  # still running
    return {"uri": uri, "truth": truth, "empty": f"sqlite:///{d / 'empty.db'}",
            "failed": failed}


@pytest.fixture(scope="module")
def sweep(stores) -> L.Sweep:
    return load_sweep(stores["uri"])


def test_load_counts_and_skipped_reasons(stores, sweep) -> None:
    truth = stores["truth"]
    c = truth["counts"]
    assert sweep.parent_run_id == truth["parent_run_id"] and sweep.experiment == "planted"
    assert sweep.used == c["completed"]
    assert sweep.skipped == {  # keys: study.records.SKIP_WHY, the summary's wording
        "early_stopped": c["early_stopped"], "diverged": c["diverged"], "error": c["error"],
        "running": c["running"]}
    assert set(sweep.skipped) <= set(SKIP_WHY)
    assert len(sweep.runs) == truth["n_trials"]
    assert list(sweep.runs.columns) == ["run_id", "trial_id", "status", "stop_reason",
                                        "stop_message", "start_time"]
    running = sweep.runs[sweep.runs.status == "RUNNING"]
    assert len(running) == 1 and running.stop_reason.isna().all()
    assert set(sweep.runs.status) == {"FINISHED", "KILLED", "FAILED", "RUNNING"}
    assert sweep.objectives == [("val_acc", "max")]
    assert "2 early_stopped" in sweep.skipped_text()


def test_trials_one_row_per_trial_and_seed_typed(stores, sweep) -> None:
    t = sweep.trials
    seeds = stores["truth"]["seeds"]
    assert len(t) == sweep.used * seeds
    assert list(t.columns[:7]) == ["run_id", "trial_id", "seed", "seed_index", "status",
                                   "stop_reason", "epoch"]
    assert (t.groupby("run_id").seed_index.apply(sorted).map(tuple) == tuple(range(seeds))).all()
    # replicate k ran with seed + k and, the space varying data seeds, data_seed + k
    assert sweep.spec is not None and sweep.spec.vary_data_seed
    for col in ("seed", "data_seed"):
        assert ((t[col] - t.seed_index).groupby(t.run_id).nunique() == 1).all(), col
    assert (t.status == "FINISHED").all() and (t.stop_reason == "completed").all()
    assert (t.epoch == stores["truth"]["epochs"]).all()
    assert sorted(sweep.params) == sorted(stores["truth"]["params"])
    assert pd.api.types.is_integer_dtype(t.n_heads) and set(t.n_heads) <= {1, 2, 4, 8}
    assert pd.api.types.is_float_dtype(t.attn_dropout)
    assert set(t.norm) == {"pre_ln", "post_ln"}
    assert t.ood_len_factors.iloc[0] == (2.0, 4.0) and not t.shuffle_seq.any()
    for m in ("gen_gap_acc", "test_acc", "attn_entropy", "ood_len_acc", "corrupt_rel"):
        assert m in sweep.metrics and t[m].notna().all()
    assert "epoch" not in sweep.metrics
    assert set(sweep.targets()) >= {*TARGETS, "ood_len_acc", "len_gen_ratio", "corrupt_acc"}
    # the per-seed final values are what was logged, not the seed means
    assert t.groupby("run_id").gen_gap_acc.std().median() > 0
    pl = sweep.tables["per_length"]
    assert {"run_id", "trial_id", "seed", "length", "acc", "split", "norm", "n_heads"} <= \
        set(pl.columns)
    assert len(pl) == sweep.used * seeds * 5 and set(pl.length) == {4, 8, 16, 32, 64}
    assert set(sweep.tables) == {"per_length", "per_corruption"}
    assert sweep.spec is not None and sweep.spec.param("n_heads").values == (1, 2, 4, 8)


def test_load_by_experiment_and_run_id(stores) -> None:
    pid = stores["truth"]["parent_run_id"]
    assert load_sweep(stores["uri"], experiment="planted").parent_run_id == pid
    assert load_sweep(stores["uri"], run_id=pid).used == stores["truth"]["counts"]["completed"]


def test_report_errors(stores, sweep) -> None:
    with pytest.raises(ReportError, match="no experiment 'nope'.*known: planted"):
        load_sweep(stores["uri"], experiment="nope")
    with pytest.raises(ReportError, match="no run 'deadbeef'"):
        load_sweep(stores["uri"], run_id="deadbeef")
    child = sweep.runs.run_id.iloc[0]
    with pytest.raises(ReportError, match="not a sweep's parent run"):
        load_sweep(stores["uri"], run_id=child)
    with pytest.raises(ReportError, match="no sweep in"):
        load_sweep(stores["empty"])
    missing = stores["empty"].replace("empty.db", "missing.db")
    with pytest.raises(ReportError, match="no MLflow store at"):
        load_sweep(missing)
    assert not Path(missing[len("sqlite:///"):]).exists()  # nothing created
    with pytest.raises(ReportError) as e:
        load_sweep(stores["failed"])
    msg = str(e.value)
    assert "\n" not in msg and "no completed trials" in msg and "3 skipped" in msg
    assert "1 early_stopped (stopped by ASHA" in msg and "1 diverged" in msg
    assert "1 running (not finished yet)" in msg


def test_effects_recover_planted_and_reject_confounded_null(sweep) -> None:
    e = effects_table(sweep.trials, sweep.params, TARGETS, n_boot=1000, seed=0)
    assert tuple(e.columns) == EFFECT_COLUMNS
    assert set(e.target) == set(TARGETS)
    g = e[e.target == "gen_gap_acc"].set_index(["param", "level"])
    post = g.loc[("norm", "post_ln")]
    assert post.contrast_low <= NORM_EFFECT <= post.contrast_high
    assert abs(post.contrast - NORM_EFFECT) < 0.01 and post.beyond_noise
    assert post.ci_low <= post["mean"] <= post.ci_high
    # n_heads is null but confounded with norm: its RAW means differ by several noise floors
    heads = g.loc["n_heads"]
    assert heads.raw_mean["8"] - heads.raw_mean["1"] > 0.03
    assert heads.raw_mean["8"] - heads.raw_mean["1"] > 3 * post.noise_floor
    # ... while the adjusted contrasts are within the noise, at every level
    assert not heads.beyond_noise.any()
    assert (heads.contrast.abs() < SEED_NOISE).all()
    # n counts trials, n_rows trial x seed rows
    assert heads.n.sum() == sweep.used and heads.n_rows.sum() == len(sweep.trials)
    # attn_dropout's small real effect: the highest bin lowers the gap
    drop = g.loc["attn_dropout"]
    assert drop.contrast.iloc[-1] < 0 and drop.contrast.iloc[0] > 0
    assert e.attrs["notes"] == []


def test_effects_skip_absent_and_constant_targets(sweep) -> None:
    t = sweep.trials.assign(const=1.0)
    e = effects_table(t, ["norm", "task"], ["gen_gap_acc", "const", "missing"], n_boot=50)
    assert set(e.target) == {"gen_gap_acc"} and set(e.param) == {"norm"}
    assert any("const: constant" in n for n in e.attrs["notes"])
    assert any("missing: absent" in n for n in e.attrs["notes"])
    assert any("task: one level" in n for n in e.attrs["notes"])


def test_importance_ranks_planted_param_first(sweep) -> None:
    imp = importance_table(sweep.trials, sweep.params, ["gen_gap_acc"], seed=0,
                           spec=sweep.spec)
    assert list(imp.columns[:4]) == ["target", "param", "importance", "evaluator"]
    fa = imp[imp.evaluator == "fanova"].set_index("param")
    assert fa.importance.idxmax() == "norm" and fa.loc["norm", "rank"] == 1
    assert fa.loc["norm", "importance"] > 0.5
    assert fa.loc["n_heads", "importance"] < 0.05
    ped = imp[imp.evaluator == "ped_anova"].set_index("param")
    # PED-ANOVA asks what sets the best 10% of trials (lowest gaps) apart from the rest: all of
    # them are pre_ln, but what separates them from other pre_ln trials is attn_dropout, and
    # being marginal it inherits the n_heads/norm confound, so norm need not rank first.
    assert set(ped.index) == set(sweep.params)
    assert abs(ped.importance.sum() - 1) < 1e-6
    assert ped.importance.idxmax() in ("norm", "attn_dropout")
    assert ped.loc["norm", "importance"] > 0


def test_importance_skips_targets_with_few_trials(sweep) -> None:
    few = sweep.trials[sweep.trials.run_id.isin(sweep.trials.run_id.unique()[:4])]
    imp = importance_table(few, sweep.params, ["gen_gap_acc"])
    assert imp.empty and "fewer than 5" in imp.attrs["notes"][0]


def test_measures_signs(sweep) -> None:
    m = measures_table(sweep.trials, sweep.params)
    assert list(m.columns[:4]) == ["target", "measure", "kendall_tau", "granulated_kendall_tau"]
    m = m.set_index("measure")
    assert m.loc["attn_entropy", "kendall_tau"] < -0.5  # planted: entropy = 2 - 5 * gap
    assert abs(m.loc["grad_norm", "kendall_tau"]) < 0.2  # planted: unrelated
    g = m.loc["attn_entropy", "granulated_kendall_tau"]
    assert g < 0 and m.loc["attn_entropy", "n_groups"] > 0  # defined here: groups exist
    assert np.isnan(m.loc["n_params", "kendall_tau"]) and "constant" in m.loc["n_params", "note"]
    assert m.loc["attn_entropy", "n"] == sweep.used
    assert set(m.index) <= {"attn_entropy", "attn_entropy_min", "attn_max_logit", "grad_norm",
                            "param_norm", "ece", "n_params", "samples_per_s"}


def test_kendall_and_granulated_on_a_grid() -> None:
    assert kendall_tau([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(kendall_tau([1, 1, 1], [1, 2, 3])) and np.isnan(kendall_tau([1], [2]))
    # a full 2x2 grid: the measure follows the target when a changes, opposes it when b does
    grid = pd.DataFrame({"a": [0, 1, 0, 1], "b": ["x", "x", "y", "y"],
                         "target": [0.0, 1.0, 2.0, 3.0], "measure": [1.0, 2.0, 0.0, 0.5]})
    psi = granulated_psi(grid, "measure", "target", ["a", "b"], group="none")
    assert psi["a"] == (pytest.approx(1.0), 2) and psi["b"] == (pytest.approx(-1.0), 2)
    assert kendall_tau(grid.measure, grid.target) == pytest.approx(-1 / 3)
    sparse = pd.DataFrame({"a": [0, 1], "b": ["x", "y"], "target": [0.0, 1.0],
                           "measure": [0.0, 1.0]})
    assert granulated_kendall_tau(grid, "measure", "target", ["a", "b"]) == pytest.approx(0.0)
    assert np.isnan(granulated_kendall_tau(sparse, "measure", "target", ["a", "b"]))


def test_bin_levels() -> None:
    cat = bin_levels(pd.Series(["post_ln", "pre_ln", "post_ln"]))
    assert list(cat) == ["post_ln", "pre_ln", "post_ln"]
    assert list(bin_levels(pd.Series([True, False])).astype(str)) == ["True", "False"]
    few = bin_levels(pd.Series([8, 1, 2, 4, 8]))
    assert list(few) == ["8", "1", "2", "4", "8"] and list(few.cat.categories) == \
        ["1", "2", "4", "8"] and few.cat.ordered
    assert list(bin_levels(pd.Series([0.1, 0.2, 0.1]))) == ["0.1", "0.2", "0.1"]
    x = pd.Series(np.linspace(0.0, 0.3, 30))
    b = bin_levels(x)
    cats = list(b.cat.categories)
    assert len(cats) == 3 and cats[0].startswith("[0, ") and cats[-1].endswith("0.3]")
    assert cats[0].endswith(")") and b.value_counts().min() >= 9
    assert b.iloc[0] == cats[0] and b.iloc[-1] == cats[-1]
    assert b.cat.ordered and (b.cat.codes.diff().dropna() >= 0).all()  # monotone in x
    withnan = bin_levels(pd.Series([1.0, np.nan, 2.0]))
    assert list(withnan.astype(str)) == ["1", "NA", "2"]
    assert list(bin_levels(pd.Series([(2.0, 4.0), (2.0, 3.0)])).astype(str)) == \
        ["2,4", "2,3"]


def test_noise_floor(sweep) -> None:
    # by hand: the median over trials of the seeds' sample std (ddof=1); a trial with one seed
    # has none
    small = pd.DataFrame({"trial_id": ["a"] * 3 + ["b"] * 3 + ["c"] * 2 + ["d"],
                          "m": [0.0, 1.0, 2.0, 0.0, 0.0, 4.0, 1.0, 1.5, 9.0]})
    stds = [statistics.stdev(v) for v in ([0.0, 1.0, 2.0], [0.0, 0.0, 4.0], [1.0, 1.5])]
    assert noise_floor(small, "m") == pytest.approx(float(np.median(stds)))
    nf = noise_floor(sweep.trials, "gen_gap_acc")
    # median of 3-seed sample stds of N(0, 0.01): about 0.83 * 0.01
    assert 0.5 * SEED_NOISE < nf < 1.3 * SEED_NOISE
    one = sweep.trials[sweep.trials.seed_index == 0]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert noise_floor(one, "gen_gap_acc") == 0.0
    assert any("one seed per trial" in str(x.message) for x in w)


def test_analysis_imports_neither_torch_nor_ray() -> None:
    code = ("import sys, analysis.load, analysis.effects, analysis.importance, "
            "analysis.measures; bad = {'torch', 'ray'} & set(sys.modules); "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("m", [pytest.param(m, id=f"m{m}") for m in (1, 2, 7, 40)])
def test_holm_is_statsmodels_holm(m: int, monkeypatch) -> None:
    """`holm` gives statsmodels' Holm-adjusted p-values, ties, 0s, 1s and NaNs (left out of
    the family) included."""
    import gc

    from statsmodels.stats.multitest import multipletests

    # the reference's full garbage collection on every call (the reason `holm` exists) takes
    # a third of a second in the test process: its values do not depend on it
    monkeypatch.setattr(gc, "collect", lambda *args: 0)

    from analysis.calls import holm

    rng = np.random.default_rng(m)
    for _ in range(50):
        p = rng.uniform(0, 1, m) ** rng.uniform(0.2, 3)
        p[rng.uniform(size=m) < 0.2] = rng.choice([0.0, 1.0, 0.05])  # ties and ends
        p[rng.uniform(size=m) < 0.15] = np.nan
        got = holm(p)
        ok = np.isfinite(p)
        assert np.isnan(got[~ok]).all()
        if ok.any():
            want = multipletests(p[ok], method="holm")[1]
            np.testing.assert_allclose(got[ok], want, rtol=0, atol=1e-12)
    assert holm(np.array([])).shape == (0,) and np.isnan(holm(np.array([np.nan]))).all()
    grid = rng.uniform(0, 1, (3, 4))  # any shape is one family
    np.testing.assert_allclose(holm(grid).ravel(), holm(grid.ravel()), rtol=0, atol=0)
