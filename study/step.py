"""One training step, its loss and its optimizer: the one definition that `run_trial`, the
benchmarks and the model contract tests all run.

The step never waits for the host: the divergence flag and the grad-norm sum are device tensors
held in `TrainState` and read once per epoch. How it runs is chosen once per trial
(`resolve_step_mode`, the config's `step_mode`): `eager`; `graph`, the whole step (forward, loss,
backward, clipping, AdamW, divergence flag) captured in one CUDA graph per batch shape and
replayed; `compile`, the model's forward and backward through `torch.compile`. All three
compute the same step (tests/test_step_modes.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from study.config import TrialConfig
from study.device import autocast, autocast_dtype
from study.graphs import capture, why_not
from study.model import AttentionModel, AttnStats
from study.params import ParamGroups, cast_names, decays
from study.tasks.base import IGNORE

log = logging.getLogger(__name__)


def lr_lambda(total: int, warmup_frac: float) -> Callable[[int], float]:
    """The LR multiplier of step 0..total-1: `warm` = round(warmup_frac x total) steps of
    linear warmup below the peak (1/(warm+1), ..., warm/(warm+1)), the peak once at step
    `warm`, then cosine decay toward zero (reached one step after the last). warmup_frac 0:
    the peak at step 0, no warmup. (The peak used to fall on two steps, and a warmup of one
    step ran at the peak, so short runs had none.)"""
    warm = min(int(round(warmup_frac * total)), max(total - 1, 0))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return f


# devices with a fused AdamW kernel (one kernel per parameter, not ~10 elementwise ops): on the
# CPU a training step of the default model measured ~11% faster with it (8.7 -> 7.8 ms)
FUSED_ADAMW = ("cuda", "cpu")


def make_optimizer(
    model: AttentionModel, cfg: TrialConfig, total_steps: int, capturable: bool = False
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay on matrices only (not on biases, norm weights or gains) and its
    warmup + cosine schedule over `total_steps`. Build it after the model is on its device.
    `capturable`: the step may be captured in a CUDA graph (the learning rate is then a device
    tensor that the schedule fills in place)."""
    decay = [p for p in model.parameters() if decays(p)]
    no_decay = [p for p in model.parameters() if not decays(p)]
    return adamw(decay, no_decay, cfg, total_steps, capturable)


def adamw(
    decay: Sequence[torch.Tensor], no_decay: Sequence[torch.Tensor], cfg: TrialConfig,
    total_steps: int, capturable: bool = False, fused: tuple[str, ...] = FUSED_ADAMW,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """`make_optimizer` over given tensors: weight decay on `decay` only (`study.replicas`
    passes parameters stacked over replicates, whose matrices it picks itself); the fused
    kernel on the device types in `fused`."""
    device = [*decay, *no_decay][0].device
    lr: float | torch.Tensor = torch.tensor(cfg.lr, device=device) if capturable else cfg.lr
    opt = torch.optim.AdamW([{"params": list(decay), "weight_decay": cfg.weight_decay},
                             {"params": list(no_decay), "weight_decay": 0.0}], lr=lr,
                            betas=(0.9, 0.98), fused=device.type in fused,
                            capturable=capturable)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, cfg.warmup_frac))
    if capturable and opt.param_groups[0]["lr"] is not lr:
        # torch < 2.4 replaces a tensor learning rate at each schedule step, so a captured
        # step would keep the rate it was captured with
        raise RuntimeError("this torch's LR schedulers do not update a tensor learning rate "
                           "in place; use step_mode eager (or torch >= 2.5)")
    return opt, sched


