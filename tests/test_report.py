"""`study report` end to end on the planted MLflow store: files, CSV columns, findings, a
self-contained HTML page that renders in headless Chromium, the CLI, and the MLflow artifacts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from analysis import plots
from analysis.load import Sweep
from analysis.report import write_report
from analysis.summary import effect_findings, findings, header, report_targets
from study.records import EFFECT_CSV_COLUMNS, IMPORTANCE_CSV_COLUMNS, MEASURE_CSV_COLUMNS
from tests.helpers import render_images

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

N_TRIALS = 40  # 35 completed + the 5 planted non-completed runs; keeps the store quick to build
CSV_COLUMNS = {"effects.csv": EFFECT_CSV_COLUMNS, "importance.csv": IMPORTANCE_CSV_COLUMNS,
               "measures.csv": MEASURE_CSV_COLUMNS}
ROBUST_PLANTED = ("id_len_acc", "ood_len_acc", "len_gen_ratio", "corrupt_acc", "corrupt_rel")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from planted import build_planted_store
    root = tmp_path_factory.mktemp("planted")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    truth = build_planted_store(uri, experiment="planted", n_trials=N_TRIALS)
    return SimpleNamespace(uri=uri, root=root, truth=truth)


@pytest.fixture(scope="module")
def report(planted):
    from analysis.load import load_sweep
    sweep = load_sweep(planted.uri, experiment="planted")
    out = planted.root / "report"
    index = write_report(sweep, out, n_boot=300, tracking_uri=planted.uri,
                         importance_boot=6)
    return SimpleNamespace(sweep=sweep, out=out, index=index)


def test_every_output_exists_and_is_nonempty(report):
    out = report.out
    assert report.index == out / "index.html"
    for name in ("trials.csv", "effects.csv", "importance.csv", "measures.csv", "summary.md",
                 "index.html"):
        assert (out / name).stat().st_size > 0, name
    figs = {p.stem for p in (out / "figures").glob("*.png")}
    targets = ["gen_gap_acc", "gen_gap_loss", "test_acc", *ROBUST_PLANTED]
    expected = {f"effects_{t}" for t in targets} | {
        "importance", "measures", "pareto", "per_length", "per_corruption"}
    assert expected <= figs, expected - figs
    assert "per_class" not in figs  # the planted sweep has no long-tail table: plot skipped
    assert all((out / "figures" / f"{f}.png").stat().st_size > 1000 for f in figs)


def test_csv_columns_are_exact(report):
    for name, cols in CSV_COLUMNS.items():
        df = pd.read_csv(report.out / name)
        assert list(df.columns) == list(cols), name
        assert len(df) > 0, name
    trials = pd.read_csv(report.out / "trials.csv")
    assert len(trials) == len(report.sweep.trials)
    effects = pd.read_csv(report.out / "effects.csv")
    assert set(effects["target"]) == {"gen_gap_acc", "gen_gap_loss", "test_acc",
                                      *ROBUST_PLANTED}


def test_summary_leads_with_the_planted_effect(report, planted):
    md = (report.out / "summary.md").read_text(encoding="utf-8")
    bullets = [ln[2:] for ln in md.splitlines() if ln.startswith("- ")]
    used = planted.truth["counts"]["completed"]
    assert bullets[0].startswith("Estimand: ")  # what is estimated, at which budget, how
    assert bullets[1].startswith(f"Used {used} trials (x 3 seeds); skipped: ")
    assert "2 early_stopped" in bullets[1] and "1 diverged" in bullets[1]
    assert "1 error" in bullets[1]
    # the first finding is the planted norm effect on the gap, with its size and CI
    m = re.match(r"norm=post_ln raises gen_gap_acc by (\d\.\d{3}) \[(\d\.\d{3}), (\d\.\d{3})\]",
                 bullets[2])
    assert m, bullets[2]
    est, lo, hi = map(float, m.groups())
    assert lo <= est <= hi and lo < 0.08 < hi + 0.01
    gap_lines = [b for b in bullets if "gen_gap_acc" in b]
    assert any(b.startswith("Top parameter for gen_gap_acc") and ": norm (" in b
               for b in gap_lines)
    best = [b for b in bullets if b.startswith("Measures vs gen_gap_acc")]
    assert best and "Holm-adjusted" in best[0] and "attn_entropy (Kendall tau -" in best[0]


def _no_external(html: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", html, re.I)
    assert "<link" not in html.lower() and "<script" not in html.lower()


def test_html_is_self_contained(report):
    html = report.index.read_text(encoding="utf-8")
    _no_external(html)
    srcs = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", html)
    n_png = len(list((report.out / "figures").glob("*.png")))
    assert len(srcs) == n_png == len(re.findall(r"<img\b", html))
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    # the summary comes first, the beyond-noise rows of the effects table are highlighted
    assert html.index("Summary") < html.index("<img") < html.index("<table")
    assert 'class=beyond' in html and "norm=post_ln raises gen_gap_acc" in html


def test_html_renders_in_headless_chromium(report, tmp_path):
    loaded, total = render_images(report.index, tmp_path)
    assert total == len(list((report.out / "figures").glob("*.png"))) > 0
    assert loaded == total


def test_report_is_logged_on_the_parent_run(report, planted):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=planted.uri)
    parent = planted.truth["parent_run_id"]
    names = {Path(a.path).name for a in client.list_artifacts(parent, "report")}
    assert {"index.html", "summary.md", "trials.csv", "effects.csv", "importance.csv",
            "measures.csv", "figures"} <= names
    figs = client.list_artifacts(parent, "report/figures")
    assert any(a.path.endswith("effects_gen_gap_acc.png") for a in figs)


def test_cli_report(planted, tmp_path, cli):
    out = tmp_path / "cli_report"
    res = cli("report", "--experiment", "planted", "--tracking-uri", planted.uri,
                  "--out", str(out), timeout=120)
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert Path(last) == out / "index.html" and Path(last).stat().st_size > 0
    used = planted.truth["counts"]["completed"]
    assert f"Used {used} trials" in res.stderr and "skipped: " in res.stderr
    assert "early_stopped" in res.stderr


def test_cli_report_refuses_bad_input(planted, tmp_path, cli):
    res = cli("report", "--experiment", "no_such_study", "--tracking-uri", planted.uri,
                  "--out", str(tmp_path / "x"), timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert not (tmp_path / "x").exists()
    res = cli("report", "--experiment", "planted", "--run", "abc", "--tracking-uri",
                  planted.uri, timeout=60)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "--run" in res.stderr
    res = cli("report", "--run", "0123456789abcdef", "--tracking-uri", planted.uri,
                  timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --run: "), res.stderr
    res = cli("report", "--experiment", "planted", "--tracking-uri", planted.uri, "--out",
              "/proc/report", timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out: /proc/report is under "
                                                    "/proc"), res.stderr


def test_a_report_replaces_its_own_files_and_logs_only_them(planted, tmp_path):
    """Into a folder holding an earlier report's file whose data are gone (lr_sensitivity.csv:
    lr is not searched here) and a file of the user's: the stale report file goes, the user's
    stays, and only this report's files are logged on the parent run."""
    from mlflow.tracking import MlflowClient

    from analysis.load import load_sweep
    from analysis.report import REPORT_FILES

    out = tmp_path / "again"
    out.mkdir()
    (out / "lr_sensitivity.csv").write_text("stale\n")
    (out / "notes.txt").write_text("mine\n")
    sweep = load_sweep(planted.uri, experiment="planted")
    write_report(sweep, out, n_boot=50, tracking_uri=planted.uri, importance_boot=5)
    assert not (out / "lr_sensitivity.csv").exists() and (out / "notes.txt").exists()
    logged = {a.path for a in MlflowClient(planted.uri).list_artifacts(sweep.parent_run_id,
                                                                       "report")}
    assert "report/notes.txt" not in logged and "report/lr_sensitivity.csv" not in logged
    assert logged <= {f"report/{n}" for n in REPORT_FILES} | {"report/figures"}
    assert "report/index.html" in logged and "report/figures" in logged


