"""Which design choices matter: hyperparameter importance with two Optuna evaluators, each with
a bootstrap interval and a permutation null.

- fANOVA (Hutter, Hoos & Leyton-Brown 2014, "An Efficient Approach for Assessing
  Hyperparameter Importance"): the share of the variance of a random-forest surrogate of the
  target explained by each param's main effect, over the whole search space.
- PED-ANOVA (Watanabe, Bansal & Hutter 2023, "PED-ANOVA: Efficiently Quantifying
  Hyperparameter Importance in Arbitrary Subspaces"): how much each param's distribution among
  the top trials differs from its distribution among all trials (Pearson divergence). It
  answers "what matters for reaching the best values", so the study direction must say which
  values are best: minimize for gaps, losses and ECE, maximize for accuracies
  (`HIGHER_IS_BETTER`). Being marginal, it inherits the sampling confounds that fANOVA's
  surrogate partly removes. The top set is the best 10% of the trials but never fewer than
  `MIN_TOP` (`ped_top_size`): the best 10% of 18 trials would be 2 trials, whose divergence is
  noise. With fewer than `2 * MIN_TOP` trials PED-ANOVA is skipped (the top set would be more
  than half of them).

Both run on in-memory Optuna studies rebuilt from the per-trial seed means (one `create_trial`
per trial), with the varied params as distributions: as declared in the sweep's search space
where given (so `n_heads: [1, 2, 4, 8]` stays categorical and log flags are exact), else
categorical over the observed values (as strings if their types are mixed), or
Int/FloatDistribution over the observed range, on a log scale when the range is positive,
spans more than 10x and the values are spread evenly in log space (`_looks_log`).

Log scale. In the installed Optuna (5.0), `FanovaImportanceEvaluator` encodes the params with
`_SearchSpaceTransform(transform_log=False, ...)`: a `log=True` distribution reaches the forest
in raw units and fANOVA's marginals integrate uniformly over the raw range, so for a
learning rate in [1e-4, 1e-1] 90% of the integration volume is lr > 1e-2 and an effect linear
in log(lr) is mostly flat there and underweighted. fANOVA therefore gets every log param
(declared `log: true` or detected by `_looks_log`) as a linear FloatDistribution over
log(value) (`fanova_scale`), so the forest splits and its marginals integrate in log space.
PED-ANOVA already works in log space for `log=True` distributions (its Parzen estimator and
grid take log(value)), so it gets the distributions unchanged.

Uncertainty and null (per target, param and evaluator; all shares are the normalized
importances, summing to 1 per target and evaluator):
- `importance_low`, `importance_high`: the percentile interval (`CI`) of the importance over
  `n_boot` bootstrap resamples of the trials (with replacement); each fANOVA replicate also
  fits its forest with another seed, so the interval covers the forest's own randomness.
- `null_high`: the `NULL_QUANTILE` (95th) percentile of THIS param's importance over `n_perm`
  refits on the target shuffled across trials (the permutation null: no param matters, the
  params' joint distribution is kept). Per param rather than the max over params because the
  null share depends on the param's type: a forest fitted to noise splits more on continuous
  params than on a binary one, so a max-over-params null would be set by the continuous
  params and hide a binary one.
- `important`: `importance_low > null_high`, i.e. even the low end of the param's interval is
  above what it reaches under the null 95% of the time. This is stricter than `p_value < 0.05`
  and holds the false-positive rate low with several params without a multiplicity
  correction (no pure-noise target in the tests' checks flagged any param). Being shares, a
  real but secondary param next to a dominant one can fall below its null share (1/k on
  average with k params, more for continuous ones): on the planted sweep attn_dropout's real
  slope takes 0.04 of fANOVA against a null of about 0.56; the effects table (contrasts with
  CIs) is the test for small effects. PED-ANOVA's intervals are wide: its statistic rests on
  the ~5 top trials, and a resample can repeat them.
- `p_value`: (1 + #{permutations with importance >= the observed}) / (1 + n_perm).

Cost (measured on one core of a shared 2-core machine, CPU time): one fANOVA fit on 40 trials
x 5 params takes 0.13 s with `FANOVA_TREES` = 32 trees (0.26 s with Optuna's 64; the cost is
Optuna's pure-Python marginals and grows with the trees), PED-ANOVA about 10 ms, and a target
costs (1 + n_boot + n_perm) fits of each: with the defaults (30 + 30) about 11 s per target on
the planted store (tests/planted.py: 55 completed trials x 4 params), 90 s for its 8 report
targets, against about 1 s per target for the point estimates alone. 32 trees move the planted
shares by under 0.003 from 64 (the forest seed's own spread), and the replicates' forest
seeds put that spread into the interval and the null anyway.
`n_boot=0` and/or `n_perm=0` skip the interval and/or the null (their columns are NaN and
`important` is False).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from analysis.load import TRIAL_KEY, trial_means
from study.metrics import HIGHER_IS_BETTER
from study.records import IMPORTANCE_COLUMNS, ParamSpec, SweepSpec

if TYPE_CHECKING:
    from optuna import Study

Direction = Literal["minimize", "maximize"]

MIN_TRIALS = 5  # a target with fewer trials is skipped
MIN_TOP = 5  # PED-ANOVA's top set holds at least this many trials ...
TOP_SHARE = 0.1  # ... and at least this share of them (Optuna's default target_quantile)
N_BOOT = 30  # bootstrap resamples of the trials per target (the interval)
N_PERM = 30  # shuffles of the target per target (the null)
CI = 0.95  # the bootstrap percentile interval's coverage
NULL_QUANTILE = 0.95  # null_high: this quantile of the param's importance under the null
ALPHA = 1 - NULL_QUANTILE  # `important` also needs its permutation p-value at most this
FANOVA_TREES = 32  # trees per fANOVA forest (Optuna: 64; 32 halves the cost, see Cost)
EVALUATORS = ("fanova", "ped_anova")
MAX_WORKERS = 8  # processes for the fits of `importance_table` (default; fewer CPUs: fewer)
MIN_POOL_FITS = 100  # fewer fits run in one process (~0.2 s each; starting 2 workers: ~3 s)


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v)
    return v


def _ks_uniform(x: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between the values, rescaled to [0, 1] by their range, and
    the uniform distribution on [0, 1]."""
    u = np.sort((x - x.min()) / (x.max() - x.min()))
    i = np.arange(1, u.size + 1) / u.size
    return float(max(np.max(i - u), np.max(u - (i - 1 / u.size))))


