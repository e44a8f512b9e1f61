"""Generalization stressors applied to any task's training split, after the task is built:
`train_fraction` (sample-size curves), `imbalance` (long tail) and `label_noise`."""

from __future__ import annotations

import numpy as np
import torch

from study.config import TrialConfig
from study.tasks.base import Split, TaskData


def long_tail_counts(n_max: int, n_classes: int, rho: float) -> np.ndarray:
    """Exponential profile n_c = n_max * rho^(-c / (C - 1)) (Cui et al. 2019), at least 1."""
    c = np.arange(n_classes)
    return np.maximum(1, np.floor(n_max * rho ** (-c / max(n_classes - 1, 1)))).astype(int)


def subsample_long_tail(y: np.ndarray, n_classes: int, rho: float,
                        rng: np.random.Generator) -> np.ndarray:
    """Indices keeping n_c examples of class c; n_max is the smallest class's count, so every
    class can supply its quota."""
    avail = np.bincount(y, minlength=n_classes)
    quota = long_tail_counts(int(avail.min()), n_classes, rho)
    keep = [rng.permutation(np.flatnonzero(y == c))[:quota[c]] for c in range(n_classes)]
    return np.sort(np.concatenate(keep))


def flip_labels(y: np.ndarray, n_classes: int, fraction: float,
                rng: np.random.Generator) -> np.ndarray:
    """Flip `fraction` of labels, each to a different class chosen uniformly."""
    y = y.copy()
    idx = rng.choice(len(y), size=int(round(fraction * len(y))), replace=False)
    y[idx] = (y[idx] + rng.integers(1, n_classes, size=len(idx))) % n_classes
    return y


def truncate(split: Split, n: int) -> Split:
    """Cut inputs to their first `n` positions (classification tasks: the label is kept)."""
    return Split(split.x[:, :n], split.y, split.mask[:, :n])


def apply_stressors(cfg: TrialConfig, data: TaskData) -> TaskData:
    """Return `data` with the training split shrunk, long-tailed and label-noised as `cfg`
    asks, inputs truncated under `length_mode: truncate`, and `train_counts` set."""
    per_token = data.spec.per_token
    rng = np.random.default_rng([cfg.data_seed, 7919])
    train = data.train
    C = data.spec.n_classes
    y = train.y.numpy()
    if cfg.train_fraction < 1.0:
        n = max(1, int(round(cfg.train_fraction * len(train))))
        train = train.subset(np.sort(rng.permutation(len(train))[:n]))
        y = train.y.numpy()
    if cfg.imbalance > 1.0:
        train = train.subset(subsample_long_tail(y, C, cfg.imbalance, rng))
        y = train.y.numpy()
    if cfg.label_noise > 0:
        train = Split(train.x, torch.from_numpy(flip_labels(y, C, cfg.label_noise, rng)),
                      train.mask)
    counts = None if per_token else np.bincount(y, minlength=C)
    out = TaskData(data.spec, train, data.val, data.test, dict(data.extra), counts,
                   data.id_lengths)
    if cfg.length_mode == "truncate":  # refused where it would cut labels: tasks.conflict
        n = int(train.mask.sum(1).max())
        out.train, out.val, out.test = (truncate(s, n) for s in (train, data.val, data.test))
        out.extra = {k: truncate(s, n) for k, s in out.extra.items()}
    return out