def test_analysis_never_imports_torch_or_ray():
    code = ("import sys; import analysis.report, analysis.plots, analysis.summary; "
            "import analysis.load, analysis.effects, analysis.importance, analysis.measures; "
            "bad = [m for m in ('torch', 'ray') if m in sys.modules]; "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# --- pure pieces on small hand-made tables ---

def _effect(target, param, level, contrast, lo, hi, call, note="", budget="final"):
    return dict(target=target, param=param, level=level, mean=0.1, ci_low=0.09, ci_high=0.11,
                n=30, beyond_noise=call == "effect", contrast=contrast, contrast_low=lo,
                contrast_high=hi, noise_floor=0.01, raw_mean=0.1, budget=budget,
                estimator="complete-case (no early stopping)", p_value=0.01, q_value=0.02,
                call=call, n_trials=30, n_rows=60, se=0.005, adj_low=lo, adj_high=hi,
                delta=0.01, mde=0.03, note=note)


def test_findings_wording():
    effects = pd.DataFrame([
        _effect("gen_gap_acc", "norm", "post_ln", 0.081, 0.070, 0.093, "effect"),
        _effect("gen_gap_acc", "norm", "pre_ln", -0.081, -0.093, -0.070, "effect"),
        _effect("gen_gap_acc", "qk_norm", "l2", -0.03, -0.04, -0.02, "effect"),
        _effect("gen_gap_acc", "qk_norm", "none", 0.01, -0.01, 0.02, "inconclusive"),
        _effect("gen_gap_acc", "qk_norm", "layernorm", 0.02, 0.0, 0.03, "inconclusive"),
        _effect("gen_gap_acc", "n_heads", "4", 0.002, -0.01, 0.012, "inconclusive",
                "not detected"),
        _effect("gen_gap_acc", "n_heads", "8", -0.002, -0.012, 0.01, "inconclusive",
                "1 trial (fewer than min_trials=3)"),
        _effect("test_acc", "norm", "post_ln", 0.001, -0.004, 0.004, "negligible"),
        _effect("test_acc", "norm", "pre_ln", -0.001, -0.004, 0.004, "negligible"),
        _effect("test_acc", "norm", "post_ln", 0.05, 0.04, 0.06, "effect", budget="4"),
    ])
    importance = pd.DataFrame([
        dict(target="gen_gap_acc", param="norm", importance=0.7, evaluator="fanova",
             importance_low=0.55, importance_high=0.8, null_high=0.3, important=True),
        dict(target="gen_gap_acc", param="n_heads", importance=0.1, evaluator="fanova",
             importance_low=0.02, importance_high=0.2, null_high=0.3, important=False)])
    measures = pd.DataFrame([
        dict(target="gen_gap_acc", measure="grad_norm", kendall_tau=0.1,
             granulated_kendall_tau=0.05, p_value=0.4, n=30),
        dict(target="gen_gap_acc", measure="attn_entropy", kendall_tau=-0.5,
             granulated_kendall_tau=-0.3, p_value=0.0001, n=30)])
    sweep = Sweep(
        experiment="x", parent_run_id="p", runs=pd.DataFrame(), objectives=[],
        used=30, skipped={"early_stopped": 2, "diverged": 1, "error": 0},
        params=["norm", "qk_norm", "n_heads"], metrics=["gen_gap_acc", "test_acc"],
        trials=pd.DataFrame({"trial_id": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1]}))
    lines = findings(effects, importance, measures, sweep)
    # the summary opens with the estimand: budgets, design, trials per level, estimator
    assert lines[0].startswith("Estimand: each level's adjusted contrast")
    assert "at ASHA's rung epochs 4" in lines[0] and "design: search" in lines[0]
    assert "trials per level 30-30" in lines[0] and "complete-case" in lines[0]
    assert lines[1] == ("Used 30 trials (x 2 seeds); skipped: 2 early_stopped (stopped by ASHA "
                        "before the last epoch), 1 diverged (NaN/inf loss or gradient); the "
                        "effects also use the 2 early-stopped, their later values imputed from "
                        "their learning curves")
    # two levels: one line, not a mirrored "pre_ln lowers" twin; largest effect first
    assert lines[2].startswith("norm=post_ln raises gen_gap_acc by 0.081 [0.070, 0.093] "
                               "relative to norm=pre_ln (adjusted for the other parameters")
    assert lines[3].startswith("qk_norm=l2 lowers gen_gap_acc by 0.030 [0.020, 0.040] "
                               "relative to the other levels")
    assert not any("pre_ln lowers" in ln for ln in lines)
    # never "no effect": what was not detected says its interval and the MDE
    assert not any("no effect" in ln for ln in lines)
    heads = next(ln for ln in lines if ln.startswith("n_heads on gen_gap_acc"))
    assert "not detected" in heads and "CI [" in heads and "MDE 0.030" in heads
    assert "8 (1 trial (fewer than min_trials=3))" in heads
    assert "norm: negligible effect on test_acc (every level's adjusted interval lies " \
           "within +-0.010)" in lines
    assert any(ln.startswith("norm=post_ln raises test_acc at epoch 4") for ln in lines)
    top = next(ln for ln in lines if ln.startswith("Top parameter for gen_gap_acc"))
    assert "norm (0.700 [0.550, 0.800])" in top and "above their permutation null: norm" in top
    # which trials the importance rests on: the completed ones, those ASHA let finish
    assert "importance (over the 2 completed trials, the ones early stopping let finish)" in top
    # measures: Holm-adjusted across all measures tried, never the best of k alone
    assert lines[-1].startswith("Measures vs gen_gap_acc, Holm-adjusted across the 2 measures")
    assert "attn_entropy (Kendall tau -0.500, adjusted p<0.001)" in lines[-1]
    one = Sweep(experiment="x", parent_run_id="p", runs=pd.DataFrame(), objectives=[],
                used=1, skipped={}, params=[], metrics=[], trials=pd.DataFrame())
    assert header(one) == \
        "Used 1 trial; skipped: none"
    assert report_targets(["ood_len_acc", "test_acc", "gen_gap_acc", "ece"]) == [
        "gen_gap_acc", "test_acc", "ood_len_acc"]
    # only rung rows (the final budget skipped: too few trials past a rung): the estimand says
    # so, and the summary gives the reason, so no call there is not read as no effect
    rung_only = effects[effects.budget == "4"].copy()
    why = "test_acc at budget final: too few trials past a rung to impute the stopped ones, " \
          "skipped"
    rung_only.attrs["notes"] = [why, "ece: absent, skipped"]
    lines = findings(rung_only, importance, measures, sweep)
    assert "at the final budget (not estimated: see the notes below)" in lines[0]
    assert f"Effects not estimated: {why}" in lines
    assert not any("ece: absent" in ln for ln in lines)