def _looks_log(x: np.ndarray) -> bool:
    """Positive, spanning more than 10x, and spread more evenly on a log scale than on a linear
    one (a smaller Kolmogorov-Smirnov distance to the uniform over the observed range in log
    units than in raw units): so a log-uniform temperature gets a log axis but a uniform
    dropout in [0.006, 0.3] does not. On 10 draws of lr log-uniform in [1e-4, 1e-1] this
    misses 6% (the median-vs-midpoints rule it replaces: 17%) and calls 8% (5%) of 10 draws
    uniform in [0.006, 0.3] log; on 40 draws both are right in over 99%."""
    lo, hi = float(x.min()), float(x.max())
    if lo <= 0 or hi / lo <= 10:
        return False
    return _ks_uniform(np.log(x)) < _ks_uniform(x)


def _declared(spec: ParamSpec, observed: pd.Series) -> Any:
    """The distribution a search-space param declares, or None if the observed values (e.g. a
    conditional param's default when inactive) do not all fit it."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if spec.kind == "categorical":
        choices = [_plain(v) for v in spec.values]
        return CategoricalDistribution(choices) if set(observed) <= set(choices) else None
    try:
        if spec.kind == "int":
            dist: Any = IntDistribution(int(spec.low), int(spec.high), log=spec.log,
                                        step=int(spec.step or 1))
        else:
            dist = FloatDistribution(float(spec.low), float(spec.high), log=spec.log,
                                     step=None if spec.log or spec.step is None
                                     else float(spec.step))
    except (TypeError, ValueError):
        return None
    x = observed.to_numpy(dtype=float)
    inside = bool(np.all((x >= dist.low) & (x <= dist.high)))
    return dist if inside and (spec.kind == "float" or np.all(x == np.round(x))) else None


def distributions(per_trial: pd.DataFrame, params: list[str], spec: SweepSpec | None = None
                  ) -> tuple[dict[str, Any], pd.DataFrame]:
    """Optuna distributions for the varied params, and the values to give `create_trial`.

    A param declared in the sweep's search space (`spec`, from `Sweep.spec`) gets
    the declared distribution when all observed values fit it; otherwise: categorical over the
    observed values (as strings if their types are mixed), or Int/FloatDistribution over the
    observed range (log scale where `_looks_log`)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    dists: dict[str, Any] = {}
    values = pd.DataFrame(index=per_trial.index)
    for p in params:
        col = per_trial[p].map(_plain)
        kinds = {type(v) for v in col}
        numeric = kinds <= {int, float}
        if numeric and kinds != {int}:
            col = col.astype(float)
        if col.nunique() < 2:
            continue
        declared = spec.param(p) if spec is not None else None
        dist = _declared(declared, col) if declared is not None else None
        if dist is not None:
            dists[p] = dist
            values[p] = col.astype(object) if isinstance(dist, CategoricalDistribution) else col
            continue
        if numeric:
            x = col.to_numpy(dtype=float)
            log = _looks_log(x)
            if kinds == {int}:
                dists[p] = IntDistribution(int(x.min()), int(x.max()), log=log)
            else:
                dists[p] = FloatDistribution(float(x.min()), float(x.max()), log=log)
            values[p] = col
            continue
        if len(kinds) > 1 or not kinds <= {str, bool}:
            col = col.map(str)
        dists[p] = CategoricalDistribution(sorted(set(col), key=str))
        values[p] = col
    return dists, values


