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
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullFormatter

from analysis.load import Sweep, trial_means
from analysis.summary import unit
from study.metrics import GEN_GAP_ACC, SAMPLES_PER_S, TEST_ACC

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
    """(a) Which levels change TARGET? Contrast (level minus the other levels) with its CI per
    (param, level); beyond-noise levels in red; the grey band is +/- the seed-noise floor."""
    if effects is None or effects.empty:
        return None
    rows = effects[effects["target"] == target].dropna(subset=["contrast"])
    if rows.empty:
        return None
    # params in table order, levels in their own order (bins ascending), top to bottom
    porder = {p: i for i, p in enumerate(dict.fromkeys(rows["param"]))}
    rows = rows.sort_values("param", key=lambda c: c.map(porder), kind="stable")
    rows = rows.reset_index(drop=True)
    rows["label"] = rows["param"].astype(str) + " = " + rows["level"].astype(str)
    rows["y"] = np.arange(len(rows))[::-1]
    rows["beyond"] = np.where(rows["beyond_noise"].astype(bool), "beyond seed noise",
                              "within seed noise")
    fig = _figure(7.5, 1.2 + 0.32 * len(rows))
    ax = fig.subplots()
    for r in cast("Iterable[_ForestRow]", rows.itertuples(index=False)):
        f = float(r.noise_floor) if pd.notna(r.noise_floor) else 0.0
        ax.fill_betweenx([r.y - 0.45, r.y + 0.45], -f, f, color="0.85", lw=0, zorder=0)
        color = BEYOND if r.beyond == "beyond seed noise" else WITHIN
        ax.hlines(r.y, r.contrast_low, r.contrast_high, color=color, lw=2, zorder=2)
    sns.scatterplot(data=rows, x="contrast", y="y", hue="beyond", ax=ax, s=50, zorder=3,
                    palette={"beyond seed noise": BEYOND, "within seed noise": WITHIN},
                    hue_order=["beyond seed noise", "within seed noise"])
    ax.axvline(0, color="0.2", lw=0.8, zorder=1)
    ax.set_yticks(rows["y"], rows["label"])
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_ylabel("")
    ax.set_xlabel(f"{target}: level minus the mean of the other levels\n"
                  f"({unit(target)}; adjusted, 95% CI)")
    ax.set_title(f"Which design choices change {target}?")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Patch(color="0.85", label="± seed-noise floor"))
    ax.legend(handles=handles, loc="best", frameon=True)
    return fig


@_styled
def importance_bars(importance: pd.DataFrame,
                    targets: Sequence[str] | None = None) -> Figure | None:
    """(b) Which parameters matter most for each target? Normalized importance per evaluator."""
    if importance is None or importance.empty:
        return None
    targets = [t for t in (targets or importance["target"].unique())
               if t in set(importance["target"])]
    if not targets:
        return None
    n_params = importance["param"].nunique()
    fig, axes = _grid(len(targets), 4.4, 1.3 + 0.3 * n_params)
    evaluators = sorted(importance["evaluator"].unique())
    palette = dict(zip(evaluators, sns.color_palette("colorblind", len(evaluators))))
    name = EVALUATORS.get(evaluators[0], evaluators[0]) if len(evaluators) == 1 else None
    for i, (ax, t) in enumerate(zip(axes, targets)):
        d = importance[importance["target"] == t].sort_values("importance", ascending=False)
        sns.barplot(data=d, x="importance", y="param", hue="evaluator", ax=ax,
                    palette=palette, hue_order=evaluators, legend=name is None and i == 0)
        ax.set_title(t)
        ax.set_xlabel(f"{name or 'importance'} (normalized share, 0-1)")
        ax.set_ylabel("")
        ax.set_xlim(0, max(1e-9, float(d["importance"].max())) * 1.1)
    fig.suptitle("Which parameters matter most for each target?")
    return fig


@_styled
def measure_bars(measures: pd.DataFrame) -> Figure | None:
    """(c) Which measures rank trials by their generalization gap? Kendall tau and granulated
    Kendall tau (Jiang et al. 2020) per measure."""
    if measures is None or measures.empty:
        return None
    long = measures.melt(id_vars=["target", "measure"],
                         value_vars=["kendall_tau", "granulated_kendall_tau"],
                         var_name="statistic", value_name="tau").dropna(subset=["tau"])
    if long.empty:
        return None
    long["statistic"] = long["statistic"].map(
        {"kendall_tau": "Kendall τ", "granulated_kendall_tau": "granulated Kendall τ"})
    targets = list(dict.fromkeys(long["target"]))
    fig, axes = _grid(len(targets), 5.5, 1.3 + 0.45 * long["measure"].nunique(), ncols=2)
    for ax, t in zip(axes, targets):
        d = long[long["target"] == t]
        order = (d[d["statistic"] == "Kendall τ"].assign(a=lambda x: x["tau"].abs())
                 .sort_values("a", ascending=False)["measure"].tolist())
        order += [m for m in d["measure"].unique() if m not in order]
        sns.barplot(data=d, x="tau", y="measure", hue="statistic", order=order, ax=ax,
                    palette="colorblind")
        ax.axvline(0, color="0.2", lw=0.8)
        ax.set_xlim(-1, 1)
        sns.move_legend(ax, "upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, title=None,
                        frameon=False)
        ax.set_xlabel(f"rank correlation with {t} (τ, -1 to 1)")
        ax.set_ylabel("")
        ax.set_title(t)
    fig.suptitle("Which measures predict the generalization gap?")
    return fig


