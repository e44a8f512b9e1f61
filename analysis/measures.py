"""Do cheap measures (attention entropy, norms, ...) track the generalization gap?

Rank correlation as in Jiang et al. 2020 ("Fantastic Generalization Measures and Where to Find
Them", ICLR; arXiv 1912.02178, 2019):

- Kendall's tau between a measure and the target over all trials (scipy.stats.kendalltau,
  tau-b, which handles ties).
- The granulated Kendall's tau (their eqs. 4-5): for each param i, group the trials that share
  the values of all OTHER params (numeric ones binned, as in `analysis.effects.bin_levels`),
  take Kendall's tau within every qualifying group and average over groups -> psi_i; the
  granulated tau is the mean of psi_i over the params with at least one qualifying group. It
  asks whether the measure follows the target when ONE choice changes. Where the other params
  are held exactly (a grid, a one_at_a_time design), a correlation driven by another choice
  cannot fake it; where a numeric other param is binned it still varies within a group, and a
  correlation it drives leaks in (simulated, measure and target both driven by a binned B
  alone: psi of the irrelevant A 0.33 where exact grouping gives 0), so the note says when
  bins stood in for exact values. With a sparse search (random or TPE samples, not a grid) few
  trials share all other values, so it can be undefined (NaN): the table says why.

Which groups qualify. Jiang et al. use every group of >= 2 trials that differ in param i; the
functions `granulated_psi` / `granulated_kendall_tau` keep that definition by default
(`min_group=2`). `measures_table` asks for more: a group must hold at least `MIN_GROUP` (3)
trials with >= 2 distinct (binned) values of the varied param, because the tau of a 2-trial
group is +1 or -1 whatever the measure is (an unrelated measure's granulated tau over 2-trial
groups has an sd of about 0.45). A group whose tau is undefined (the measure or the target
constant within it) is not used. A `design: one_at_a_time` sweep (README "Designs") makes one
such group per base configuration and param with >= 3 levels: the base and its variations of
that param; 2-level params give 2-trial groups only.

Uncertainty (`measures_table`, 95% intervals):
- `granulated_low/high`: a stratified t interval over groups (`granulated_ci`): the estimate is
  the mean over params of each param's mean group tau, its standard error sqrt(sum_i s_i^2 /
  k_i) / P from the spread of each param's k_i group taus, with Welch-Satterthwaite degrees of
  freedom (`stratified_se`); the within-group taus are computed once, and the statistic
  (`granulated_stat`) is the same function for the estimate and the interval. It needs >= 3
  groups in every used param (else NaN, with a note): a percentile bootstrap over groups, used
  before, covered 44% (2 groups) and 61% (3 groups) for a nominal 95%, this interval 93% at 3
  (tests/test_measures.py simulates it). Groups of different params share trials (a base
  belongs to one group per param), which this treats as independent.
- `tau_low/high`: trials drawn with replacement (each trial's seed mean is one observation),
  Kendall's tau-b of every resample (resamples where it is undefined are dropped).

All functions work on per-trial seed means (one row per trial).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import stats

from analysis.effects import bin_levels, is_binned
from analysis.load import TRIAL_KEY, trial_means
from study.records import MEASURE_COLUMNS

DEFAULT_MEASURES = ("attn_entropy", "attn_entropy_min", "attn_max_logit", "grad_norm",
                    "param_norm", "ece", "n_params", "samples_per_s")
MIN_GROUP = 3  # the fewest trials a group needs in `measures_table` (see the module docstring)
N_BOOT = 200  # bootstrap resamples of `measures_table`'s intervals
CI_LEVEL = 0.95
MIN_GROUPS_CI = 3  # the fewest groups a param needs for the granulated interval
DESIGN_HINT = ("a `design: one_at_a_time` sweep with params of >= 3 levels gives such groups "
               "(README \"Designs\")")

FloatArray = npt.NDArray[np.float64]


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


def group_taus(trials: pd.DataFrame, measure: str, target: str, params: Sequence[str],
               n_bins: int = 3, group: str = TRIAL_KEY,
               min_group: int = 2) -> tuple[dict[str, list[tuple[float, int]]], int]:
    """The groups behind the granulated tau: param -> [(Kendall's tau, trials) of every group
    of >= `min_group` trials that share the other params' (binned) values and hold >= 2 values
    of the param, with a defined tau], and the number of groups left out only for being
    smaller than `min_group`."""
    df = trial_means(trials, [measure, target], group)
    df = df[np.isfinite(df[measure].astype(float)) & np.isfinite(df[target].astype(float))]
    params = [p for p in params if p in df]
    levels = pd.DataFrame({p: bin_levels(df[p], n_bins).astype(str) for p in params},
                          index=df.index)
    out: dict[str, list[tuple[float, int]]] = {}
    small = 0
    for p in params:
        others = [q for q in params if q != p]
        key = levels[others].agg("\x1f".join, axis=1) if others else pd.Series("", df.index)
        found: list[tuple[float, int]] = []
        for idx in key.groupby(key, sort=False).groups.values():
            if len(idx) < 2 or levels.loc[idx, p].nunique() < 2:
                continue
            if len(idx) < min_group:
                small += 1
                continue
            t = kendall_tau(df.loc[idx, measure], df.loc[idx, target])
            if np.isfinite(t):
                found.append((t, len(idx)))
        out[p] = found
    return out, small


def granulated_psi(trials: pd.DataFrame, measure: str, target: str, params: Sequence[str],
                   n_bins: int = 3, group: str = TRIAL_KEY,
                   min_group: int = 2) -> dict[str, tuple[float, int]]:
    """psi_i for each param i: (mean within-group Kendall's tau, number of groups used);
    (NaN, 0) where no group qualifies. `min_group=2` is Jiang et al.'s definition."""
    taus, _ = group_taus(trials, measure, target, params, n_bins, group, min_group)
    return {p: (float(np.mean([t for t, _ in g])), len(g)) if g else (float("nan"), 0)
            for p, g in taus.items()}


def granulated_kendall_tau(trials_df: pd.DataFrame, measure: str, target: str,
                           params: Sequence[str], n_bins: int = 3,
                           group: str = TRIAL_KEY, min_group: int = 2) -> float:
    """Jiang et al.'s granulated Kendall's tau: the mean of psi_i over the params with at least
    one group of trials that differ only in param i; NaN if there is none."""
    psi = [v for v, n in granulated_psi(trials_df, measure, target, params, n_bins,
                                        group, min_group).values() if n]
    return float(np.mean(psi)) if psi else float("nan")


def granulated_stat(taus: Sequence[FloatArray]) -> FloatArray:
    """The granulated tau from each used param's group taus: the mean over params of the mean
    over groups (the last axis). 1-d arrays give a 0-d result, (n_boot, groups) arrays one
    value per resample."""
    return np.asarray(np.mean([t.mean(axis=-1) for t in taus], axis=0), dtype=np.float64)


def stratified_se(taus: Sequence[FloatArray]) -> tuple[float, float]:
    """The standard error of `granulated_stat` (a mean over params of each param's mean group
    tau, the params' groups independent samples) and its Welch-Satterthwaite degrees of
    freedom: se = sqrt(sum_i s_i^2 / k_i) / P over the P params with k_i groups each."""
    v = np.array([np.var(t, ddof=1) / len(t) for t in taus])
    se = float(np.sqrt(v.sum()) / len(taus))
    k = np.array([len(t) for t in taus], dtype=float)
    df = float(v.sum() ** 2 / np.sum(v**2 / (k - 1))) if v.sum() > 0 else float("inf")
    return se, df


def granulated_ci(taus: Sequence[FloatArray], level: float = CI_LEVEL
                  ) -> tuple[float, float]:
    """Stratified t interval of `granulated_stat` (`stratified_se`); NaN when there is no
    group or a param has fewer than `MIN_GROUPS_CI` groups. A percentile bootstrap over groups
    covered far below its level at few groups (2 groups: about 44% for a 95% interval, 3:
    61%; this interval at 3 groups: 93%, by simulation)."""
    if not taus or min(len(t) for t in taus) < MIN_GROUPS_CI:
        return float("nan"), float("nan")
    est = float(granulated_stat(taus))
    se, df = stratified_se(taus)
    q = float(stats.t.ppf(0.5 + level / 2, df)) if np.isfinite(df) else float(
        stats.norm.ppf(0.5 + level / 2))
    return max(-1.0, est - q * se), min(1.0, est + q * se)


def percentile_ci(samples: npt.ArrayLike, level: float = CI_LEVEL) -> tuple[float, float]:
    """The central `level` percentile interval of the finite samples; NaN if fewer than half
    of them are finite."""
    s = np.asarray(samples, dtype=float).ravel()
    s = s[np.isfinite(s)]
    if len(s) == 0 or 2 * len(s) < np.asarray(samples).size:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo, hi = np.quantile(s, [a, 1 - a])
    return float(lo), float(hi)


def kendall_tau_ci(x: npt.ArrayLike, y: npt.ArrayLike, n_boot: int = N_BOOT, seed: int = 0,
                   level: float = CI_LEVEL) -> tuple[float, float]:
    """Trial-bootstrap interval of Kendall's tau-b over the pairs where both are finite."""
    xa = np.asarray(x, dtype=float)
    ya = np.asarray(y, dtype=float)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = len(xa)
    if n_boot <= 0 or n < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boot = [kendall_tau(xa[i], ya[i]) for i in idx]
    return percentile_ci(boot, level)


def measures_table(trials: pd.DataFrame, params: Sequence[str],
                   targets: Sequence[str] = ("gen_gap_acc",),
                   measures: Sequence[str] = DEFAULT_MEASURES, n_bins: int = 3,
                   group: str = TRIAL_KEY, *, n_boot: int = N_BOOT, seed: int = 0,
                   min_group: int = MIN_GROUP, level: float = CI_LEVEL) -> pd.DataFrame:
    """Kendall's tau and granulated Kendall's tau of each measure with each target over the
    per-trial seed means, with bootstrap intervals. Columns (`MEASURE_COLUMNS`): target,
    measure, kendall_tau, granulated_kendall_tau, p_value (of tau), n (trials), tau_low,
    tau_high (trial bootstrap), granulated_low, granulated_high (group bootstrap within params),
    n_groups (qualifying groups over all params: >= `min_group` trials, >= 2 values of the
    varied param, a defined tau), group_size (their median size), n_params_granulated (params
    with a qualifying group) and note (why a value is empty). Every row uses the generator
    `seed`, so a row does not depend on which other measures are present. Measures or targets
    not present are skipped."""
    present = [m for m in measures if m in trials]
    tgts = [t for t in targets if t in trials]
    df = trial_means(trials, list(dict.fromkeys([*present, *tgts])), group)
    binned = [p for p in params if p in df and is_binned(df[p])]  # grouped by their bins
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
                taus, small = group_taus(df, m, t, params, n_bins, group, min_group)
            used = {q: np.array([v for v, _ in g]) for q, g in taus.items() if g}
            sizes = [k for g in taus.values() for _, k in g]
            gran = float(granulated_stat(list(used.values()))) if used else float("nan")
            tau_lo, tau_hi = kendall_tau_ci(x, y, n_boot, seed, level)
            g_lo, g_hi = granulated_ci(list(used.values()), level)
            notes = []
            if n < 2:
                notes.append(f"fewer than 2 trials with both {m} and {t}: tau undefined")
            elif not np.isfinite(tau):
                const = m if np.nanmax(x) == np.nanmin(x) else t
                notes.append(f"{const} is constant across trials: tau undefined")
            elif not used:
                why = f"; {small} smaller groups not counted" if small else ""
                notes.append(f"no group of >= {min_group} trials that differ only in one "
                             f"param (after binning){why}: granulated tau undefined; "
                             f"{DESIGN_HINT}")
            if used and binned:
                notes.append(f"granulated tau over bins of {', '.join(binned)} (not exact "
                             "values: a correlation they drive can leak in)")
            if used and np.isnan(g_lo):
                few = [q for q, v in used.items() if len(v) < MIN_GROUPS_CI]
                notes.append(f"granulated interval undefined: fewer than {MIN_GROUPS_CI} "
                             f"groups for {', '.join(few)}")
            rows.append({"target": t, "measure": m, "kendall_tau": tau,
                         "granulated_kendall_tau": gran, "p_value": p, "n": n,
                         "tau_low": tau_lo, "tau_high": tau_hi, "granulated_low": g_lo,
                         "granulated_high": g_hi, "n_groups": len(sizes),
                         "group_size": float(np.median(sizes)) if sizes else float("nan"),
                         "n_params_granulated": len(used), "note": "; ".join(notes)})
    return pd.DataFrame(rows, columns=list(MEASURE_COLUMNS))