def ped_top_size(n: int) -> int | None:
    """How many of `n` trials PED-ANOVA's top set holds: the best `TOP_SHARE` (10%), but at
    least `MIN_TOP`; None when that would be more than half of them (n < 2 * MIN_TOP), where
    "top" no longer means anything and PED-ANOVA is skipped."""
    k = max(MIN_TOP, math.ceil(round(TOP_SHARE * n, 9)))
    return k if 2 * k <= n else None


def ped_quantile(n: int) -> float | None:
    """The `target_quantile` that makes Optuna's PED-ANOVA keep exactly `ped_top_size(n)` of
    `n` trials (it keeps the best ceil(q * n), plus ties): (k - 0.5) / n, so that rounding
    cannot add a trial (5 / 18 * 18 may exceed 5 in floating point)."""
    k = ped_top_size(n)
    return None if k is None else (k - 0.5) / n


def fanova_scale(dists: dict[str, Any], values: pd.DataFrame
                 ) -> tuple[dict[str, Any], pd.DataFrame]:
    """fANOVA's view of the params: every `log=True` Int/FloatDistribution becomes a linear
    FloatDistribution over log(value), with the values logged (Optuna's fANOVA would otherwise
    fit and integrate them in raw units: see the module docstring); others unchanged."""
    from optuna.distributions import FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    vals = values.copy()
    for p, dist in dists.items():
        if isinstance(dist, (FloatDistribution, IntDistribution)) and dist.log:
            out[p] = FloatDistribution(math.log(dist.low), math.log(dist.high))
            vals[p] = np.log(values[p].to_numpy(dtype=float))
        else:
            out[p] = dist
    return out, vals


@dataclass
class _Space:
    """The params of one evaluator: distributions, and each trial's values for create_trial."""

    dists: dict[str, Any]
    rows: list[dict[str, Any]]

    @classmethod
    def of(cls, dists: dict[str, Any], values: pd.DataFrame) -> _Space:
        cols = {p: values[p].tolist() for p in dists}
        return cls(dists, [{p: cols[p][i] for p in dists} for i in range(len(values))])


def _study(space: _Space, idx: Sequence[int] | np.ndarray, y: np.ndarray,
           direction: Direction) -> Study:
    """An in-memory study holding trials `idx` (repeats allowed) with target values `y`."""
    import optuna

    study = optuna.create_study(direction=direction)
    study.add_trials([optuna.trial.create_trial(params=space.rows[int(i)],
                                                distributions=space.dists, value=float(v))
                      for i, v in zip(idx, y)])
    return study


