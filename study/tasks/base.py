"""The task interface: a task turns a config into seeded splits plus named evaluation sets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from study.model import ModelSpec

IGNORE = -100  # target value of positions that carry no label (per-token tasks)
SEVERITIES = (1, 2, 3, 4, 5)  # the severities s of every `corrupt:<kind>:<s>` set


@dataclass
class Split:
    """Inputs `x` ((N, T) token ids or (N, T, C) signal), targets `y` ((N,) or (N, T)) and the
    (N, T) bool `mask` of real positions (a prefix of each row)."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray | torch.Tensor) -> Split:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.x[idx], self.y[idx], self.mask[idx])

    def lengths(self) -> torch.Tensor:
        return self.mask.sum(1)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device), self.mask.to(device))


@dataclass
class TaskData:
    """Everything a trial trains and evaluates on.

    `extra` holds named evaluation sets; the name says what they measure and which metric they
    feed (see `study/metrics.py`): `len:<L>` (sequences of length L), `corrupt:<kind>:<severity>`.
    `train_counts` are the per-class training counts after any imbalance (long-tail metrics).
    """

    spec: ModelSpec
    train: Split
    val: Split
    test: Split
    extra: dict[str, Split] = field(default_factory=dict)
    train_counts: np.ndarray | None = None
    id_lengths: tuple[int, int] | None = None  # training length range of sequence tasks

    def has_padding(self) -> bool:
        """Whether any split (evaluation sets included) holds a padded position."""
        splits = [self.train, self.val, self.test, *self.extra.values()]
        return any(not bool(s.mask.all()) for s in splits)

    def on(self, device: torch.device) -> TaskData:
        """This data with every split on `device` (itself on the CPU): a trial's evaluation
        then copies nothing from the host."""
        if device.type == "cpu":
            return self
        return dataclasses.replace(
            self, train=self.train.to(device), val=self.val.to(device),
            test=self.test.to(device), extra={n: s.to(device) for n, s in self.extra.items()})


def stratified_split(
    y: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded stratified train/val/test indices. A class of at least 3 rows has at least one
    in each split: rounding alone gave a 3-row class no validation row and a 4- or 5-row class
    no test row at 70/15/15 (the row a split lacked comes out of training; larger classes
    split as rounding says)."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_tr = int(round(fractions[0] * len(idx)))
        n_va = int(round(fractions[1] * len(idx)))
        if len(idx) >= 3:
            if n_va == 0 and fractions[1] > 0:
                n_tr, n_va = n_tr - 1, 1
            if n_tr + n_va >= len(idx) and fractions[2] > 0:
                n_tr = len(idx) - n_va - 1
        parts[0] += idx[:n_tr].tolist()
        parts[1] += idx[n_tr:n_tr + n_va].tolist()
        parts[2] += idx[n_tr + n_va:].tolist()
    return tuple(rng.permutation(np.array(p, dtype=np.int64)) for p in parts)  # type: ignore
