"""What each effect estimates, and from which trials: budgets and the estimators behind them.

A report's effect holds at a budget (an epoch count). Which trials inform it depends on the
sweep's design (`SweepSpec.design`):

- `random`, `factorial`, `one_at_a_time`: no early stopping, so every trial that completed was
  trained the whole budget and none was selected on its outcome: the final values of the
  completed trials are the estimand's data ("complete case").
- `search` (TPE + ASHA): ASHA stops trials whose objective is low at a rung, so the completed
  trials are selected on the outcome and a completed-only contrast is biased (a level that
  learns faster but ends the same looks worse at the end: its weak configurations survive).
  ASHA decides only on observed values, so a stopped trial's later values are missing at random
  given what was observed of it (its curve up to the rung and its configuration). They are
  estimated by sequential regression imputation over the rungs, from the last rung down
  (iterated conditional expectations, as in Robins' g-computation for monotone dropout; see
  Tsiatis 2006, "Semiparametric Theory and Missing Data", ch. 9-10): at each rung, the value at
  the budget of the trials that went on (observed, or imputed at a later rung) is regressed on
  their objective and target at the rung and their configuration (one-hot levels), and the
  trials stopped at that rung get the prediction. The bootstrap repeats the whole imputation in
  every replicate, so intervals include its uncertainty.
- At a rung epoch (a "common budget") every trial that reached the rung is observed; trials
  stopped at an earlier rung are imputed the same way.

Diverged, errored and interrupted trials have no values at the budget; their share per level is
reported as an outcome of its own (`outcome_table`), never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.load import TRIAL_KEY
from study.records import Outcome

EARLY_STOPPING_DESIGNS = ("search",)
ESTIMATOR_COMPLETE = "complete-case (no early stopping)"
ESTIMATOR_OBSERVED = "observed at the budget (every trial reached it)"
ESTIMATOR_IMPUTED = "sequential regression imputation over ASHA rungs"
ESTIMATOR_COMPLETED_ONLY = "completed trials only (biased under early stopping)"
FINAL = "final"
ANALYSED = (Outcome.COMPLETED.value, Outcome.EARLY_STOPPED.value)
IMPUTE_RIDGE = 1e-6  # of the mean diagonal of Z'Z, as effects.RIDGE: the one-hot coding only


@dataclass(frozen=True)
class ImputeStep:
    """One rung of the sequential imputation: trials `fit` (went past the rung) teach a
    regression of the budget value on `covariates` (objective/target at the rung); trials
    `fill` (stopped at the rung) get its prediction."""

    rung: int
    covariates: np.ndarray  # (n, k); 0 where a trial did not reach the rung
    fit: np.ndarray  # (n,) bool
    fill: np.ndarray  # (n,) bool


@dataclass(frozen=True)
class BudgetData:
    """One target at one budget over the analysed trials (rows of `trial_ids`)."""

    target: str
    budget: str  # "final" or the epoch number
    epoch: int
    estimator: str
    trial_ids: list[str]
    y: np.ndarray  # (n,) the value at the budget; NaN where it must be imputed
    steps: list[ImputeStep] = field(default_factory=list)  # descending rungs

    @property
    def observed(self) -> np.ndarray:
        return np.asarray(np.isfinite(self.y), dtype=bool)


def _at_epoch(curves: pd.DataFrame, metric: str, epoch: int) -> pd.Series:
    if curves.empty or metric not in curves:
        return pd.Series(dtype=float)
    rows = curves[curves["epoch"] == epoch]
    out: pd.Series = rows.set_index(TRIAL_KEY)[metric].dropna()
    return out


def budget_data(trial_table: pd.DataFrame, curves: pd.DataFrame, target: str, epoch: int,
                final: bool, design: str, rungs: list[int], objective: str | None
                ) -> BudgetData | None:
    """The data of `target` at `epoch` (the final budget when `final`) and how it is
    estimated; None when no analysed trial has it."""
    t = trial_table[trial_table["outcome"].isin(ANALYSED)]
    if design not in EARLY_STOPPING_DESIGNS:
        t = t[t["outcome"] == Outcome.COMPLETED.value]
    if t.empty:
        return None
    ids = list(t[TRIAL_KEY])
    if final and target in t:
        done = (t["outcome"] == Outcome.COMPLETED.value).to_numpy()
        y = np.where(done, pd.to_numeric(t[target], errors="coerce").to_numpy(float), np.nan)
    else:
        y = _at_epoch(curves, target, epoch).reindex(ids).to_numpy(float)
    last = t["last_epoch"].to_numpy(int)
    if design not in EARLY_STOPPING_DESIGNS:
        keep = np.isfinite(y)
        return BudgetData(target, FINAL if final else str(epoch), epoch, ESTIMATOR_COMPLETE,
                          [i for i, k in zip(ids, keep) if k], y[keep])
    stopped_early = (last < epoch) & (t["outcome"] == Outcome.EARLY_STOPPED.value).to_numpy()
    # the rungs, and every epoch a trial was stopped at (a store without its spec passes no
    # rungs: its stopped trials were dropped, the estimate still called imputed)
    below = sorted({r for r in rungs if r < epoch} | {int(e) for e in last[stopped_early]})
    if not stopped_early.any():
        keep = np.isfinite(y)
        return BudgetData(target, FINAL if final else str(epoch), epoch, ESTIMATOR_OBSERVED,
                          [i for i, k in zip(ids, keep) if k], y[keep])
    steps = []
    for r in reversed(below):
        cov_names = [m for m in dict.fromkeys([objective, target]) if m]
        cols = [_at_epoch(curves, m, r).reindex(ids).to_numpy(float) for m in cov_names]
        cols = [c for c in cols if np.isfinite(c).any()]
        cov = np.column_stack(cols) if cols else np.zeros((len(ids), 0))
        reached = last >= r
        fill = stopped_early & (last == r)
        fit = reached & ~fill
        cov = np.where(np.isfinite(cov), cov, 0.0)
        steps.append(ImputeStep(r, cov, fit, fill))
    filled = np.zeros(len(ids), bool)
    for s in steps:
        filled |= s.fill
    keep = np.isfinite(y) | filled
    idx = np.flatnonzero(keep)
    steps = [ImputeStep(s.rung, s.covariates[idx], s.fit[idx], s.fill[idx]) for s in steps]
    return BudgetData(target, FINAL if final else str(epoch), epoch, ESTIMATOR_IMPUTED,
                      [ids[i] for i in idx], y[idx], steps)


def impute(X: np.ndarray, y: np.ndarray, steps: list[ImputeStep], idx: np.ndarray | None = None,
           ridge: float = IMPUTE_RIDGE) -> np.ndarray:
    """Sequential regression imputation, batched over bootstrap replicates.

    X: (n, p) design (intercept + one-hot levels); y: (n,) with NaN where imputed; idx:
    (B, n) resampled trial indices (None: the sample itself). Returns (B, n) values, NaN in a
    replicate whose rung had too few trials to fit (fewer than its regressors + 2). The ridge
    only resolves the one-hot coding: relative to the mean diagonal of the uncentred Z'Z it
    must stay far below a rung value's variance across trials (at 1e-3 it was as large, and
    flattened the slope that removes the survivors' bias: 0.021 for a planted 0.027)."""
    if idx is None:
        idx = np.arange(len(y))[None, :]
    yb = y[idx].astype(float)  # (B, n)
    bad = np.zeros(idx.shape[0], bool)
    for s in steps:
        Z = np.concatenate([X[idx], s.covariates[idx]], axis=-1)  # (B, n, q)
        w = s.fit[idx].astype(float)  # (B, n)
        target = np.where(s.fit[idx], yb, 0.0)
        Zw = Z * w[..., None]
        A = np.einsum("bnp,bnq->bpq", Zw, Z)
        scale = np.mean(np.diagonal(A, axis1=1, axis2=2), axis=1)[:, None, None]
        A = A + (ridge * np.maximum(scale, 1e-12) + 1e-9) * np.eye(Z.shape[-1])
        beta = np.linalg.solve(A, np.einsum("bnp,bn->bp", Zw, target)[..., None])[..., 0]
        pred = np.einsum("bnq,bq->bn", Z, beta)
        bad |= w.sum(axis=1) < Z.shape[-1] + 2
        yb = np.where(s.fill[idx], pred, yb)
    yb[bad] = np.nan
    return yb


def outcome_table(trial_table: pd.DataFrame, levels: dict[str, pd.Series]) -> pd.DataFrame:
    """Per level of each studied param: trials and how they ended (completed, early-stopped,
    diverged, error, interrupted), with the stop and divergence rates. A level that only
    early-stopped (or diverged) trials reached appears here with its rates."""
    rows = []
    outcomes = [o.value for o in Outcome]
    for p, lev in levels.items():
        for level in lev.cat.categories:
            at = trial_table.loc[lev[lev == level].index]
            n = len(at)
            if n == 0:
                continue
            counts = at["outcome"].value_counts()
            row = {"param": p, "level": str(level), "n_trials": n,
                   **{o: int(counts.get(o, 0)) for o in outcomes}}
            row["stop_rate"] = int(counts.get(Outcome.EARLY_STOPPED.value, 0)) / n
            row["divergence_rate"] = int(counts.get(Outcome.DIVERGED.value, 0)) / n
            rows.append(row)
    cols = ["param", "level", "n_trials", *outcomes, "stop_rate", "divergence_rate"]
    return pd.DataFrame(rows, columns=cols)
