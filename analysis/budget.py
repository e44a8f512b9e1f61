"""Budget curves and learning-rate sensitivity: small pure functions over arrays and tables.

**Expected best value vs number of trials** (Dodge et al. 2019, "Show Your Work: Improved
Reporting of Experimental Results", EMNLP). For the N trials at one level of one param (the
per-trial seed means of the objective), the expected best value among n trials drawn from
them, n = 1..N. With v_(1) <= ... <= v_(N) sorted ascending, the best of the n draws is v_(i)
with probability w_n(i), and

    E[max] = sum_i w_n(i) v_(i),   Var[max] = sum_i w_n(i) v_(i)^2 - E[max]^2.

- without replacement (`replace=False`, the one the report uses): w_n(i) = C(i-1, n-1) / C(N, n)
  for i >= n. This is the exact average of the best value over all C(N, n) n-subsets of the
  observed trials, a U-statistic and hence an unbiased estimator of the expected best of n
  trials drawn from the same distribution (Tang et al. 2020, "Showing Your Work Doesn't Always
  Work", ACL). At n = 1 it is the mean, at n = N the observed best, and it stops at N: a budget
  beyond the trials run is not estimated.
- with replacement (`replace=True`, Dodge et al.'s formula): w_n(i) = (i/N)^n - ((i-1)/N)^n,
  the expected best of n draws from the empirical distribution. It draws one trial several
  times, so it is never above the unbiased version (at n = N it is below the observed best):
  biased low for n >= 2. Kept for comparison with published curves.

The weights come from log-binomials (one table of log k! by `scipy.special.gammaln`) and are
renormalized, so they neither overflow nor lose precision for thousands of trials; ties need
no care (the best of a subset is the same value whichever tied trial is in it). The band's
variance is summed as sum_i w_n(i) (v_(i) - E[max])^2, free of cancellation.

The band is the one Dodge et al. draw: the expected best +/- one standard deviation of the best
of n under the same sampling, clipped to the observed [min, max]. It shows how much the best of
an n-trial search varies from search to search, not the uncertainty of the curve itself (a
bootstrap over trials would); without replacement it shrinks to 0 at n = N.

Caveat: the curve treats the level's trials as exchangeable draws. A TPE/ASHA search samples
adaptively, so it describes the trials this sweep ran, not an independent random search; and
only completed (full-budget) trials enter (see `analysis.load`).

**LR sensitivity** (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
training instabilities", section 2.2). Their definition for a loss l over an LR range [a, b]
(searched on a log grid): E_{lr in [a, b]}[min(l(lr), l_0) - min_{lr in [a, b]} l(lr)], with
l_0 the loss at initialization capping divergent runs. Here the target at each level is
averaged per geometric (log-width) LR bin, and the sensitivity is the mean over the bins of
|bin mean - best bin mean| (best = max for accuracies, min for losses and gaps): the expected
shortfall from the best LR when the LR is drawn log-uniformly from the range. Diverged trials
never enter (`analysis.load` keeps completed trials only), which plays the role of the l_0
cap but can understate the sensitivity of levels that diverge at high LR.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import special, stats

from analysis.effects import studied_levels
from analysis.load import HIGHER_IS_BETTER, TRIAL_KEY, trial_means

__all__ = ["BUDGET_COLUMNS", "LR_COLUMNS", "LR_SUMMARY_COLUMNS", "budget_curves",
           "expected_max", "expected_max_curve", "lr_bins", "lr_sensitivity",
           "lr_sensitivity_summary", "max_weights"]

BUDGET_COLUMNS = ("metric", "param", "level", "n_trials", "mean", "low", "high", "n_level")
LR_COLUMNS = ("target", "param", "level", "lr_bin", "lr_low", "lr_high", "mean", "low",
              "high", "n")
LR_SUMMARY_COLUMNS = ("target", "param", "level", "best", "lr_best", "sensitivity", "n_bins",
                      "support", "n", "noise_floor")
NOISE_SIMS = 4000  # flat curves simulated for the LR sensitivity's noise floor
LR = "lr"
MODES = ("max", "min")

FloatArray = npt.NDArray[np.float64]


def _sorted_finite(values: npt.ArrayLike) -> FloatArray:
    v = np.asarray(values, dtype=float).ravel()
    return np.sort(v[np.isfinite(v)])


def _log_comb(N: int, a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]) -> FloatArray:
    """log C(a, b) (elementwise, -inf where not 0 <= b <= a <= N), from one table of
    log k! = gammaln(k + 1), k = 0..N."""
    lf = np.asarray(special.gammaln(np.arange(N + 1, dtype=float) + 1), dtype=float)
    ok = (b >= 0) & (b <= a)
    a_, b_ = np.where(ok, a, 0), np.where(ok, b, 0)
    return np.where(ok, lf[a_] - lf[b_] - lf[a_ - b_], -np.inf)


def max_weights(N: int, n: npt.ArrayLike, replace: bool = False) -> FloatArray:
    """P(the best of n draws is the i-th smallest of N values), shape (len(n), N) (or (N,) for a
    scalar n). Without replacement C(i-1, n-1) / C(N, n) (needs 1 <= n <= N), with replacement
    (i/N)^n - ((i-1)/N)^n (needs n >= 1). Rows sum to 1."""
    ns = np.asarray(n, dtype=float)
    scalar = ns.ndim == 0
    ns = np.atleast_1d(ns)
    if N < 1:
        raise ValueError("max_weights: need at least one value")
    if (ns < 1).any() or (ns != np.round(ns)).any():
        raise ValueError(f"max_weights: n must be a positive integer, got {n!r}")
    if replace:
        with np.errstate(divide="ignore"):
            log_cdf = np.log(np.arange(N + 1, dtype=float) / N)  # F(v_(i)) = i/N, i = 0..N
        w = np.diff(np.exp(ns[:, None] * log_cdf[None, :]), axis=1)
    else:
        if (ns > N).any():
            raise ValueError(f"max_weights: without replacement n <= N = {N}, got {n!r}")
        k = np.arange(1, N + 1, dtype=np.int64)[None, :]
        nn = ns.astype(np.int64)[:, None]
        w = np.exp(_log_comb(N, k - 1, nn - 1) - _log_comb(N, np.full_like(nn, N), nn))
    out: FloatArray = w / w.sum(axis=1, keepdims=True)  # sums to 1 exactly in theory
    return out[0] if scalar else out


def expected_max(values: npt.ArrayLike, n: int, replace: bool = False) -> float:
    """Expected best (maximum) of n trials drawn from `values` (non-finite values dropped):
    without replacement the average over all n-subsets (unbiased), with replacement Dodge et
    al.'s formula. NaN for no values; ValueError for n < 1 or, without replacement, n > N."""
    v = _sorted_finite(values)
    if v.size == 0:
        return float("nan")
    return float(max_weights(v.size, n, replace) @ v)


