"""A synthetic sweep with planted effects, written to MLflow through the product's `Tracker`.

The store has exactly the layout `study sweep` writes (parent run tagged `study.kind=sweep`,
one child run per trial with every `TrialConfig` field as a param, per-epoch seed means and
`_seed_std`, final per-seed `seed_<k>/<name>` values and `seed_<k>.json` tables), so the
analysis code can be tested against a known truth:

- `norm`: PLANTED, post_ln raises `gen_gap_acc` by +0.08.
- `attn_dropout` (uniform [0, 0.3]): small real effect, gap -= 0.1 * attn_dropout.
- `n_heads` in {1, 2, 4, 8}: NULL, but CONFOUNDED with norm: post_ln trials get n_heads=8
  far more often (a TPE-like concentration), so raw per-level means make n_heads=8 look like
  it raises the gap.
- `attn_temperature` (log-uniform [0.25, 4]): NULL.
- seed noise: each seed's gap = the trial's value + N(0, 0.01).
- measures: `attn_entropy` = 2 - 5 * gap + noise (planted NEGATIVE correlation with the gap),
  `grad_norm` is unrelated noise, `n_params` is constant.

Besides the completed trials there are 2 early-stopped (KILLED), 1 diverged (FAILED),
1 error (FAILED) and 1 still RUNNING run (no stop_reason).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from study.config import TrialConfig
from study.records import Outcome
from study.spaces import parse_space
from study.tracking import Tracker

NORM_EFFECT = 0.08  # gen_gap_acc(post_ln) - gen_gap_acc(pre_ln)
DROPOUT_SLOPE = -0.1  # d gen_gap_acc / d attn_dropout
SEED_NOISE = 0.01  # std of a seed's gap around its trial's value
BASE_GAP = 0.05
EPOCHS = 3
LENGTHS = (4, 8, 16, 32, 64)  # trained on 4..16, longer lengths are out of distribution
CORRUPTIONS = ("gaussian_noise", "shuffle")
NON_COMPLETED = {"early_stopped": 2, "diverged": 1, "error": 1, "running": 1}
HEADS = (1, 2, 4, 8)
# P(n_heads | norm): post_ln concentrates on 8 heads, pre_ln avoids it (the confound)
HEADS_P = {"post_ln": (0.05, 0.1, 0.15, 0.7), "pre_ln": (0.3, 0.3, 0.3, 0.1)}
P_POST = 0.4
SPACE_YAML = """# planted: synthetic sweep written by tests/planted.py (no training)
name: planted
task: copy
fixed: {d_model: 64, d_ff: 128, n_layers: 2, min_len: 4, max_len: 16}
params:
  norm: [pre_ln, post_ln]
  n_heads: [1, 2, 4, 8]
  attn_dropout: {type: float, low: 0.0, high: 0.3}
  attn_temperature: {type: float, low: 0.25, high: 4.0, log: true}
