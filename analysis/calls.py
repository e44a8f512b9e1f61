"""Calls on effects: `effect`, `negligible` or `inconclusive`, against a smallest effect of
interest and with the number of comparisons controlled (pure functions over the effects table).

Each row is a test of one level's contrast at one budget. For a report of m such rows:

1. Omnibus first: per (target, budget, param), a Wald test that all its levels share one
   adjusted mean (`p_family`), Holm-adjusted across the report's families (`q_family`).
2. Per row: a two-sided t-test of contrast = 0 with the bootstrap standard error on the
   regression's residual degrees of freedom `df` = n - rank (`p_value`), Holm-adjusted across
   the report's m rows (`q_value`; Holm 1979, "A Simple Sequentially Rejective Multiple Test
   Procedure").
3. A Bonferroni-adjusted interval `adj_low, adj_high` = contrast -+ t_df(1 - alpha / 2m) * se,
   simultaneous over the report's rows (normal quantiles where a table has no `df`). With
   normal quantiles, 12-trial null designs had an interval excluding 0 in 21% of reports.
4. The call, with delta the target's smallest effect of interest (`SweepSpec.min_effect`):
   `effect` when the family and the row are significant after adjustment and the adjusted
   interval lies entirely outside [-delta, delta] (a minimum-effect test); `negligible` when
   it lies entirely inside (an equivalence test, TOST at the adjusted level; Schuirmann 1987);
   else `inconclusive`. A level without enough support (fewer than `min_trials` trials,
   aliased with another param's level, no interval) is `inconclusive` whatever its numbers,
   and its `note` says why.

Under a global null the chance of any `effect` in a report is at most alpha (Bonferroni's
simultaneous interval must exclude 0); `mde` is the smallest |contrast| a row of that family
would call an effect with 80% power at the design's size: (t_df(1 - alpha / 2m) + t_df(0.8)) *
se, plus delta.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
POWER = 0.8
EFFECT, NEGLIGIBLE, INCONCLUSIVE = "effect", "negligible", "inconclusive"


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values (Holm 1979, "A simple sequentially rejective multiple test
    procedure"): the i-th smallest of m times (m - i + 1), made monotone, capped at 1; NaN
    stays NaN (not counted as a test). The values of statsmodels' `multipletests(p, method=
    "holm")` (tests/test_analysis_stats.py checks them), without the full garbage collection it
    runs on every call (a second or more in a large process, for each of a report's tables)."""
    p = np.asarray(p, dtype=float)
    flat, out = p.ravel(), np.full(p.size, np.nan)  # one family, whatever the shape
    ok = np.flatnonzero(np.isfinite(flat))
    order = ok[np.argsort(flat[ok], kind="stable")]
    m = len(order)
    out[order] = np.minimum(np.maximum.accumulate(flat[order] * np.arange(m, 0, -1)), 1.0)
    return out.reshape(p.shape)


def apply_calls(effects: pd.DataFrame, min_effect: dict[str, float],
                alpha: float = ALPHA) -> pd.DataFrame:
    """The effects table with q_value, q_family, adj_low/adj_high, delta, mde, call,
    beyond_noise (= call == "effect") and note added."""
    out = effects.copy()
    tests = np.isfinite(out["p_value"].to_numpy(float)) & (out["se"].to_numpy(float) > 0)
    m = max(int(tests.sum()), 1)
    out["q_value"] = holm(np.where(tests, out["p_value"], np.nan))
    fam_keys = ["target", "budget", "param"]
    fam = out.drop_duplicates(fam_keys)[[*fam_keys, "p_family"]].copy()
    fam["q_family"] = holm(fam["p_family"].to_numpy(float))
    out = out.drop(columns=["q_family"], errors="ignore").merge(
        fam[[*fam_keys, "q_family"]], on=fam_keys, how="left")
    # per row: t quantiles on its degrees of freedom (normal ones where the table has none)
    df = out["df"].to_numpy(float) if "df" in out else np.full(len(out), np.inf)
    df = np.where(np.isfinite(df) & (df > 0), df, np.inf)
    z, z_power = stats.t.ppf(1 - alpha / (2 * m), df), stats.t.ppf(POWER, df)
    se = out["se"].to_numpy(float)
    c = out["contrast"].to_numpy(float)
    out["adj_low"], out["adj_high"] = c - z * se, c + z * se
    out["delta"] = out["target"].map(lambda t: float(min_effect.get(t, 0.01)))
    out["mde"] = out.groupby(fam_keys)["se"].transform("median") * (z + z_power) + out["delta"]
    calls, notes = [], []
    supports = (out["support"].fillna("").astype(str) if "support" in out
                else pd.Series("", index=out.index))
    cols = [out[k].to_numpy(float) for k in ("adj_low", "adj_high", "delta", "q_family",
                                              "q_value")]
    for support, lo, hi, d, qf, q in zip(supports, *cols):
        if support or not (np.isfinite(lo) and np.isfinite(hi)):
            calls.append(INCONCLUSIVE)
            notes.append(support or "no interval")
        elif qf < alpha and q < alpha and (lo > d or hi < -d):
            calls.append(EFFECT)
            notes.append("")
        elif -d < lo and hi < d:
            calls.append(NEGLIGIBLE)
            notes.append(f"within +-{d:g}")
        else:
            calls.append(INCONCLUSIVE)
            notes.append("not detected" if lo <= 0 <= hi else
                         "its family is not significant after adjustment" if not qf < alpha
                         else "not significant after adjustment" if not q < alpha
                         else f"its adjusted interval excludes 0 but reaches into +-{d:g}")
    out["call"] = calls
    out["note"] = notes
    out["beyond_noise"] = out["call"] == EFFECT
    return out