def expected_max_curve(values: npt.ArrayLike, replace: bool = False, n_max: int | None = None
                       ) -> tuple[npt.NDArray[np.int64], FloatArray, FloatArray, FloatArray]:
    """(n, mean, low, high) for n = 1..N (n_max, default N; without replacement at most N):
    the expected best of n draws and the band mean +/- the std of the best of n under the same
    sampling, clipped to the observed [min, max] (Dodge et al. 2019). Empty arrays for no
    finite values."""
    v = _sorted_finite(values)
    N = v.size
    if N == 0:
        e = np.empty(0)
        return np.empty(0, dtype=np.int64), e, e.copy(), e.copy()
    top = N if n_max is None else int(n_max)
    if not replace:
        top = min(top, N)
    ns = np.arange(1, top + 1, dtype=np.int64)
    w = max_weights(N, ns, replace)
    mean = w @ v
    sd = np.sqrt((w * (v[None, :] - mean[:, None]) ** 2).sum(axis=1))  # no cancellation
    low = np.maximum(mean - sd, v[0])
    high = np.minimum(mean + sd, v[-1])
    return ns, mean, low, high


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _per_trial_levels(trials: pd.DataFrame, params: list[str], columns: list[str],
                      n_bins: int, group: str, notes: list[str]
                      ) -> tuple[pd.DataFrame, dict[str, pd.Series]]:
    """Seed means per trial and each usable param's levels (binned over all trials, as in
    `effects_table`)."""
    per = trial_means(trials, columns, group).reset_index(drop=True)
    levels, more = studied_levels(per, list(params), n_bins)
    notes.extend(more)
    return per, levels


