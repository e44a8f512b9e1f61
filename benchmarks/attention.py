"""The attention training step: throughput ratios and peak tensor memory.

- `attention_ratios`: the fused SDPA path against the explicit softmax path (the oracle), and
  the attention kinds (local, low_rank) and ALiBi against full attention, for a training step
  (`study.step.train_step`: forward, loss, backward, clip, AdamW and schedule step).
- `textbook_comparison`: the model's SDPA path against `textbook_attention`, a per-head loop
  written here (scores, mask, softmax, dropout, weighted sum, one head at a time), swapped into
  the same model: same shapes, same training step. Time per step and peak memory of tensors
  allocated during one step (`peak_step_bytes`: CUDA's allocator statistics on a GPU; on the
  CPU a dispatch mode that follows every tensor storage an operator creates until it is freed).
- `short_rows`: the default study's model (MNIST-1D, 10 tokens; on the CPU attention dropout 0.1)
  with `study.model.attend` (written out with the padded softmax) against plain SDPA on the CPU;
  on CUDA SDPA against `attend_written_out` in a captured step. A training step and an
  evaluation forward, alternated in one process.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from study.config import TrialConfig
from study.device import autocast
from study.model import Attention, AttentionModel, ModelSpec, attend_written_out, build_model
from study.step import GRAPH_WARMUP, TrainState, make_optimizer, train_step


def textbook_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                       is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Multi-head attention as textbooks write it, one head at a time, with the signature of
    `F.scaled_dot_product_attention` (q, k, v: `(B, nh, T, hs)`; `attn_mask` bool, True =
    attend, or an additive float bias, broadcast over heads when its head axis is 1)."""
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if is_causal:
        attn_mask = torch.ones(T, k.shape[-2], dtype=torch.bool, device=q.device).tril()
    heads = []
    for h in range(H):
        scores = (q[:, h] @ k[:, h].transpose(-1, -2)) * scale  # (B, T, S)
        if attn_mask is not None:
            m = attn_mask
            if m.dim() == 4:
                m = m[:, h if m.shape[1] > 1 else 0]
            scores = (scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool
                      else scores + m)
        p = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            p = F.dropout(p, dropout_p)
        heads.append(p @ v[:, h])
    return torch.stack(heads, dim=1)


@contextlib.contextmanager
def use_kernel(model: AttentionModel, kernel: Callable[..., torch.Tensor] | None
               ) -> Iterator[None]:
    """Run `model`'s attention layers with `kernel` instead of SDPA (None: as built)."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if kernel is None or not layers:
        yield
        return
    if all(hasattr(m, "kernel") for m in layers):
        saved = [m.kernel for m in layers]
        for m in layers:
            m.kernel = kernel
        try:
            yield
        finally:
            for m, k in zip(layers, saved):
                m.kernel = k
        return
    # a model without a swappable kernel calls F.scaled_dot_product_attention directly
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = kernel
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class _LiveTensors(TorchDispatchMode):
    """Bytes of the tensor storages created by operators while active and not yet freed, and
    their peak. PyTorch keeps a storage's Python object alive as long as the storage, so a
    finalizer on it runs when the memory is released (autograd's saved tensors included)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key, nbytes = id(st), st.nbytes()
            if nbytes == 0 or key in self._seen:
                continue
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key, nbytes)
        return out