def test_findings_say_which_trials_and_why_a_level_is_inconclusive():
    """At a rung under imputation the line says the stopped trials were imputed and how many;
    an inconclusive parameter whose adjusted interval excludes 0 is not "not detected"."""
    from analysis.estimators import ESTIMATOR_IMPUTED
    from analysis.summary import effect_findings

    why = "its adjusted interval excludes 0 but reaches into +-0.01"
    imputed = {"estimator": ESTIMATOR_IMPUTED, "n": 87, "n_imputed": 22}
    rows = pd.DataFrame([
        {**_effect("test_acc", "b", "q", 0.054, 0.043, 0.065, "effect", budget="8"), **imputed},
        {**_effect("test_acc", "b", "p", -0.054, -0.065, -0.043, "effect", budget="8"),
         **imputed},
        {**_effect("test_acc", "a", "x", -0.021, -0.030, -0.012, "inconclusive", why, "8"),
         **imputed},
        {**_effect("test_acc", "a", "y", 0.021, 0.012, 0.030, "inconclusive", why, "8"),
         **imputed},
        _effect("test_acc", "c", "u", 0.004, -0.01, 0.02, "inconclusive", "not detected", "8"),
        _effect("test_acc", "c", "v", -0.004, -0.02, 0.01, "inconclusive", "not detected", "8"),
    ])
    lines = effect_findings(rows, "test_acc", ["a", "b", "c"], "8")
    assert lines[0].startswith("b=q raises test_acc at epoch 8 (every analysed trial, those "
                               "stopped before it imputed) by 0.054 [0.043, 0.065]")
    assert lines[0].endswith("; 87 trials, 22 of them imputed)")
    a = next(ln for ln in lines if ln.startswith("a on test_acc"))
    assert f"inconclusive ({why})" in a and "not detected" not in a
    c = next(ln for ln in lines if ln.startswith("c on test_acc"))
    assert ": not detected: largest contrast c=u 0.004, adjusted CI [-0.010, 0.020]" in c
    # a budget every trial reached: nothing imputed, and the line says so
    observed = effect_findings(rows[rows["param"] == "c"], "test_acc", ["c"], "8")
    assert observed[0].startswith("c on test_acc at epoch 8 (every trial reached it): not det")


