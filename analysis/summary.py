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

from analysis.load import Sweep
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
    return (f"Used {used} trial{'s' if used != 1 else ''}{seeds}; skipped: "
            + sweep.skipped_text())


def effect_findings(effects: pd.DataFrame, target: str, params: Sequence[str]) -> list[str]:
    """Levels beyond seed noise (largest first), then the params with no detectable effect."""
    if effects is None or effects.empty:
        return []
    rows = effects[effects["target"] == target]
    if rows.empty:
        return []
    higher = HIGHER_IS_BETTER.get(target)
    direction = None if higher is None else ("higher is better" if higher else
                                             "lower is better")
    out = []
    beyond = rows[rows["beyond_noise"].astype(bool)]
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
        out.append(f"{r.param}={r.level} {'raises' if up else 'lowers'} {target} by "
                   f"{fmt(abs(r.contrast))} [{fmt(lo)}, {fmt(hi)}] relative to {over} ({note})")
    has_effect = set(beyond["param"])
    floors: dict[str, list[str]] = {}
    for p in [p for p in params if p in set(rows["param"]) and p not in has_effect]:
        floors.setdefault(fmt(rows.loc[rows["param"] == p, "noise_floor"].max()), []).append(p)
    for floor, ps in floors.items():
        verb = "has" if len(ps) == 1 else "have"
        out.append(f"{', '.join(ps)} {verb} no effect on {target} beyond seed noise "
                   f"(floor {floor})")
    return out


def importance_finding(importance: pd.DataFrame, target: str) -> str | None:
    """The top parameter by fANOVA importance (PED-ANOVA when fANOVA is absent)."""
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
    line = (f"Top parameter for {target} by {name} importance: {top['param']} "
            f"({fmt(top['importance'])})")
    if len(rows) > 1:
        nxt = rows.iloc[1]
        line += f", next {nxt['param']} ({fmt(nxt['importance'])})"
    return line


def measure_finding(measures: pd.DataFrame, target: str = GEN_GAP_ACC) -> str | None:
    """The measure with the largest |Kendall tau| against the gap, with its sign."""
    if measures is None or measures.empty:
        return None
    rows = measures[(measures["target"] == target) & measures["kendall_tau"].notna()]
    if rows.empty:
        return None
    best = rows.iloc[int(rows["kendall_tau"].abs().argmax())]
    tau = float(best["kendall_tau"])
    sign = "larger" if tau > 0 else "smaller"
    p = float(best["p_value"])
    sig = "" if p < 0.05 else ", not significant at p < 0.05"
    return (f"Best measure for {target}: {best['measure']} (Kendall tau {fmt(tau)}, granulated "
            f"{fmt(best['granulated_kendall_tau'])}, {fmt_p(p)}, n={int(best['n'])}{sig}): "
            f"trials with a higher {best['measure']} tend to have a {sign} {target} "
            f"(a rank correlation, not a cause)")


def _any_beyond(effects: pd.DataFrame, target: str) -> bool:
    if effects is None or effects.empty:
        return False
    return bool(effects.loc[effects["target"] == target, "beyond_noise"].astype(bool).any())


def findings(effects: pd.DataFrame, importance: pd.DataFrame, measures: pd.DataFrame,
             sweep: Sweep, targets: Sequence[str] | None = None) -> list[str]:
    """The report's plain-language summary, header line first."""
    params = list(sweep.params)
    if targets is None:
        targets = report_targets(sweep.metrics)
    out = [header(sweep)]
    for t in finding_targets(targets):
        out.extend(effect_findings(effects, t, params))
        line = importance_finding(importance, t)
        if line:
            if not _any_beyond(effects, t):
                line += " (no level is beyond seed noise, so this ranking may be noise)"
            out.append(line)
    line = measure_finding(measures, GEN_GAP_ACC)
    if line:
        out.append(line)
    return out
