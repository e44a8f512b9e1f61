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

The unit of resampling is the trial: each trial enters as the mean over its seeds (seed noise
stays inside its trial, counted once), trials are resampled with replacement, the model is
refit, and 95% percentile intervals are taken (Efron & Tibshirani 1993, "An Introduction to
the Bootstrap", chapter 13). Under early stopping the imputation of stopped trials
(`analysis/estimators.py`) is repeated inside every replicate. All replicates are fit at once
(batched normal equations). What each row estimates, at which budget and by which estimator,
is in its `budget` and `estimator` columns; the calls (`effect`, `negligible`, `inconclusive`)
against a smallest effect of interest, with multiplicity control, are made by
`analysis/calls.py`.
"""

from __future__ import annotations

import warnings
from typing import Any, SupportsFloat

import numpy as np
import pandas as pd
from scipy import stats

from analysis.calls import apply_calls
from analysis.estimators import (
    ESTIMATOR_COMPLETE,
    ESTIMATOR_IMPUTED,
    FINAL,
    BudgetData,
    budget_data,
    impute,
)
from analysis.load import TRIAL_KEY, Sweep, trial_means
from study.records import DEFAULT_MIN_EFFECT, EFFECT_COLUMNS, rung_epochs

RIDGE = 1e-6  # relative to the mean diagonal of X'X: only fixes the one-hot coding
MAX_LEVELS = 4  # numeric params with at most this many distinct values keep them as levels
MIN_VALID_BOOT = 0.5  # fewer valid replicates than this fraction -> no interval
MIN_TRIALS = 3  # trials a level needs for a call (SweepSpec.min_trials overrides)


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


def is_binned(values: pd.Series) -> bool:
    """Whether `bin_levels` puts `values` in quantile bins: numeric (not bool) with more than
    `MAX_LEVELS` distinct values."""
    s = pd.Series(values)
    return (pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
            and s.dropna().nunique() > MAX_LEVELS)


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
        if not is_binned(s):
            uniq = np.unique(x[ok])
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


def _interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0, NaN-aware; NaN where too few valid replicates."""
    a = (1 - level) / 2
    valid = np.mean(np.isfinite(samples), axis=0) >= MIN_VALID_BOOT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(samples, [100 * a, 100 * (1 - a)], axis=0)
    return np.where(valid, lo, np.nan), np.where(valid, hi, np.nan)


def _small_sample(n: int, rank: int, level: float = 0.95) -> tuple[float, float, int]:
    """The bootstrap's small-sample correction for a regression with `rank` coefficients on n
    trials: the percentile level of Hesterberg's expanded percentile interval (2015, "What
    Teachers Should Know About the Bootstrap", section 5.2), sqrt(n / (n - rank)) * t(n - rank)
    in normal units, the matching standard-error inflation sqrt(n / (n - rank)) and the
    residual degrees of freedom n - rank (at least 1) that the tests refer to."""
    df = max(n - rank, 1)
    inflate = float(np.sqrt(n / df))
    z = inflate * float(stats.t.ppf(0.5 + level / 2, df))
    return float(1 - 2 * stats.norm.sf(z)), inflate, df


def _omnibus(boot_pd: np.ndarray, point_pd: np.ndarray, inflate: float, df: int) -> float:
    """Wald test that all levels of a param have the same adjusted mean: the differences
    PD(l) - PD(first level), with their bootstrap covariance inflated as the standard errors are
    (`inflate`^2 = n / (n - rank)), as an F test on (L - 1, df) degrees of freedom, the
    small-sample form of the chi2(L - 1) Wald test (with two levels it is the row's t-test).
    Against chi2 with the raw covariance, 12 trials of a null design rejected 19% at 5%."""
    d = point_pd[1:] - point_pd[0]
    bd = boot_pd[:, 1:] - boot_pd[:, :1]
    bd = bd[np.isfinite(bd).all(axis=1)]
    if len(bd) < max(10, 2 * len(d)):
        return float("nan")
    cov = np.atleast_2d(np.cov(bd, rowvar=False)) * inflate**2
    try:
        w = float(d @ np.linalg.pinv(cov) @ d)
    except np.linalg.LinAlgError:
        return float("nan")
    return float(stats.f.sf(w / len(d), len(d), df))


def _aliases(X: np.ndarray, blocks: dict[str, list[int]], names: dict[str, list[str]]
             ) -> dict[tuple[str, int], str]:
    """Levels whose trials are exactly another param's level's trials: their effects cannot
    be told apart."""
    out: dict[tuple[str, int], str] = {}
    cols = [(p, i, X[:, c]) for p, cs in blocks.items() for i, c in enumerate(cs)]
    for p, i, col in cols:
        for q, j, other in cols:
            if q != p and np.array_equal(col, other):
                out[(p, i)] = f"{q}={names[q][j]}"
                break
    return out


def _budget_rows(bd: BudgetData, levels: dict[str, pd.Series], n_boot: int,
                 rng: np.random.Generator, min_trials: int,
                 seed_rows: pd.Series | None = None, n_seeds: int = 1
                 ) -> tuple[list[dict[str, Any]], list[str]]:
    """Effect rows of one target at one budget (no calls yet). `seed_rows`: the trial x seed
    rows of each completed trial; a trial stopped early (not in it) ran `n_seeds`."""
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    lev = {p: s.reindex(bd.trial_ids) for p, s in levels.items()}
    lev = {p: s for p, s in lev.items() if s.nunique() >= 2}
    where = f"{bd.target} at budget {bd.budget}"
    if not lev:
        notes.append(f"{where}: no param has two levels among its trials, skipped")
        return [], notes
    X, blocks, names = _design(lev)
    n = len(bd.y)
    y0 = impute(X, bd.y, bd.steps)[0] if bd.steps else bd.y
    if not np.isfinite(y0).all():
        notes.append(f"{where}: too few trials past a rung to impute the stopped ones, skipped")
        return [], notes
    point = _pd_and_contrast(X, _solve(X, y0[:, None]), blocks)
    idx = rng.integers(0, n, size=(n_boot, n))
    yb = impute(X, bd.y, bd.steps, idx) if bd.steps else bd.y[idx]
    Xb = X[idx]
    ok_rep = np.isfinite(yb).all(axis=1)
    beta = _solve(Xb, np.where(np.isfinite(yb), yb, 0.0)[..., None])
    boot = _pd_and_contrast(Xb, beta, blocks)
    present = Xb.sum(axis=1) > 0  # (B, p)
    completed_only = None
    if bd.estimator == ESTIMATOR_IMPUTED and bd.observed.sum() > X.shape[1]:
        obs = bd.observed
        Xo, bo, _ = _design({p: s[obs] for p, s in lev.items()})
        if all(len(bo[p]) == len(blocks[p]) for p in blocks):
            completed_only = _pd_and_contrast(Xo, _solve(Xo, bd.y[obs][:, None]), bo)
    aliases = _aliases(X, blocks, names)
    ci_level, inflate, df = _small_sample(n, int(np.linalg.matrix_rank(X)))
    for p, cols in blocks.items():
        ok = (present[:, cols].all(axis=1) & ok_rep)[:, None, None]
        bpd, bcon = (np.where(ok, a, np.nan)[..., 0] for a in boot[p])
        pdv, con = (a[..., 0] for a in point[p])
        pd_lo, pd_hi = _interval(bpd, ci_level)
        c_lo, c_hi = _interval(bcon, ci_level)
        # a robust standard error (half the central 68% range): a few replicates whose
        # imputation extrapolates far must not inflate it
        s_lo, s_hi = _interval(bcon, 0.6827)
        se = (s_hi - s_lo) / 2 * inflate
        p_family = _omnibus(bpd, pdv, inflate, df)
        n_tr = X[:, cols].sum(axis=0)
        first = len(rows)
        thin: list[tuple[str, str]] = []  # (level, why): levels every contrast of p rests on
        for li, level in enumerate(names[p]):
            at = X[:, cols[li]] > 0
            obs_at = at & bd.observed
            why = []
            if n_tr[li] < min_trials:
                why.append(f"{int(n_tr[li])} trial{'s' if n_tr[li] != 1 else ''} "
                           f"(fewer than min_trials={min_trials})")
            if (p, li) in aliases:
                why.append(f"aliased with {aliases[(p, li)]} (the same trials)")
            if why:
                thin.append((level, "; ".join(why)))
            if not np.isfinite(c_lo[li]):
                why.append("too few trials for an interval")
            blind = [st.rung for st in bd.steps
                     if (st.fill & at).any() and not (st.fit & at).any()]
            if blind:
                why.append(f"no trial at this level went on past epoch {blind[0]}, so its "
                           "stopped trials' later values cannot be estimated")
            # the rows behind the values observed at this budget (an imputed trial has none)
            ids = [t for t, a in zip(bd.trial_ids, at & bd.observed) if a]
            rows_at = int(seed_rows.reindex(ids).fillna(n_seeds).sum()) \
                if seed_rows is not None else len(ids)
            z = abs(float(con[li])) / float(se[li]) if se[li] > 0 else float("nan")
            rows.append({
                "target": bd.target, "param": p, "level": level,
                "mean": float(pdv[li]), "ci_low": float(pd_lo[li]), "ci_high": float(pd_hi[li]),
                "n": int(n_tr[li]), "contrast": float(con[li]),
                "contrast_low": float(c_lo[li]), "contrast_high": float(c_hi[li]),
                "raw_mean": float(np.mean(bd.y[obs_at])) if obs_at.any() else float("nan"),
                "n_trials": int(n_tr[li]), "budget": bd.budget, "estimator": bd.estimator,
                # a t-test on the residual degrees of freedom, as the intervals' expansion
                "p_value": float(2 * stats.t.sf(z, df)) if np.isfinite(z) else float("nan"),
                "df": df,
                "n_rows": rows_at, "n_imputed": int((at & ~bd.observed).sum()),
                "se": float(se[li]), "p_family": p_family,
                "contrast_completed_only": float(completed_only[p][1][li, 0])
                if completed_only is not None else float("nan"),
                "support": "; ".join(why)})
        _share_thin_support(rows[first:], p, thin)
    return rows, notes


def _share_thin_support(rows: list[dict[str, Any]], param: str,
                        thin: list[tuple[str, str]]) -> None:
    """A level's contrast is against the other levels of its param, so a level with too few
    trials, or aliased (`thin`: each such level and why), leaves every contrast of that param
    without support, not only its own (with two levels the other row is the same contrast,
    sign flipped: it was called an effect while its mirror was inconclusive). Adds that to the
    other rows' `support`, in place."""
    for r in rows:
        also = [f"its contrast rests on {param}={lv} too ({why})" for lv, why in thin
                if lv != r["level"]]
        if also:
            r["support"] = "; ".join([r["support"], *also] if r["support"] else also)


def _finish(rows_: list[dict[str, Any]], notes: list[str], min_effect: dict[str, float] | None,
            min_trials: int, floors: dict[str, float]) -> pd.DataFrame:
    out = pd.DataFrame(rows_)
    if out.empty:
        out = pd.DataFrame(columns=list(EFFECT_COLUMNS))
        out.attrs["notes"] = notes
        return out
    out["noise_floor"] = out["target"].map(floors).fillna(0.0)
    out = apply_calls(out, {**DEFAULT_MIN_EFFECT, **(min_effect or {})})
    out = out.reindex(columns=list(EFFECT_COLUMNS))
    out.attrs["notes"] = notes
    return out


def studied_levels(per_trial: pd.DataFrame, params: list[str], n_bins: int = 3
                   ) -> tuple[dict[str, pd.Series], list[str]]:
    """Each param's levels over the trials (`bin_levels`), params with one level left out;
    and notes saying which were left out and why."""
    notes, levels = [], {}
    for p in params:
        if p not in per_trial:
            notes.append(f"{p}: not a column, skipped")
            continue
        lev = bin_levels(per_trial[p], n_bins)
        if lev.nunique() < 2:
            notes.append(f"{p}: one level only, skipped")
            continue
        levels[p] = lev
    return levels, notes


def effects_table(trials: pd.DataFrame, params: list[str], targets: list[str],
                  n_boot: int = 1000, seed: int = 0, n_bins: int = 3,
                  group: str = TRIAL_KEY, min_effect: dict[str, float] | None = None,
                  min_trials: int = MIN_TRIALS) -> pd.DataFrame:
    """Adjusted effect of every level of every param on every target at the final budget, from
    trials that all trained the whole budget (complete case), with 95% intervals and calls.

    `trials`: one row per trial x seed (`Sweep.trials`); `group` names the trial column. Columns:
    `study.records.EFFECT_COLUMNS`. mean/ci: the level's adjusted (partial dependence) mean;
    contrast: it minus the mean of the other levels' (trial-bootstrap interval); n = n_trials:
    trials at the level; n_rows: trial x seed rows; raw_mean: the unadjusted mean
    (confounded); call / beyond_noise: see `analysis.calls`. Targets absent or constant and
    params with one level are skipped; `df.attrs["notes"]` says which and why."""
    notes: list[str] = []
    rng = np.random.default_rng(seed)
    use = [t for t in targets if t in trials and trials[t].notna().any()]
    notes += [f"{t}: absent, skipped" for t in targets if t not in use]
    const = [t for t in use if trials[t].nunique(dropna=True) < 2]
    notes += [f"{t}: constant, skipped" for t in const]
    use = [t for t in use if t not in const]
    per_trial = trial_means(trials, use, group).set_index(group)
    levels, lnotes = studied_levels(per_trial, params, n_bins)
    notes += lnotes
    seed_rows = trials.groupby(group, sort=False).size()
    floors = {t: _quiet_floor(trials, t, group) for t in use}
    out_rows: list[dict[str, Any]] = []
    if levels:
        for t in use:
            y = pd.to_numeric(per_trial[t], errors="coerce").to_numpy(float)
            keep = np.isfinite(y)
            bd = BudgetData(t, FINAL, 0, ESTIMATOR_COMPLETE,
                            [i for i, k in zip(per_trial.index, keep) if k], y[keep])
            r, nts = _budget_rows(bd, levels, n_boot, rng, min_trials, seed_rows)
            out_rows += r
            notes += nts
    return _finish(out_rows, notes, min_effect, min_trials, floors)


def _quiet_floor(trials: pd.DataFrame, target: str, group: str) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return noise_floor(trials, target, group)


def effects_report(sweep: Sweep, targets: list[str], n_boot: int = 1000, seed: int = 0,
                   n_bins: int = 3) -> pd.DataFrame:
    """Every report target at the final budget (all targets) and, for a search design, at
    each ASHA rung epoch (per-epoch targets), by the estimator the design calls for
    (`analysis/estimators.py`), with calls made across the whole table."""
    from analysis.load import CURVE_METRICS

    spec = sweep.spec
    design = sweep.design
    table = sweep.trial_table
    if table.empty:  # a store without the trial table: the completed trials alone
        return effects_table(sweep.trials, sweep.params, targets, n_boot, seed, n_bins,
                             min_effect=getattr(spec, "min_effect", None),
                             min_trials=int(getattr(spec, "min_trials", MIN_TRIALS)))
    min_trials = int(getattr(spec, "min_trials", MIN_TRIALS))
    analysed = table[table["outcome"].isin(("completed", "early_stopped"))]
    per_trial = analysed.set_index(TRIAL_KEY)
    levels, notes = studied_levels(per_trial, sweep.params, n_bins)
    epochs = int(spec.epochs) if spec else int(analysed["last_epoch"].max())
    stopped = analysed.loc[analysed["outcome"] == "early_stopped", "last_epoch"]
    # without the spec, the epochs its trials were stopped at stand for ASHA's rungs
    rungs = (rung_epochs(spec.grace_period, spec.reduction_factor, epochs) if spec
             else sorted({int(e) for e in stopped if int(e) < epochs}))
    objective = sweep.objectives[0][0] if sweep.objectives else None
    seed_rows = sweep.trials.groupby(TRIAL_KEY, sort=False).size() if not sweep.trials.empty \
        else None
    n_seeds = int(spec.seeds) if spec else int(seed_rows.max()) if seed_rows is not None else 1
    rng = np.random.default_rng(seed)
    floors = {t: _quiet_floor(sweep.trials, t, TRIAL_KEY) for t in targets
              if t in sweep.trials}
    out_rows: list[dict[str, Any]] = []
    budgets = [(epochs, True)]
    if design == "search":
        budgets += [(r, False) for r in rungs]
    for epoch, final in budgets:
        for t in targets:
            if not final and t not in CURVE_METRICS:
                continue
            bd = budget_data(table, sweep.curves, t, epoch, final, design, rungs, objective)
            if bd is None or len(bd.y) < 2 or np.nanstd(bd.y) == 0:
                continue
            r, nts = _budget_rows(bd, levels, n_boot, rng, min_trials, seed_rows, n_seeds)
            out_rows += r
            notes += nts
    return _finish(out_rows, notes, getattr(spec, "min_effect", None), min_trials, floors)