def budget_curves(trials: pd.DataFrame, params: list[str], metric: str, mode: str = "max",
                  group: str = TRIAL_KEY, n_bins: int = 3, replace: bool = False
                  ) -> pd.DataFrame:
    """Expected best `metric` vs number of trials, per level of every param.

    `trials`: one row per trial x seed (`Sweep.trials`); each trial counts once, with its seed
    mean of `metric`. Levels come from `bin_levels` (numeric params in `n_bins` quantile bins,
    as in the effects table). `mode`: "max" if higher is better, "min" for the expected lowest.
    Columns (`BUDGET_COLUMNS`): metric, param, level, n_trials (n = 1..n_level), mean (expected
    best of n), low, high (mean -/+ the std of the best of n, clipped to the level's observed
    range), n_level (trials at the level with a finite `metric`). Without replacement (default)
    the unbiased estimator; `replace=True`: Dodge et al.'s. `df.attrs["notes"]` lists what was
    skipped and why."""
    _check_mode(mode)
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    if metric not in trials or not trials[metric].notna().any():
        notes.append(f"{metric}: absent, no budget curves")
        params = []
    per, levels = _per_trial_levels(trials, params, [metric], n_bins, group, notes)
    sign = 1.0 if mode == "max" else -1.0
    for p, lev in levels.items():
        for lvl in lev.cat.categories:
            v = per.loc[(lev == lvl).to_numpy(), metric].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if v.size == 0:
                continue
            ns, mean, low, high = expected_max_curve(sign * v, replace=replace)
            if sign < 0:
                mean, low, high = -mean, -high, -low
            rows += [{"metric": metric, "param": p, "level": str(lvl), "n_trials": int(k),
                      "mean": float(m), "low": float(lo), "high": float(hi),
                      "n_level": int(v.size)}
                     for k, m, lo, hi in zip(ns, mean, low, high)]
    out = pd.DataFrame(rows, columns=list(BUDGET_COLUMNS))
    out.attrs["notes"] = notes
    out.attrs["mode"] = mode
    out.attrs["replace"] = replace
    return out


def lr_bins(lr: npt.ArrayLike, n_bins: int = 5) -> tuple[npt.NDArray[np.int64], FloatArray,
                                                          FloatArray, FloatArray]:
    """Geometric LR bins: (bin index per value, -1 where not positive and finite; centres;
    lower edges; upper edges). At most `n_bins` distinct LRs (a grid): one bin per value.
    Otherwise `n_bins` bins of equal width in log10 between the smallest and the largest LR
    (the last one closed), centred at the geometric mean of their edges."""
    x = np.asarray(lr, dtype=float).ravel()
    ok = np.isfinite(x) & (x > 0)
    idx = np.full(x.size, -1, dtype=np.int64)
    uniq = np.unique(x[ok])
    if uniq.size == 0:
        e = np.empty(0)
        return idx, e, e.copy(), e.copy()
    if uniq.size <= n_bins:
        idx[ok] = np.searchsorted(uniq, x[ok])
        return idx, uniq, uniq.copy(), uniq.copy()
    edges = np.logspace(np.log10(uniq[0]), np.log10(uniq[-1]), n_bins + 1)
    idx[ok] = np.clip(np.searchsorted(edges[1:-1], x[ok], side="right"), 0, n_bins - 1)
    return idx, np.sqrt(edges[:-1] * edges[1:]), edges[:-1].copy(), edges[1:].copy()


