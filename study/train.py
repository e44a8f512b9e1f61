"""One trial in pure PyTorch (no Ray, no MLflow): `run_trial(cfg)` yields metrics per epoch.

The step is `study.step.train_step` and the metrics come from `study.evaluation`. Metrics are
accumulated on the device and read once per epoch; the training step never waits for the host.
Each trial owns its RNG state, so several trials can be advanced in lockstep in one process (the
sweep's seed replicates) and still match a trial run alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from study import metrics as M
from study.ahead import check_cancelled
from study.config import TrialConfig
from study.device import resolve_device
from study.evaluation import epoch_metrics, robustness_metrics
from study.graphs import Captured
from study.model import AttentionModel, SqueezeExcite, build_model
from study.step import train_state, train_step
from study.tasks import get_task
from study.tasks.base import IGNORE, TaskData

log = logging.getLogger(__name__)


@dataclass
class EpochResult:
    """What one epoch produced. `diverged` holds "diverged at step N" when training blew up;
    `artifacts` holds tables (lists of rows) computed on the final epoch."""

    epoch: int
    metrics: dict[str, float]
    final: bool = False
    diverged: str | None = None
    artifacts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def class_prior(data: TaskData) -> torch.Tensor:
    """Training-split class frequencies `(C,)` (per-token tasks: over labelled positions)."""
    y = data.train.y
    y = y[y != IGNORE] if y.dim() == 2 else y
    counts = torch.bincount(y.flatten(), minlength=data.spec.n_classes).float()
    return counts / counts.sum()


def make_batches(lengths: np.ndarray, batch_size: int, bucket: bool,
                 gen: torch.Generator, pool: int = 32) -> list[np.ndarray]:
    """Index batches for one epoch: a random permutation cut into batches. With `bucket`, each
    pool of `pool` batches is sorted by length (stable) before cutting, so batches hold similar
    lengths, and the pool's batches are then shuffled (no short-to-long order within an
    epoch); a pool of equal lengths is left as it is, so then the batches are exactly those
    without bucketing."""
    n = len(lengths)
    perm = torch.randperm(n, generator=gen).numpy()
    if not bucket:
        return [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    out: list[np.ndarray] = []
    step = pool * batch_size
    for i in range(0, n, step):
        chunk = perm[i:i + step]
        if len(np.unique(lengths[chunk])) == 1:
            out += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
            continue
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches = [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        out += [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]
    return out


def device_batches(batches: Sequence[np.ndarray], device: torch.device
                   ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Each batch's indices (`(..., B)`) with their copy on `device`, all of an epoch's copied in
    one transfer: a copy from pageable host memory waits for the device (a stream sync), so one
    per step would make the host wait for every step before queueing the next."""
    if not batches:
        return
    flat = torch.from_numpy(np.concatenate(batches, axis=-1)).to(device, non_blocking=True)
    start = 0
    for idx_np in batches:
        check_cancelled()  # an epoch computed ahead of a trial that was stopped
        end = start + idx_np.shape[-1]
        yield idx_np, flat[..., start:end]
        start = end


class _RNG:
    """A trial's private RNG state, swapped in around each epoch."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(seed)
            self._save()

    def _save(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if self.devices else None

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda)
            yield
            self._save()


def flops_per_sample(model: AttentionModel, cfg: TrialConfig, data: TaskData) -> float:
    """Training FLOPs per sample of `model` on `data`'s training split (`metrics.FLOPS_PER_SAMPLE`,
    the formula in `metrics.training_flops_per_sample`): the model's matmul weights and the
    tokens it sees per sample, i.e. the padded width the batches keep (`pad`, `truncate`) or
    each sample's own length (`bucket`, whose batches are trimmed to similar lengths)."""
    p = model.embed.p
    once: set[nn.Module] = set()
    if not data.spec.per_token:  # the head and squeeze-excite gates act on a pooled vector
        once.add(model.head)
    for mod in model.modules():
        if isinstance(mod, SqueezeExcite):
            once |= set(mod.children())
    per_token = once_params = 0.0
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            n = float(mod.weight.numel())
            if mod in once:
                once_params += n
            else:
                per_token += n
        elif isinstance(mod, nn.Conv1d):  # runs at raw steps: p / stride positions per token
            per_token += float(mod.weight.numel()) * p / int(mod.stride[0])
        elif isinstance(mod, nn.LSTM):
            per_token += float(sum(w.numel() for name, w in mod.named_parameters()
                                   if name.startswith("weight")))
    if cfg.length_mode == "bucket":
        raw = data.train.lengths().double()
    else:
        raw = torch.full((len(data.train),), float(data.train.mask.shape[1]),
                         dtype=torch.float64)
    tokens = torch.ceil(raw / p)
    t_mean = float(tokens.mean())
    if cfg.arch != "transformer":
        layers, pairs = 0, 0.0
    elif cfg.attn_kind == "low_rank":
        layers, pairs = cfg.n_layers, 2.0 * t_mean * cfg.attn_rank
    else:
        layers, pairs = cfg.n_layers, float((tokens**2).mean())
    return M.training_flops_per_sample(per_token, t_mean, pairs, layers, cfg.d_model,
                                       once_params)