def _importances(evaluator: str, space: _Space, idx: Sequence[int] | np.ndarray,
                 y: np.ndarray, direction: Direction, seed: int, quantile: float
                 ) -> np.ndarray:
    """Normalized importance of each param of `space` (in its order) for trials `idx` with
    target values `y`; NaN where the evaluator cannot be fitted (fANOVA on a resample whose
    target is constant)."""
    from optuna.importance import (
        FanovaImportanceEvaluator,
        PedAnovaImportanceEvaluator,
        get_param_importances,
    )

    study = _study(space, idx, y, direction)
    ev: Any = (FanovaImportanceEvaluator(n_trees=FANOVA_TREES, seed=seed)
               if evaluator == "fanova" else PedAnovaImportanceEvaluator(target_quantile=quantile))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            imp = get_param_importances(study, evaluator=ev, params=list(space.dists),
                                        normalize=True)
        except RuntimeError:  # fANOVA: "Encountered zero total variance in all trees."
            return np.full(len(space.dists), np.nan)
    return np.array([float(imp.get(p, 0.0)) for p in space.dists])


def _percentile(x: np.ndarray, q: float) -> np.ndarray:
    """Per column, the q-th percentile of the finite rows (NaN where none is)."""
    out = np.full(x.shape[1], np.nan)
    for j in range(x.shape[1]):
        col = x[:, j][np.isfinite(x[:, j])]
        if col.size:
            out[j] = np.percentile(col, q)
    return out


def importance_table(trials: pd.DataFrame, params: list[str], targets: list[str],
                     seed: int = 0, group: str = TRIAL_KEY,
                     spec: SweepSpec | None = None, n_boot: int = N_BOOT,
                     n_perm: int = N_PERM, workers: int | None = None) -> pd.DataFrame:
    """Importance of each varied param for each target under fANOVA and PED-ANOVA, with a
    bootstrap interval and a permutation null (see the module docstring).

    Columns (`IMPORTANCE_COLUMNS`): target, param, importance (normalized to sum to 1 per
    target and evaluator), evaluator ("fanova" | "ped_anova"), rank (1 = most important),
    n_trials, importance_low, importance_high (the `CI` bootstrap percentile interval over
    `n_boot` resamples of the trials), null_high (the `NULL_QUANTILE` quantile of the param's
    importance over `n_perm` shuffles of the target), important (importance_low > null_high),
    p_value (permutation p-value, +1 corrected). `spec`: the sweep's search space
    (`Sweep.spec`) for the declared distributions. `seed` fixes the resamples, the shuffles and
    the forests. Targets absent, constant or with fewer than `MIN_TRIALS` trials are skipped,
    and PED-ANOVA with fewer than `2 * MIN_TOP`; `df.attrs["notes"]` says why. The fANOVA fits
    run in `workers` processes (None: `MAX_WORKERS`, or one below `MIN_POOL_FITS` fits; never
    more than the CPUs this process may use or the fits; the same values as one gives)."""
    jobs = (1 + n_boot + n_perm) * sum(t in trials for t in targets)  # fANOVA fits at most
    if workers is None:  # below MIN_POOL_FITS, less work than starting the processes
        workers = 1 if jobs < MIN_POOL_FITS else MAX_WORKERS
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with _fit_pool(min(workers, jobs, cpus or 1)) as pool:
        return _importance_table(trials, params, targets, seed, group, spec, n_boot, n_perm,
                                 pool)


@contextlib.contextmanager
def _fit_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """`workers` processes for the fANOVA fits, or None for one: spawned, not forked (the
    caller may hold MLflow's threads and connections). Each imports Optuna, scikit-learn and
    pandas (~200 MB): `MAX_WORKERS` at most by default."""
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_quiet_optuna) as pool:
        yield pool


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _fit(job: tuple[Any, ...]) -> np.ndarray:
    return _importances(*job)


