"""MNIST-1D (Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024).

Ten 1-D digit templates are padded, dilated, scaled, translated, noised (correlated noise in
the background, i.i.d. noise everywhere) and sheared, then subsampled to 40 points. The samples
are generated locally from the `mnist1d` package's templates and generator arguments
(`mnist1d.data.get_templates`, `get_dataset_args`); nothing is downloaded.

Generation. `mnist1d.data.make_dataset` calls the package's per-sample `transform`, which
builds a scipy `interp1d` three times per sample (about 0.5 ms a sample; 31,000 samples would
take about 15 s). `generate` below draws the very same random numbers from numpy's legacy
global RNG in the same order (seeded like `make_dataset`, the caller's global state saved and
restored) and applies the same arithmetic, with `np.interp` (what `interp1d` delegates to for
1-D float data) and the noise filter vectorized; `tests/test_signal_tasks.py` checks that it
reproduces `make_dataset` (up to the standardization below). The whole task (31,000
samples with the shift sets) builds in under 2 s; the raw samples are cached per process and
`data_seed` (`raw_sets`), so configs differing in `shuffle_seq` or a training stressor share
them.

Splits. Train and test are one draw of 5,000 samples split 4,000 / 1,000 in the generator's
order, exactly as the published benchmark does (`num_samples=5000`, `train_split=0.8`), with
generator seed `42 + data_seed`: `data_seed=0` gives the samples of the package's default
`make_dataset()`. Validation is a separate draw of 1,000 samples (same arguments, a seed
derived from `data_seed`), so the train/test sizes stay those of the paper.

Scale. The generator's raw values are small: mean about -0.006 and std about 0.155 over the
training split (the templates are whitened and divided by 6), with a per-step std between
0.12 and 0.17. The package standardizes each dataset with its own global mean/std; here every
split and shift set is standardized with the TRAINING split's global mean and std (two
scalars), so the shift sets keep their change of scale and no test statistics leak. `x` is
(N, 40, 1) float32, mean 0 and std 1 on the training split.

`shuffle_seq`: one fixed permutation of the 40 time steps, seeded by `data_seed`, applied to
every split and shift set (the paper's "shuffled" benchmark, which removes spatial structure).

Shift sets `corrupt:<kind>:<severity>` (severity s = 1..5, 1,000 samples each, label kept):
fresh samples whose generator knob is multiplied by (1 + k * s):
- `translation`: `max_translation` 48, k = 0.1 (48 -> 53, 58, 62, 67, 72). The translation is a
  circular shift on the 72-point canvas (`template_len + padding[1]`), so 72 is the largest
  meaningful value: at s = 5 the digit can start anywhere, a third of the shifts unseen.
- `corr_noise`: `corr_noise_scale` 0.25, k = 0.25 (0.31 .. 0.56).
- `iid_noise`: `iid_noise_scale` 0.02, k = 1 (0.04 .. 0.12).
- `scale`: `scale_coeff` 0.4, k = 0.5 (amplitude factor 1 +- 0.2 -> 1 +- 0.7 at s = 5; must
  stay below 2, where the factor would change sign).
- `shear`: `shear_scale` 0.75, k = 0.5 (1.125 .. 2.625).
The k's were chosen so that the default model (2 layers, d_model 64, patches of 4, 40 epochs,
about 90% clean test accuracy) degrades gradually, staying well above chance (10%) at s = 5;
with k = 0.5 (corr_noise) and k = 2 (iid_noise) both fell to about 23% at s = 4.
All 25 shift sets are drawn with one seed (derived from `data_seed`), so apart from
`translation` (whose bounded integer draw consumes a bound-dependent amount of randomness)
severities of a kind differ only in the knob, not in the underlying random draws.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

from study.config import TrialConfig
from study.model import ModelSpec
from study.tasks.base import SEVERITIES, Split, TaskData

N_TRAIN, N_TEST, N_VAL, N_SHIFT = 4000, 1000, 1000, 1000
SEQ_LEN = 40
N_CLASSES = 10
# kind -> (generator argument, k): severity s multiplies the default value by (1 + k * s)
SHIFTS: dict[str, tuple[str, float]] = {
    "translation": ("max_translation", 0.1),
    "corr_noise": ("corr_noise_scale", 0.25),
    "iid_noise": ("iid_noise_scale", 1.0),
    "scale": ("scale_coeff", 0.5),
    "shear": ("shear_scale", 0.5),
}
_EPS = 1e-8  # mnist1d.transform.transform's eps: keeps the template apart from the zero padding


def default_args() -> dict:
    """The package's generator arguments (`mnist1d.data.get_dataset_args`) as a dict."""
    from mnist1d.data import get_dataset_args  # imports scipy.interpolate etc.; once, lazily

    return dict(get_dataset_args(as_dict=True))


def shift_args(kind: str, severity: int) -> dict:
    """Generator arguments of shift set `kind` at `severity` (see the module docstring)."""
    args = default_args()
    key, k = SHIFTS[kind]
    value = args[key] * (1.0 + k * severity)
    if key == "max_translation":
        value = min(int(round(value)), args["template_len"] + args["padding"][-1])
    args[key] = value
    return args


def _seed(data_seed: int, stream: int) -> int:
    """A 32-bit generator seed for one stream of `data_seed` (numpy's legacy seeding)."""
    return int(np.random.SeedSequence([data_seed, stream]).generate_state(1)[0])


