"""Do cheap measures (attention entropy, norms, ...) track the generalization gap?

Rank correlation as in Jiang et al. 2020 ("Fantastic Generalization Measures and Where to Find
Them", ICLR; arXiv 1912.02178, 2019):

- Kendall's tau between a measure and the target over all trials (scipy.stats.kendalltau,
  tau-b, which handles ties).
- The granulated Kendall's tau (their eqs. 4-5): for each param i, group the trials that share
  the values of all OTHER params (numeric ones binned, as in `analysis.effects.bin_levels`),
  take Kendall's tau within every group that has >= 2 trials with different values of i, and
  average over groups -> psi_i; the granulated tau is the mean of psi_i over the params with
  at least one such group. It asks whether the measure follows the target when ONE choice
  changes, which a correlation driven by another choice cannot fake. With a sparse search
  (random or TPE samples, not a grid) few trials share all other values, so it can be
  undefined (NaN): the table says why.

All functions work on per-trial seed means (one row per trial).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import stats

from analysis.effects import bin_levels
from analysis.load import TRIAL_KEY, trial_means
from study.records import MEASURE_COLUMNS

DEFAULT_MEASURES = ("attn_entropy", "attn_entropy_min", "attn_max_logit", "grad_norm",
                    "param_norm", "ece", "n_params", "samples_per_s")


def kendall_tau_p(x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[float, float]:
    """Kendall's tau-b and its two-sided p-value over pairs where both are finite; NaN when
    fewer than 2 such pairs or either side is constant."""
    xa = np.asarray(x, dtype=float)
    ya = np.asarray(y, dtype=float)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    if len(xa) < 2 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return float("nan"), float("nan")
    res = stats.kendalltau(xa, ya)
    return float(res.statistic), float(res.pvalue)


def kendall_tau(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Kendall's tau-b (scipy.stats.kendalltau); NaN when undefined."""
    return kendall_tau_p(x, y)[0]


def granulated_psi(trials: pd.DataFrame, measure: str, target: str, params: Sequence[str],
                   n_bins: int = 3, group: str = TRIAL_KEY) -> dict[str, tuple[float, int]]:
    """psi_i for each param i: (mean within-group Kendall's tau, number of groups used);
    (NaN, 0) where no group qualifies."""
    df = trial_means(trials, [measure, target], group)
    df = df[np.isfinite(df[measure].astype(float)) & np.isfinite(df[target].astype(float))]
    params = [p for p in params if p in df]
    levels = pd.DataFrame({p: bin_levels(df[p], n_bins).astype(str) for p in params},
                          index=df.index)
    out: dict[str, tuple[float, int]] = {}
    for p in params:
        others = [q for q in params if q != p]
        taus = []
        key = levels[others].agg("\x1f".join, axis=1) if others else pd.Series("", df.index)
        groups = key.groupby(key, sort=False).groups.values()
        for idx in groups:
            if len(idx) < 2 or levels.loc[idx, p].nunique() < 2:
                continue
            t = kendall_tau(df.loc[idx, measure], df.loc[idx, target])
            if np.isfinite(t):
                taus.append(t)
        out[p] = (float(np.mean(taus)), len(taus)) if taus else (float("nan"), 0)
    return out


def granulated_kendall_tau(trials_df: pd.DataFrame, measure: str, target: str,
                           params: Sequence[str], n_bins: int = 3,
                           group: str = TRIAL_KEY) -> float:
    """Jiang et al.'s granulated Kendall's tau: the mean of psi_i over the params with at least
    one group of trials that differ only in param i; NaN if there is none."""
    psi = [v for v, n in granulated_psi(trials_df, measure, target, params, n_bins,
                                        group).values() if n]
    return float(np.mean(psi)) if psi else float("nan")


def measures_table(trials: pd.DataFrame, params: Sequence[str],
                   targets: Sequence[str] = ("gen_gap_acc",),
                   measures: Sequence[str] = DEFAULT_MEASURES, n_bins: int = 3,
                   group: str = TRIAL_KEY) -> pd.DataFrame:
    """Kendall's tau and granulated Kendall's tau of each measure with each target over the
    per-trial seed means. Columns: target, measure, kendall_tau, granulated_kendall_tau, then
    p_value (of tau), n (trials), n_params_granulated (params with a qualifying group) and
    note (why a value is empty). Measures or targets not present are skipped."""
    present = [m for m in measures if m in trials]
    tgts = [t for t in targets if t in trials]
    df = trial_means(trials, list(dict.fromkeys([*present, *tgts])), group)
    rows = []
    for t in tgts:
        for m in present:
            if m == t:
                continue
            x, y = df[m].to_numpy(dtype=float), df[t].to_numpy(dtype=float)
            n = int((np.isfinite(x) & np.isfinite(y)).sum())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tau, p = kendall_tau_p(x, y)
                psi = granulated_psi(df, m, t, params, n_bins, group)
            used = [v for v, k in psi.values() if k]
            gran = float(np.mean(used)) if used else float("nan")
            note = ""
            if n < 2:
                note = f"fewer than 2 trials with both {m} and {t}: tau undefined"
            elif not np.isfinite(tau):
                const = m if np.nanmax(x) == np.nanmin(x) else t
                note = f"{const} is constant across trials: tau undefined"
            elif not used:
                note = ("no two trials differ in only one param (after binning): "
                        "granulated tau undefined")
            rows.append({"target": t, "measure": m, "kendall_tau": tau,
                         "granulated_kendall_tau": gran, "p_value": p, "n": n,
                         "n_params_granulated": len(used), "note": note})
    return pd.DataFrame(rows, columns=list(MEASURE_COLUMNS))
