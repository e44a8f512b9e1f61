"""A configuration's seed replicates trained as ONE batched computation (`torch.func`).

`train_replicas(cfgs, datas)` is `run_trial` for k replicates at once: it yields, after every
epoch, the list of the k replicates' `EpochResult`s that `run_trial` would have yielded one by
one (`study.trainable.lockstep` turns them into one `TrialReport`).

How. Each replicate's model is built exactly as `run_trial` builds it (its own seed, so its
initial weights are those of the unbatched run) and the k models' parameters are stacked
(`torch.func.stack_module_state`) and laid side by side in a few leaf tensors `(k, P)`, one per
group (`study.params.ParamGroups`: weight decay or not, cast by autocast or not), each parameter
a `(k, ...)` view of its leaf (`Replicas.params`). A training step
is the forward of one stateless copy of the model (`functional_call`) under
`torch.vmap(..., randomness="different")` over the stacked parameters and the k replicates'
batches, giving their logits, whose k losses are computed on the stacked outputs outside vmap
(`step.stacked_loss`); ordinary autograd on their sum gives each replicate's own
gradient (the replicates share no parameter), gathered in the leaves; then per-replicate
gradient clipping (each replicate's own global norm over its row, as `clip_grad_norm_`: one
norm and one multiply a group, for any k), one AdamW over the leaves (elementwise, so exactly
k AdamWs) and the same warmup + cosine schedule. In captured steps (CUDA graphs) each
projection is one batched product with its bias (`fused_linear`), and under autocast (CUDA) the
parameters autocast would cast one by one are grouped and cast a group at a time
(`Replicas.working_params`). Every
replicate draws its batches from its own data order (`make_batches` with a generator seeded by
its seed, as in `run_trial`) and, with `vary_data_seed`, from its own data. Non-finite losses
or gradient norms are flagged per replicate; a diverged replicate's NaNs stay in its own slice.

Evaluation: `Replicas.epoch_values` either runs the same vmap over the stacked parameters
(`vmap_eval`, the default on CUDA) or copies each replicate's parameters back into its own
module and runs `evaluation.epoch_metrics` on it (the default on the CPU, where it measured
about 1.3x faster: the batched forward does the same matmul work as k separate ones, plus the
separate bias adds and layer-norm affines of vmap's decompositions, and evaluation has no
backward or optimizer step whose overhead batching would save). The batched evaluation takes
`evaluation.eval_rows` rows of every replicate per chunk (on CUDA as many as an activation
budget allows, so the number of chunks does not grow with k) and turns the k replicates'
logits into their metrics in one computation (`evaluation.chunk_outputs`), not one per
replicate. After the final epoch the robustness sets (`evaluation.robustness_metrics`, once
per trial) go through the same batched forward where the replicates share them
(`Replicas.robustness_accs`), else through each replicate's own module (those sets may differ
between replicates), and every replicate's values are read to the host in one transfer.
Every replicate's data is on the device for the whole trial (`TaskData.on`).

Dropout, attention dropout and stochastic depth draw from one generator for all replicates
(vmap's `randomness="different"`: independent masks per replicate), seeded from the replicate
seeds (`dropout_seed`). A trial is therefore reproducible from its seeds, and replicates differ
from each other, but with dropout a replicate's masks are not those of `run_trial` with the
same seed (its initial weights and data order are): the batched and unbatched paths agree in
distribution, not draw for draw. Without dropout they agree up to float rounding (which Adam
amplifies only in parameters whose gradient is rounding noise, e.g. the key bias of full
attention, to which the softmax is invariant: only `attn_max_logit` sees it).

Attention. On the CPU, `F.scaled_dot_product_attention` without dropout dispatches to
`aten::_scaled_dot_product_flash_attention_for_cpu`, which has no vmap batching rule in torch
2.13 (vmap falls back to a per-replicate loop and warns "There is a performance drop because
we have not yet implemented the batching rule for ..."); with dropout SDPA takes its math path,
which vmap batches by decomposition. `folded_sdpa` (swapped into each `Attention.kernel` of the
stateless copy) is an `autograd.Function` with its own vmap rule: it folds the replicate axis
into the batch axis, `(k, B, nh, T, hs) -> (k*B, nh, T, hs)` (the mask likewise), runs the
kernel SDPA itself picks once (on the CPU the flash kernel, whose logsumexp it keeps for the
kernel's own backward: the same kernels as the unbatched path) and unfolds the output; autograd
differentiates that one physical call. Other backends (CUDA) run SDPA itself and recompute its
forward in the backward. With dropout, on rows of fewer than `SHORT_ROW` (16) keys, and
wherever `study.model.attend` writes attention out (the CPU), attention is written out
(`attend_written_out`, which vmap batches; a recomputed dropout would draw another mask). On
CUDA that avoids two things: SDPA with dropout under vmap (its batching rule), with which every
trial of the default study diverged at its first step on an H200 (non-finite loss: attention
dropout 0 to 0.2, 2 replicates; the GPU tests had no dropout), and the cuDNN kernels the fold
would call on short rows (47 to 175 us a call on the default model's 10-token rows). Measured
on two CPU cores before `attend` (one thread, the default MNIST-1D model, 4 replicates), a
training epoch took the same time with the fold and with vmap's fallback loop, within noise:
the flash kernel's cost is linear in its batch, so one call over k*B rows costs what k calls
over B rows do. The fold keeps one kernel call per layer (no
warning, no loop over replicates) for larger k and devices where calls cost more.

Autocast (bf16 on CUDA) does not reach every operation under vmap: `F.linear` with a bias is
decomposed before autocast sees it (the fp32 bias then made each projection's output fp32),
`F.conv1d` escapes it altogether, and `_SDPA`'s CUDA backward recomputes attention outside
autocast. So the stateless copy casts each `Linear`'s, `Conv1d`'s and attention call's inputs
to the autocast dtype itself (`AUTOCAST_FORWARD`, `autocast_inputs`), as autocast casts them
for one call: the batched step computes in the unbatched one's dtypes (on an H100 the fp32
recomputation had cost ~3x the bf16 kernels).

Fallbacks (`fallback_reason`; the trial then trains the replicates in lockstep, one model after
the other, exactly as `batching: lockstep`): one replicate; `length_mode: bucket` (each
replicate's batches are trimmed to their own lengths, so batch shapes differ); `arch:
lstm_attention` (`nn.LSTM` dispatches to `aten::mkldnn_rnn_layer` on the CPU, which has no
batching rule); attention dropout on CUDA with `LONG_ROWS_WITH_DROPOUT` (128) tokens or more
(written out, attention would keep k x batch x heads x tokens^2 probabilities for the backward,
where each unbatched trial uses SDPA's fused dropout kernel); replicates whose train/val/test
splits differ in shape.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.attention import SDPBackend

from study import metrics as M
from study.ahead import check_cancelled
from study.config import TrialConfig
from study.device import autocast, autocast_dtype, resolve_device
from study.evaluation import (
    STATS_BATCH,
    Outputs,
    accuracies_on_host,
    chunk_outputs,
    epoch_metrics,
    eval_rows,
    sets_accuracy,
)
from study.graphs import Captured
from study.model import (
    Attention,
    AttentionModel,
    attend_written_out,
    build_model,
    steps_per_token,
    written_out,
)
from study.params import ParamGroups, cast_names
from study.step import (
    adamw,
    apply_step,
    graph_step,
    optimizer_step,
    resolve_step_mode,
    stacked_loss,
)
from study.tasks.base import Split, TaskData
from study.train import (
    _RNG,
    EpochResult,
    check_padding,
    class_prior,
    device_batches,
    diverged_result,
    epoch_result,
    flops_per_sample,
    make_batches,
    read_values,
)

# --- attention with the replicate axis folded into the batch axis ----------------------------


def _fold(info: Any, in_dims: tuple[int | None, ...],
          tensors: tuple[torch.Tensor | None, ...]) -> tuple[int, int, list[Any]]:
    """Physical tensors of a vmap rule as `(k*B, ...)`: the vmapped dim moved first (unbatched
    tensors expanded to the k replicates), then merged with the logical batch dim. The mask's
    logical batch dim may be 1 (broadcast): it is expanded to B first."""
    k = int(info.batch_size)
    moved = [None if t is None else (t.movedim(d, 0) if d is not None else t.expand(k, *t.shape))
             for t, d in zip(tensors, in_dims)]
    B = int(moved[0].shape[1])  # type: ignore[union-attr]
    return k, B, [None if t is None else t.expand(k, B, *t.shape[2:]).reshape(k * B, *t.shape[2:])
                  for t in moved]


_FLASH_CPU = int(SDPBackend.FLASH_ATTENTION.value)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as the additive float mask SDPA converts it to (0 / -inf)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf"))


def _sdpa_backward(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                   scale: float | None) -> tuple[torch.Tensor, ...]:
    """Gradients of `F.scaled_dot_product_attention` (no dropout) w.r.t. q, k and v: the CPU
    flash kernel's own backward from the saved output and logsumexp, else (`lse` empty) by
    recomputing the forward under autograd."""
    if lse.shape[-1] > 0:
        return tuple(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, q, k, v, out, lse, 0.0, False, attn_mask=_float_mask(mask, q.dtype),
            scale=scale))
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
        y = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
        return tuple(torch.autograd.grad(y, (qd, kd, vd), g))


class _SDPA(torch.autograd.Function):
    """`F.scaled_dot_product_attention` (no dropout) whose vmap rule folds the replicate axis
    into the batch axis and calls the fused kernel once, so autograd records (and
    differentiates) one physical call over replicates x batch. Returns the output and the
    kernel's logsumexp (the CPU flash kernel, which SDPA itself picks there: its backward needs
    it) or an empty `(N, 0)` tensor (another backend: the backward recomputes the forward).
    Differentiate it with ordinary autograd (`Tensor.backward`), not inside `torch.func.grad`."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        if q.device.type == "cpu" and torch._fused_sdp_choice(
                q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                scale=scale) == _FLASH_CPU:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, attn_mask=_float_mask(mask, q.dtype), scale=scale)
            return out, lse
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out, q.new_zeros(q.shape[0], 0)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        q, k, v, mask, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.scale = scale

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, _: Any) -> Any:
        q, k, v, mask, out, lse = ctx.saved_tensors
        dq, dk, dv = _sdpa_backward(g, q, k, v, mask, out, lse, ctx.scale)
        return dq, dk, dv, None, None  # the mask (positions, ALiBi) is never trained

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], q: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, mask: torch.Tensor | None,
             scale: float | None) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[int, int]]:
        n, B, (q, k, v, mask) = _fold(info, in_dims[:4], (q, k, v, mask))
        y, lse = _SDPA.apply(q, k, v, mask, scale)
        return (y.view(n, B, *y.shape[1:]), lse.view(n, B, *lse.shape[1:])), (0, 0)