def _t_interval(v: FloatArray, level: float) -> tuple[float, float, float]:
    m = float(np.mean(v))
    if v.size < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf((1 + level) / 2, v.size - 1)) * float(np.std(v, ddof=1)) \
        / np.sqrt(v.size)
    return m, m - half, m + half


def lr_sensitivity(trials: pd.DataFrame, params: list[str], target: str, n_bins: int = 5,
                   group: str = TRIAL_KEY, level_bins: int = 3, lr: str = LR,
                   level: float = 0.95) -> pd.DataFrame:
    """`target` against the learning rate, per level of every other param.

    Needs `lr` among `params`. Each trial counts once (seed mean of `target`); trials are
    grouped by geometric LR bin (`lr_bins`, shared by all levels so their curves align) and by
    the level of each other param (`bin_levels` with `level_bins`, as in the effects table).
    Columns (`LR_COLUMNS`): target, param, level, lr_bin (geometric bin centre, or the LR
    itself on a grid), lr_low, lr_high (bin edges), mean (over the trials in the cell), low,
    high (two-sided `level` t-interval over those trials, mean +/- t_{n-1} sd/sqrt(n); NaN for
    n = 1), n (trials in the cell). Raw (unadjusted) means: the other params are not held
    fixed. `df.attrs["notes"]` says what was skipped and why."""
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    ok = lr in params and lr in trials and target in trials and trials[target].notna().any()
    if not ok:
        why = (f"{lr} is not a varied param" if lr not in params or lr not in trials
               else f"{target}: absent")
        notes.append(f"{why}: no LR sensitivity")
    others = [p for p in params if p != lr] if ok else []
    per, levels = _per_trial_levels(trials, others, [target], level_bins, group, notes)
    if ok:
        idx, centre, lo_e, hi_e = lr_bins(per[lr].to_numpy(dtype=float), n_bins)
        y = per[target].to_numpy(dtype=float)
        use = (idx >= 0) & np.isfinite(y)
        if not others:
            notes.append(f"no param other than {lr} varies: no per-level LR curves")
        for p, lev in levels.items():
            lab = lev.astype(str).to_numpy()
            for lvl in lev.cat.categories:
                at = use & (lab == str(lvl))
                for b in np.unique(idx[at]):
                    v = y[at & (idx == b)]
                    m, lo, hi = _t_interval(v, level)
                    rows.append({"target": target, "param": p, "level": str(lvl),
                                 "lr_bin": float(centre[b]), "lr_low": float(lo_e[b]),
                                 "lr_high": float(hi_e[b]), "mean": m, "low": lo, "high": hi,
                                 "n": int(v.size)})
    out = pd.DataFrame(rows, columns=list(LR_COLUMNS))
    out.attrs["notes"] = notes
    return out


def lr_sensitivity_targets(trials: pd.DataFrame, params: list[str], targets: Sequence[str]
                           ) -> pd.DataFrame:
    """`lr_sensitivity` of each distinct target in `targets` that `trials` has, in one table (a
    report's objective and the generalization gap: when the objective is the gap itself, its
    table once, not twice with every count doubled). Empty when none applies."""
    tables = [lr_sensitivity(trials, params, t) for t in dict.fromkeys(targets) if t in trials]
    tables = [t for t in tables if not t.empty]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def sensitivity(means: npt.ArrayLike, mode: str = "max") -> FloatArray:
    """Wortsman et al.'s LR sensitivity of bin means (the last axis): the mean over bins of
    |mean - best| (best: the highest for `mode` "max", the lowest for "min")."""
    v = np.asarray(means, dtype=float)
    best = v.max(axis=-1, keepdims=True) if mode == "max" else v.min(axis=-1, keepdims=True)
    return np.asarray(np.mean(np.abs(v - best), axis=-1), dtype=np.float64)