budget: {epochs: 3, grace_period: 1, reduction_factor: 3}
seeds: 3
objective: {metric: val_acc, mode: max}
searcher: tpe
"""
BASE = dict(task="copy", d_model=64, d_ff=128, n_layers=2, min_len=4, max_len=16,
            epochs=EPOCHS, seed=0)


def _sample_params(rng: np.random.Generator, norm: str | None = None,
                   heads: int | None = None) -> dict[str, Any]:
    norm = norm or ("post_ln" if rng.random() < P_POST else "pre_ln")
    heads = heads or int(rng.choice(HEADS, p=HEADS_P[norm]))
    cfg = TrialConfig(**BASE, norm=norm, n_heads=heads,
                      attn_dropout=float(rng.uniform(0.0, 0.3)),
                      attn_temperature=float(np.exp(rng.uniform(np.log(0.25), np.log(4.0)))))
    return cfg.to_dict()


def _seed_metrics(rng: np.random.Generator, p: dict[str, Any], seeds: int) -> list[dict]:
    """Final metrics of each seed, and their tables."""
    effect = NORM_EFFECT * (p["norm"] == "post_ln") + DROPOUT_SLOPE * p["attn_dropout"]
    out = []
    for _ in range(seeds):
        gap = BASE_GAP + effect + rng.normal(0, SEED_NOISE)
        test = float(np.clip(0.85 - 0.5 * effect + rng.normal(0, 0.01), 0, 1))
        train = float(np.clip(test + gap, 0, 1))
        gap = train - test
        train_loss = float(0.2 + rng.normal(0, 0.01))
        gap_loss = float(3 * gap + rng.normal(0, 0.02))
        entropy = float(2 - 5 * gap + rng.normal(0, 0.05))
        per_length = []
        for L in LENGTHS:
            decay = 0.75 ** max(0.0, np.log2(L / 16))
            acc = float(np.clip(test * decay + rng.normal(0, 0.01), 0, 1))
            per_length.append({"length": L, "acc": acc, "split": "id" if L <= 16 else "ood",
                               "n": 200})
        per_corr = [{"kind": k, "severity": s,
                     "acc": float(np.clip(test * (1 - 0.1 * s) + rng.normal(0, 0.01), 0, 1))}
                    for k in CORRUPTIONS for s in (1, 2, 3)]
        id_acc = float(np.mean([r["acc"] for r in per_length if r["split"] == "id"]))
        ood_acc = float(np.mean([r["acc"] for r in per_length if r["split"] == "ood"]))
        corrupt = float(np.mean([r["acc"] for r in per_corr]))
        m = {"train_loss": train_loss, "train_acc": train,
             "val_loss": train_loss + gap_loss + float(rng.normal(0, 0.01)),
             "val_acc": float(np.clip(test + rng.normal(0, 0.005), 0, 1)),
             "test_loss": train_loss + gap_loss, "test_acc": test,
             "gen_gap_acc": gap, "gen_gap_loss": gap_loss,
             "ece": float(abs(0.02 + 0.3 * gap + rng.normal(0, 0.005))),
             "attn_entropy": entropy,
             "attn_entropy_min": float(0.5 * entropy + rng.normal(0, 0.05)),
             "attn_max_logit": float(5.0 / p["attn_temperature"] + rng.normal(0, 0.2)),
             "grad_norm": float(abs(rng.normal(1.0, 0.2))),
             "param_norm": float(20 + 0.5 * p["n_heads"] + rng.normal(0, 0.3)),
             "n_params": 50000.0,
             "samples_per_s": float(4000 / np.sqrt(p["n_heads"]) + rng.normal(0, 50)),
             "epoch": float(EPOCHS),
             "id_len_acc": id_acc, "ood_len_acc": ood_acc, "len_gen_ratio": ood_acc / id_acc,
             "corrupt_acc": corrupt, "corrupt_rel": corrupt / test}
        out.append({"metrics": m, "tables": {"per_length": per_length,
                                             "per_corruption": per_corr}})
    return out


def _epoch_logs(tracker: Tracker, rid: str, seeds: list[dict], last_epoch: int) -> None:
    """Per-epoch seed means and `_seed_std` (sample std, as `seed_summary` does), drifting
    towards the final values; the last logged epoch carries the final values."""
    names = list(seeds[0]["metrics"])
    for epoch in range(1, last_epoch + 1):
        lag = (EPOCHS - epoch) / EPOCHS
        vals = {n: np.array([s["metrics"][n] for s in seeds]) for n in names}
        row: dict[str, float] = {}
        for n, v in vals.items():
            if n == "epoch":
                v = np.full_like(v, float(epoch))
            elif n.endswith("_acc") and epoch < EPOCHS:
                v = v * (1 - 0.2 * lag)
            row[n] = float(v.mean())
            row[f"{n}_seed_std"] = float(v.std(ddof=1))
        tracker.log_metrics(rid, row, step=epoch)


def _per_seed(seeds: list[dict], epoch: int) -> dict[str, float]:
    return {f"seed_{k}/{n}": (float(epoch) if n == "epoch" else v)
            for k, s in enumerate(seeds) for n, v in s["metrics"].items()}


@contextlib.contextmanager
def _fast_sqlite() -> Iterator[None]:
    """No fsync while writing a throwaway test store (SQLite `synchronous=OFF`): about twice as
    fast; the listener is removed afterwards."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def on_connect(conn: Any, _record: Any) -> None:
        if isinstance(conn, sqlite3.Connection):
            conn.execute("PRAGMA synchronous=OFF")

    event.listen(Engine, "connect", on_connect)
    try:
        yield
    finally:
        event.remove(Engine, "connect", on_connect)


def _ensure_experiment(tracker: Tracker, tracking_uri: str, experiment: str) -> None:
    """Artifacts next to the SQLite file (MLflow's default root is ./mlruns of the cwd)."""
    if tracker.client.get_experiment_by_name(experiment) is not None:
        return
    if tracking_uri.startswith("sqlite:///"):
        root = Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "artifacts"
        tracker.client.create_experiment(experiment, artifact_location=root.as_uri())


