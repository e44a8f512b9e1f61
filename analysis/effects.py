"""Effects of design choices with confidence intervals: small pure functions over tidy tables.

In the spirit of rliable (Agarwal et al. 2021, "Deep Reinforcement Learning at the Edge of the
Statistical Precipice"): report interval estimates, not point estimates, and compare effects
with the seed-to-seed noise.

Why an adjusted model: a TPE search samples unevenly and its choices are correlated (it
concentrates on combinations that did well), so the raw mean of a target at one level of a
param mixes in the levels of the others (confounding). Here every varied param enters one
additive model, target ~ intercept + sum_p onehot(level_p), fit by least squares with a tiny
ridge penalty (which only picks among the equivalent codings of the one-hot blocks). The
adjusted mean of level l of param p is the model's partial dependence (Friedman 2001, "Greedy
Function Approximation", section 8.2): the mean prediction over the data with p set to l, the
other params kept as observed. Its contrast is PD(l) - mean of PD(other levels of p).

Intervals come from a two-stage cluster bootstrap (Davison & Hinkley 1997, "Bootstrap Methods
and their Application", section 3.8): resample trials with replacement, then each drawn trial's
seeds with replacement; refit; take 95% percentile intervals (Efron & Tibshirani 1993, "An
Introduction to the Bootstrap", chapter 13). All replicates are fit at once (batched normal
equations), so a whole table takes well under a second.
"""

from __future__ import annotations

import warnings
from typing import Any, SupportsFloat

import numpy as np
import pandas as pd

from analysis.load import TRIAL_KEY
from study.records import EFFECT_COLUMNS

RIDGE = 1e-6  # relative to the mean diagonal of X'X: only fixes the one-hot coding
MAX_LEVELS = 4  # numeric params with at most this many distinct values keep them as levels
MIN_VALID_BOOT = 0.5  # fewer valid replicates than this fraction -> no interval


def _fmt(x: SupportsFloat) -> str:
    v = float(x)
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.3g}"


def _is_missing(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # tuples and lists are values
        return False


def _label(v: object) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(_fmt(x) if isinstance(x, (int, float)) else str(x) for x in v)
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, float, np.integer, np.floating)):
        return _fmt(v)
    return str(v)


