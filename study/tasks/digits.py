"""scikit-learn's bundled digits (8x8 images) as a raster-scan signal of 64 steps.

Clean splits: a seeded stratified 60/20/20 split of the 1,797 images, pixels scaled to [0, 1],
`x` of shape (N, 64, 1).

Corruption sets `corrupt:<kind>:<severity>` (severity s = 1..5), built from the clean test split
with the label kept, seeded by `data_seed`:
- `gaussian_noise`: additive N(0, sigma) pixel noise, sigma = 0.1 * s, clipped to [0, 1];
- `occlusion`: one square of side s + 1 pixels (2..6), at a uniformly random position inside
  the 8x8 image (its own per image), set to 0.
The random draws of a kind are shared by its severities (the noise of severity s is the same
standard normal draw times sigma), so severities differ only in strength.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from study.config import TrialConfig
from study.model import ModelSpec
from study.tasks.base import SEVERITIES, Split, TaskData, stratified_split

SIDE = 8
NOISE_SIGMA = (0.1, 0.2, 0.3, 0.4, 0.5)  # gaussian_noise sigma of severities 1..5
CORRUPTIONS = ("gaussian_noise", "occlusion")


def _as_split(x: np.ndarray, y: np.ndarray) -> Split:
    xt = torch.tensor(x, dtype=torch.float32)[..., None]  # (N, 64, 1)
    return Split(xt, torch.tensor(y, dtype=torch.long), torch.ones(xt.shape[:2], dtype=torch.bool))


def corrupt(x: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Corrupt raster images `x` ((N, 64) in [0, 1]) with `kind` at `severity` (1..5).

    The random draws do not depend on `severity`: with the same `rng` seed, the noise of
    every severity is the same standard normal draw scaled by sigma."""
    if kind == "gaussian_noise":
        noise = NOISE_SIGMA[severity - 1] * rng.standard_normal(size=x.shape)
        return np.clip(x + noise, 0.0, 1.0).astype(x.dtype)
    if kind == "occlusion":
        side = severity + 1
        n = len(x)
        u = rng.random((2, n))  # top-left corner, uniform over the valid positions
        r0, c0 = (np.floor(u * (SIDE - side + 1)).astype(np.int64))
        rows, cols = np.arange(SIDE)[None, :, None], np.arange(SIDE)[None, None, :]
        hole = ((rows >= r0[:, None, None]) & (rows < (r0 + side)[:, None, None])
                & (cols >= c0[:, None, None]) & (cols < (c0 + side)[:, None, None]))
        return np.where(hole.reshape(n, SIDE * SIDE), 0.0, x).astype(x.dtype)
    raise ValueError(f"unknown corruption {kind!r}")


def build(cfg: TrialConfig) -> TaskData:
    d = load_digits()
    x = d.data.astype(np.float32) / 16.0  # (1797, 64) in [0, 1]
    y = d.target.astype(np.int64)
    tr, va, te = stratified_split(y, (0.6, 0.2, 0.2), cfg.data_seed)
    spec = ModelSpec(n_classes=10, max_len=64, in_channels=1)
    extra = {}
    for i, kind in enumerate(CORRUPTIONS):
        for s in SEVERITIES:
            rng = np.random.default_rng([cfg.data_seed, 101, i])  # shared by severities
            extra[f"corrupt:{kind}:{s}"] = _as_split(corrupt(x[te], kind, s, rng), y[te])
    return TaskData(spec, _as_split(x[tr], y[tr]), _as_split(x[va], y[va]),
                    _as_split(x[te], y[te]), extra)