def build_planted_store(tracking_uri: str, experiment: str = "planted", n_trials: int = 60,
                        seeds: int = 3, rng_seed: int = 0) -> dict:
    """Write the planted sweep (`n_trials` child runs in all, 5 of them not completed) and
    return its truth: effect sizes, param names, trial counts by status, parent run id."""
    with _fast_sqlite():
        return _build(tracking_uri, experiment, n_trials, seeds, rng_seed)


def _build(tracking_uri: str, experiment: str, n_trials: int, seeds: int, rng_seed: int) -> dict:
    n_done = n_trials - sum(NON_COMPLETED.values())
    if n_done < 8:
        raise ValueError(f"n_trials: need at least {8 + sum(NON_COMPLETED.values())}")
    rng = np.random.default_rng(rng_seed)
    tracker = Tracker(tracking_uri)
    _ensure_experiment(tracker, tracking_uri, experiment)
    objective = [["val_acc", "max"]]
    spec = parse_space(SPACE_YAML.replace("seeds: 3", f"seeds: {seeds}"), "planted.yaml")
    parent = tracker.start_parent(experiment, f"sweep_{experiment}", spec, {
        "space_file": "planted.yaml", "space_name": experiment, "num_trials": str(n_trials),
        "seeds": str(seeds), "objective": json.dumps(objective)})
    # every (norm, n_heads) cell once so the additive model is identified, the rest sampled
    cells = [(n, h) for n in ("pre_ln", "post_ln") for h in HEADS]
    plan = [("completed", *cells[i]) if i < len(cells) else ("completed", None, None)
            for i in range(n_done)]
    order = rng.permutation(len(plan))
    plan = [plan[i] for i in order]
    for reason, n in NON_COMPLETED.items():
        plan += [(reason, None, None)] * n
    completed_params: list[dict] = []
    for i, (reason, norm, heads) in enumerate(plan):
        p = _sample_params(rng, norm, heads)
        tid = f"planted_{i:05d}"
        rid = tracker.start_child(parent, tid, p, seeds)
        per_seed = _seed_metrics(rng, p, seeds)
        if reason == "completed":
            completed_params.append(p)
            _epoch_logs(tracker, rid, per_seed, EPOCHS)
            tracker.log_metrics(rid, _per_seed(per_seed, EPOCHS), step=EPOCHS)
            tracker.finish_child(rid, Outcome.COMPLETED, f"completed {EPOCHS} epochs", {
                k: s["tables"] for k, s in enumerate(per_seed)})
        elif reason == "early_stopped":
            _epoch_logs(tracker, rid, per_seed, 1)
            tracker.log_metrics(rid, _per_seed(per_seed, 1), step=1)
            tracker.finish_child(rid, "early_stopped", "stopped by ASHA at epoch 1")
        elif reason == "diverged":
            _epoch_logs(tracker, rid, per_seed, 2)
            tracker.finish_child(rid, "diverged", "seed 1: non-finite loss")
        elif reason == "error":
            tracker.finish_child(rid, "error", "RuntimeError: planted failure")
        else:  # running: started, one epoch logged, never finished
            _epoch_logs(tracker, rid, per_seed, 1)
    tracker.finish_parent(parent, "FINISHED")
    post = [p for p in completed_params if p["norm"] == "post_ln"]
    pre = [p for p in completed_params if p["norm"] == "pre_ln"]
    return {
        "experiment": experiment, "parent_run_id": parent, "tracking_uri": tracking_uri,
        "n_trials": n_trials, "seeds": seeds, "epochs": EPOCHS,
        "params": ["norm", "n_heads", "attn_dropout", "attn_temperature"],
        "planted": {"norm": {"target": "gen_gap_acc", "level": "post_ln", "baseline": "pre_ln",
                             "effect": NORM_EFFECT},
                    "attn_dropout": {"target": "gen_gap_acc", "slope": DROPOUT_SLOPE}},
        "null": ["n_heads", "attn_temperature"],
        "seed_noise": SEED_NOISE,
        "measures": {"attn_entropy": "negative", "grad_norm": "none"},
        "counts": {"completed": n_done, **NON_COMPLETED},
        "confound": {"post_ln_share_8_heads": sum(p["n_heads"] == 8 for p in post) / len(post),
                     "pre_ln_share_8_heads": sum(p["n_heads"] == 8 for p in pre) / len(pre)},
    }