def _importance_table(trials: pd.DataFrame, params: list[str], targets: list[str], seed: int,
                      group: str, spec: SweepSpec | None, n_boot: int, n_perm: int,
                      pool: ProcessPoolExecutor | None) -> pd.DataFrame:
    _quiet_optuna()
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    params = [p for p in params if p in trials]
    per_trial = trial_means(trials, [t for t in targets if t in trials], group).set_index(group)
    for t_index, target in enumerate(targets):
        if target not in trials:
            notes.append(f"{target}: absent, skipped")
            continue
        y_all = per_trial[target]
        ok = y_all.notna().to_numpy()
        n = int(ok.sum())
        if n < MIN_TRIALS:
            notes.append(f"{target}: {n} trials with a value, fewer than "
                         f"{MIN_TRIALS}, skipped")
            continue
        if y_all[ok].nunique() < 2:
            notes.append(f"{target}: constant, skipped")
            continue
        dists, values = distributions(per_trial[ok], params, spec)
        if not dists:
            notes.append(f"{target}: no param varies among its trials, skipped")
            continue
        higher = HIGHER_IS_BETTER.get(target)
        if higher is None:
            notes.append(f"{target}: no known direction; PED-ANOVA takes higher as better")
        direction: Direction = "minimize" if higher is False else "maximize"
        spaces = {"fanova": _Space.of(*fanova_scale(dists, values)),
                  "ped_anova": _Space.of(dists, values)}
        quantile = ped_quantile(n)
        if quantile is None:
            notes.append(f"{target}: {n} trials, fewer than {2 * MIN_TOP}: PED-ANOVA skipped "
                         f"(its top set needs at least {MIN_TOP} trials and at most half)")
        elif ped_top_size(n) != math.ceil(round(TOP_SHARE * n, 9)):
            notes.append(f"{target}: PED-ANOVA's top set is the best {ped_top_size(n)} of "
                         f"{n} trials (at least {MIN_TOP}, not {TOP_SHARE:.0%})")
        y = y_all[ok].to_numpy(dtype=float)
        everyone = np.arange(n)
        rng = np.random.default_rng([seed, t_index])
        resamples = rng.integers(0, n, size=(n_boot, n))
        shuffles = [rng.permutation(y) for _ in range(n_perm)]
        for name in EVALUATORS:
            if name == "ped_anova" and quantile is None:
                continue
            space, q = spaces[name], quantile or TOP_SHARE
            # the estimate, its n_boot resamples, its n_perm shuffles: independent fits, each
            # with its own forest seed (so spread over processes they give the loop's values)
            jobs = [(name, space, everyone, y, direction, seed, q),
                    *((name, space, idx, y[idx], direction, seed + 1 + b, q)
                      for b, idx in enumerate(resamples)),
                    *((name, space, everyone, ys, direction, seed + 1 + n_boot + k, q)
                      for k, ys in enumerate(shuffles))]
            fits = np.array(list(pool.map(_fit, jobs)) if pool and name == "fanova"
                            else [_fit(j) for j in jobs]).reshape(len(jobs), len(dists))
            imp, boot, null = fits[0], fits[1:1 + n_boot], fits[1 + n_boot:]
            low = _percentile(boot, 50 * (1 - CI))
            high = _percentile(boot, 50 * (1 + CI))
            null_high = _percentile(null, 100 * NULL_QUANTILE)
            fin = np.isfinite(null)
            p_value = ((1 + ((null >= imp - 1e-12) & fin).sum(axis=0))
                       / (1 + fin.sum(axis=0))) if n_perm else np.full(len(dists), np.nan)
            order = sorted(range(len(dists)), key=lambda j: -imp[j])
            for rank, j in enumerate(order, start=1):
                rows.append({
                    "target": target, "param": list(dists)[j], "importance": float(imp[j]),
                    "evaluator": name, "rank": rank, "n_trials": n,
                    "importance_low": float(low[j]), "importance_high": float(high[j]),
                    "null_high": float(null_high[j]),
                    # and p <= ALPHA: with few shuffles (under 19) the null's quantile is
                    # coarse, and p cannot reach it, so nothing is called important
                    "important": bool(low[j] > null_high[j] and p_value[j] <= ALPHA),
                    "p_value": float(p_value[j])})
    out = pd.DataFrame(rows, columns=list(IMPORTANCE_COLUMNS))
    out["important"] = out["important"].astype(bool)
    out.attrs["notes"] = notes
    out.attrs["n_boot"], out.attrs["n_perm"] = n_boot, n_perm
    return out
