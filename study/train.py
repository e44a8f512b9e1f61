"""One trial in pure PyTorch (no Ray, no MLflow): `run_trial(cfg)` yields metrics per epoch.

Metrics are accumulated on the device and read once per epoch; the training step never waits
for the host. Each trial owns its RNG state, so several trials can be advanced in lockstep in one
process (the sweep's seed replicates) and still match a trial run alone.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from study import metrics as M
from study.config import TrialConfig
from study.model import AttentionModel, build_model
from study.tasks import get_task
from study.tasks.base import IGNORE, Split, TaskData

EVAL_BATCH = 512
STATS_BATCH = 256  # evaluation batch on which attention statistics are computed


@dataclass
class EpochResult:
    """What one epoch produced. `diverged` holds "diverged at step N" when training blew up;
    `artifacts` holds tables (lists of rows) computed on the final epoch."""

    epoch: int
    metrics: dict[str, float]
    final: bool = False
    diverged: str | None = None
    artifacts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def resolve_device(cfg: TrialConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class EvalOut:
    """Evaluation of one split, all tensors on the device. `conf`, `pred` and `target` are over
    labelled examples (per-token tasks: labelled positions)."""

    loss: torch.Tensor
    acc: torch.Tensor
    conf: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    example_correct: torch.Tensor  # (N,) fraction of an example's labels predicted correctly


@torch.no_grad()
def evaluate(model: AttentionModel, split: Split, device: torch.device) -> EvalOut:
    model.eval()
    losses, confs, preds, targets, ex = [], [], [], [], []
    for i in range(0, len(split), EVAL_BATCH):
        x, y, m = (t[i:i + EVAL_BATCH].to(device, non_blocking=True)
                   for t in (split.x, split.y, split.mask))
        with autocast(device):
            logits = model(x, m)
        logits = logits.float()
        if y.dim() == 2:  # per-token: keep labelled positions; logits cover the token grid
            keep = y != IGNORE
            c = (logits.argmax(-1) == y) & keep
            ex.append(c.sum(1) / keep.sum(1).clamp_min(1))
            logits, y = logits[keep], y[keep]
        else:
            ex.append((logits.argmax(-1) == y).float())
        losses.append(F.cross_entropy(logits, y, reduction="none"))
        p = logits.softmax(-1)
        conf, pred = p.max(-1)
        confs.append(conf)
        preds.append(pred)
        targets.append(y)
    loss = torch.cat(losses)
    pred, target = torch.cat(preds), torch.cat(targets)
    return EvalOut(loss.mean(), (pred == target).float().mean(), torch.cat(confs), pred, target,
                   torch.cat(ex).float())


@torch.no_grad()
def attention_stats(model: AttentionModel, split: Split, device: torch.device) -> dict:
    """Mean and lowest-head attention entropy (nats) and the largest logit on one batch."""
    model.eval()
    x, m = split.x[:STATS_BATCH].to(device), split.mask[:STATS_BATCH].to(device)
    with autocast(device):
        _, st = model(x, m, stats=True)
    per_head = st["entropy"].float().mean(0)  # (L, nh)
    return {M.ATTN_ENTROPY: per_head.mean(), M.ATTN_ENTROPY_MIN: per_head.min(),
            M.ATTN_MAX_LOGIT: st["max_logit"].float()}


def class_prior(data: TaskData) -> torch.Tensor:
    y = data.train.y
    y = y[y != IGNORE] if y.dim() == 2 else y
    counts = torch.bincount(y.flatten(), minlength=data.spec.n_classes).float()
    return counts / counts.sum()


def lr_lambda(total: int, warmup_frac: float):
    warm = max(1, int(round(warmup_frac * total)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return f


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


def run_trial(cfg: TrialConfig, data: TaskData | None = None) -> Iterator[EpochResult]:
    """Train `cfg` and yield an `EpochResult` after every epoch; stop early on divergence."""
    from study.robustness import robustness_metrics  # noqa: PLC0415 (task-specific, late)

    device = resolve_device(cfg)
    data = data if data is not None else get_task(cfg)
    rng = _RNG(cfg.seed, device)
    with rng.scope():
        model = build_model(cfg, data.spec).to(device)
        gen = torch.Generator().manual_seed(cfg.seed)
    n_params = model.n_params()
    train = data.train.to(device)
    lengths = data.train.lengths().numpy()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            betas=(0.9, 0.98), fused=device.type == "cuda")
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.epochs * steps_per_epoch, cfg.warmup_frac))
    log_prior = class_prior(data).clamp_min(1e-12).log().to(device)
    adjust = cfg.logit_adjust_tau * log_prior  # Menon et al. 2020: train on logits + tau log pi
    want_stats = cfg.attn_entropy_reg > 0
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        gn_sum = torch.zeros((), device=device)
        first_bad = torch.full((), -1, device=device, dtype=torch.long)
        t0 = time.perf_counter()
        with rng.scope():
            batches = make_batches(lengths, cfg.batch_size, cfg.length_mode == "bucket", gen)
            for idx_np in batches:
                idx = torch.from_numpy(idx_np).to(device, non_blocking=True)
                x, y, m = train.x[idx], train.y[idx], train.mask[idx]
                if cfg.length_mode == "bucket":  # trim the shared padding of a bucket
                    t = int(lengths[idx_np].max())
                    x, y, m = x[:, :t], (y[:, :t] if y.dim() == 2 else y), m[:, :t]
                with autocast(device):
                    out = model(x, m, stats=want_stats)
                logits, st = out if want_stats else (out, None)
                logits = logits.float()
                if y.dim() == 2:
                    keep = y != IGNORE
                    logits, y = logits[keep], y[keep]
                loss = F.cross_entropy(logits + adjust, y, label_smoothing=cfg.label_smoothing)
                if cfg.z_loss > 0:  # PaLM's z-loss keeps the softmax normalizer near 1
                    loss = loss + cfg.z_loss * torch.logsumexp(logits, -1).pow(2).mean()
                if st is not None:
                    loss = loss + cfg.attn_entropy_reg * st["entropy"].float().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                bad = ~(torch.isfinite(loss) & torch.isfinite(gn))
                first_bad = torch.where(bad & (first_bad < 0), step + 1, first_bad)
                gn_sum += torch.nan_to_num(gn, nan=0.0, posinf=0.0)
                opt.step()
                sched.step()
                step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time = time.perf_counter() - t0
        bad_step = int(first_bad.item())
        if bad_step >= 0:
            yield EpochResult(epoch, {M.EPOCH: float(epoch), M.N_PARAMS: float(n_params)},
                              final=True, diverged=f"diverged at step {bad_step}")
            return
        final = epoch == cfg.epochs
        values = epoch_metrics(model, data, device)
        values[M.GRAD_NORM] = gn_sum / len(batches)
        metrics = {k: float(v) for k, v in zip(values, torch.stack(
            [torch.as_tensor(v, device=device).float() for v in values.values()]).tolist())}
        metrics[M.GEN_GAP_ACC] = metrics[M.TRAIN_ACC] - metrics[M.TEST_ACC]
        metrics[M.GEN_GAP_LOSS] = metrics[M.TEST_LOSS] - metrics[M.TRAIN_LOSS]
        metrics[M.N_PARAMS] = float(n_params)
        metrics[M.SAMPLES_PER_S] = len(train) / max(train_time, 1e-9)
        metrics[M.EPOCH] = float(epoch)
        artifacts: dict[str, list[dict[str, Any]]] = {}
        if final:
            extra, artifacts = robustness_metrics(cfg, data, model, device, metrics)
            metrics.update(extra)
        if not all(math.isfinite(v) for v in metrics.values()):
            yield EpochResult(epoch, {M.EPOCH: float(epoch), M.N_PARAMS: float(n_params)},
                              final=True, diverged=f"diverged at step {step} (non-finite eval)")
            return
        yield EpochResult(epoch, metrics, final=final, artifacts=artifacts)


def epoch_metrics(model: AttentionModel, data: TaskData, device: torch.device) -> dict:
    """Train (in eval mode), val and test loss/accuracy, ECE on test, attention statistics and
    the parameter norm, as device tensors."""
    tr, va, te = (evaluate(model, s, device) for s in (data.train, data.val, data.test))
    out = {M.TRAIN_LOSS: tr.loss, M.TRAIN_ACC: tr.acc, M.VAL_LOSS: va.loss, M.VAL_ACC: va.acc,
           M.TEST_LOSS: te.loss, M.TEST_ACC: te.acc,
           M.ECE: M.expected_calibration_error(te.conf, te.pred == te.target)}
    out.update(attention_stats(model, data.val, device))
    out[M.PARAM_NORM] = torch.sqrt(sum(p.detach().float().pow(2).sum()
                                       for p in model.parameters()))
    return out


def final_metrics(cfg: TrialConfig, data: TaskData | None = None) -> EpochResult:
    """Run a whole trial and return its last result."""
    *_, last = run_trial(cfg, data)
    return last
