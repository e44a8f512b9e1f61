"""One training step, its loss and its optimizer: the one definition that `run_trial`, the
benchmarks and the model contract tests all run.

The step never waits for the host: the divergence flag and the grad-norm sum are device tensors
held in `TrainState` and read once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from study.config import TrialConfig
from study.device import autocast
from study.model import AttentionModel, AttnStats
from study.tasks.base import IGNORE


def lr_lambda(total: int, warmup_frac: float) -> Callable[[int], float]:
    """Linear warmup over `warmup_frac` of `total` steps, then cosine decay to zero."""
    warm = max(1, int(round(warmup_frac * total)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return f


def make_optimizer(
    model: AttentionModel, cfg: TrialConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay on matrices only (not on biases, norm weights or gains) and its
    warmup + cosine schedule over `total_steps`. Build it after the model is on its device."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return adamw(decay, no_decay, cfg, total_steps)


def adamw(
    decay: Sequence[torch.Tensor], no_decay: Sequence[torch.Tensor], cfg: TrialConfig,
    total_steps: int,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """`make_optimizer` over given tensors: weight decay on `decay` only (`study.replicas`
    passes parameters stacked over replicates, whose matrices it picks itself)."""
    fused = [*decay, *no_decay][0].device.type == "cuda"
    opt = torch.optim.AdamW([{"params": list(decay), "weight_decay": cfg.weight_decay},
                             {"params": list(no_decay), "weight_decay": 0.0}], lr=cfg.lr,
                            betas=(0.9, 0.98), fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, cfg.warmup_frac))
    return opt, sched


def trial_loss(
    logits: torch.Tensor, y: torch.Tensor, stats: AttnStats | None, cfg: TrialConfig,
    adjust: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """The training objective of a trial.

    Cross-entropy with label smoothing on logits + `adjust` (logit adjustment, Menon et al. 2020:
    `adjust` = tau log pi), plus PaLM's z-loss and the attention-entropy regulariser (when `stats`
    is given). Per-token `logits` `(B, T, C)` with `y` `(B, T)` count labelled positions only.
    """
    logits = logits.float()
    if y.dim() == 2:
        keep = y != IGNORE
        logits, y = logits[keep], y[keep]  # (N, C), (N,)
    loss = F.cross_entropy(logits + adjust, y, label_smoothing=cfg.label_smoothing)
    if cfg.z_loss > 0:  # keeps the softmax normalizer near 1
        loss = loss + cfg.z_loss * torch.logsumexp(logits, -1).pow(2).mean()
    if stats is not None and cfg.attn_entropy_reg > 0:
        loss = loss + cfg.attn_entropy_reg * stats.entropy.float().mean()
    return loss


@dataclass
class TrainState:
    """What a training step reads and updates: the model, its optimizer and schedule, the loss
    settings (`cfg` and the logit adjustment) and device-side accumulators of the epoch."""

    model: AttentionModel
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    cfg: TrialConfig
    adjust: torch.Tensor | float = 0.0  # (C,) added to the training logits, see `trial_loss`
    stats: bool | None = None  # explicit softmax path; None: when the entropy regulariser needs it
    step: int = 0  # optimizer steps taken so far
    device: torch.device = field(init=False)
    gn_sum: torch.Tensor = field(init=False)  # () sum of finite grad norms this epoch
    first_bad: torch.Tensor = field(init=False)  # () first step with a non-finite loss/grad, or -1

    def __post_init__(self) -> None:
        if self.stats is None:
            self.stats = self.cfg.attn_entropy_reg > 0
        self.device = next(self.model.parameters()).device
        self.start_epoch()

    @property
    def clip(self) -> float:
        return self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")

    def start_epoch(self) -> None:
        """Reset the per-epoch accumulators (the step count runs on across epochs)."""
        self.gn_sum = torch.zeros((), device=self.device)
        self.first_bad = torch.full((), -1, device=self.device, dtype=torch.long)


def train_step(
    state: TrainState, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Forward, `trial_loss`, backward, clip, optimizer and schedule step; returns the loss.

    A non-finite loss or grad norm records its step (1-based) in `state.first_bad` on the device;
    the step still runs, and the caller stops the trial when it reads the flag.
    """
    model = state.model
    with autocast(state.device):
        logits, st = model(x, mask, stats=state.stats)
    loss = trial_loss(logits, y, st, state.cfg, state.adjust)
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), state.clip)
    return apply_step(state, loss, gn)


def apply_step(state: Any, loss: torch.Tensor, gn: torch.Tensor) -> torch.Tensor:
    """The end of a step once gradients are clipped (`gn`: the norm(s) before clipping, one
    per replicate when batched): the divergence flag (first bad step, kept on the device, no
    host sync), the grad-norm sum, the optimizer and the schedule. `state` holds opt, sched,
    step, first_bad and gn_sum (a `TrainState`, or the batched replicas)."""
    bad = ~(torch.isfinite(loss) & torch.isfinite(gn))
    state.first_bad = torch.where(bad & (state.first_bad < 0), state.step + 1, state.first_bad)
    state.gn_sum += torch.nan_to_num(gn, nan=0.0, posinf=0.0)
    state.opt.step()
    state.sched.step()
    state.step += 1
    return loss.detach()
