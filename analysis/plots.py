"""Figures for the report: seaborn on matplotlib's Agg backend, one question per figure.

Every function takes tables and returns a `matplotlib.figure.Figure`, or None when its data are
absent (the report then skips it). Figures are built without pyplot, so nothing global is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, cast

import matplotlib

matplotlib.use("Agg")

import numpy as np
import numpy.typing as npt
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullFormatter

from analysis.load import Sweep, trial_means
from analysis.summary import unit
from study.metrics import FLOPS_PER_SAMPLE, GEN_GAP_ACC, SAMPLES_PER_S, TEST_ACC

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

P = ParamSpec("P")
R = TypeVar("R")

BEYOND, WITHIN = "#c0392b", "#7f8c8d"
EVALUATORS = {"fanova": "fANOVA importance", "ped_anova": "PED-ANOVA importance"}
STYLE: dict[RcKeyType, Any] = {
    "axes.titlesize": 12, "axes.labelsize": 10.5, "xtick.labelsize": 9.5,
    "ytick.labelsize": 9.5, "legend.fontsize": 9, "figure.dpi": 100}


class _ForestRow(Protocol):
    """The columns of an `effect_forest` row it draws (`itertuples` types every attribute as
    any scalar)."""

    y: float
    noise_floor: float
    beyond: str
    contrast_low: float
    contrast_high: float


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), layout="constrained")
    return fig


def _grid(n: int, w: float, h: float, ncols: int = 3) -> tuple[Figure, list[Axes]]:
    cols = min(n, ncols)
    rows = math.ceil(n / cols)
    fig = _figure(w * cols, h * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _styled(fn: Callable[P, R]) -> Callable[P, R]:
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with sns.axes_style("whitegrid"), matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@_styled
def effect_forest(effects: pd.DataFrame, target: str) -> Figure | None:
    """(a) Which levels change TARGET? Adjusted contrast (level minus the other levels) with its
    95% trial-bootstrap interval per (param, level) at the final budget, the number of trials
    per level at the right; coloured by the call (effect / negligible / inconclusive) where the
    table has calls, else by beyond/within seed noise; the grey band is +/- the seed-noise
    floor, dotted lines +/- the smallest effect of interest."""
    if effects is None or effects.empty:
        return None
    rows = effects[effects["target"] == target].dropna(subset=["contrast"])
    budget = None
    if "budget" in rows and rows["budget"].notna().any():  # one budget: the final one
        budgets = [str(b) for b in rows["budget"].dropna().unique()]
        budget = "final" if "final" in budgets else max(
            budgets, key=lambda b: float(b) if b.replace(".", "", 1).isdigit() else -1.0)
        rows = rows[rows["budget"].astype(str) == budget]
    if rows.empty:
        return None
    # params in table order, levels in their own order (bins ascending), top to bottom
    porder = {p: i for i, p in enumerate(dict.fromkeys(rows["param"]))}
    rows = rows.sort_values("param", key=lambda c: c.map(porder), kind="stable")
    rows = rows.reset_index(drop=True)
    rows["label"] = rows["param"].astype(str) + " = " + rows["level"].astype(str)
    rows["y"] = np.arange(len(rows))[::-1]
    colors: dict[str, str]
    if "call" in rows and rows["call"].notna().all():
        colors = {"effect": BEYOND, "negligible": "#2c7fb8", "inconclusive": WITHIN}
        rows["beyond"] = rows["call"].astype(str)
    else:
        colors = {"beyond seed noise": BEYOND, "within seed noise": WITHIN}
        rows["beyond"] = np.where(rows["beyond_noise"].astype(bool), "beyond seed noise",
                                  "within seed noise")
    n_col = "n_trials" if "n_trials" in rows and rows["n_trials"].notna().all() else "n"
    fig = _figure(8.5, 1.6 + 0.32 * len(rows))
    ax = fig.subplots()
    for r in cast("Iterable[_ForestRow]", rows.itertuples(index=False)):
        f = float(r.noise_floor) if pd.notna(r.noise_floor) else 0.0
        ax.fill_betweenx([r.y - 0.45, r.y + 0.45], -f, f, color="0.85", lw=0, zorder=0)
        ax.hlines(r.y, r.contrast_low, r.contrast_high, color=colors.get(r.beyond, WITHIN),
                  lw=2, zorder=2)
    order = [c for c in colors if c in set(rows["beyond"])]
    sns.scatterplot(data=rows, x="contrast", y="y", hue="beyond", ax=ax, s=50, zorder=3,
                    palette=colors, hue_order=order, legend=False)
    ax.axvline(0, color="0.2", lw=0.8, zorder=1)
    deltas: list[float] = (sorted({float(v) for v in rows["delta"].dropna()})
                           if "delta" in rows else [])
    if len(deltas) == 1 and "call" in rows:
        for x in (-float(deltas[0]), float(deltas[0])):
            ax.axvline(x, color="0.35", lw=0.9, ls=":", zorder=1)
    ax.set_yticks(rows["y"], rows["label"])
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_ylabel("")
    # the number of trials behind each row, next to it
    n_ax = ax.secondary_yaxis("right")
    n_ax.set_yticks(rows["y"], [f"n = {int(v)}" if pd.notna(v) else "n = ?"
                                for v in rows[n_col]])
    n_ax.tick_params(length=0)
    n_ax.set_ylabel("trials at the level")
    where = ("at the final budget" if budget in (None, "final") else f"at epoch {budget}")
    ax.set_xlabel(f"{target}: adjusted contrast, level minus the mean of the other levels\n"
                  f"({unit(target)}; 95% trial-bootstrap interval, {where})")
    estimator = (str(rows["estimator"].dropna().iloc[0])
                 if "estimator" in rows and rows["estimator"].notna().any() else "")
    ax.set_title(f"Which design choices change {target}?"
                 + (f"\n{where}; {estimator}" if estimator else f" ({where})"), fontsize=11)
    handles: list[Any] = [Patch(color=colors[c], label=c) for c in order]
    handles.append(Patch(color="0.85", label="± seed-noise floor"))
    if len(deltas) == 1 and "call" in rows:
        handles.append(Line2D([], [], color="0.35", lw=0.9, ls=":",
                              label=f"± smallest effect of interest ({float(deltas[0]):g})"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3),
               frameon=False, title="call" if "call" in rows else None)
    return fig


@_styled
def importance_bars(importance: pd.DataFrame,
                    targets: Sequence[str] | None = None) -> Figure | None:
    """(b) Which parameters matter most for each target? Normalized importance per evaluator
    (bars), its 95% trial-bootstrap interval (whiskers) and the permutation null's 95th
    percentile (black tick: the param's importance with the target shuffled across trials).
    Solid bars are `important` (the whole interval above the null), pale bars are not. The
    legend sits below the panels, never over the bars; drawn from whichever of
    importance_low/importance_high/null_high/important the table has."""
    from matplotlib.lines import Line2D

    if importance is None or importance.empty:
        return None
    targets = [t for t in (targets or importance["target"].unique())
               if t in set(importance["target"])]
    if not targets:
        return None
    has_ci = {"importance_low", "importance_high"} <= set(importance)
    has_null = "null_high" in importance
    has_call = "important" in importance
    n_params = importance["param"].nunique()
    evaluators = sorted(importance["evaluator"].unique())
    fig, axes = _grid(len(targets), 4.6, 1.1 + (0.22 + 0.16 * len(evaluators)) * n_params)
    palette = dict(zip(evaluators, sns.color_palette("colorblind", len(evaluators))))
    h = 0.8 / len(evaluators)  # each evaluator's bar height within a param's band
    for ax, t in zip(axes, targets):
        d = importance[importance["target"] == t]
        order = (d.groupby("param")["importance"].max().sort_values(ascending=False)
                 .index.tolist())
        top = 0.0
        for j, ev in enumerate(evaluators):
            e = d[d["evaluator"] == ev].set_index("param").reindex(order)
            y = np.arange(len(order)) - 0.4 + h * (j + 0.5)
            imp = e["importance"].to_numpy(dtype=float)
            present = np.isfinite(imp)
            solid = (e["important"].fillna(False).astype(bool).to_numpy() if has_call
                     else np.ones(len(order), dtype=bool))
            for mask, alpha in ((present & solid, 1.0), (present & ~solid, 0.35)):
                if mask.any():
                    ax.barh(y[mask], imp[mask], height=h * 0.9, color=palette[ev],
                            alpha=alpha, edgecolor=palette[ev], lw=0.8, zorder=2)
            top = max(top, float(np.nanmax(imp, initial=0.0)))
            if has_ci:
                lo = e["importance_low"].to_numpy(dtype=float)
                hi = e["importance_high"].to_numpy(dtype=float)
                ok = np.isfinite(lo) & np.isfinite(hi)
                if ok.any():
                    ax.hlines(y[ok], lo[ok], hi[ok], color="0.15", lw=1.1, zorder=3)
                    for x in (lo[ok], hi[ok]):
                        ax.vlines(x, y[ok] - h * 0.15, y[ok] + h * 0.15, color="0.15",
                                  lw=1.1, zorder=3)
                    top = max(top, float(np.max(hi[ok])))
            if has_null:
                null = e["null_high"].to_numpy(dtype=float)
                ok = np.isfinite(null)
                if ok.any():
                    ax.vlines(null[ok], y[ok] - h * 0.48, y[ok] + h * 0.48, color="black",
                              lw=2.6, zorder=4)
                    top = max(top, float(np.max(null[ok])))
        ax.set_yticks(np.arange(len(order)), order)
        ax.set_ylim(len(order) - 0.5, -0.5)  # the most important param on top
        ax.set_title(t)
        ax.set_xlabel("importance (normalized share, 0-1)")
        ax.set_ylabel("")
        ax.set_xlim(0, min(1.05, max(1e-9, top) * 1.08))
    handles: list[Any] = [Patch(color=palette[ev], label=EVALUATORS.get(ev, ev))
                          for ev in evaluators]
    if has_call:
        handles.append(Patch(facecolor="0.6", alpha=0.35, edgecolor="0.6",
                             label="pale: interval not above the null"))
    if has_ci:
        handles.append(Line2D([], [], color="0.15", lw=1.1, marker="|", markersize=6,
                              label="95% trial-bootstrap interval"))
    if has_null:
        handles.append(Line2D([], [], color="black", lw=0, marker="|", markersize=11,
                              markeredgewidth=2.6,
                              label="null: 95th percentile, target shuffled"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)),
               frameon=False)
    fig.suptitle("Which parameters matter most for each target?")
    return fig


@_styled
def measure_bars(measures: pd.DataFrame) -> Figure | None:
    """(c) Which measures rank trials by their generalization gap? Kendall tau and granulated
    Kendall tau (Jiang et al. 2020) per measure, with their 95% intervals where the table has
    them (tau: a trial bootstrap; granulated: a stratified t interval over groups); a value
    not computed is marked "n/a", not drawn as 0; each measure's label gives the number of
    groups behind its granulated tau."""
    if measures is None or measures.empty:
        return None
    stats_ = {"kendall_tau": ("Kendall τ", "tau_low", "tau_high"),
              "granulated_kendall_tau": ("granulated Kendall τ", "granulated_low",
                                         "granulated_high")}
    d_all = measures[measures[list(stats_)].notna().any(axis=1)]
    if d_all.empty:
        return None
    colors = sns.color_palette("colorblind", len(stats_))
    targets = list(dict.fromkeys(d_all["target"]))
    fig, axes = _grid(len(targets), 5.5, 1.3 + 0.45 * d_all["measure"].nunique(), ncols=2)
    height = 0.8 / len(stats_)
    drawn = False  # any interval
    for ax, t in zip(axes, targets):
        d = d_all[d_all["target"] == t].assign(a=lambda x: x["kendall_tau"].abs())
        d = d.sort_values("a", ascending=False, na_position="last").reset_index(drop=True)
        ys = np.arange(len(d), dtype=float)
        for k, (col, (_, lo, hi)) in enumerate(stats_.items()):
            y = ys - 0.4 + height * (k + 0.5)
            v = d[col].to_numpy(dtype=float)
            ax.barh(y, np.nan_to_num(v), height=height, color=colors[k])
            for yy in y[~np.isfinite(v)]:  # not computed: said, not a bar of length 0
                ax.text(0.02, yy, "n/a", va="center", ha="left", fontsize=7, color=colors[k])
            if {lo, hi} <= set(d):
                low, high = d[lo].to_numpy(dtype=float), d[hi].to_numpy(dtype=float)
                ok = np.isfinite(v) & np.isfinite(low) & np.isfinite(high)
                if ok.any():
                    drawn = True
                    ax.errorbar(v[ok], y[ok], xerr=[v[ok] - low[ok], high[ok] - v[ok]],
                                fmt="none", ecolor="0.15", elinewidth=1.0, capsize=2.5)
        groups = d["n_groups"] if "n_groups" in d else pd.Series(np.nan, index=d.index)
        labels = [f"{m} ({int(g)} groups)" if pd.notna(g) else str(m)
                  for m, g in zip(d["measure"], groups)]
        ax.set_yticks(ys, labels)
        ax.invert_yaxis()
        ax.axvline(0, color="0.2", lw=0.8)
        ax.set_xlim(-1, 1)
        ax.set_xlabel(f"rank correlation with {t} (τ, -1 to 1)")
        ax.set_ylabel("")
        ax.set_title(t)
    handles: list[Patch | Line2D] = [Patch(color=colors[k], label=name) for k, (name, _, _)
                                     in enumerate(stats_.values())]
    if drawn:
        handles.append(Line2D([], [], color="0.15", marker="|", markersize=8, lw=1.0,
                              label="95% interval (τ: trial bootstrap; granulated: "
                                    "stratified t over groups)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    fig.suptitle("Which measures predict the generalization gap?")
    return fig


def _unit_key(rows: pd.DataFrame) -> str | None:
    """The column that names each row's trial (or, in older tables, its run)."""
    return next((k for k in ("trial_id", "run_id") if k in rows), None)


def trial_points(rows: pd.DataFrame, by: Sequence[str], value: str) -> pd.DataFrame:
    """One point per trial and `by` group: the mean of `value` over the trial's seeds (and
    anything else not in `by`), so that an SE drawn over the points is over trials (over
    trial x seed rows it counted each trial's seed noise once per seed). Rows without a trial
    or run id are returned as they are."""
    unit = _unit_key(rows)
    if unit is None:
        return rows
    keys = [unit, *(c for c in by if c and c in rows)]
    return rows.groupby(keys, dropna=False, observed=True)[value].mean().reset_index()


@_styled
def accuracy_vs_length(per_length: pd.DataFrame | None,
                       params: Sequence[str] = ()) -> Figure | None:
    """(d) Does accuracy hold beyond the training lengths? Mean accuracy per evaluation length,
    one line per positional encoding when it was varied; dashed: the longest training length."""
    if per_length is None or per_length.empty or not {"length", "acc"} <= set(per_length):
        return None
    hue = "pos_encoding" if "pos_encoding" in params and "pos_encoding" in per_length else None
    per = trial_points(per_length, ["length", "split", hue or ""], "acc")
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    sns.lineplot(data=per, x="length", y="acc", hue=hue, marker="o", errorbar="se",
                 ax=ax, palette="colorblind" if hue else None)
    lengths = sorted(per_length["length"].unique())
    if len(lengths) > 1 and min(lengths) > 0 and max(lengths) / min(lengths) >= 8:
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{v:g}" for v in lengths])
        ax.xaxis.set_minor_formatter(NullFormatter())
    if "split" in per_length and (per_length["split"] == "id").any():
        longest = per_length.loc[per_length["split"] == "id", "length"].max()
        ax.axvline(longest, color="0.3", ls="--", lw=1,
                   label=f"longest training length ({longest:g})")
        ax.legend(title=hue.replace("_", " ") if hue else None)
    ax.set_xlabel("evaluation sequence length (tokens"
                  + (", log scale)" if ax.get_xscale() == "log" else ")"))
    ax.set_ylabel("accuracy (fraction correct)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Does accuracy hold beyond the training lengths? (mean ± SE over trials, "
                 "each the mean of its seeds)")
    return fig


@_styled
def accuracy_vs_class_count(per_class: pd.DataFrame | None) -> Figure | None:
    """(e) Do rare classes lose accuracy? Per-class test accuracy vs its training count."""
    if per_class is None or per_class.empty or not {"train_count", "test_acc"} <= set(per_class):
        return None
    d = per_class[per_class["train_count"] > 0]
    if d.empty:
        return None
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    key = "class" if "class" in d else "train_count"
    per = d.groupby(key, as_index=False).agg(train_count=("train_count", "median"),
                                             test_acc=("test_acc", "mean"))
    sns.scatterplot(data=d, x="train_count", y="test_acc", ax=ax, color="0.6", alpha=0.25,
                    s=12, label="one class in one run", edgecolor=None)
    sns.scatterplot(data=per, x="train_count", y="test_acc", ax=ax, color="#2c7fb8", s=40,
                    label="class mean over runs")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xlabel("training examples of the class (log scale)")
    ax.set_ylabel("test accuracy of the class (fraction correct)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Do rare classes lose accuracy?")
    return fig


def _value_label(v: Any) -> str:
    """A config value as a short label (floats to 3 significant digits)."""
    if isinstance(v, (tuple, list)):
        return ",".join(_value_label(x) for x in v)
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.3g}"
    return str(v)