def peak_step_bytes(step: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of tensors allocated during one call of `step` (above what was allocated
    before it)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    mode = _LiveTensors()
    with mode:
        step()
    return mode.peak


def _state(cfg: TrialConfig, spec: ModelSpec, device: torch.device, steps: int,
           stats: bool = False, mode: str = "eager") -> TrainState:
    torch.manual_seed(0)
    model = build_model(cfg, spec).to(device).train()
    opt, sched = make_optimizer(model, cfg, steps, capturable=mode == "graph")
    return TrainState(model, opt, sched, cfg, stats=stats, mode=mode)


def _batch(spec: ModelSpec, batch: int, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, spec.vocab_size, (batch, spec.max_len), generator=g).to(device)
    y = torch.randint(0, spec.n_classes, (batch,), generator=g).to(device)
    return x, y, torch.ones_like(x, dtype=torch.bool)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(state: TrainState, batch: tuple[torch.Tensor, ...], device: torch.device,
                warmup: int, iters: int) -> float:
    """Seconds per `train_step` of `state` on `batch` (mean of `iters` after `warmup`, the
    device synchronized before and after the timed steps)."""
    for _ in range(warmup):
        train_step(state, *batch)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        train_step(state, *batch)
    _sync(device)
    return (time.perf_counter() - t0) / iters


def step_time(cfg: TrialConfig, spec: ModelSpec, device: torch.device, batch: int,
              explicit: bool, iters: int, kernel: Callable[..., torch.Tensor] | None = None,
              warmup: int = 3) -> float:
    """Seconds per training step (mean of `iters` after `warmup`)."""
    state = _state(cfg, spec, device, warmup + iters, stats=explicit)
    with use_kernel(state.model, kernel):
        return timed_steps(state, _batch(spec, batch, device), device, warmup, iters)


def shapes(cuda: bool) -> tuple[TrialConfig, ModelSpec, int, int]:
    """The benchmark's model, inputs, batch and timed steps: seq 1024, batch 32, d_model 256
    on a GPU; seq 256, batch 16, d_model 64 on the CPU."""
    T, batch, iters = (1024, 32, 20) if cuda else (256, 16, 5)
    spec = ModelSpec(n_classes=10, max_len=T, vocab_size=64)
    cfg = TrialConfig(d_model=256 if cuda else 64, n_heads=8 if cuda else 4, n_layers=4,
                      d_ff=1024 if cuda else 128, attn_window=32, attn_rank=64)
    return cfg, spec, batch, iters


def attention_ratios(device: torch.device) -> dict[str, Any]:
    """The step time of full SDPA attention, and the other paths as ratios to it."""
    cfg, spec, batch, iters = shapes(device.type == "cuda")
    full = step_time(cfg, spec, device, batch, False, iters)

    def other(c: TrialConfig, explicit: bool = False) -> float:
        return step_time(c, spec, device, batch, explicit, iters)

    rows = {
        "sdpa_vs_explicit_speedup": other(cfg, explicit=True) / full,
        "local_vs_full_speedup": full / other(cfg.replace(attn_kind="local")),
        "low_rank_vs_full_speedup": full / other(cfg.replace(attn_kind="low_rank")),
        "alibi_vs_sinusoidal_slowdown": other(cfg.replace(pos_encoding="alibi")) / full,
    }
    return {"seq_len": spec.max_len, "batch": batch, "d_model": cfg.d_model,
            "n_heads": cfg.n_heads, "n_layers": cfg.n_layers, "full_step_ms": full * 1e3,
            "ratios": rows}


def textbook_comparison(device: torch.device, rounds: int = 3) -> dict[str, Any]:
    """Our SDPA training step vs the per-head textbook loop in the same model: the speedup
    (median over `rounds` alternating measurements) and the ratio of peak step memory."""
    cfg, spec, batch, iters = shapes(device.type == "cuda")
    ours, book = [], []
    for _ in range(rounds):  # alternated, so a change in machine load hits both alike
        ours.append(step_time(cfg, spec, device, batch, False, iters))
        book.append(step_time(cfg, spec, device, batch, False, iters,
                              kernel=textbook_attention))
    peaks = {}
    for name, kernel in (("ours", None), ("textbook", textbook_attention)):
        state = _state(cfg, spec, device, 4)
        x, y, mask = _batch(spec, batch, device)
        with use_kernel(state.model, kernel):
            for _ in range(2):  # gradients and optimizer state exist before the measured step
                train_step(state, x, y, mask)
            peaks[name] = peak_step_bytes(
                lambda s=state, b=(x, y, mask): train_step(s, *b), device)
    t_ours, t_book = sorted(ours)[len(ours) // 2], sorted(book)[len(book) // 2]
    return {"seq_len": spec.max_len, "batch": batch, "d_model": cfg.d_model,
            "n_heads": cfg.n_heads, "n_layers": cfg.n_layers,
            "ours_step_ms": t_ours * 1e3, "textbook_step_ms": t_book * 1e3,
            "speedup": t_book / t_ours,
            "ours_peak_mb": peaks["ours"] / 1e6, "textbook_peak_mb": peaks["textbook"] / 1e6,
            "peak_mem_ratio": peaks["ours"] / peaks["textbook"] if peaks["textbook"] else None,
            "memory_method": ("torch.cuda.max_memory_allocated during one step"
                              if device.type == "cuda" else
                              "peak bytes of tensor storages created during one step "
                              "(dispatch mode + storage finalizers)")}


def short_rows(device: torch.device, rounds: int = 5, steps: int = 30,
               dropout: float | None = None) -> dict[str, Any]:
    """The default study's model (`benchmarks.trials.DEFAULT_TRIAL`, attention dropout
    `dropout`, its MNIST-1D data: rows of 10 keys) with two attention kernels: ms per training
    step (batch 64, mean of `steps`) and per evaluation forward (512 rows, no grad), each the
    median of `rounds` alternated measurements, and the two kernels' first losses (the same
    model and batch both ways: they agree within float rounding). On the CPU `study.model.attend`
    (written out there) against `F.scaled_dot_product_attention`, attention dropout 0.1 by
    default; on CUDA SDPA (what `attend` calls there) against `attend_written_out` (what the
    batched replicates use on such rows), the step captured in a CUDA graph as a trial's is,
    no dropout by default (the trials section's config)."""
    from benchmarks.trials import DEFAULT_TRIAL
    from study.tasks import get_task

    cuda = device.type == "cuda"
    dropout = dropout if dropout is not None else (0.0 if cuda else 0.1)
    cfg = TrialConfig(**{**DEFAULT_TRIAL, "attn_dropout": dropout})
    data = get_task(cfg)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(data.train), (cfg.batch_size,), generator=g)
    batch = tuple(t[idx].to(device) for t in (data.train.x, data.train.y, data.train.mask))
    rows = tuple(t[:512].to(device) for t in (data.train.x, data.train.mask))
    kernels: dict[str, Callable[..., torch.Tensor] | None] = (
        {"sdpa": None, "written_out": attend_written_out} if cuda
        else {"attend": None, "sdpa": F.scaled_dot_product_attention})
    mode, warmup = ("graph", GRAPH_WARMUP + 2) if cuda else ("eager", 1)
    states = {name: _state(cfg, data.spec, device, 1 + rounds * (warmup + steps), mode=mode)
              for name in kernels}
    first = {}
    for name, state in states.items():
        with use_kernel(state.model, kernels[name]):
            torch.manual_seed(0)  # the same dropout draws both ways
            first[name] = float(train_step(state, *batch))
    step_ms: dict[str, list[float]] = {name: [] for name in kernels}
    eval_ms: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(rounds):  # alternated, so a change in machine load hits both alike
        for name, state in states.items():
            with use_kernel(state.model, kernels[name]):
                state.model.train()
                step_ms[name].append(timed_steps(state, batch, device, warmup, steps) * 1e3)
                state.model.eval()
                with torch.no_grad(), autocast(device):
                    _sync(device)
                    t0 = time.perf_counter()
                    state.model(*rows)
                    _sync(device)
                    eval_ms[name].append((time.perf_counter() - t0) * 1e3)
    med = {k: {n: sorted(v)[len(v) // 2] for n, v in d.items()}
           for k, d in (("step", step_ms), ("eval", eval_ms))}
    ours, other = list(kernels) if not cuda else ("written_out", "sdpa")
    return {"config": {**DEFAULT_TRIAL, "attn_dropout": dropout}, "tokens": data.spec.max_len
            // cfg.patch_size, "rounds": rounds, "steps": steps, "step_mode": mode,
            **{f"{n}_step_ms": med["step"][n] for n in kernels},
            "step_speedup": med["step"][other] / med["step"][ours],
            **{f"{n}_eval_ms": med["eval"][n] for n in kernels},
            "eval_speedup": med["eval"][other] / med["eval"][ours],
            "speedup_of": f"{ours} over {other}", "first_loss": first}