def check_padding(data: TaskData) -> None:
    """Refuse data with padding whose spec says it has none (a model would not mask it): data
    built by hand, or changed after `get_task` measured it."""
    if not data.spec.padded and data.has_padding():
        raise ValueError("the task's data holds padded positions but its ModelSpec says "
                         "padded=False; set padded=True (get_task measures it)")


def run_trial(cfg: TrialConfig, data: TaskData | None = None) -> Iterator[EpochResult]:
    """Train `cfg` and yield an `EpochResult` after every epoch; stop early on divergence."""
    device = resolve_device(cfg)
    data = data if data is not None else get_task(cfg)
    check_padding(data)
    lengths = data.train.lengths().cpu().numpy()
    data = data.on(device)
    rng = _RNG(cfg.seed, device)
    with rng.scope():
        model = build_model(cfg, data.spec).to(device)
        gen = torch.Generator().manual_seed(cfg.seed)
    n_params = model.n_params()
    flops = flops_per_sample(model, cfg, data)  # a constant of the config: computed once
    train = data.train
    log_prior = class_prior(data).clamp_min(1e-12).log().to(device)
    # Menon et al. 2020: train on logits + tau log pi
    state, why = train_state(model, cfg, cfg.epochs * math.ceil(len(train) / cfg.batch_size),
                             adjust=cfg.logit_adjust_tau * log_prior)
    if why is not None:
        log.info(why)
    # CUDA: the epoch's evaluation captured in a CUDA graph as well (parameters and data keep
    # their addresses), replayed from the second epoch on
    evaluate_epoch = Captured(lambda: epoch_metrics(model, data, device), state.mode == "graph")
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        state.start_epoch()
        t0 = time.perf_counter()
        with rng.scope():
            batches = make_batches(lengths, cfg.batch_size, cfg.length_mode == "bucket", gen)
            for idx_np, idx in device_batches(batches, device):
                x, y, m = train.x[idx], train.y[idx], train.mask[idx]
                if cfg.length_mode == "bucket":  # trim the shared padding of a bucket
                    t = int(lengths[idx_np].max())
                    x, y, m = x[:, :t], (y[:, :t] if y.dim() == 2 else y), m[:, :t]
                train_step(state, x, y, m)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time = time.perf_counter() - t0
        bad_step = int(state.first_bad.item())
        if bad_step >= 0:
            yield diverged_result(epoch, n_params, f"diverged at step {bad_step}")
            return
        values = evaluate_epoch()
        values[M.GRAD_NORM] = state.gn_sum / len(batches)
        result = epoch_result(cfg, data, device, epoch, read_values([values], device)[0],
                              n_params=n_params, flops=flops,
                              samples_per_s=len(train) / max(train_time, 1e-9),
                              steps=state.step, final_model=lambda: model)
        yield result
        if result.diverged:
            return


def diverged_result(epoch: int, n_params: int, why: str) -> EpochResult:
    """The last result of a trial that diverged (`why`: "diverged at step N ...")."""
    return EpochResult(epoch, {M.EPOCH: float(epoch), M.N_PARAMS: float(n_params)}, final=True,
                       diverged=why)


def read_values(values: Sequence[dict[str, Any]], device: torch.device
                ) -> list[dict[str, float]]:
    """The epoch's values of k models (device tensors or numbers, the same names in each) as
    floats, read to the host in one transfer."""
    names = list(values[0])
    host = torch.stack([torch.as_tensor(v[n], device=device).float()
                        for v in values for n in names]).view(len(values), -1).tolist()
    return [dict(zip(names, row)) for row in host]


def epoch_result(
    cfg: TrialConfig, data: TaskData, device: torch.device, epoch: int,
    values: dict[str, float], *, n_params: int, flops: float, samples_per_s: float, steps: int,
    final_model: Callable[[], AttentionModel], accs: dict[str, float] | None = None,
) -> EpochResult:
    """The result of an epoch whose training steps were all finite: `values` (`epoch_metrics`
    and the grad norm, `read_values`), the derived metrics and, after the final epoch, the
    robustness metrics of `final_model()` (called then only, where they need it; `accs`: its
    robustness-set accuracies where already computed). A non-finite metric makes it a
    divergence at step `steps` (non-finite eval)."""
    final = epoch == cfg.epochs
    metrics = dict(values)
    metrics[M.GEN_GAP_ACC] = metrics[M.TRAIN_ACC] - metrics[M.TEST_ACC]
    metrics[M.GEN_GAP_LOSS] = metrics[M.TEST_LOSS] - metrics[M.TRAIN_LOSS]
    metrics[M.N_PARAMS] = float(n_params)
    metrics[M.FLOPS_PER_SAMPLE] = flops
    metrics[M.SAMPLES_PER_S] = samples_per_s
    metrics[M.EPOCH] = float(epoch)
    artifacts: dict[str, list[dict[str, Any]]] = {}
    if final:
        extra, artifacts = robustness_metrics(cfg, data, final_model, device, metrics, accs)
        metrics.update(extra)
    if not all(math.isfinite(v) for v in metrics.values()):
        return diverged_result(epoch, n_params, f"diverged at step {steps} (non-finite eval)")
    return EpochResult(epoch, metrics, final=final, artifacts=artifacts)


def final_metrics(cfg: TrialConfig, data: TaskData | None = None) -> EpochResult:
    """Run a whole trial and return its last result."""
    *_, last = run_trial(cfg, data)
    return last