# Keys per row below which the batched replicates' attention is written out on CUDA too: on an
# H200 the fold's cuDNN kernels took 47 us a forward on 10-token rows at 4 replicates (175 us at
# 16), run twice (the backward recomputes the forward) besides a 27 us (96 us) backward, for a
# few small matmuls' work (benchmarks/results/profile-NVIDIA-H200.txt)
SHORT_ROW = 16


# CUDA, attention dropout: from this many tokens a trial's replicates train in lockstep, each
# with SDPA's fused dropout kernel, not batched with attention written out (`fallback_reason`)
LONG_ROWS_WITH_DROPOUT = 128


def folded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                scale: float | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention` for `Attention.kernel` under `torch.vmap`: one fused
    call over replicates x batch; written out (`attend_written_out`, which vmap batches,
    drawing each replicate's own dropout mask) with dropout, on rows of fewer than `SHORT_ROW`
    keys, and wherever `study.model.attend` writes attention out (the CPU). With dropout on
    CUDA, SDPA under vmap (its batching rule) gave non-finite losses: on an H200 every trial of
    the default study (attention dropout 0 to 0.2, 2 replicates) diverged at its first step."""
    if dropout_p > 0.0 or written_out(q, k, dropout_p) or k.shape[-2] < SHORT_ROW:
        return attend_written_out(q, k, v, attn_mask, dropout_p, scale)
    out: torch.Tensor = _SDPA.apply(*autocast_inputs(q, k, v, attn_mask), scale)[0]
    return out


class _SavesLinear(torch.autograd.Function):
    """What a projection's backward needs: its input, its weight and whether it has a bias."""

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, w, b = inputs
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None


class _Linear(_SavesLinear):
    """`F.linear` whose vmap rule runs the k replicates' projections as one batched product
    with the bias (`_StackedLinear`: one `baddbmm` forward, which on CUDA likely launches a
    copy of the bias into the output and the product; 3 kernels backward). vmap's own rule
    decomposes `F.linear` into a product, a multiplication by 1 and an addition, and its
    backward adds a multiplication and a copy of each weight gradient out of the transposed
    layout: 9 kernels a projection for 4 or 5."""

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gx = g @ w if ctx.needs_input_grad[0] else None
        gw = g2.mT @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], x: torch.Tensor, w: torch.Tensor,
             b: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        n = int(info.batch_size)
        xs, ws, bs = (None if t is None else (t.movedim(d, 0) if d is not None
                                              else t.expand(n, *t.shape))
                      for t, d in zip((x, w, b), in_dims))
        assert xs is not None and ws is not None
        out = _StackedLinear.apply(xs.reshape(n, -1, xs.shape[-1]), ws, bs)  # (n, N, out)
        return out.view(*xs.shape[:-1], ws.shape[-2]), 0


class _StackedLinear(_SavesLinear):
    """k projections at once: `x (k, N, in) @ w (k, out, in)^T + b (k, out)`, one `baddbmm`
    (`bmm` without a bias); the backward makes each gradient in its operand's own layout."""

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if b is None:
            return torch.bmm(x, w.mT)
        return torch.baddbmm(b.unsqueeze(1), x, w.mT)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, w = ctx.saved_tensors
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None  # (k, N, in)
        gw = torch.bmm(g.mT, x) if ctx.needs_input_grad[1] else None  # (k, out, in)
        gb = g.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def autocast_linear(self: torch.nn.Linear, x: torch.Tensor, fused: bool = False
                    ) -> torch.Tensor:
    """`nn.Linear.forward` for the stateless copy under vmap: the input, weight and bias cast
    to the autocast dtype first, as autocast casts them for one `F.linear` call. Under vmap,
    `F.linear` with a bias is decomposed (matmul, then the bias added) before autocast sees it:
    the matmul ran in bf16 but adding the fp32 bias made every projection's output fp32, where
    an unbatched trial's is bf16 (more casts a step, and not the same computation). `fused`:
    one batched product a projection (`_Linear`, `fused_linear`)."""
    inp, weight, bias = autocast_inputs(x, self.weight, self.bias)
    assert inp is not None and weight is not None
    if fused:
        out: torch.Tensor = _Linear.apply(inp, weight, bias)
        return out
    return F.linear(inp, weight, bias)


def fused_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`autocast_linear` as one batched product a projection: what captured steps use
    (`fused_projections`)."""
    return autocast_linear(self, x, fused=True)


def fused_projections(mode: str) -> bool:
    """Whether the stateless copy's projections are `fused_linear` (4 or 5 kernels each,
    forward and backward) rather than vmap's own rule for `F.linear` (9): in captured steps (`mode`
    "graph"), where the kernels are what a step costs. `_Linear`'s vmap rule runs in Python
    (about 0.15 ms a call on the CPU), which a captured step pays once, at capture, and an
    eager one at every call: on the CPU's eager steps vmap's rule was as fast or faster."""
    return mode == "graph"


def autocast_conv1d(self: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """`nn.Conv1d.forward` for the stateless copy (`embed: conv`): under vmap the convolution
    escapes autocast altogether (fp32 out, where an unbatched trial's is bf16)."""
    inp, weight, bias = autocast_inputs(x, self.weight, self.bias)
    assert inp is not None and weight is not None
    return self._conv_forward(inp, weight, bias)


# the modules whose forward `Replicas` replaces in its stateless copy, and with what
AUTOCAST_FORWARD: dict[type, Any] = {torch.nn.Linear: autocast_linear,
                                     torch.nn.Conv1d: autocast_conv1d}


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The floating tensors cast to the autocast dtype where autocast is on (their device's),
    as SDPA's own autocast rule casts its inputs: `_SDPA` then saves and recomputes the
    attention in that dtype. Without this, q and k that RoPE, a learned temperature or the
    QK-norm gain promoted to fp32 reached the backward's recomputation (which runs outside
    autocast) in fp32: on an H100, fp32 memory-efficient kernels at ~3x the bf16 ones' time."""
    dev = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)  # autocast keeps fp64


# --- when the replicates cannot be batched ----------------------------------------------------


def fallback_reason(cfgs: Sequence[TrialConfig], datas: Sequence[TaskData]) -> str | None:
    """Why these replicates (configs that differ in `seed`/`data_seed` only, and their data)
    cannot train as one batched computation; None when they can."""
    cfg = cfgs[0]
    if len(cfgs) < 2:
        return "one replicate: nothing to batch"
    if cfg.length_mode == "bucket":
        return ("length_mode=bucket: each replicate's batches are trimmed to their own lengths, "
                "so batch shapes differ between replicates")
    if cfg.arch == "lstm_attention":
        return "arch=lstm_attention: nn.LSTM (aten::mkldnn_rnn_layer) has no vmap batching rule"
    tokens = -(-int(datas[0].train.x.shape[1]) // steps_per_token(cfg, datas[0].spec))
    if (cfg.attn_dropout > 0 and tokens >= LONG_ROWS_WITH_DROPOUT
            and resolve_device(cfg).type == "cuda"):
        return (f"attn_dropout on CUDA with {tokens} tokens: batched, attention with dropout is "
                "written out (k x batch x heads x tokens^2 probabilities kept for the backward), "
                "unbatched it is SDPA's fused kernel")
    for name in ("train", "val", "test"):
        shapes = {(tuple(getattr(d, name).x.shape), tuple(getattr(d, name).y.shape))
                  for d in datas}
        if len(shapes) > 1:
            return f"the replicates' {name} splits differ in shape ({sorted(shapes)})"
    return None


def dropout_seed(cfgs: Sequence[TrialConfig]) -> int:
    """The seed of the one dropout stream of a batched trial, from its replicates' seeds."""
    return int(np.random.SeedSequence([c.seed for c in cfgs]).generate_state(1)[0])


# --- the batched trial ------------------------------------------------------------------------


@dataclass
class _Stacked:
    """One split of every replicate on the device: `(k, N, ...)`, or `(N, ...)` when all
    replicates share the same data (`shared`)."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    shared: bool

    @classmethod
    def of(cls, splits: Sequence[Split], device: torch.device) -> _Stacked:
        if all(s is splits[0] for s in splits):
            s = splits[0].to(device)
            return cls(s.x, s.y, s.mask, True)
        x, y, mask = (torch.stack([getattr(s, f) for s in splits]).to(device)
                      for f in ("x", "y", "mask"))
        return cls(x, y, mask, False)

    def __len__(self) -> int:
        return int(self.y.shape[0 if self.shared else 1])

    def split(self, r: int) -> Split:
        """Replicate r's split (views, no copy)."""
        if self.shared:
            return Split(self.x, self.y, self.mask)
        return Split(self.x[r], self.y[r], self.mask[r])

    def rows(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.shared:
            return self.x[i:j], self.y[i:j], self.mask[i:j]
        return self.x[:, i:j], self.y[:, i:j], self.mask[:, i:j]

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The rows `idx` `(k, B)` of each replicate: `(k, B, ...)`."""
        if self.shared:
            return self.x[idx], self.y[idx], self.mask[idx]
        r = torch.arange(idx.shape[0], device=idx.device)[:, None]
        return self.x[r, idx], self.y[r, idx], self.mask[r, idx]


class Replicas:
    """k replicates of one configuration as stacked parameters, one optimizer and one
    stateless model (`functional_call`)."""

    def __init__(self, cfgs: Sequence[TrialConfig], datas: Sequence[TaskData],
                 vmap_eval: bool | None = None) -> None:
        self.cfg = cfg = cfgs[0]
        self.k = len(cfgs)
        self.device = device = resolve_device(cfg)
        self.lengths = [d.train.lengths().cpu().numpy() for d in datas]
        for d in {id(d): d for d in datas}.values():  # shared data is checked once
            check_padding(d)
        # each split once on the device: stacked `(k, N, ...)` (or one, when shared), and each
        # replicate's data made of views of it, plus its evaluation sets
        self.train = _Stacked.of([d.train for d in datas], device)
        self.val = _Stacked.of([d.val for d in datas], device)
        self.test = _Stacked.of([d.test for d in datas], device)
        extras = {id(d): {n: s.to(device) for n, s in d.extra.items()} for d in datas}
        self.shared_extra = len(extras) == 1
        self.cfgs = list(cfgs)
        self.datas = datas = [dataclasses.replace(
            d, train=self.train.split(r), val=self.val.split(r), test=self.test.split(r),
            extra=extras[id(d)]) for r, d in enumerate(datas)]
        self.models: list[AttentionModel] = []
        self.gens: list[torch.Generator] = []
        for c, d in zip(cfgs, datas):
            with _RNG(c.seed, device).scope():  # exactly as `run_trial` builds its model
                self.models.append(build_model(c, d.spec).to(device))
                self.gens.append(torch.Generator().manual_seed(c.seed))
        params, _ = stack_module_state(self.models)  # (k, ...) each
        # each replicate's parameters side by side in a few `(k, P)` leaves
        # (`study.params`): clipping multiplies one tensor a group for any k, and under autocast
        # a cast group is cast in one kernel each way
        self.flat = ParamGroups(params, cast_names(self.models[0]), autocast_dtype(device),
                                lead=1)
        # buffers (positional tables) depend on the config only: one copy, not vmapped
        self.buffers = dict(self.models[0].named_buffers())
        self.base = copy.deepcopy(self.models[0]).to("meta")
        # the one model runs every replicate: it masks padding if any replicate's data has it
        self.base.spec = dataclasses.replace(
            self.base.spec, padded=any(d.spec.padded for d in datas))
        # CUDA: the whole batched step captured in CUDA graphs (`step.graph_step`), as a
        # single trial's is: vmap's per-operation dispatch is paid once, at capture
        self.mode = "graph" if resolve_step_mode(cfg, device)[0] == "graph" else "eager"
        forwards: dict[type, Any] = dict(AUTOCAST_FORWARD)
        if fused_projections(self.mode):
            forwards[torch.nn.Linear] = fused_linear
        for mod in self.base.modules():
            if isinstance(mod, Attention):
                mod.kernel = folded_sdpa
            if type(mod) in forwards:  # a partial, not a bound method: it pickles
                mod.forward = functools.partial(forwards[type(mod)], mod)
        self.steps_per_epoch = math.ceil(len(self.train) / cfg.batch_size)
        self.vmap_eval = vmap_eval if vmap_eval is not None else device.type == "cuda"
        self.graphs: dict[tuple, Any] = {}
        decay, no_decay = self.flat.decayed(True), self.flat.decayed(False)
        # not the CPU's fused AdamW over stacked tensors: with it, identical replicates with
        # identical gradients had different weights after 2 steps (cause not pinned down:
        # plain stacked tensors did not reproduce it)
        self.opt, self.sched = adamw(decay, no_decay, cfg, cfg.epochs * self.steps_per_epoch,
                                     capturable=self.mode == "graph", fused=("cuda",))
        # Menon et al. 2020: train on logits + tau log pi, with each replicate's own prior
        self.adjust = torch.stack([c.logit_adjust_tau * class_prior(d).clamp_min(1e-12).log()
                                   for c, d in zip(cfgs, datas)]).to(device)
        self.stats = cfg.attn_entropy_reg > 0
        self.clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        self.rng = _RNG(dropout_seed(cfgs), device)
        self.step = 0
        self.step_t = torch.zeros((), device=device, dtype=torch.long)
        self.gn_sum = torch.zeros(self.k, device=device)  # (k,) per replicate, as TrainState's
        self.first_bad = torch.full((self.k,), -1, device=device, dtype=torch.long)
        self._train_forward = vmap(self._forward_one, randomness="different")
        # CUDA: the batched evaluation captured too (`study.graphs.Captured`), as the step is
        self._batched_values = Captured(self._values, self.mode == "graph")

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Each parameter, stacked `(k, ...)`: a view of its group's leaf (`ParamGroups`)."""
        return self.flat.views()

    def working_params(self) -> dict[str, torch.Tensor]:
        """`params` as the forward takes them (`ParamGroups.working`: cast groups cast)."""
        return self.flat.working()

    def start_epoch(self) -> None:
        """Reset the per-epoch accumulators in place (captured steps hold their addresses)."""
        self.gn_sum.zero_()
        self.first_bad.fill_(-1)

    def _forward_one(self, params: dict[str, torch.Tensor], x: torch.Tensor, m: torch.Tensor
                     ) -> tuple[torch.Tensor, ...]:
        """One replicate's training forward (vmapped by `_train_forward`): its logits, and its
        attention entropies where the loss needs them."""
        with autocast(self.device):
            logits, st = functional_call(self.base, (params, self.buffers), (x, m),
                                         {"stats": self.stats})
        return (logits,) if st is None else (logits, st.entropy)

    def _losses(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                m: torch.Tensor, adjust: torch.Tensor) -> torch.Tensor:
        """The `(k,)` training losses: the forward vmapped, the loss on its stacked outputs
        (`stacked_loss`)."""
        logits, *entropy = self._train_forward(params, x, m)
        return stacked_loss(logits, y, entropy[0] if entropy else None, self.cfg, adjust)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """`step.train_step` for every replicate at once, on batches `(k, B, ...)`; returns the
        `(k,)` losses. Flags and grad norms are per replicate, on the device."""
        if self.mode == "graph":
            return graph_step(self, x, y, m, self._eager_step, self._captured_step)
        return self._eager_step(x, y, m)

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss, gn = self._clipped(x, y, m)
        return apply_step(self, loss, gn)

    def _captured_step(self, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor
                       ) -> torch.Tensor:
        """The step as a CUDA graph holds it (as `step._captured_step`: the captured backward
        makes the gradients, which each replay writes anew)."""
        loss, gn = self._clipped(x, y, m)
        optimizer_step(self, loss, gn)
        return loss.detach()

    def _clipped(self, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The `(k,)` losses and grad norms, gradients computed and clipped per replicate."""
        loss = self._losses(self.working_params(), x, y, m, self.adjust)  # (k,)
        # replicates are independent: d(sum)/d(replicate r's params) = d(loss_r)/d(...)
        loss.sum().backward()
        grads = self.flat.grads()  # (k, P) each
        # clip_grad_norm_ per replicate: the global norm over each replicate's own row
        gn = self.norms(grads)  # (k,)
        coef = (self.clip / (gn + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef[:, None])
        return loss, gn

    def norms(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        """`(k,)` each replicate's global L2 norm over stacked `(k, ...)` tensors, as one norm
        over them side by side (2 kernels, not one per tensor)."""
        return torch.linalg.vector_norm(torch.cat([t.reshape(self.k, -1) for t in tensors], 1),
                                        dim=1)

    def train_epoch(self) -> None:
        """One epoch: each replicate's own batch order, one batched step per batch."""
        self.base.train()
        self.start_epoch()
        orders = [make_batches(lengths, self.cfg.batch_size, False, gen)
                  for lengths, gen in zip(self.lengths, self.gens)]
        with self.rng.scope():
            steps = [np.stack(idx_np) for idx_np in zip(*orders)]  # (k, B) each
            for _, idx in device_batches(steps, self.device):
                self.train_step(*self.gather(idx))

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.train.gather(idx)

    # --- evaluation, batched over replicates ---

    @torch.no_grad()
    def _forward(self, x: torch.Tensor, m: torch.Tensor, shared: bool,
                 stats: bool = False) -> tuple[torch.Tensor, ...]:
        def fwd(params: dict[str, torch.Tensor], x: torch.Tensor,
                m: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with autocast(self.device):
                logits, st = functional_call(self.base, (params, self.buffers), (x, m),
                                             {"stats": stats})
            return (logits, st.entropy, st.max_logit) if st is not None else (logits,)
        dim = None if shared else 0
        out: tuple[torch.Tensor, ...] = vmap(fwd, in_dims=(0, dim, dim))(
            self.working_params(), x, m)
        return out

    @torch.no_grad()
    def outputs(self, split: _Stacked) -> Outputs:
        """Every replicate's `Outputs` on its own split, in chunks of `eval_rows` rows per
        replicate."""
        self.base.eval()
        seq_len = split.x.shape[1 if split.shared else 2]  # (k,) N, T (, C)
        rows = eval_rows(self.models[0], seq_len, self.device, self.k)
        parts = []
        for i in range(0, len(split), rows):
            check_cancelled()
            x, y, m = split.rows(i, i + rows)
            (logits,) = self._forward(x, m, split.shared)
            parts.append(chunk_outputs(logits, y.expand(self.k, *y.shape) if split.shared
                                       else y))
        return Outputs.cat(parts)

    def robustness_accs(self) -> list[dict[str, float]] | None:
        """Each replicate's accuracies on the robustness sets (`evaluation.set_accuracies`),
        by the batched forward and read in one transfer, where the replicates share those sets
        and evaluate batched (`vmap_eval`); None otherwise (each replicate's own module then
        evaluates them)."""
        if not (self.vmap_eval and self.shared_extra):
            return None
        return accuracies_on_host(sets_accuracy(
            lambda s: self.outputs(_Stacked(s.x, s.y, s.mask, True)), self.datas[0].extra),
            self.k)

    @torch.no_grad()
    def epoch_values(self) -> list[dict[str, torch.Tensor]]:
        """`evaluation.epoch_metrics` and the grad norm of every replicate (device tensors, in
        the order `run_trial` reports them): batched (`vmap_eval`), or each replicate's own
        module through `epoch_metrics` itself."""
        if self.vmap_eval:  # each replicate's values are views of the `(k,)` tensors
            stacked = self._batched_values()
            return [{n: v[r] for n, v in stacked.items()} for r in range(self.k)]
        gn = self.gn_sum / self.steps_per_epoch
        out = []
        for r, d in enumerate(self.datas):
            values = epoch_metrics(self.model(r), d, self.device)
            values[M.GRAD_NORM] = gn[r]
            out.append(values)
        return out

    @torch.no_grad()
    def _values(self) -> dict[str, torch.Tensor]:
        """`epoch_values` batched (`vmap_eval`), each metric `(k,)` for all replicates: what
        `_batched_values` captures on CUDA."""
        gn = self.gn_sum / self.steps_per_epoch
        tr, va = (self.outputs(s).scores() for s in (self.train, self.val))
        te = self.outputs(self.test).scores(ece=True)
        x, _, m = self.val.rows(0, STATS_BATCH)
        self.base.eval()
        _, entropy, max_logit = self._forward(x, m, self.val.shared, stats=True)
        # every statistic for all k at once
        per_head = entropy.float().mean(1)  # (k, L, nh)
        ent, ent_min = per_head.mean((1, 2)), per_head.amin((1, 2))  # (k,)
        max_logit = max_logit.float()
        param_norm = self.norms(f.detach().float() for f in self.flat.leaves.values())
        return {M.TRAIN_LOSS: tr[0], M.TRAIN_ACC: tr[1], M.VAL_LOSS: va[0],
                M.VAL_ACC: va[1], M.TEST_LOSS: te[0], M.TEST_ACC: te[1],
                M.ECE: cast(torch.Tensor, te[2]),  # evaluated with ece=True
                M.ATTN_ENTROPY: ent, M.ATTN_ENTROPY_MIN: ent_min, M.ATTN_MAX_LOGIT: max_logit,
                M.PARAM_NORM: param_norm, M.GRAD_NORM: gn}

    def model(self, r: int) -> AttentionModel:
        """Replicate r's own module, holding its current parameters (copied back)."""
        model = self.models[r]
        params = self.params  # every view at once (each call splits every leaf)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name][r])
        model.eval()
        return model


def train_replicas(cfgs: Sequence[TrialConfig], datas: Sequence[TaskData],
                   vmap_eval: bool | None = None) -> Iterator[list[EpochResult]]:
    """Train the replicates `cfgs` (one config with seeds seed, seed + 1, ...; each with its
    data in `datas`) as one batched computation and yield, after every epoch, each replicate's
    `EpochResult` (what `run_trial(cfgs[r], datas[r])` yields, see the module docstring for how
    far they agree). Stops after the first epoch in which some replicate diverged.
    `fallback_reason` must be None; `vmap_eval`: see `Replicas.epoch_values` (None: on CUDA)."""
    why = fallback_reason(cfgs, datas)
    if why is not None:
        raise ValueError(f"replicates cannot be batched: {why}")
    reps = Replicas(cfgs, datas, vmap_eval)
    cfg, device = reps.cfg, reps.device
    n_params = [m.n_params() for m in reps.models]
    flops = [flops_per_sample(m, c, d) for m, c, d in zip(reps.models, cfgs, datas)]
    n_train = len(reps.train)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        reps.train_epoch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        # each replicate trained on all its samples in this wall time (concurrently)
        samples_per_s = n_train / max(time.perf_counter() - t0, 1e-9)
        bad_steps = reps.first_bad.tolist()
        values = read_values(reps.epoch_values(), device)  # one transfer for all k
        accs = (reps.robustness_accs()
                if epoch == cfg.epochs and not all(b >= 0 for b in bad_steps) else None)
        results = []
        for r, (c, d) in enumerate(zip(cfgs, reps.datas)):
            if bad_steps[r] >= 0:
                results.append(diverged_result(epoch, n_params[r],
                                               f"diverged at step {bad_steps[r]}"))
                continue
            results.append(epoch_result(
                c, d, device, epoch, values[r], n_params=n_params[r], flops=flops[r],
                samples_per_s=samples_per_s, steps=reps.step,
                final_model=lambda r=r: reps.model(r),  # type: ignore[misc]
                accs=None if accs is None else accs[r]))
        yield results
        if any(res.diverged for res in results):
            return
