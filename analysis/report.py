"""Write a sweep's report: CSV tables, PNG figures, summary.md and one self-contained index.html,
then log the whole folder on the sweep's parent MLflow run (artifact path `report`)."""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.load import Sweep
from analysis.summary import findings, fmt, report_targets
from study.records import EFFECT_CSV_COLUMNS, IMPORTANCE_CSV_COLUMNS, MEASURE_CSV_COLUMNS

DPI = 110

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;
 max-width:1100px;margin:2em auto;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
 margin-top:2em}
.meta{color:#666;font-size:.9em}
.summary{background:#f6f8fa;border-left:4px solid #2c7fb8;padding:.6em 1.2em}
.summary li{margin:.25em 0}
figure{margin:1.5em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0 1.5em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f0f0f0}td.t{text-align:left}
tr.beyond td{background:#fde2e0;font-weight:600}
.note{color:#555;font-size:.9em}
"""


# every file a report writes in its folder besides figures/*.png (the last two: where the
# learning rate varies)
REPORT_FILES = ("index.html", "summary.md", "trials.csv", "effects.csv", "importance.csv",
                "measures.csv", "outcomes.csv", "budget.csv", "lr_sensitivity.csv",
                "lr_sensitivity_summary.csv")


def _ordered(df: pd.DataFrame | None, columns: Sequence[str]) -> pd.DataFrame:
    """The table with exactly `columns`, in that order (an empty table keeps the header), its
    `attrs` (the notes) kept."""
    if df is None or df.empty:
        out = pd.DataFrame(columns=list(columns))
    else:
        missing = [c for c in columns if c not in df]
        if missing:
            raise ValueError(f"table lacks columns {missing}")
        out = df[list(columns)].reset_index(drop=True)
    out.attrs = dict(df.attrs) if df is not None else {}
    return out


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(none)_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def _html_table(df: pd.DataFrame, highlight: pd.Series | None = None) -> str:
    if df.empty:
        return '<p class="note">(none)</p>'
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    flags = list(highlight) if highlight is not None else [False] * len(df)
    for flag, row in zip(flags, df.itertuples(index=False)):
        cells = "".join(
            f'<td{"" if isinstance(v, int | float) and not isinstance(v, bool) else " class=t"}>'
            f"{html.escape(fmt(v))}</td>" for v in row)
        body.append(f'<tr{" class=beyond" if flag else ""}>{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _ci(df: pd.DataFrame) -> pd.DataFrame:
    """Effects in reading form: contrast with its CI in one column, the call and why."""
    out = df[["target", "budget", "param", "level", "n"]].copy()
    out["contrast [95% CI]"] = [
        f"{fmt(c)} [{fmt(lo)}, {fmt(hi)}]" if pd.notna(lo) else f"{fmt(c)} (no interval)"
        for c, lo, hi in zip(df["contrast"], df["contrast_low"], df["contrast_high"])]
    out["adjusted CI"] = [f"[{fmt(lo)}, {fmt(hi)}]" for lo, hi in
                          zip(df["adj_low"], df["adj_high"])]
    out["delta"] = df["delta"].to_numpy()
    out["q"] = df["q_value"].to_numpy()
    out["call"] = df["call"].to_numpy()
    out["note"] = df["note"].fillna("").to_numpy()
    out["adjusted mean"] = df["mean"].to_numpy()
    out["raw mean"] = df["raw_mean"].to_numpy()
    return out


def summary_markdown(sweep: Sweep, lines: list[str], effects: pd.DataFrame,
                     importance: pd.DataFrame, measures: pd.DataFrame,
                     figures: Sequence[str]) -> str:
    beyond = effects[effects["call"] == "effect"] if not effects.empty else effects
    parts = [f"# Report: {sweep.experiment}\n",
             f"Parent run `{sweep.parent_run_id}`; params studied: "
             f"{', '.join(sweep.params) or 'none'}.\n",
             "## Summary\n", *[f"- {line}" for line in lines], "",
             "## Effects called\n",
             "Contrast = the level's adjusted mean minus the mean of the other levels of the "
             "same parameter (95% trial-bootstrap CI), at the budget given; `effect` = its "
             "multiplicity-adjusted interval lies outside +-delta; all rows, with "
             "`negligible` and `inconclusive` ones, are in `effects.csv`, outcomes per level "
             "in `outcomes.csv`.\n",
             _md_table(_ci(beyond) if not beyond.empty else beyond),
             "## Parameter importance\n", _md_table(importance),
             "## Measures vs. the generalization gap\n", _md_table(measures),
             "## Figures\n", *[f"![{f}](figures/{f}.png)" for f in figures], ""]
    return "\n".join(parts)


def index_html(sweep: Sweep, lines: list[str], effects: pd.DataFrame, importance: pd.DataFrame,
               measures: pd.DataFrame, pngs: dict[str, tuple[bytes, str]]) -> str:
    """One page, no external resources: inline CSS, images as base64 data URIs."""
    e = html.escape
    figs = "".join(
        f'<figure><img alt="{e(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"><figcaption>{e(caption)}</figcaption>'
        "</figure>" for name, (png, caption) in pngs.items())
    eff = _ci(effects) if not effects.empty else effects
    flags = (effects["call"] == "effect") if not effects.empty else None
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Report: {e(sweep.experiment)}</title><style>{CSS}</style></head>
<body>
<h1>Which attention design choices matter? &mdash; {e(sweep.experiment)}</h1>
<p class="meta">MLflow experiment <b>{e(sweep.experiment)}</b>, parent run
<code>{e(sweep.parent_run_id)}</code>; params studied: {e(", ".join(sweep.params) or "none")};
generated {e(stamp)}.</p>
<h2>Summary</h2>
<div class="summary"><ul>{"".join(f"<li>{e(x)}</li>" for x in lines)}</ul></div>
<p class="note">Effects are differences between levels of one parameter, adjusted for the other
parameters, at the budget given (final, or an ASHA rung epoch), with 95% bootstrap intervals over
trials (each trial the mean of its seeds). Under early stopping the stopped trials' later values
are imputed from their curves (the estimator column). A call is <b>effect</b> when the level's
multiplicity-adjusted interval lies outside +-delta (the smallest effect of interest),
<b>negligible</b> when it lies inside, else <b>inconclusive</b> (the note says why: not detected,
family not significant, not beyond +-delta, too few trials, aliased). They describe this
sweep's sampled configurations, not guaranteed causes. Diverged and failed trials are counted
per level in outcomes.csv.</p>
<h2>Figures</h2>
{figs or '<p class="note">(no figures: no data)</p>'}
<h2>Effects of each parameter level</h2>
<p class="note">Highlighted rows are called effects.</p>
{_html_table(eff, flags)}
<h2>Parameter importance</h2>
{_html_table(importance)}
<h2>Measures vs. the generalization gap</h2>
{_html_table(measures)}
<p class="note">Files beside this page: trials.csv, effects.csv, importance.csv, measures.csv,
summary.md, figures/*.png.</p>
</body></html>
"""


def write_report(sweep: Sweep, out_dir: Path, n_boot: int = 1000, log_to_mlflow: bool = True,
                 tracking_uri: str | None = None, importance_boot: int = 30) -> Path:
    """Compute the tables, write every file under `out_dir`, log it on the parent run (in
    `tracking_uri`, default the store the sweep was loaded from); returns index.html's path."""
    from analysis.budget import budget_curves, lr_sensitivity_summary, lr_sensitivity_targets
    from analysis.effects import effects_report
    from analysis.estimators import outcome_table
    from analysis.importance import importance_table
    from analysis.measures import measures_table
    from analysis.plots import CAPTIONS, all_figures, budget_figures, caption

    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    # a file of an earlier report whose data are gone (a figure, lr_sensitivity.csv) must not
    # linger, nor be logged as this report's
    for stale in [*fig_dir.glob("*.png"), *(out_dir / name for name in REPORT_FILES)]:
        stale.unlink(missing_ok=True)
    trials = sweep.trials
    targets = [t for t in report_targets(sweep.metrics) if t in trials]
    raw_effects = effects_report(sweep, targets, n_boot=n_boot, seed=0)
    effects = _ordered(raw_effects, EFFECT_CSV_COLUMNS)
    raw_importance = importance_table(trials, sweep.params, targets, seed=0, spec=sweep.spec,
                                      n_boot=importance_boot, n_perm=importance_boot)
    importance = _ordered(raw_importance, IMPORTANCE_CSV_COLUMNS)
    measures = _ordered(measures_table(trials, sweep.params), MEASURE_CSV_COLUMNS)

    trials.to_csv(out_dir / "trials.csv", index=False)
    effects.to_csv(out_dir / "effects.csv", index=False)
    importance.to_csv(out_dir / "importance.csv", index=False)
    measures.to_csv(out_dir / "measures.csv", index=False)
    outcomes = _outcomes(sweep, outcome_table)
    outcomes.to_csv(out_dir / "outcomes.csv", index=False)
    objective, mode = sweep.objectives[0] if sweep.objectives else ("val_acc", "max")
    budget = budget_curves(trials, sweep.params, objective, mode) \
        if objective in trials else pd.DataFrame()
    budget.to_csv(out_dir / "budget.csv", index=False)
    lr_table = lr_sensitivity_targets(trials, sweep.params, (objective, "gen_gap_acc"))
    if not lr_table.empty:
        lr_table.to_csv(out_dir / "lr_sensitivity.csv", index=False)
        lr_sensitivity_summary(lr_table).to_csv(out_dir / "lr_sensitivity_summary.csv",
                                                index=False)

    figures = {name: (fig, caption(name)) for name, fig in
               all_figures(sweep, effects, importance, measures, targets).items()}
    for name, fig in budget_figures(budget, lr_table).items():
        text = (CAPTIONS["budget"].format(metric=objective) if name.startswith("budget_")
                else CAPTIONS["lr_sensitivity"].format(
                    target=next(t for t in lr_table["target"].unique()
                                if name.startswith(f"lr_sensitivity_{t}_"))))
        figures[name] = (fig, text)
    pngs: dict[str, tuple[bytes, str]] = {}
    for name, (fig, text) in figures.items():
        png = _png(fig)
        (fig_dir / f"{name}.png").write_bytes(png)
        pngs[name] = (png, text)
        fig.clear()

    lines = findings(effects, importance, measures, sweep, targets)
    lines += [f"Importance not computed for {note}" for note in
              raw_importance.attrs.get("notes", []) if "fewer than" in note]
    if sweep.conditional:
        lines.append(f"Not analysed: {', '.join(sweep.conditional)} (conditional parameters: "
                     "where their condition is off they hold the default, not a sampled level)")
    lines += [f"{r.param}={r.level}: {r.n_trials} trials, {r.stop_rate:.0%} stopped early, "
              f"{r.divergence_rate:.0%} diverged (no trial completed)"
              for r in outcomes.itertuples() if r.completed == 0]
    (out_dir / "summary.md").write_text(
        summary_markdown(sweep, lines, effects, importance, measures, list(pngs)),
        encoding="utf-8")
    index = out_dir / "index.html"
    index.write_text(index_html(sweep, lines, effects, importance, measures, pngs),
                     encoding="utf-8")
    if log_to_mlflow:
        log_report(sweep.parent_run_id, out_dir,
                   tracking_uri or sweep.tracking_uri or None)
    return index


def _outcomes(sweep: Sweep, table_fn: Any) -> pd.DataFrame:
    """Trials per level of each studied param by how they ended (every outcome)."""
    from analysis.effects import bin_levels

    t = sweep.trial_table
    if t.empty:
        return pd.DataFrame()
    levels = {p: bin_levels(t[p]) for p in sweep.params if p in t}
    out: pd.DataFrame = table_fn(t, levels)
    return out


def log_report(parent_run_id: str, out_dir: Path, tracking_uri: str | None = None) -> None:
    """Log the report's files (`REPORT_FILES` and figures/*.png, nothing else the folder may
    hold) as artifacts `report/` of the sweep's parent run."""
    import logging

    from mlflow.tracking import MlflowClient
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=tracking_uri)
    for name in REPORT_FILES:
        if (out_dir / name).is_file():
            client.log_artifact(parent_run_id, str(out_dir / name), artifact_path="report")
    for png in sorted((out_dir / "figures").glob("*.png")):
        client.log_artifact(parent_run_id, str(png), artifact_path="report/figures")