def sensitivity_noise_floor(se: npt.ArrayLike, mode: str = "max", sims: int = NOISE_SIMS,
                            seed: int = 0) -> float:
    """The expected `sensitivity` of a flat curve (every bin's true mean equal) whose bin means
    carry the standard errors `se`: simulated, seeded. NaN when a bin has no standard error
    (a single trial) or fewer than 2 bins."""
    s = np.asarray(se, dtype=float)
    if s.size < 2 or not np.isfinite(s).all():
        return float("nan")
    draws = np.random.default_rng(seed).normal(0.0, 1.0, (sims, s.size)) * s
    return float(np.mean(sensitivity(draws, mode)))


def _bin_se(bins: pd.DataFrame, level: float = 0.95) -> FloatArray:
    """Each bin's standard error under a flat curve: the trials' standard deviation pooled over
    the bins (each bin's from its t interval, `lr_sensitivity`'s low/high and n) over the
    square root of the bin's trials; NaN where no bin has 2 trials."""
    n = bins["n"].to_numpy(dtype=float)
    half = (bins["high"].to_numpy(dtype=float) - bins["low"].to_numpy(dtype=float)) / 2
    two = n >= 2
    if not two.any():
        return np.full(n.shape, np.nan)
    sd = half[two] / stats.t.ppf((1 + level) / 2, n[two] - 1) * np.sqrt(n[two])
    pooled = float(np.sqrt(np.sum((n[two] - 1) * sd**2) / np.sum(n[two] - 1)))
    return np.asarray(pooled / np.sqrt(n), dtype=np.float64)


def lr_sensitivity_summary(table: pd.DataFrame, mode: str | None = None) -> pd.DataFrame:
    """Wortsman et al.'s LR sensitivity per (target, param, level) of an `lr_sensitivity` table.

    mode: "max" (higher is better) or "min"; None takes it per target from `HIGHER_IS_BETTER`
    (unknown targets: "max"). sensitivity = mean over LR bins of |bin mean - best bin mean|,
    over the bins every level of the param has trials in ("shared" support, so levels are
    compared over the same LR range), or each level's own bins where fewer than 2 are shared
    ("own"). best, lr_best: the best bin mean over those bins and its bin centre; n_bins: bins
    used; n: trials in them; noise_floor: the sensitivity a flat curve would show with these
    bins' trials and the level's pooled trial spread (`sensitivity_noise_floor`): the best of
    noisy bin means is chosen by the noise, so sensitivity is above 0 even where the target
    ignores the LR, and more so for a level with fewer trials. Columns: `LR_SUMMARY_COLUMNS`."""
    rows: list[dict[str, Any]] = []
    if table is None or table.empty:
        return pd.DataFrame(rows, columns=list(LR_SUMMARY_COLUMNS))
    for (target, param), d in table.groupby(["target", "param"], sort=False):
        m = mode or ("max" if HIGHER_IS_BETTER.get(str(target), True) else "min")
        _check_mode(m)
        d = d.dropna(subset=["mean"])
        lv = list(dict.fromkeys(d["level"]))
        sets = [set(d.loc[d["level"] == x, "lr_bin"]) for x in lv]
        shared = set.intersection(*sets) if sets else set()
        for x in lv:
            c = d[d["level"] == x]
            support = "shared" if len(shared) >= 2 else "own"
            if support == "shared":
                c = c[c["lr_bin"].isin(shared)]
            vals = c["mean"].to_numpy(dtype=float)
            k = int(np.argmax(vals) if m == "max" else np.argmin(vals))
            best = float(vals[k])
            rows.append({"target": target, "param": param, "level": x, "best": best,
                         "lr_best": float(c["lr_bin"].iloc[k]),
                         "sensitivity": float(sensitivity(vals, m)),
                         "n_bins": len(vals), "support": support, "n": int(c["n"].sum()),
                         "noise_floor": sensitivity_noise_floor(_bin_se(c), m)})
    return pd.DataFrame(rows, columns=list(LR_SUMMARY_COLUMNS))