@_styled
def accuracy_vs_length(per_length: pd.DataFrame | None,
                       params: Sequence[str] = ()) -> Figure | None:
    """(d) Does accuracy hold beyond the training lengths? Mean accuracy per evaluation length,
    one line per positional encoding when it was varied; dashed: the longest training length."""
    if per_length is None or per_length.empty or not {"length", "acc"} <= set(per_length):
        return None
    hue = "pos_encoding" if "pos_encoding" in params and "pos_encoding" in per_length else None
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    sns.lineplot(data=per_length, x="length", y="acc", hue=hue, marker="o", errorbar="se",
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
    ax.set_title("Does accuracy hold beyond the training lengths? (mean ± SE over runs)")
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


@_styled
def accuracy_vs_corruption(per_corruption: pd.DataFrame | None) -> Figure | None:
    """(f) How fast does accuracy fall with corruption? Mean accuracy per severity and kind."""
    if (per_corruption is None or per_corruption.empty
            or not {"kind", "severity", "acc"} <= set(per_corruption)):
        return None
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    sns.lineplot(data=per_corruption, x="severity", y="acc", hue="kind", marker="o",
                 errorbar="se", ax=ax, palette="colorblind")
    ax.set_xticks(sorted(per_corruption["severity"].unique()))
    ax.set_xlabel("corruption severity (level, higher = stronger)")
    ax.set_ylabel("accuracy on corrupted test set (fraction correct)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(title="corruption kind")
    ax.set_title("How fast does accuracy fall with corruption? (mean ± SE over runs)")
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


@_styled
def pareto_front(trials: pd.DataFrame | None) -> Figure | None:
    """(g) Which configurations trade test accuracy against the gap best? Seed means per trial;
    colour and size = training throughput; the non-dominated front is ringed and joined."""
    if trials is None or trials.empty or not {TEST_ACC, GEN_GAP_ACC} <= set(trials):
        return None
    cols = [TEST_ACC, GEN_GAP_ACC] + ([SAMPLES_PER_S] if SAMPLES_PER_S in trials else [])
    d = trial_means(trials, cols).dropna(subset=[TEST_ACC, GEN_GAP_ACC])
    if d.empty:
        return None
    speed = d[SAMPLES_PER_S] if SAMPLES_PER_S in d and d[SAMPLES_PER_S].notna().all() else None
    d["front"] = pareto_mask(d[TEST_ACC], d[GEN_GAP_ACC], speed)
    d["front2"] = pareto_mask(d[TEST_ACC], d[GEN_GAP_ACC])
    fig = _figure(7.5, 5)
    ax = fig.subplots()
    tp: dict[str, Any] = {"color": "#2c7fb8"}
    if SAMPLES_PER_S in d and d[SAMPLES_PER_S].notna().any():
        norm = Normalize(float(d[SAMPLES_PER_S].min()), float(d[SAMPLES_PER_S].max()))
        tp = {"hue": SAMPLES_PER_S, "size": SAMPLES_PER_S, "palette": "viridis",
              "hue_norm": norm, "size_norm": norm, "sizes": (25, 160)}
        fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=ax,
                     label="training throughput (samples/s); also point size")
    sns.scatterplot(data=d, x=GEN_GAP_ACC, y=TEST_ACC, ax=ax, alpha=0.85, legend=False, **tp)
    front2 = d[d["front2"]].sort_values(GEN_GAP_ACC)
    ax.plot(front2[GEN_GAP_ACC], front2[TEST_ACC], color=BEYOND, lw=1.2, ls="-", zorder=1,
            drawstyle="steps-post", label="front of accuracy vs gap")
    front = d[d["front"]]
    ax.scatter(front[GEN_GAP_ACC], front[TEST_ACC], s=190, facecolors="none",
               edgecolors=BEYOND, linewidths=1.6, zorder=3,
               label="non-dominated in accuracy, gap" + (" and throughput" if speed is not None
                                                         else ""))
    ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("generalization gap: train − test accuracy (fraction, lower is better)")
    ax.set_ylabel("test accuracy (fraction correct, higher is better)")
    ax.set_title("Accuracy vs. gap vs. throughput per configuration (seed means)")
    return fig


CAPTIONS = {
    "effects": "Each point: a level's adjusted mean of {target} minus the mean of the other "
               "levels of the same parameter, with its 95% CI. Red: beyond seed noise; grey "
               "band: ± the seed-noise floor.",
    "importance": "Share of each target's variation attributed to each parameter "
                  "(fANOVA; PED-ANOVA where fANOVA could not be fitted).",
    "measures": "Kendall τ between each measure and the generalization gap over trials, and "
                "its granulated version (mean τ when only one parameter varies).",
    "pareto": "One point per configuration (seed means). Ringed: not beaten on both test "
              "accuracy and the gap by any other configuration.",
    "per_length": "Accuracy per evaluation length; lengths right of the dashed line are longer "
                  "than any training sequence.",
    "per_class": "Per-class test accuracy against the class's number of training examples.",
    "per_corruption": "Accuracy on corrupted test sets by corruption kind and severity.",
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
    figs["pareto"] = pareto_front(sweep.trials)
    figs["per_length"] = accuracy_vs_length(tables.get("per_length"), params)
    figs["per_class"] = accuracy_vs_class_count(tables.get("per_class"))
    figs["per_corruption"] = accuracy_vs_corruption(tables.get("per_corruption"))
    return {k: v for k, v in figs.items() if v is not None}