def test_corruption_figure_bins_levels_per_trial_as_the_effects_table():
    """Numeric levels of the corruption figure are the effects table's (`bin_levels` over one
    value per trial): trials with more seeds or rows do not move the edges, and n counts
    trials (they were quantile bins over every row, with other edges and counts)."""
    from analysis.effects import bin_levels

    rows = [dict(trial_id=i, seed=s, d_ff=float(i), severity=sev, kind=kind,
                 acc=0.9 - 0.1 * sev)
            for i in range(9) for s in range(2 if i < 3 else 1)
            for sev in (1, 2, 3) for kind in ("noise", "mask")]
    table = pd.DataFrame(rows)
    fig = plots.accuracy_vs_corruption(table, ["d_ff"])
    shown = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    expected = bin_levels(table.groupby("trial_id")["d_ff"].first()).value_counts(sort=False)
    assert shown == [f"{lvl} (n = {n})" for lvl, n in expected.items()]
    assert shown == ["[0, 2.67) (n = 3)", "[2.67, 5.33) (n = 3)", "[5.33, 8] (n = 3)"]


def test_plots_skip_absent_data_and_draw_present_data():
    empty = pd.DataFrame()
    assert plots.effect_forest(empty, "gen_gap_acc") is None
    assert plots.importance_bars(empty) is None
    assert plots.measure_bars(empty) is None
    assert plots.accuracy_vs_length(None) is None
    assert plots.accuracy_vs_class_count(None) is None
    assert plots.accuracy_vs_corruption(None) is None
    assert plots.pareto_front(pd.DataFrame({"test_acc": [0.9]})) is None
    per_class = pd.DataFrame({"class": [0, 1, 2, 0, 1, 2], "train_count": [500, 50, 5] * 2,
                              "test_acc": [0.95, 0.8, 0.4, 0.9, 0.7, 0.5]})
    fig = plots.accuracy_vs_class_count(per_class)
    assert fig is not None and fig.axes[0].get_xscale() == "log"
    assert "training examples" in fig.axes[0].get_xlabel()
    assert plots.pareto_mask([0.9, 0.8, 0.85, 0.95], [0.1, 0.05, 0.2, 0.3]).tolist() == [
        True, True, False, True]