def bin_levels(values: pd.Series, n_bins: int = 3) -> pd.Series:
    """String level labels (an ordered categorical with the same index).

    Categorical, bool, str and tuple values are kept as they are; numeric values with at most
    4 distinct values keep them as levels ("1", "0.1"); other numeric values fall into
    `n_bins` quantile bins labelled "[lo, hi)" (the last "[lo, hi]"), ordered by value.
    Missing values get the level "NA" (last)."""
    s = pd.Series(values)
    missing = s.isna()
    numeric = (pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s))
    if not numeric:
        labels = s.map(lambda v: "NA" if _is_missing(v) else _label(v))
        present = s[~missing].drop_duplicates()
        try:
            ordered = sorted(present, key=lambda v: (isinstance(v, str), v))
        except TypeError:
            ordered = sorted(present, key=str)
        cats = list(dict.fromkeys(_label(v) for v in ordered))
    else:
        x = s.astype(float).to_numpy()
        ok = ~np.isnan(x)
        uniq = np.unique(x[ok])
        if len(uniq) <= MAX_LEVELS:
            cats = [_fmt(u) for u in uniq]
            lab = np.array([_fmt(v) if f else "NA" for v, f in zip(x, ok)], dtype=np.object_)
        else:
            edges = np.unique(np.quantile(x[ok], np.linspace(0, 1, n_bins + 1)))
            names = [f"[{_fmt(lo)}, {_fmt(hi)}{']' if i == len(edges) - 2 else ')'}"
                     for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
            idx = np.clip(np.searchsorted(edges[1:-1], np.where(ok, x, 0), side="right"),
                          0, len(names) - 1)
            cats = names
            lab = np.array([names[i] if f else "NA" for i, f in zip(idx, ok)],
                           dtype=np.object_)
        labels = pd.Series(lab, index=s.index)
    if missing.any():
        cats = [*cats, "NA"]
    return pd.Series(pd.Categorical(labels, categories=cats, ordered=True), index=s.index,
                     name=s.name)


def noise_floor(trials: pd.DataFrame, target: str, group: str = TRIAL_KEY) -> float:
    """The seed noise floor of `target`: the median over trials of the std (ddof=1) across the
    seeds of one configuration. Returns 0.0, with a warning, when no trial has 2 seeds."""
    g = trials.groupby(group, sort=False)[target]
    sd = g.std(ddof=1)[g.count() >= 2].dropna()
    if sd.empty:
        warnings.warn(f"{target}: one seed per trial, so the seed noise floor is unknown "
                      "(taken as 0); run sweeps with seeds >= 2", stacklevel=2)
        return 0.0
    return float(np.median(sd))


def _seed_matrix(trials: pd.DataFrame, targets: list[str], group: str
                 ) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """Trial keys, values (n_trials, max_seeds, n_targets) padded with NaN, and seed counts
    (n_trials, n_targets) of finite values (finite values packed first)."""
    keys = list(dict.fromkeys(trials[group]))
    pos = {k: i for i, k in enumerate(keys)}
    rows = trials[group].map(pos).to_numpy()
    rank = trials.groupby(group, sort=False).cumcount().to_numpy()
    smax = int(rank.max()) + 1
    vals = np.full((len(keys), smax, len(targets)), np.nan)
    vals[rows, rank] = trials[targets].to_numpy(dtype=float)
    # pack finite values first (a seed missing one metric) and count them per target
    finite = np.isfinite(vals)
    order = np.argsort(~finite, axis=1, kind="stable")
    vals = np.take_along_axis(vals, order, axis=1)
    return keys, vals, finite.sum(axis=1)


def _design(levels: dict[str, pd.Series]) -> tuple[np.ndarray, dict[str, list[int]],
                                                      dict[str, list[str]]]:
    """Intercept + one-hot blocks (levels present in the data) per param."""
    cols = [np.ones(len(next(iter(levels.values()))))]
    blocks: dict[str, list[int]] = {}
    names: dict[str, list[str]] = {}
    for p, lev in levels.items():
        present = [c for c in lev.cat.categories if (lev == c).any()]
        blocks[p] = list(range(len(cols), len(cols) + len(present)))
        names[p] = present
        cols += [(lev == c).to_numpy(dtype=float) for c in present]
    return np.column_stack(cols), blocks, names


def _solve(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Batched ridge (intercept unpenalized): X (..., n, p), y (..., n, T) -> beta (..., p, T).
    NaN where a replicate has no data for a column is left to the caller (beta is 0 there)."""
    A = np.einsum("...np,...nq->...pq", X, X)
    scale = np.mean(np.diagonal(A, axis1=-2, axis2=-1), axis=-1)[..., None, None]
    pen = np.eye(X.shape[-1])
    pen[0, 0] = 0.0
    A = A + RIDGE * scale * pen + 1e-12 * np.eye(X.shape[-1])
    return np.linalg.solve(A, np.einsum("...np,...nt->...pt", X, y))


def _pd_and_contrast(X: np.ndarray, beta: np.ndarray, blocks: dict[str, list[int]]
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Partial dependence of each level, (..., L, T), and its contrast with the other levels."""
    fit_mean = np.einsum("...p,...pt->...t", X.mean(axis=-2), beta)
    out = {}
    for p, cols in blocks.items():
        b = beta[..., cols, :]
        share = np.einsum("...p,...pt->...t", X[..., cols].mean(axis=-2), b)
        pdv = (fit_mean - share)[..., None, :] + b
        L = len(cols)
        contrast = pdv - (pdv.sum(axis=-2, keepdims=True) - pdv) / max(L - 1, 1)
        out[p] = (pdv, contrast)
    return out


def _bootstrap(X: np.ndarray, vals: np.ndarray, counts: np.ndarray, blocks: dict[str, list[int]],
               n_boot: int, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Two-stage cluster bootstrap: trials with replacement, then each drawn trial's seeds with
    replacement. Replicates missing a level of p get NaN for p's estimates."""
    n, smax, T = vals.shape
    idx = rng.integers(0, n, size=(n_boot, n))
    c = counts[idx]  # (B, n, T) seeds available per drawn trial and target
    draw = np.floor(rng.random((n_boot, n, smax, 1)) * c[:, :, None, :]).astype(int)
    draw = np.minimum(draw, np.maximum(c[:, :, None, :] - 1, 0))
    y = np.take_along_axis(vals[idx], draw, axis=2)  # (B, n, smax, T)
    keep = np.arange(smax)[None, None, :, None] < c[:, :, None, :]
    y = np.where(keep, y, 0.0).sum(axis=2) / np.maximum(c, 1)
    Xb = X[idx]
    beta = _solve(Xb, y)
    est = _pd_and_contrast(Xb, beta, blocks)
    present = Xb.sum(axis=1) > 0  # (B, p)
    for p, cols in blocks.items():
        ok = present[:, cols].all(axis=1)[:, None, None]
        pdv, con = est[p]
        est[p] = (np.where(ok, pdv, np.nan), np.where(ok, con, np.nan))
    return est


def _interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0, NaN-aware; NaN where too few valid replicates."""
    a = (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(samples, [100 * a, 100 * (1 - a)], axis=0)
    valid = np.mean(np.isfinite(samples), axis=0) >= MIN_VALID_BOOT
    return np.where(valid, lo, np.nan), np.where(valid, hi, np.nan)


def effects_table(trials: pd.DataFrame, params: list[str], targets: list[str],
                  n_boot: int = 1000, seed: int = 0, n_bins: int = 3,
                  group: str = TRIAL_KEY) -> pd.DataFrame:
    """Adjusted effect of every level of every param on every target, with 95% intervals.

    `trials`: one row per trial x seed (`Sweep.trials`); `group` names the trial column.
    Columns: target, param, level, mean, ci_low, ci_high, n, beyond_noise, then contrast,
    contrast_low, contrast_high, noise_floor, raw_mean, n_trials.
    mean/ci: the adjusted (partial dependence) mean of the level and its bootstrap interval;
    n: (trial, seed) rows at the level; beyond_noise: the contrast interval excludes 0 and
    |contrast| exceeds the seed noise floor; raw_mean: the unadjusted mean (confounded).
    Targets absent or constant and params with one level are skipped; `df.attrs["notes"]`
    says which and why."""
    notes: list[str] = []
    rng = np.random.default_rng(seed)
    use_targets = []
    for t in targets:
        if t not in trials or not trials[t].notna().any():
            notes.append(f"{t}: absent, skipped")
        elif trials[t].nunique(dropna=True) < 2:
            notes.append(f"{t}: constant, skipped")
        else:
            use_targets.append(t)
    keys, vals, counts = _seed_matrix(trials, use_targets, group) if use_targets else \
        ([], np.empty((0, 0, 0)), np.empty((0, 0), dtype=int))
    per_trial = trials.drop_duplicates(group).set_index(group).loc[keys] if keys else trials
    levels: dict[str, pd.Series] = {}
    for p in params:
        if p not in trials:
            notes.append(f"{p}: not a column, skipped")
            continue
        lev = bin_levels(per_trial[p], n_bins)
        if lev.nunique() < 2:
            notes.append(f"{p}: one level only, skipped")
            continue
        levels[p] = lev
    rows: list[dict[str, Any]] = []
    if not use_targets or not levels:
        out = pd.DataFrame(rows, columns=list(EFFECT_COLUMNS))
        out.attrs["notes"] = notes
        return out
    row_level = {p: trials[group].map(dict(zip(keys, levels[p].astype(str)))) for p in levels}
    floors = {}
    for t in use_targets:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            floors[t] = noise_floor(trials, t, group)
        if caught:
            notes.append(f"{t}: one seed per trial, so the noise floor is unknown (0) and "
                         "beyond_noise rests on the interval alone")
    # targets with the same trials/seeds available are fit together
    patterns: dict[bytes, list[int]] = {}
    for j in range(len(use_targets)):
        patterns.setdefault(counts[:, j].tobytes(), []).append(j)
    for tjs in patterns.values():
        cnt = counts[:, tjs]
        sel = cnt[:, 0] > 0
        X, blocks, names = _design({p: lev[sel] for p, lev in levels.items()})
        rank = np.linalg.matrix_rank(X)
        full = 1 + sum(len(c) - 1 for c in blocks.values())
        if rank < full:
            notes.append(f"{', '.join(use_targets[j] for j in tjs)}: some levels always occur "
                         "together, so their separate effects are not identified")
        v, c = vals[sel][:, :, tjs], cnt[sel]
        ybar = np.nansum(v, axis=1) / np.maximum(c, 1)
        point = _pd_and_contrast(X, _solve(X, ybar), blocks)
        boot = _bootstrap(X, v, c, blocks, n_boot, rng)
        for p, cols in blocks.items():
            if len(cols) < 2:
                notes.append(f"{p}: one level among the trials with "
                             f"{use_targets[tjs[0]]}, skipped for it")
                continue
            pdv, con = point[p]
            bpd, bcon = boot[p]
            pd_lo, pd_hi = _interval(bpd)
            c_lo, c_hi = _interval(bcon)
            n_tr = X[:, cols].sum(axis=0)
            for k, tj in enumerate(tjs):
                target = use_targets[tj]
                tv = trials[target]
                for li, lvl in enumerate(names[p]):
                    at = (row_level[p] == lvl) & tv.notna()
                    lo, hi = c_lo[li, k], c_hi[li, k]
                    excl = bool(np.isfinite(lo) and (lo > 0 or hi < 0))
                    rows.append({
                        "target": target, "param": p, "level": lvl,
                        "mean": float(pdv[li, k]), "ci_low": float(pd_lo[li, k]),
                        "ci_high": float(pd_hi[li, k]), "n": int(at.sum()),
                        "beyond_noise": excl and abs(float(con[li, k])) > floors[target],
                        "contrast": float(con[li, k]), "contrast_low": float(lo),
                        "contrast_high": float(hi), "noise_floor": floors[target],
                        "raw_mean": float(tv[at].mean()), "n_trials": int(n_tr[li])})
    out = pd.DataFrame(rows, columns=list(EFFECT_COLUMNS))
    order = {t: i for i, t in enumerate(use_targets)}
    porder = {p: i for i, p in enumerate(levels)}
    out = out.sort_values(["target", "param"], key=lambda s: s.map(order if s.name == "target"
                                                                   else porder),
                          kind="stable").reset_index(drop=True)
    out.attrs["notes"] = notes
    return out