def stacked_loss(logits: torch.Tensor, y: torch.Tensor, entropy: torch.Tensor | None,
                 cfg: TrialConfig, adjust: torch.Tensor | float = 0.0) -> torch.Tensor:
    """The training objective of k trials (a trial's replicates) at once: the `(k,)` losses.

    Cross-entropy with label smoothing on logits + `adjust` (logit adjustment, Menon et al.
    2020: `adjust` = tau log pi), plus PaLM's z-loss and the attention-entropy regulariser
    (when `entropy` is given), on stacked logits `(k, B[, T], C)`, targets `(k, B[, T])`
    (per-token tasks: IGNORE where unlabelled, counted out), attention entropies `(k, ...)`
    and adjustments `(k, C)` (or a float). Each replicate's loss is the mean over its labelled
    rows. Batched replicates call it outside vmap: vmap's rule for `F.cross_entropy` with an
    ignore index decomposed it into about 20 kernels a step (gather, scatter, masks); this is
    about 7. One trial (k = 1, `trial_loss`) takes the mean inside the kernel, 3 kernels fewer.
    """
    k, C = logits.shape[0], logits.shape[-1]
    logits = logits.float()
    if isinstance(adjust, torch.Tensor):
        adjust = adjust.view(k, *([1] * (logits.dim() - 2)), C)
    # flattened, with no boolean indexing: the step keeps static shapes (CUDA graphs)
    shifted, target = (logits + adjust).reshape(-1, C), y.flatten()
    keep = n = None
    if k == 1:
        loss = F.cross_entropy(shifted, target, ignore_index=IGNORE,
                               label_smoothing=cfg.label_smoothing).view(1)
    else:
        keep = (y != IGNORE).flatten(1)  # (k, N)
        n = keep.sum(1).clamp_min(1)  # (k,)
        ce = F.cross_entropy(shifted, target, ignore_index=IGNORE,
                             label_smoothing=cfg.label_smoothing, reduction="none")  # (k*N,)
        loss = ce.view(k, -1).sum(1) / n
    if cfg.z_loss > 0:  # keeps the softmax normalizer near 1 (before the adjustment; unlabelled
        # positions: none)
        if keep is None or n is None:
            keep = (y != IGNORE).flatten(1)
            n = keep.sum(1)
        z = torch.logsumexp(logits, -1).pow(2).reshape(k, -1)
        loss = loss + cfg.z_loss * torch.where(keep, z, 0.0).sum(1) / n
    if entropy is not None and cfg.attn_entropy_reg > 0:
        loss = loss + cfg.attn_entropy_reg * entropy.float().reshape(k, -1).mean(1)
    return loss