def test_pareto_front_counts_throughput_as_a_third_objective():
    acc, gap = [0.9, 0.8, 0.85], [0.1, 0.05, 0.2]
    assert plots.pareto_mask(acc, gap).tolist() == [True, True, False]
    # the slow-but-accurate point stays; the dominated one in 2-D returns by being fastest
    assert plots.pareto_mask(acc, gap, [1.0, 1.0, 5.0]).tolist() == [True, True, True]
    assert plots.pareto_mask(acc, gap, [5.0, 5.0, 1.0]).tolist() == [True, True, False]


def test_a_not_detected_line_shows_the_interval_its_call_rests_on():
    """The label comes from the multiplicity-adjusted interval, so the line prints that one
    (an unadjusted CI excluding 0 beside "not detected" read as a contradiction); and it
    speaks of the largest level not called negligible (a negligible level's contrast beside
    "inconclusive" named the wrong level)."""
    row = _effect("gen_gap_acc", "t", "hot", 0.006, 0.001, 0.011, "inconclusive",
                  "not detected")
    row.update(adj_low=-0.003, adj_high=0.015)
    line = effect_findings(pd.DataFrame([row]), "gen_gap_acc", ["t"])[0]
    assert "not detected" in line and "adjusted CI [-0.003, 0.015]" in line
    assert "[0.001, 0.011]" not in line
    rows = [_effect("test_acc", "p", "a", 0.004, 0.002, 0.006, "negligible"),
            _effect("test_acc", "p", "b", -0.003, -0.02, 0.015, "inconclusive",
                    "5 trials (fewer than min_trials=6)"),
            _effect("test_acc", "p", "c", 0.001, -0.004, 0.005, "negligible")]
    line = effect_findings(pd.DataFrame(rows), "test_acc", ["p"])[0]
    assert "largest contrast of the levels not negligible p=b -0.003" in line
    assert "p=a" not in line


def test_length_and_corruption_points_are_trial_means():
    """The per-length figure's SE is over trials, each the mean of its seeds (it was over
    trial x seed rows: 3 seeds made it about sqrt(3) too narrow)."""
    rng = np.random.default_rng(0)
    rows = [{"trial_id": f"t{t}", "seed": s, "length": L, "split": "id", "acc": rng.random()}
            for t in range(5) for s in range(3) for L in (4, 8)]
    d = pd.DataFrame(rows)
    per = plots.trial_points(d, ["length", "split"], "acc")
    assert len(per) == 10 and set(per.columns) == {"trial_id", "length", "split", "acc"}
    at4 = d[d.length == 4].groupby("trial_id")["acc"].mean()
    assert np.allclose(per[per.length == 4].set_index("trial_id")["acc"], at4)
    fig = plots.accuracy_vs_length(d)
    assert fig is not None and "SE over trials" in fig.axes[0].get_title()
