"""scikit-learn's bundled digits (8x8 images) as a raster-scan signal of 64 steps."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from study.config import TrialConfig
from study.model import ModelSpec
from study.tasks import register
from study.tasks.base import Split, TaskData, stratified_split


def _as_split(x: np.ndarray, y: np.ndarray) -> Split:
    xt = torch.tensor(x, dtype=torch.float32)[..., None]  # (N, 64, 1)
    return Split(xt, torch.tensor(y, dtype=torch.long), torch.ones(xt.shape[:2], dtype=torch.bool))


@register("digits")
def build(cfg: TrialConfig) -> TaskData:
    d = load_digits()
    x = d.data.astype(np.float32) / 16.0  # (1797, 64) in [0, 1]
    y = d.target.astype(np.int64)
    tr, va, te = stratified_split(y, (0.6, 0.2, 0.2), cfg.data_seed)
    spec = ModelSpec(n_classes=10, max_len=64, in_channels=1)
    return TaskData(spec, _as_split(x[tr], y[tr]), _as_split(x[va], y[va]),
                    _as_split(x[te], y[te]))