def trial_loss(
    logits: torch.Tensor, y: torch.Tensor, stats: AttnStats | None, cfg: TrialConfig,
    adjust: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """The training objective of one trial (`stacked_loss` with k = 1): logits `(B[, T], C)`,
    targets `(B[, T])`, its attention statistics (the entropy regulariser's; or None) and its
    logit adjustment `(C,)`; a scalar."""
    if isinstance(adjust, torch.Tensor):
        adjust = adjust[None]
    entropy = None if stats is None else stats.entropy[None]
    return stacked_loss(logits[None], y[None], entropy, cfg, adjust).view(())


def graph_blocker(cfg: TrialConfig, device: torch.device) -> str | None:
    """Why a config's step cannot be captured in a CUDA graph on `device` (None: it can)."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if cfg.length_mode == "bucket":
        return "length_mode bucket trims every batch to its own length (no static shapes)"
    if cfg.arch == "lstm_attention":
        return "arch lstm_attention: cuDNN's LSTM step is not captured"
    return None


def resolve_step_mode(cfg: TrialConfig, device: torch.device) -> tuple[str, str | None]:
    """The mode a trial's steps run in (`eager`, `graph` or `compile`) and why it differs from
    the config's `step_mode` (None when it does not, or when `auto` chose).

    `auto` takes the fastest that works: a CUDA graph where the step can be captured, else
    eager (on the CPU `compile` measured no faster than eager and costs ~30 s of compilation
    per configuration: README "Why the unmet goals are unmet")."""
    why = graph_blocker(cfg, device)
    if cfg.step_mode == "auto":
        return ("graph" if why is None else "eager"), None
    if cfg.step_mode == "graph" and why is not None:
        return "eager", f"step_mode graph falls back to eager: {why}"
    return cfg.step_mode, None


GRAPH_WARMUP = 3  # eager steps (on a side stream) before the first capture: lazy CUDA state


@dataclass
class _Graph:
    """One captured step for one batch shape: its static inputs and loss."""

    graph: Any
    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    loss: torch.Tensor


@dataclass
class TrainState:
    """What a training step reads and updates: the model, its optimizer and schedule, the loss
    settings (`cfg` and the logit adjustment), device-side accumulators of the epoch and how
    the step runs (`mode`: `eager`, `graph` or `compile`, see `resolve_step_mode`)."""

    model: AttentionModel
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    cfg: TrialConfig
    adjust: torch.Tensor | float = 0.0  # (C,) added to the training logits, see `trial_loss`
    stats: bool | None = None  # explicit softmax path; None: when the entropy regulariser needs it
    step: int = 0  # optimizer steps taken so far
    mode: str = "eager"
    # the parameters as a few leaves (`study.params`), which the optimizer steps and the
    # forward takes (cast groups cast once); the module's own are aliases. None: the module's
    groups: ParamGroups | None = None
    device: torch.device = field(init=False)
    gn_sum: torch.Tensor = field(init=False)  # () sum of finite grad norms this epoch
    first_bad: torch.Tensor = field(init=False)  # () first step with a non-finite loss/grad, or -1
    step_t: torch.Tensor = field(init=False)  # () `step` on the device (captured steps count it)
    # (x, y, mask) -> loss: the forward and `trial_loss`, compiled together in `compile` mode
    loss_of: Callable[..., torch.Tensor] = field(init=False)
    graphs: dict[tuple, _Graph] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.stats is None:
            self.stats = self.cfg.attn_entropy_reg > 0
        self.device = next(self.model.parameters()).device
        self.gn_sum = torch.zeros((), device=self.device)
        self.first_bad = torch.full((), -1, device=self.device, dtype=torch.long)
        self.step_t = torch.full((), self.step, device=self.device, dtype=torch.long)
        self.loss_of = self._loss
        if self.mode == "compile":  # the loss with the model: its float cast and cross-entropy
            # fuse into a few kernels (a large vocabulary's fp32 logits are never written out);
            # CUDA: CUDA graphs inside compiled regions as well
            self.loss_of = torch.compile(
                self._loss, dynamic=False,
                mode="reduce-overhead" if self.device.type == "cuda" else None)
        elif self.mode == "graph" and graph_blocker(self.cfg, self.device) is not None:
            raise ValueError(f"step mode graph: {graph_blocker(self.cfg, self.device)}")

    def _loss(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            if self.groups is None:
                logits, st = self.model(x, mask, stats=self.stats)
            else:
                logits, st = functional_call(self.model, self.groups.working(), (x, mask),
                                             {"stats": self.stats})
        return trial_loss(logits, y, st, self.cfg, self.adjust)

    def trained(self) -> list[torch.Tensor]:
        """The tensors the optimizer steps (whose gradients are clipped)."""
        if self.groups is None:
            return list(self.model.parameters())
        return list(self.groups.leaves.values())

    @property
    def clip(self) -> float:
        return self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")

    def start_epoch(self) -> None:
        """Reset the per-epoch accumulators in place (captured steps hold their addresses;
        the step count runs on across epochs)."""
        self.gn_sum.zero_()
        self.first_bad.fill_(-1)


def train_state(model: AttentionModel, cfg: TrialConfig, total_steps: int,
                adjust: torch.Tensor | float = 0.0, stats: bool | None = None
                ) -> tuple[TrainState, str | None]:
    """The optimizer, schedule and `TrainState` of `model` (on its device) for `total_steps`,
    stepping as `cfg.step_mode` resolves; also the fallback reason (`resolve_step_mode`)."""
    device = next(model.parameters()).device
    mode, why = resolve_step_mode(cfg, device)
    groups = None
    if grouped_params(mode):
        groups = ParamGroups(dict(model.named_parameters()), cast_names(model),
                             autocast_dtype(device))
        groups.alias_into(model)
        opt, sched = adamw(groups.decayed(True), groups.decayed(False), cfg, total_steps,
                           capturable=mode == "graph")
    else:
        opt, sched = make_optimizer(model, cfg, total_steps, capturable=mode == "graph")
    return TrainState(model, opt, sched, cfg, adjust=adjust, stats=stats, mode=mode,
                      groups=groups), why


def grouped_params(mode: str) -> bool:
    """Whether a trial's step takes its parameters as `ParamGroups` (`TrainState.groups`): in
    captured steps (`mode` "graph", on CUDA), whose cost is their kernel count. Under CUDA's
    autocast that casts the default model's 20 `Linear` parameters in 2 kernels forward and 2
    back, where autocast launched 40; clipping and AdamW then see 4 tensors, not 30.
    Eager steps keep the module's own parameters (no `functional_call` each step)."""
    return mode == "graph"


def train_step(
    state: TrainState, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Forward, `trial_loss`, backward, clip, optimizer and schedule step; returns the loss.

    A non-finite loss or grad norm records its step (1-based) in `state.first_bad` on the device;
    the step still runs, and the caller stops the trial when it reads the flag. In `graph` mode
    the whole step but the schedule (a device-side fill of the learning rate) replays one CUDA
    graph per batch shape, captured after `GRAPH_WARMUP` eager steps (`graph_step`).
    """
    if state.mode == "graph":
        return graph_step(state, x, y, mask, lambda *b: _eager_step(state, *b),
                          lambda *b: _captured_step(state, *b))
    return _eager_step(state, x, y, mask)


def graph_step(state: Any, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
               eager: Callable[..., torch.Tensor], captured: Callable[..., torch.Tensor]
               ) -> torch.Tensor:
    """One step in `graph` mode: `eager(x, y, mask)` (the whole step, schedule included) for the
    first `GRAPH_WARMUP` steps, on a side stream as capture needs; then `captured` (the same
    step in place, without the schedule) captured once per batch shape and replayed. `state`
    holds step, sched, device, mode and graphs (a `TrainState`, or the batched replicas); a
    config whose step cannot be captured falls back to `eager` for good."""
    if state.step >= GRAPH_WARMUP:
        return _replay(state, x, y, mask, eager, captured)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loss = eager(x, y, mask)
    torch.cuda.current_stream().wait_stream(side)
    return loss


def _eager_step(
    state: TrainState, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    loss = state.loss_of(x, y, mask)
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(state.trained(), state.clip)
    return apply_step(state, loss, gn)


def _captured_step(
    state: TrainState, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """What one CUDA graph holds: the step on tensors that outlive it. No gradient exists when
    capture starts (`_replay`), so the captured backward makes them in the graph's own memory
    and each replay writes them anew: no zeroing and no accumulation into kept gradients (31
    kernels a step fewer for the default model, one add per parameter and the zeroing)."""
    loss = state._loss(x, y, mask)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(state.trained(), state.clip)
    optimizer_step(state, loss, gn)
    return loss.detach()


def _replay(state: Any, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
            eager: Callable[..., torch.Tensor], captured: Callable[..., torch.Tensor]
            ) -> torch.Tensor:
    key = (tuple(x.shape), tuple(y.shape), tuple(mask.shape))
    g = state.graphs.get(key)
    if g is None:  # the first batch of this shape: capture (nothing runs) then replay
        sx, sy, sm = x.clone(), y.clone(), mask.clone()
        # the captured backward makes the gradients (`captured`): none may exist before, or it
        # would add into them; each graph then reads the gradients it made itself
        state.opt.zero_grad(set_to_none=True)
        try:
            graph, loss = capture(lambda: captured(sx, sy, sm), state.device)
        except Exception as e:  # something in this config cannot be captured: eager from now
            log.warning("step_mode graph falls back to eager at step %d: %s",
                        state.step + 1, why_not(e))
            state.mode, state.graphs = "eager", {}  # (a capture runs nothing: step_t holds)
            return eager(x, y, mask)
        g = state.graphs[key] = _Graph(graph, sx, sy, sm, loss)
    else:
        g.x.copy_(x)
        g.y.copy_(y)
        g.mask.copy_(mask)
    g.graph.replay()
    state.sched.step()
    state.step += 1
    return g.loss.clone()  # the graph's own loss tensor is overwritten by the next replay


def optimizer_step(state: Any, loss: torch.Tensor, gn: torch.Tensor) -> None:
    """The end of a step once gradients are clipped (`gn`: the norm(s) before clipping, one per
    replicate when batched), all on the device and in place (so a CUDA graph can hold it): the
    step count `step_t`, the divergence flag (the first bad step), the grad-norm sum and the
    optimizer. `state` holds opt, step_t, first_bad and gn_sum (a `TrainState`, or the batched
    replicas)."""
    bad = ~(torch.isfinite(loss) & torch.isfinite(gn))
    state.step_t.add_(1)
    state.first_bad.copy_(torch.where(bad & (state.first_bad < 0), state.step_t,
                                      state.first_bad))
    state.gn_sum.add_(torch.nan_to_num(gn, nan=0.0, posinf=0.0))
    state.opt.step()


def apply_step(state: Any, loss: torch.Tensor, gn: torch.Tensor) -> torch.Tensor:
    """The end of an eager step: `optimizer_step`, then the schedule and the host's count."""
    optimizer_step(state, loss, gn)
    state.sched.step()
    state.step += 1
    return loss.detach()