def generate(args: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw (unstandardized, unshuffled) MNIST-1D samples `(num_samples, final_seq_length)` and
    labels, drawn as `mnist1d.data.make_dataset(args)` draws them with `args["seed"] = seed`.

    Uses numpy's global legacy RNG (for fidelity to the package) and restores its state."""
    from mnist1d.data import get_templates

    templates = get_templates()
    t_x, t_y = templates["x"], templates["y"]
    n_per = args["num_samples"] // len(t_y)
    labels = np.repeat(t_y, n_per)
    n = len(labels)
    lo, hi = args["padding"]
    canvas = args["template_len"] + hi  # length after dilation
    r_pad, r_scale, r_shear = np.empty(n), np.empty(n), np.empty(n)
    shift = np.empty(n, dtype=np.int64)
    corr, iid = np.empty((n, canvas)), np.empty((n, canvas))
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        rand, randn, choice = np.random.rand, np.random.randn, np.random.choice
        for i in range(n):  # the draw order of mnist1d.transform.transform
            r_pad[i] = rand()
            r_scale[i] = rand()
            shift[i] = choice(args["max_translation"])
            corr[i] = randn(canvas)
            iid[i] = randn(canvas)
            r_shear[i] = rand()
        batch_shuffle = np.random.permutation(n)
    finally:
        np.random.set_state(state)

    # pad with p zeros, then dilate to the canvas (linear interpolation, as np.interp)
    p = lo + (r_pad * (hi - lo + 1)).astype(np.int64)
    x = np.empty((n, canvas))
    grid = np.linspace(0, 1, canvas)
    for plen in np.unique(p):
        rows = np.flatnonzero(p == plen)
        src = np.linspace(0, 1, args["template_len"] + plen)
        padded = np.zeros((len(rows), len(src)))
        padded[:, :args["template_len"]] = t_x[labels[rows]] + _EPS
        for j, r in enumerate(rows):
            x[r] = np.interp(grid, src, padded[j])
    x *= (1 + args["scale_coeff"] * (r_scale - 0.5))[:, None]
    # translate: concatenate([x[-k:], x[:-k]]), the identity for k == 0 or k >= canvas
    k = np.where(shift < canvas, shift, 0)
    x = x[np.arange(n)[:, None], (np.arange(canvas)[None, :] - k[:, None]) % canvas]
    mask = x != 0
    x = mask * x + (1 - mask) * gaussian_filter1d(args["corr_noise_scale"] * corr, 2, axis=-1)
    x = x + args["iid_noise_scale"] * iid
    coeff = args["shear_scale"] * (r_shear - 0.5)
    x = x - coeff[:, None] * np.linspace(-0.5, 0.5, canvas)[None, :]
    out = np.empty((n, args["final_seq_length"]))
    final = np.linspace(0, 1, args["final_seq_length"])
    for i in range(n):
        out[i] = np.interp(final, grid, x[i])
    return out[batch_shuffle], labels[batch_shuffle].astype(np.int64)


def _as_split(x: np.ndarray, y: np.ndarray, mean: float, std: float,
              perm: np.ndarray | None) -> Split:
    x = (x - mean) / std
    if perm is not None:
        x = x[:, perm]
    xt = torch.tensor(x, dtype=torch.float32)[..., None]  # (N, 40, 1)
    return Split(xt, torch.tensor(y, dtype=torch.long),
                 torch.ones(xt.shape[:2], dtype=torch.bool))


@functools.lru_cache(maxsize=4)
def raw_sets(data_seed: int, seq_len: int = SEQ_LEN) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Raw samples of every split and shift set of `data_seed`, subsampled to `seq_len` points
    (the generator's `final_seq_length`; cached per process: configs that differ only in
    `shuffle_seq` or in the generic training stressors share them). The arrays are read-only."""
    args = {**default_args(), "num_samples": N_TRAIN + N_TEST, "final_seq_length": seq_len}
    x, y = generate(args, 42 + data_seed)
    out = {"train": (x[:N_TRAIN], y[:N_TRAIN]), "test": (x[N_TRAIN:], y[N_TRAIN:]),
           "val": generate({**args, "num_samples": N_VAL}, _seed(data_seed, 1))}
    shift_seed = _seed(data_seed, 3)
    for kind in SHIFTS:
        for s in SEVERITIES:
            out[f"corrupt:{kind}:{s}"] = generate(
                {**shift_args(kind, s), "num_samples": N_SHIFT, "final_seq_length": seq_len},
                shift_seed)
    for arrays in out.values():
        for a in arrays:
            a.flags.writeable = False
    return out


def build(cfg: TrialConfig) -> TaskData:
    raw = raw_sets(cfg.data_seed, cfg.seq_length)
    x_tr = raw["train"][0]
    mean, std = float(x_tr.mean()), float(x_tr.std())
    perm = (np.random.default_rng([cfg.data_seed, 2]).permutation(cfg.seq_length)
            if cfg.shuffle_seq else None)
    splits = {name: _as_split(x, y, mean, std, perm) for name, (x, y) in raw.items()}
    spec = ModelSpec(n_classes=N_CLASSES, max_len=cfg.seq_length, in_channels=1)
    return TaskData(spec, splits.pop("train"), splits.pop("val"), splits.pop("test"), splits)