def _studied(table: pd.DataFrame, params: Sequence[str]) -> list[str]:
    """The studied params present in `table`: `params` where given, else the config fields
    that take more than one value in it (the replicate `seed` is never one)."""
    from analysis.load import NOT_DESIGN
    from study.config import FIELD_NAMES

    names = list(params) if params else [f for f in FIELD_NAMES if f not in NOT_DESIGN]
    return [p for p in names if p in table
            and table[p].map(_value_label).nunique(dropna=False) > 1]


def _trial_levels(d: pd.DataFrame, param: str, unit_key: str) -> pd.Series:
    """Each row's level of `param` as the effects table bins it (`effects.bin_levels` over one
    value per trial, so a trial's seeds and corruption rows do not move the bin edges): an
    ordered categorical aligned with `d`."""
    from analysis.effects import bin_levels

    lvl = bin_levels(d.groupby(unit_key, sort=False)[param].first())
    return pd.Series(pd.Categorical(d[unit_key].map(lvl.astype(str)),
                                    categories=list(lvl.cat.categories), ordered=True),
                     index=d.index)


@_styled
def accuracy_vs_corruption(per_corruption: pd.DataFrame | None,
                           params: Sequence[str] = ()) -> Figure | None:
    """(f) How fast does accuracy fall with corruption, at each level of each studied choice?
    One panel per studied param (`params`, else the config fields that vary in the table), one
    line per level (numeric params in quantile bins): accuracy vs severity, the mean over the
    level's trials (each averaged over its seeds and the corruption kinds) +/- SE across
    trials. A table where no param varies shows one line per corruption kind instead."""
    if (per_corruption is None or per_corruption.empty
            or not {"kind", "severity", "acc"} <= set(per_corruption)):
        return None
    d = per_corruption
    severities = sorted(d["severity"].unique())
    studied = _studied(d, params)
    unit_key = _unit_key(d)

    def _axes_labels(ax: Axes) -> None:
        ax.set_xticks(severities)
        ax.set_xlabel("corruption severity (level, higher = stronger)")
        ax.set_ylabel("accuracy on corrupted test sets\n(fraction correct)")
        ax.set_ylim(-0.02, 1.02)

    if not studied or unit_key is None:
        per_kind = trial_points(d, ["kind", "severity"], "acc")
        fig = _figure(7.5, 4.5)
        ax = fig.subplots()
        sns.lineplot(data=per_kind, x="severity", y="acc", hue="kind", marker="o",
                     errorbar="se", ax=ax, palette="colorblind")
        _axes_labels(ax)
        ax.legend(title="corruption kind", loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  frameon=False)
        ax.set_title("How fast does accuracy fall with corruption? (mean ± SE over "
                     + ("trials)" if unit_key else "runs)"))
        return fig
    fig, axes = _grid(len(studied), 5.6, 3.8, ncols=2)
    for ax, p in zip(axes, studied):
        g = d.assign(level=_trial_levels(d, p, unit_key))
        # one value per trial, level and severity: the mean over its seeds and the kinds
        per = trial_points(g, ["level", "severity"], "acc")
        n = per.groupby("level", observed=True)[unit_key].nunique()
        names = {lvl: f"{lvl} (n = {int(n[lvl])})" for lvl in g["level"].cat.categories
                 if lvl in n.index}
        per["level"] = per["level"].map(names).astype(str)
        sns.lineplot(data=per, x="severity", y="acc", hue="level",
                     hue_order=list(names.values()), marker="o", errorbar="se", ax=ax,
                     palette="colorblind")
        _axes_labels(ax)
        ax.legend(title=p, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        ax.set_title(f"by {p}")
    fig.suptitle("How fast does accuracy fall with corruption, per level? "
                 "(mean over trials ± SE; n = trials)")
    return fig


def pareto_mask(acc: npt.ArrayLike, gap: npt.ArrayLike,
                throughput: npt.ArrayLike | None = None) -> npt.NDArray[np.bool_]:
    """Non-dominated points when maximizing `acc` (and `throughput`, if given) and minimizing
    `gap`."""
    cols = [np.asarray(acc, float), -np.asarray(gap, float)]
    if throughput is not None:
        cols.append(np.asarray(throughput, float))
    v = np.stack(cols, axis=1)  # (n, k), all maximized
    keep = np.ones(len(v), bool)
    for i in range(len(v)):
        dominated = (v >= v[i]).all(1) & (v > v[i]).any(1)
        keep[i] = not dominated.any()
    return keep


MAX_FRONT_LABELS = 10  # front configurations numbered and listed in the Pareto figure


@_styled
def pareto_front(trials: pd.DataFrame | None, params: Sequence[str] = ()) -> Figure | None:
    """(g) Which configurations trade test accuracy against the gap and the cost best? Seed
    means per trial; colour and size = training cost: `flops_per_sample` (analytic, lower is
    cheaper) where logged, else the measured throughput `samples_per_s` (higher is faster, but
    it also measures the machine's load); the non-dominated front is ringed, labelled with its
    configurations (the studied params: `params`, else the config fields that vary), and the
    front of accuracy vs gap is joined."""
    if trials is None or trials.empty or not {TEST_ACC, GEN_GAP_ACC} <= set(trials):
        return None
    cols = [TEST_ACC, GEN_GAP_ACC] + [c for c in (FLOPS_PER_SAMPLE, SAMPLES_PER_S)
                                      if c in trials]
    d = trial_means(trials, cols).dropna(subset=[TEST_ACC, GEN_GAP_ACC]).reset_index(drop=True)
    if d.empty:
        return None
    cost = next((c for c in (FLOPS_PER_SAMPLE, SAMPLES_PER_S)
                 if c in d and d[c].notna().all()), None)
    if cost == FLOPS_PER_SAMPLE:  # lower is cheaper: maximized as its negative
        d["front"] = pareto_mask(d[TEST_ACC], d[GEN_GAP_ACC], -d[FLOPS_PER_SAMPLE])
        what = "training FLOPs per sample (analytic; lower is cheaper)"
        short = "cost (FLOPs/sample)"
    elif cost == SAMPLES_PER_S:
        d["front"] = pareto_mask(d[TEST_ACC], d[GEN_GAP_ACC], d[SAMPLES_PER_S])
        what = "throughput (samples/s, measured; includes load)"
        short = "throughput (samples/s)"
    else:
        d["front"] = pareto_mask(d[TEST_ACC], d[GEN_GAP_ACC])
        what = short = ""
    d["front2"] = pareto_mask(d[TEST_ACC], d[GEN_GAP_ACC])
    fig = _figure(9, 5.2 + 0.19 * min(int(d["front"].sum()), MAX_FRONT_LABELS))
    ax = fig.subplots()
    tp: dict[str, Any] = {"color": "#2c7fb8"}
    if cost is not None:
        norm = Normalize(float(d[cost].min()), float(d[cost].max()))
        tp = {"hue": cost, "size": cost, "palette": "viridis", "hue_norm": norm,
              "size_norm": norm, "sizes": (25, 160)}
        fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=ax,
                     label=f"{what}\n(colour and point size)")
    sns.scatterplot(data=d, x=GEN_GAP_ACC, y=TEST_ACC, ax=ax, alpha=0.85, legend=False, **tp)
    front2 = d[d["front2"]].sort_values(GEN_GAP_ACC)
    ax.plot(front2[GEN_GAP_ACC], front2[TEST_ACC], color=BEYOND, lw=1.2, ls="-", zorder=1,
            drawstyle="steps-post", label="front of accuracy vs gap")
    front = d[d["front"]]
    ax.scatter(front[GEN_GAP_ACC], front[TEST_ACC], s=190, facecolors="none",
               edgecolors=BEYOND, linewidths=1.6, zorder=3,
               label="non-dominated in accuracy, gap" + (f" and {short}" if short else ""))
    # the front's configurations: numbered on the plot, their studied values in the legend
    # (only the values that differ among the front's points when there are many params)
    shown = _studied(d, params)
    if len(shown) > 4:
        shown = [p for p in shown if front[p].map(_value_label).nunique() > 1] or shown[:4]
    handles, _ = ax.get_legend_handles_labels()
    top = front.sort_values(TEST_ACC, ascending=False).head(MAX_FRONT_LABELS)
    for i, (_, r) in enumerate(top.iterrows(), start=1):
        if not shown:
            break
        ax.annotate(str(i), (r[GEN_GAP_ACC], r[TEST_ACC]), xytext=(7, 5),
                    textcoords="offset points", fontsize=8, fontweight="bold", color=BEYOND,
                    zorder=4)
        handles.append(Line2D([], [], ls="", marker=f"${i}$", color=BEYOND, markersize=7,
                              label=", ".join(f"{p}={_value_label(r[p])}" for p in shown)
                              + f"  (test {r[TEST_ACC]:.3f}, gap {r[GEN_GAP_ACC]:.3f})"))
    if shown and len(front) > len(top):
        handles.append(Patch(color="none", label=f"(+{len(front) - len(top)} more "
                                                  "non-dominated, not numbered)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=1, frameon=False,
               fontsize=8)
    ax.set_xlabel("generalization gap: train − test accuracy (fraction, lower is better)")
    ax.set_ylabel("test accuracy (fraction correct, higher is better)")
    ax.set_title("Accuracy vs. gap vs. " + (short or "cost") + " per configuration "
                 "(seed means)" + ("" if cost != SAMPLES_PER_S else
                                   "\nno flops_per_sample logged: measured throughput"))
    return fig


CAPTIONS = {
    "effects": "Adjusted contrast of {target} per parameter level: the level's partial-"
               "dependence mean from one additive model over all studied parameters (so "
               "adjusted for the others) minus the mean of the other levels of the same "
               "parameter, with its 95% trial-bootstrap percentile interval (trials resampled, "
               "each as its seed mean; not adjusted for the number of comparisons), at the "
               "budget and with the estimator the title names: the final budget where it "
               "could be estimated (under design: search the completed trials and the early-"
               "stopped ones, their later values imputed from their learning curves; else "
               "the completed trials), otherwise the last rung; numeric parameters in "
               "quantile bins. n = trials at the level (right). Colour: the call against the "
               "smallest effect of interest (dotted lines), made on the multiplicity-adjusted "
               "interval (effects.csv adj_low/adj_high, wider than the bar drawn), where the "
               "table has calls (effect, negligible, inconclusive), else whether the interval "
               "excludes 0 beyond the seed-noise floor; grey band: ± the seed-noise floor "
               "(median spread of one configuration across seeds).",
    "importance": "Normalized share of each target's variation attributed to each parameter, "
                  "per evaluator (fANOVA: variance of a random-forest surrogate explained by "
                  "the parameter's main effect; PED-ANOVA: what separates the best trials), "
                  "computed on the per-trial seed means; whiskers: 95% trial-bootstrap "
                  "interval; black tick: 95th percentile of the parameter's share with the "
                  "target shuffled across trials (permutation null); pale bars: interval not "
                  "above the null. Shares sum to 1 per target and evaluator.",
    "measures": "Kendall τ between each measure and the generalization gap over trials, and "
                "its granulated version (Jiang et al. 2020: the mean τ within groups of "
                "trials that differ in one parameter; numeric parameters with more than 4 "
                "values are binned to form the groups, so they still vary within a group and "
                "a correlation they drive can leak in: measures.csv's note says where). "
                "Intervals: 95%, a trial bootstrap for τ, a stratified t interval over "
                "groups for the granulated τ (at least 3 groups a parameter); n/a: not "
                "computed (the note says why).",
    "pareto": "One point per completed configuration (seed means). Colour and size: "
              "training cost as flops_per_sample (analytic training FLOPs per sample: 3 x "
              "(2 x matmul weights x tokens + 4 x layers x tokens² x d_model); lower is "
              "cheaper, independent of machine load); a sweep that did not log it falls back "
              "to the measured throughput samples_per_s (higher is faster, but it also "
              "measures how loaded the machine was), as the colour bar and the title say. "
              "Ringed and labelled with their studied parameter values: not beaten on test "
              "accuracy, the gap and the cost together by any other configuration; red "
              "line: the front of accuracy vs gap alone.",
    "per_length": "Accuracy per evaluation length; lengths right of the dashed line are longer "
                  "than any training sequence.",
    "per_class": "Per-class test accuracy against the class's number of training examples.",
    "per_corruption": "Accuracy on corrupted test sets vs corruption severity, one panel per "
                      "studied parameter and one line per level (numeric parameters in "
                      "quantile bins of the completed trials shown, made as the effects "
                      "table makes them; its bins also count early-stopped trials, so an "
                      "edge can differ slightly from effects.csv's): the mean "
                      "over the completed trials at that level, each trial averaged over its "
                      "seeds and the corruption kinds, ± SE across trials; n = trials per "
                      "level. Other parameters vary freely (unadjusted). A sweep with no "
                      "varied parameter shows one line per corruption kind.",
    "budget": "Expected best {metric} among n trials drawn at random without replacement "
              "from the completed (full-budget) trials at each level, n = 1 to the level's "
              "trial count N (legend); each trial is its seed mean. Estimator: the exact "
              "average of the best over all n-subsets of those trials, unbiased (Dodge et al. "
              "2019; Tang et al. 2020). Band: ± one standard deviation of the best of n under "
              "the same draw, clipped to the observed range: how much an n-trial search varies, "
              "not a confidence interval. Numeric parameters in quantile bins of the completed "
              "trials shown, made as the effects table makes them (its bins also count "
              "early-stopped trials, so an edge can differ slightly from effects.csv's); "
              "early-stopped, diverged and failed trials are not counted.",
    "lr_sensitivity": "{target} against the learning rate, one line per level: mean over the "
                      "completed trials (seed means) in each learning-rate bin (equal width in "
                      "log LR from the smallest to the largest LR the trials used, or the "
                      "grid's own values), ± 95% t-interval over those trials (no bar: one "
                      "trial); points shifted slightly sideways for legibility. Other "
                      "parameters vary freely (unadjusted). Sensitivity (legend; Wortsman et "
                      "al. 2023): the mean over the LR bins that every level has (each level's "
                      "own bins where fewer than two are shared) of |bin mean − best bin mean| "
                      "(best: highest for accuracies, lowest for losses and gaps), the expected"
                      " shortfall from the best LR when the LR is drawn log-uniformly over "
                      "those bins. It is above 0 from noise alone (the best bin is chosen by "
                      "it): 'flat curve' is what a level whose target ignores the LR would show "
                      "with these bins' standard errors (simulated); only a sensitivity well "
                      "above it says the LR matters. Diverged trials are left out, so "
                      "instability at high learning rates can be understated.",
}


def caption(name: str) -> str:
    """The caption of figure `name` (a file stem from `all_figures`)."""
    if name.startswith("effects_"):
        return CAPTIONS["effects"].format(target=name[len("effects_"):])
    return CAPTIONS.get(name, "")


def all_figures(sweep: Sweep, effects: pd.DataFrame, importance: pd.DataFrame,
                measures: pd.DataFrame, targets: Sequence[str]) -> dict[str, Figure]:
    """Every figure whose data are present, by file stem, in report order."""
    tables, params = sweep.tables, list(sweep.params)
    figs: dict[str, Figure | None] = {}
    for t in targets:
        figs[f"effects_{t}"] = effect_forest(effects, t)
    figs["importance"] = importance_bars(importance, targets)
    figs["measures"] = measure_bars(measures)
    figs["pareto"] = pareto_front(sweep.trials, params)
    figs["per_length"] = accuracy_vs_length(tables.get("per_length"), params)
    figs["per_class"] = accuracy_vs_class_count(tables.get("per_class"))
    figs["per_corruption"] = accuracy_vs_corruption(tables.get("per_corruption"), params)
    return {k: v for k, v in figs.items() if v is not None}


def _legend_outside(ax: Axes, title: str) -> None:
    """Legend right of the axes, so it never covers a curve or an interval."""
    ax.legend(title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              frameon=False)


@_styled
def budget_curve_figure(table: pd.DataFrame | None, param: str) -> Figure | None:
    """How good would a search with n trials be at each level of PARAM? Expected best value
    of the objective vs number of trials (Dodge et al. 2019), one line per level, with the
    ± one-std band of the best of n (`analysis.budget.budget_curves`)."""
    if table is None or table.empty or "param" not in table:
        return None
    d = table[table["param"] == param].dropna(subset=["mean"])
    if d.empty:
        return None
    metric = str(d["metric"].iloc[0]) if "metric" in d else "objective"
    levels = list(dict.fromkeys(d["level"]))
    colors = dict(zip(levels, sns.color_palette("colorblind", len(levels))))
    fig = _figure(7.5, 4.5)
    ax = fig.subplots()
    for lvl in levels:
        c = d[d["level"] == lvl].sort_values("n_trials")
        n_level = int(c["n_level"].iloc[0]) if "n_level" in c else len(c)
        ax.fill_between(c["n_trials"], c["low"], c["high"], color=colors[lvl], alpha=0.18,
                        lw=0)
        ax.plot(c["n_trials"], c["mean"], color=colors[lvl], lw=1.8,
                marker="o" if len(c) <= 30 else None, ms=3, label=f"{lvl} (N = {n_level})")
    top = int(d["n_trials"].max())
    if top >= 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(0.9 if top >= 10 else 0.8, top * (1.1 if top >= 10 else 1.0) + 0.2)
    ax.set_xlabel("number of trials n drawn from the level" + (" (log scale)" if top >= 10
                                                                else ""))
    ax.set_ylabel(f"expected best {metric} ({unit(metric)})\n± std of the best of n")
    ax.set_title(f"Expected best {metric} vs. number of trials, per {param}")
    _legend_outside(ax, param)
    return fig


@_styled
def lr_sensitivity_figure(table: pd.DataFrame | None, param: str,
                          target: str | None = None) -> Figure | None:
    """Does PARAM change how sensitive TARGET is to the learning rate? Mean target per
    geometric LR bin with its 95% t-interval, one line per level; the legend gives each level's
    LR sensitivity (Wortsman et al. 2023; `analysis.budget.lr_sensitivity`)."""
    from analysis.budget import lr_sensitivity_summary

    if table is None or table.empty or "param" not in table:
        return None
    d = table[table["param"] == param].dropna(subset=["mean"])
    if target is not None:
        d = d[d["target"] == target]
    elif not d.empty:
        d = d[d["target"] == d["target"].iloc[0]]
    if d.empty:
        return None
    tgt = str(d["target"].iloc[0])
    summary = lr_sensitivity_summary(d).set_index("level")
    levels = list(dict.fromkeys(d["level"]))
    colors = dict(zip(levels, sns.color_palette("colorblind", len(levels))))
    bins = np.sort(d["lr_bin"].unique())
    step = float(np.min(np.diff(np.log10(bins)))) if len(bins) > 1 else 0.5
    fig = _figure(7.5, 4.5)
    ax = fig.subplots()
    for k, lvl in enumerate(levels):
        c = d[d["level"] == lvl].sort_values("lr_bin")
        shift = 10 ** (0.15 * step * (k - (len(levels) - 1) / 2) / max(len(levels), 1))
        x = c["lr_bin"].to_numpy(dtype=float) * shift
        m = c["mean"].to_numpy(dtype=float)
        lo, hi = c["low"].to_numpy(dtype=float), c["high"].to_numpy(dtype=float)
        err = np.vstack([np.where(np.isfinite(lo), m - lo, 0.0),
                         np.where(np.isfinite(hi), hi - m, 0.0)])
        sens = summary["sensitivity"].get(lvl, float("nan"))
        floor = summary["noise_floor"].get(lvl, float("nan"))
        ax.errorbar(x, m, yerr=err, color=colors[lvl], marker="o", ms=4, lw=1.6, capsize=3,
                    label=f"{lvl} (sensitivity {sens:.3g}; flat curve: {floor:.3g})")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (geometric bin centre; log scale)")
    ax.set_ylabel(f"{tgt} ({unit(tgt)})\nmean ± 95% t-interval over trials")
    ax.set_title(f"{tgt} vs. learning rate, per {param}")
    _legend_outside(ax, param)
    return fig


def budget_figures(budget: pd.DataFrame | None, lr_table: pd.DataFrame | None
                   ) -> dict[str, Figure]:
    """Every budget and LR-sensitivity figure whose data are present, by file stem:
    `budget_<param>` (captions: CAPTIONS["budget"]) and `lr_sensitivity_<target>_<param>`
    (CAPTIONS["lr_sensitivity"])."""
    figs: dict[str, Figure | None] = {}
    if budget is not None and not budget.empty:
        for p in dict.fromkeys(budget["param"]):
            figs[f"budget_{p}"] = budget_curve_figure(budget, str(p))
    if lr_table is not None and not lr_table.empty:
        for t in dict.fromkeys(lr_table["target"]):
            for p in dict.fromkeys(lr_table.loc[lr_table["target"] == t, "param"]):
                figs[f"lr_sensitivity_{t}_{p}"] = lr_sensitivity_figure(lr_table, str(p),
                                                                        str(t))
    return {k: v for k, v in figs.items() if v is not None}
