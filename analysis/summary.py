"""Plain-language findings from the effects, importance and measures tables (pure functions).

Wording stays correlational: a level "raises"/"lowers" a target relative to the other levels of
the same parameter, adjusted for the other parameters; nothing here claims more than the sweep's
design supports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, cast

import numpy as np
import pandas as pd

from analysis.estimators import ESTIMATOR_IMPUTED
from analysis.load import TRIAL_KEY, Sweep
from study.metrics import (
    GEN_GAP_ACC,
    GEN_GAP_LOSS,
    HIGHER_IS_BETTER,
    ROBUSTNESS_METRICS,
    TEST_ACC,
)

# metric -> unit shown on axes and in tables
UNITS: dict[str, str] = {
    "gen_gap_acc": "accuracy, fraction", "gen_gap_loss": "cross-entropy, nats",
    "test_acc": "fraction correct", "len_gen_ratio": "ratio", "corrupt_rel": "ratio",
    "ece": "fraction",
}


class _EffectRow(Protocol):
    """The columns of an effects-table row that the findings read (`itertuples` types every
    attribute as any scalar)."""

    param: str
    level: Any
    contrast: float
    contrast_low: float
    contrast_high: float


def unit(metric: str) -> str:
    return UNITS.get(metric, "fraction" if metric.endswith(("_acc", "_f1")) else "value")


def report_targets(metrics: Iterable[str]) -> list[str]:
    """The gap, its loss version and test accuracy, then every robustness metric present."""
    present = set(metrics)
    core = [GEN_GAP_ACC, GEN_GAP_LOSS, TEST_ACC]
    return [m for m in core if m in present] + [m for m in ROBUSTNESS_METRICS if m in present]


def finding_targets(targets: Sequence[str]) -> list[str]:
    """Targets the findings speak about: every report target (both gaps, test accuracy and
    the robustness metrics)."""
    return list(targets)


def fmt(x: Any) -> str:
    """A number with 3 decimals (integers and text unchanged)."""
    if isinstance(x, bool | str | int | np.bool_) or x is None:
        return str(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "n/a"
    return str(int(v)) if isinstance(x, np.integer) else f"{v:.3f}"


def fmt_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def header(sweep: Sweep) -> str:
    """'Used N trials (x K seeds); skipped: 2 early_stopped (stopped by ASHA ...), ...'."""
    used = sweep.used
    k = sweep.seeds()
    seeds = f" (x {k} seed{'s' if k != 1 else ''})" if k else ""
    text = (f"Used {used} trial{'s' if used != 1 else ''}{seeds}; skipped: "
            + sweep.skipped_text())
    stopped = sweep.skipped.get("early_stopped", 0)
    if stopped and sweep.design == "search":  # (the effects table takes them, imputed)
        text += (f"; the effects also use the {stopped} early-stopped, their later values "
                 "imputed from their learning curves")
    return text


def estimand(sweep: Sweep, effects: pd.DataFrame) -> str:
    """What the effects estimate: the design, the budgets, the trials per level and the
    estimator, and how the calls are made."""
    spec = sweep.spec
    epochs = int(spec.epochs) if spec else None
    if effects.empty:
        return f"Estimand: no effect could be estimated; design: {sweep.design}"
    final = effects[effects["budget"] == "final"]
    budgets = sorted({str(b) for b in effects["budget"] if str(b) != "final"}, key=int)
    text = ("Estimand: each level's adjusted contrast (its mean minus the mean of the other "
            "levels of the same parameter, the other parameters held as observed) at the "
            + (f"final budget ({epochs} epochs)" if epochs else "final budget"))
    if final.empty:
        text += " (not estimated: see the notes below)"
    if budgets:
        text += f" and at ASHA's rung epochs {', '.join(budgets)} (common budgets)"
    text += f"; design: {sweep.design}"
    if not final.empty:
        n = final.groupby(["param", "level"])["n"].max()
        m = int(np.isfinite(effects["p_value"].astype(float)).sum())
        text += (f"; trials per level {int(n.min())}-{int(n.max())}; estimator: "
                 + "; ".join(dict.fromkeys(final["estimator"].astype(str)))
                 + "; calls against the smallest effect of interest (delta per target) with "
                 f"Holm/Bonferroni adjustment across the report's {m} tests")
    return text


def _thin(note: object) -> bool:
    """Whether an effect row's note says its level lacks support (too few trials, aliased, no
    trial past a rung: `effects._budget_rows`)."""
    return any(w in str(note) for w in ("trial", "aliased", "went on"))


def _delta(rows: pd.DataFrame) -> str:
    return fmt(float(rows["delta"].iloc[0])) if "delta" in rows and len(rows) else "n/a"


def effect_findings(effects: pd.DataFrame, target: str, params: Sequence[str],
                    budget: str = "final") -> list[str]:
    """Effects (largest first), then the params whose levels are all negligible, then what
    was not detected, with its interval and the minimum detectable effect (MDE)."""
    if effects is None or effects.empty:
        return []
    rows = effects[effects["target"] == target]
    if "budget" in rows:
        rows = rows[rows["budget"].astype(str) == budget]
    if rows.empty:
        return []
    higher = HIGHER_IS_BETTER.get(target)
    direction = None if higher is None else ("higher is better" if higher else
                                             "lower is better")
    imputed = "estimator" in rows and (rows["estimator"] == ESTIMATOR_IMPUTED).any()
    at = ("" if budget == "final" else
          f" at epoch {budget} (every analysed trial, those stopped before it imputed)"
          if imputed else f" at epoch {budget} (every trial reached it)")
    out = []
    called = rows["call"] == "effect" if "call" in rows else rows["beyond_noise"].astype(bool)
    beyond = rows[called]
    beyond = beyond.reindex(beyond["contrast"].abs().sort_values(ascending=False).index)
    levels = rows.groupby("param")["level"].agg(lambda s: list(dict.fromkeys(s.astype(str))))
    for r in cast("Iterable[_EffectRow]", beyond.itertuples(index=False)):
        up = r.contrast > 0
        others = [lv for lv in levels.get(r.param, []) if lv != str(r.level)]
        if len(others) == 1 and not up and (beyond["param"] == r.param).sum() > 1:
            continue  # two levels: the other level's "raises" line says the same thing
        lo, hi = (r.contrast_low, r.contrast_high) if up else (-r.contrast_high,
                                                                -r.contrast_low)
        over = (f"{r.param}={others[0]}" if len(others) == 1 else "the other levels")
        note = "adjusted for the other parameters" + (f"; {direction}" if direction else "")
        n = f"; {int(r.n)} trials" if hasattr(r, "n") else ""
        k = int(getattr(r, "n_imputed", 0) or 0)
        n += f", {k} of them imputed" if n and k else ""
        out.append(f"{r.param}={r.level} {'raises' if up else 'lowers'} {target}{at} by "
                   f"{fmt(abs(r.contrast))} [{fmt(lo)}, {fmt(hi)}] relative to {over} "
                   f"({note}{n})")
    if "call" not in rows:
        return out
    has_effect = set(beyond["param"])
    rest = [p for p in params if p in set(rows["param"]) and p not in has_effect]
    negligible = [p for p in rest
                  if (rows.loc[rows["param"] == p, "call"] == "negligible").all()]
    if negligible:
        out.append(f"{', '.join(negligible)}: negligible effect on {target}{at} (every level's "
                   f"adjusted interval lies within +-{_delta(rows)})")
    for p in [p for p in rest if p not in negligible]:
        pr = rows[rows["param"] == p]
        # the level the label speaks of: the largest contrast among the levels not called
        # negligible (a negligible level's would contradict "not detected"/"inconclusive")
        open_ = pr[pr["call"] != "negligible"]
        big = open_.iloc[int(open_["contrast"].abs().fillna(-1).to_numpy().argmax())]
        thin = [f"{lv} ({note})" for lv, note in zip(pr["level"], pr["note"]) if _thin(note)]
        # the interval the call was made on: multiplicity-adjusted (the unadjusted one can
        # exclude 0 where the adjusted one, and so the label, does not)
        lo_key, hi_key = (("adj_low", "adj_high") if "adj_low" in big.index
                          else ("contrast_low", "contrast_high"))
        ci = (f"{'adjusted ' if lo_key == 'adj_low' else ''}CI [{fmt(big[lo_key])}, "
              f"{fmt(big[hi_key])}]" if np.isfinite(float(big[lo_key])) else "no interval")
        why = str(big["note"]) if "note" in big and isinstance(big["note"], str) else ""
        # "not detected" only where the adjusted interval holds 0; else the note says why not
        label = ("inconclusive" if _thin(why) else
                 "not detected" if why in ("", "not detected", "no interval") else
                 f"inconclusive ({why})")
        largest = "largest contrast" if len(open_) == len(pr) else \
            "largest contrast of the levels not negligible"
        line = (f"{p} on {target}{at}: {label}: {largest} {p}={big['level']} "
                f"{fmt(big['contrast'])}, {ci}, MDE {fmt(big['mde'])}")
        if thin:
            line += "; too little support: " + ", ".join(thin)
        out.append(line)
    return out


def _imp_text(r: pd.Series) -> str:
    text = fmt(r["importance"])
    if "importance_low" in r and np.isfinite(float(r["importance_low"])):
        text += f" [{fmt(r['importance_low'])}, {fmt(r['importance_high'])}]"
    return text


def importance_finding(importance: pd.DataFrame, target: str, over: str = "") -> str | None:
    """The top parameter by fANOVA importance (PED-ANOVA when fANOVA is absent), with its
    bootstrap interval and which params stand above the permutation null; `over`: which
    trials it was computed on (`trials_used`)."""
    if importance is None or importance.empty:
        return None
    rows = importance[importance["target"] == target]
    if rows.empty:
        return None
    evaluators = list(rows["evaluator"].unique())
    ev = "fanova" if "fanova" in evaluators else evaluators[0]
    rows = rows[rows["evaluator"] == ev].sort_values("importance", ascending=False)
    name = {"fanova": "fANOVA", "ped_anova": "PED-ANOVA"}.get(ev, ev)
    top = rows.iloc[0]
    over = f" ({over})" if over else ""
    line = (f"Top parameter for {target} by {name} importance{over}: {top['param']} "
            f"({_imp_text(top)})")
    if len(rows) > 1:
        nxt = rows.iloc[1]
        line += f", next {nxt['param']} ({_imp_text(nxt)})"
    if "important" in rows:
        imp = [str(p) for p, i in zip(rows["param"], rows["important"]) if bool(i)]
        line += ("; above their permutation null: "
                 + (", ".join(imp) if imp else "none, so this ranking may be noise"))
    return line


def measure_finding(measures: pd.DataFrame, target: str = GEN_GAP_ACC) -> str | None:
    """Which measures rank-correlate with the target after Holm adjustment across every
    measure tried (never the best of k with its unadjusted p-value)."""
    if measures is None or measures.empty:
        return None
    rows = measures[(measures["target"] == target) & measures["kendall_tau"].notna()]
    if rows.empty:
        return None
    from analysis.calls import holm

    rows = rows.assign(q=holm(rows["p_value"].to_numpy(float))).sort_values("q")
    hits = rows[rows["q"] < 0.05]
    k = len(rows)
    if hits.empty:
        best = rows.iloc[0]
        return (f"Measures vs {target}: no rank correlation survives Holm adjustment across the "
                f"{k} measures tried (strongest: {best['measure']}, Kendall tau "
                f"{fmt(best['kendall_tau'])}, adjusted p={float(best['q']):.3f}, "
                f"n={int(best['n'])})")
    parts = [f"{r['measure']} (Kendall tau {fmt(r['kendall_tau'])}, adjusted "
             f"{fmt_p(float(r['q']))})" for _, r in hits.iterrows()]
    return (f"Measures vs {target}, Holm-adjusted across the {k} measures tried "
            f"(n={int(hits['n'].iloc[0])} trials): " + ", ".join(parts)
            + ": a rank correlation over trials, not a cause")


def _any_effect(effects: pd.DataFrame, target: str) -> bool:
    if effects is None or effects.empty:
        return False
    return bool(effects.loc[effects["target"] == target, "beyond_noise"].astype(bool).any())


def trials_used(sweep: Sweep) -> str:
    """Which trials the importance (and measures) tables rest on: the completed ones, which
    under early stopping are those ASHA let finish, not all that were sampled."""
    n = sweep.trials[TRIAL_KEY].nunique() if TRIAL_KEY in sweep.trials else 0
    if not n:
        return ""
    text = f"over the {n} completed trials"
    if sweep.design == "search":
        text += ", the ones early stopping let finish"
    return text


def findings(effects: pd.DataFrame, importance: pd.DataFrame, measures: pd.DataFrame,
             sweep: Sweep, targets: Sequence[str] | None = None) -> list[str]:
    """The report's plain-language summary, header line first."""
    params = list(sweep.params)
    if targets is None:
        targets = report_targets(sweep.metrics)
    out = ([estimand(sweep, effects)] if "budget" in effects else []) + [header(sweep)]
    # a target left out at a budget (e.g. too few trials past a rung to impute the stopped
    # ones): said, so that no call there is not read as no effect
    out += [f"Effects not estimated: {note}" for note in effects.attrs.get("notes", [])
            if " at budget " in note]
    budgets = (sorted({str(b) for b in effects["budget"] if str(b) != "final"}, key=int)
               if "budget" in effects else [])
    for t in finding_targets(targets):
        out.extend(effect_findings(effects, t, params))
        for b in budgets:
            out.extend(x for x in effect_findings(effects, t, params, b)
                       if " raises " in x or " lowers " in x)
        line = importance_finding(importance, t, trials_used(sweep))
        if line:
            if "important" not in importance and not _any_effect(effects, t):
                line += " (no level is called an effect, so this ranking may be noise)"
            out.append(line)
    line = measure_finding(measures, GEN_GAP_ACC)
    if line:
        out.append(line)
    return out
