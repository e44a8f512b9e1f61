"""Which design choices matter: hyperparameter importance with two Optuna evaluators.

- fANOVA (Hutter, Hoos & Leyton-Brown 2014, "An Efficient Approach for Assessing
  Hyperparameter Importance"): the share of the variance of a random-forest surrogate of the
  target explained by each param's main effect, over the whole search space.
- PED-ANOVA (Watanabe, Bansal & Hutter 2023, "PED-ANOVA: Efficiently Quantifying
  Hyperparameter Importance in Arbitrary Subspaces"): how much each param's distribution among
  the top-`target_quantile` trials (default: best 10%) differs from its distribution among all
  trials (Pearson divergence). It answers "what matters for reaching the best values", so the
  study direction must say which values are best: minimize for gaps, losses and ECE, maximize
  for accuracies (`HIGHER_IS_BETTER`). Being marginal, it inherits the sampling confounds that
  fANOVA's surrogate partly removes.

Both run on an in-memory Optuna study rebuilt from the per-trial seed means (one
`create_trial` per trial), with the varied params as distributions: as declared in the sweep's
search space where given (so `n_heads: [1, 2, 4, 8]` stays categorical and log flags are
exact), else categorical over the observed values (as strings if their types are mixed), or
Int/FloatDistribution over the observed range, on a log scale when the range is positive,
spans more than 10x and the values are spread evenly in log space (`_looks_log`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from analysis.load import TRIAL_KEY, trial_means
from study.metrics import HIGHER_IS_BETTER
from study.records import IMPORTANCE_COLUMNS, ParamSpec, SweepSpec

if TYPE_CHECKING:
    from optuna import Study

Direction = Literal["minimize", "maximize"]

MIN_TRIALS = 5


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v)
    return v


def _looks_log(x: np.ndarray) -> bool:
    """Positive, spanning more than 10x, and spread evenly on a log scale rather than a linear
    one (the median is nearer the geometric than the arithmetic midpoint, in log units): so a
    log-uniform temperature gets a log axis but a uniform dropout in [0.006, 0.3] does not."""
    lo, hi = float(x.min()), float(x.max())
    if lo <= 0 or hi / lo <= 10:
        return False
    med = float(np.median(x))
    return bool(abs(np.log(med) - 0.5 * np.log(lo * hi))
                < abs(np.log(med) - np.log((lo + hi) / 2)))


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


def _study(values: pd.DataFrame, dists: dict[str, Any], y: np.ndarray,
           direction: Direction) -> Study:
    import optuna

    study = optuna.create_study(direction=direction)
    trials = [optuna.trial.create_trial(
        params={p: values.at[i, p] for p in dists}, distributions=dists, value=float(v))
        for i, v in zip(values.index, y)]
    study.add_trials(trials)
    return study


def importance_table(trials: pd.DataFrame, params: list[str], targets: list[str],
                     seed: int = 0, group: str = TRIAL_KEY,
                     spec: SweepSpec | None = None) -> pd.DataFrame:
    """Importance of each varied param for each target under fANOVA and PED-ANOVA.

    Columns: target, param, importance (normalized to sum to 1 per target and evaluator),
    evaluator ("fanova" | "ped_anova"), rank (1 = most important), n_trials. `spec`: the
    sweep's search space (`Sweep.spec`) for the declared distributions. Targets absent,
    constant or with fewer than 5 trials are skipped; `df.attrs["notes"]` says why."""
    import optuna
    from optuna.importance import (
        FanovaImportanceEvaluator,
        PedAnovaImportanceEvaluator,
        get_param_importances,
    )

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    params = [p for p in params if p in trials]
    per_trial = trial_means(trials, [t for t in targets if t in trials], group).set_index(group)
    for target in targets:
        if target not in trials:
            notes.append(f"{target}: absent, skipped")
            continue
        y = per_trial[target]
        ok = y.notna().to_numpy()
        if ok.sum() < MIN_TRIALS:
            notes.append(f"{target}: {int(ok.sum())} trials with a value, fewer than "
                         f"{MIN_TRIALS}, skipped")
            continue
        if y[ok].nunique() < 2:
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
        study = _study(values, dists, y[ok].to_numpy(), direction)
        for name, evaluator in (("fanova", FanovaImportanceEvaluator(seed=seed)),
                                ("ped_anova", PedAnovaImportanceEvaluator())):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = get_param_importances(study, evaluator=evaluator, params=list(dists),
                                            normalize=True)
            ranked = sorted(dists, key=lambda p: -imp.get(p, 0.0))
            rows += [{"target": target, "param": p, "importance": float(imp.get(p, 0.0)),
                      "evaluator": name, "rank": ranked.index(p) + 1, "n_trials": int(ok.sum())}
                     for p in ranked]
    out = pd.DataFrame(rows, columns=list(IMPORTANCE_COLUMNS))
    out.attrs["notes"] = notes
    return out
