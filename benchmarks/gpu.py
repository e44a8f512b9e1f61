"""GPU-only measurements: model FLOP utilization (MFU) and packed trials through Ray.

- `mfu_gpt2_small`: a GPT-2-small-sized configuration of this project's model (d_model 768,
  12 layers, 12 heads, d_ff 3072, T = 1024 token inputs, a 50257-way per-token head) trained
  with bf16 autocast and `step_mode: compile`: tokens/s x (6N + 12 L d T) over the device's
  dense bf16 peak (`PEAK_BF16`), N the weights of every matmul (the head included, the token
  embedding not: a lookup), as in Kaplan et al. 2020 and PaLM's appendix B.
- `packing_throughput_x8`: whole-trial samples/s of 8 default trials running at once in Ray
  actors with `num_gpus=0.125` each (each capping its GPU memory share, as a packed sweep
  trial does, and warmed by a first trial) over one such trial alone.

- `mfu_profile`: where that step's time goes (kernels by kind, how busy the GPU was), for
  `python -m benchmarks.profile_trial --mfu BATCH` (`scripts/gpu-probe`).

The pure parts (`mfu`, `peak_flops`, `kernel_kind`, `kernel_shares`) are tested in
tests/test_bench.py, and `mfu_profile` on a small model on the CPU.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from study.step import TrainState

# dense bf16 peak FLOP/s by device name (without sparsity)
PEAK_BF16 = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H200": 989e12,
             "H100 PCIe": 756e12, "A100": 312e12}
GPT2_SMALL = {"d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072, "seq_len": 1024,
              "vocab": 50257}
# The MFU step's embedding and head are sized to the vocabulary rounded up to a multiple of 64
# (GPT-2's 50257 -> 50304, as nanoGPT and Megatron-LM pad it): a row of 50257 bf16 logits is not
# 16-byte aligned, which can rule out the GPU's fastest matmul kernels (those that load by TMA)
# for the head, over a quarter of the FLOPs a token is credited with. The padded rows' FLOPs get
# no credit (`gpt2_step`'s N counts the real ones); `mfu_gpt2_small` times the unpadded step
# beside it, as the gain is not measured yet.
VOCAB_MULTIPLE = 64


def padded_vocab(vocab: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-vocab // multiple) * multiple


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a device by its name, None when unknown."""
    for key, peak in PEAK_BF16.items():
        if all(part in device_name for part in key.split()):
            return peak
    if "H100" in device_name:  # an H100 not named as SXM or PCIe: the SXM figure, as asked
        return PEAK_BF16["H100 SXM"]
    return None


def flops_per_token(n_matmul: float, n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N (forward and backward of every weight) plus 12 L d T (the
    attention scores and their weighting, forward and backward)."""
    return 6.0 * n_matmul + 12.0 * n_layers * d_model * seq_len


def mfu(tokens_per_s: float, n_matmul: float, n_layers: int, d_model: int, seq_len: int,
        peak: float) -> float:
    return tokens_per_s * flops_per_token(n_matmul, n_layers, d_model, seq_len) / peak


def mfu_gpt2_small(batches: tuple[int, ...] = (32, 16, 8)) -> dict[str, Any]:
    """`mfu_at` the first batch size (sequences of 1024 tokens) that fits, trying `batches` in
    order: on an H100 batch 32 gave the best MFU in both runs that measured 8, 16 and 32
    (0.227 against 0.218 and 0.202; 0.340 against 0.322 and 0.301), and each size costs about
    30 s of compilation and timing. Then, at that size, the same step with the vocabulary
    unpadded (`unpadded`: the configuration of every figure measured before) and the
    padded step's speed over it (`pad_vocab_speedup`, tokens/s, same run)."""
    import torch

    tried: dict[int, Any] = {}
    for b in batches:
        try:
            run = mfu_at(b)
        except Exception as e:
            if not out_of_memory(e):
                raise
            # too large for this device: the next size
            tried[b] = f"out of memory: {str(e).splitlines()[0][:200]}"
            torch.cuda.empty_cache()
            continue
        tried[b] = run["value"]
        return {**run, "by_batch": tried, **unpadded_beside(run, b)}
    raise RuntimeError(f"no batch size fitted: {tried}")


def unpadded_beside(padded: dict[str, Any], batch: int) -> dict[str, Any]:
    """The unpadded step's `mfu_at` at `batch` (`unpadded`: its value, tokens/s and config;
    or why it did not run) and the padded run's tokens/s over it (`pad_vocab_speedup`)."""
    import torch

    try:
        run = mfu_at(batch, pad_vocab=False)
    except Exception as e:  # the headline figure stands without its comparison
        torch.cuda.empty_cache()
        return {"unpadded": {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"},
                "pad_vocab_speedup": None}
    keep = ("value", "tokens_per_s", "config", "peak_mem_gb")
    return {"unpadded": {k: run[k] for k in keep if k in run},
            "pad_vocab_speedup": padded["tokens_per_s"] / run["tokens_per_s"]}


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is, or was raised from, a CUDA out-of-memory error (`torch.compile` wraps
    one raised while it compiles or autotunes, e.g. in `BackendCompilerFailed`)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if type(cur).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def gpt2_step(batch: int, total_steps: int, dims: dict[str, int] = GPT2_SMALL,
              device: str = "cuda", step_mode: str = "compile", pad_vocab: bool = True
              ) -> tuple[TrainState, tuple[Any, ...], float, str | None]:
    """The MFU measurement's training: this project's model at `dims` (GPT-2 small), bf16
    autocast, `step_mode`, on random tokens `(batch, seq_len)` below `dims["vocab"]` with no
    padding mask; `pad_vocab`: embedding and head sized to `padded_vocab` (their extra rows
    never seen as a token or a target). Returns its `TrainState`, the step's inputs, N (the
    weights of every matmul, the padded rows not counted) and the fallback reason. `mfu_at`
    times it, `mfu_profile` profiles it (both on CUDA; the tests build a small one on the
    CPU)."""
    import torch
    from torch import nn

    from study.config import TrialConfig
    from study.model import ModelSpec, build_model
    from study.step import train_state

    g = dims
    cfg = TrialConfig(task="copy", d_model=g["d_model"], n_layers=g["n_layers"],
                      n_heads=g["n_heads"], d_ff=g["d_ff"], batch_size=batch, lr=3e-4,
                      pos_encoding="learned", device=device, step_mode=step_mode)
    # every position is real, as in language-model pretraining: no padding mask, so SDPA may
    # take its flash kernel (as `get_task` tells the model for a task without padding)
    rows = padded_vocab(g["vocab"]) if pad_vocab else g["vocab"]
    spec = ModelSpec(n_classes=rows, max_len=g["seq_len"], vocab_size=rows, per_token=True,
                     padded=False)
    model = build_model(cfg, spec).to(device)
    n_matmul = float(sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
                     - (rows - g["vocab"]) * model.head.in_features)  # the head's padded rows
    state, why = train_state(model, cfg, total_steps=total_steps)
    gen = torch.Generator(device=device).manual_seed(0)
    x, y = (torch.randint(0, g["vocab"], (batch, g["seq_len"]), device=device, generator=gen)
            for _ in range(2))
    mask = torch.ones(batch, g["seq_len"], dtype=torch.bool, device=device)
    return state, (x, y, mask), n_matmul, why


def mfu_at(batch: int, warmup: int = 5, steps: int = 20, pad_vocab: bool = True
           ) -> dict[str, Any]:
    import torch

    from benchmarks.attention import timed_steps

    torch._dynamo.reset()  # each batch size compiles afresh, from a clean cache
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    g = GPT2_SMALL
    state, inputs, n_matmul, why = gpt2_step(batch, warmup + steps, pad_vocab=pad_vocab)
    # the warm-up steps compile
    wall = timed_steps(state, inputs, torch.device("cuda"), warmup, steps) * steps
    tokens_per_s = batch * g["seq_len"] * steps / wall
    name = torch.cuda.get_device_name()
    peak = peak_flops(name)
    return {"config": {**g, "batch": batch, "step_mode": state.mode, "fallback": why,
                       "autocast": "bf16", "vocab_rows": padded_vocab(g["vocab"]) if pad_vocab
                       else g["vocab"]},
            "n_matmul_params": n_matmul, "tokens_per_s": tokens_per_s,
            "flops_per_token": flops_per_token(n_matmul, g["n_layers"], g["d_model"],
                                               g["seq_len"]),
            "peak_flops": peak, "device": name,
            "value": None if peak is None else mfu(tokens_per_s, n_matmul, g["n_layers"],
                                                   g["d_model"], g["seq_len"], peak),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}


# What a profiled operation or kernel is, by its name (the first pattern that matches): CUDA
# kernels (cuBLAS/CUTLASS GEMMs are named gemm, xmma, nvjet; flash and memory-efficient
# attention flash, fmha; Inductor's fused kernels triton_*) and, on the CPU, ATen operators
KERNEL_KINDS = (
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention"),
    ("matmul", r"gemm|xmma|nvjet|cutlass|cublas|triton_tem_.*mm|"
               r"aten::(mm|bmm|addmm|baddbmm|addbmm|matmul)$"),
    ("optimizer", r"adam|multi_tensor_apply|foreach"),
    ("fused (triton)", r"triton"),
    ("copy/fill", r"memcpy|memset|copy|fill|aten::cat$"),
    ("elementwise/reduce", r"elementwise|reduce|softmax|norm|gelu|dropout|nll|loss"),
)


def kernel_kind(name: str) -> str:
    """The `KERNEL_KINDS` kind of a kernel or operator name, or "other"."""
    low = name.lower()
    return next((kind for kind, pat in KERNEL_KINDS if re.search(pat, low)), "other")


def kernel_shares(times: dict[str, float]) -> dict[str, float]:
    """Each kind's share of the total time of `times` (name -> time), kinds in
    `KERNEL_KINDS` order, then "other"; empty when the total is 0."""
    total = sum(times.values())
    if total <= 0:
        return {}
    out = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}
    for name, t in times.items():
        out[kernel_kind(name)] += t / total
    return out


def mfu_profile(batch: int = 32, warmup: int = 5, steps: int = 5, rows: int = 25,
                dims: dict[str, int] = GPT2_SMALL, device: str = "cuda",
                step_mode: str = "compile", pad_vocab: bool = True) -> dict[str, Any]:
    """Where a step of the MFU measurement's training goes (`torch.profiler`, `steps` steps
    after `warmup`, which compile): on CUDA each kernel's device time, on the CPU each
    operator's self time; their shares by `KERNEL_KINDS`, how much of the wall time the
    device was busy (`busy_frac`: below 1, the GPU waited on the host), and the matmul
    kernels' own rate as a fraction of the peak (`matmul_peak_frac`: 6N FLOPs a token over
    the matmul kernels' time; `names`: how many kernels or operators by name: a CUDA graph's
    kernels are traced by CUPTI, and a `busy_frac` near 0 would say they were not). `table`:
    the top `rows` by that time. `pad_vocab`: as `gpt2_step`'s (the measured step's)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.attention import timed_steps

    cuda = device == "cuda"
    if cuda:
        torch._dynamo.reset()
    state, inputs, n_matmul, why = gpt2_step(batch, warmup + steps, dims, device, step_mode,
                                             pad_vocab)
    dev = torch.device(device)
    timed_steps(state, inputs, dev, 0, warmup)  # outside the profile (they compile), synced
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        wall = timed_steps(state, inputs, dev, 0, steps) * steps
    events = prof.key_averages()
    if cuda:  # the kernels themselves (a CPU operator's device time is its kernels')
        times = {e.key: e.device_time_total / 1e6 for e in events
                 if e.device_type == DeviceType.CUDA}
        sort = "self_device_time_total"
    else:
        times = {e.key: e.self_cpu_time_total / 1e6 for e in events}
        sort = "self_cpu_time_total"
    shares = kernel_shares(times)
    busy = sum(times.values())
    tokens = batch * dims["seq_len"] * steps
    peak = peak_flops(torch.cuda.get_device_name()) if cuda else None
    matmul_s = shares.get("matmul", 0.0) * busy
    return {"config": {**dims, "batch": batch, "step_mode": state.mode, "fallback": why,
                       "device": device,
                       "vocab_rows": padded_vocab(dims["vocab"]) if pad_vocab else dims["vocab"]},
            "steps": steps, "wall_s": wall, "busy_s": busy, "names": len(times),
            "busy_frac": busy / wall if cuda else None, "shares": shares,
            "matmul_peak_frac": (6 * n_matmul * tokens / matmul_s / peak
                                 if peak and matmul_s > 0 else None),
            "table": events.table(sort_by=sort, row_limit=rows, max_name_column_width=70)}


PACKING_TIMEOUT_S = 300.0  # the most any of the packing section's waits may take


class PackedWorker:
    """One packed trial process (a Ray actor, as a sweep's trial is), set up as a sweep's
    worker is (`trial_process`: its `cpus`, its GPU memory share `gpu`), then training default
    trials on request."""

    def __init__(self, cpus: float, gpu: float | None) -> None:
        from study.trainable import trial_process

        trial_process(cpus, gpu)

    def trial(self, epochs: int) -> float:
        """One default trial: its whole-trial samples/s (`trial_samples_per_s`)."""
        from benchmarks.trials import default_trial, trial_samples_per_s

        return trial_samples_per_s(default_trial(epochs))[0]

    def pid(self) -> int:
        import os
        return os.getpid()


def packing(epochs: int = 3, k: int = 8, gpu: bool = True) -> dict[str, Any]:
    """Sum of samples/s of k trials at once over one trial alone, each in its own Ray actor
    holding 1/k of the GPU (`gpu=False`: no GPU asked for, a check of the mechanics on the
    CPU). Every actor trains a one-epoch trial first, all at once, so that no timed trial
    pays a process's one-time costs (imports, CUDA context, the first optimizer's import of
    `torch._dynamo`, its data): before 2026-11-27 these were Ray tasks, which on a GPU run in
    a fresh worker process each (Ray's `max_calls` is 1 for GPU tasks), so every timed trial
    paid them, and they overlap across processes."""
    import ray

    from study.sweep.lifecycle import init_ray, sweep_environment

    with sweep_environment():
        cpus = init_ray(None).get("CPU", 1.0)
        frac = 1.0 / k
        # an actor holds its CPUs for life: k of them must fit at once, or some never start
        per_cpu = min(1.0, cpus / k)
        actor = ray.remote(num_gpus=frac if gpu else 0, num_cpus=per_cpu)(PackedWorker)
        workers = [actor.remote(per_cpu, frac if gpu else None) for _ in range(k)]
        try:
            # warm every process at once (a limit, so a stuck actor fails the section)
            ray.get([w.trial.remote(1) for w in workers], timeout=PACKING_TIMEOUT_S)
            pids = ray.get([w.pid.remote() for w in workers], timeout=PACKING_TIMEOUT_S)
            t0 = time.perf_counter()
            one = ray.get(workers[0].trial.remote(epochs), timeout=PACKING_TIMEOUT_S)
            t_one = time.perf_counter() - t0
            t0 = time.perf_counter()
            many = ray.get([w.trial.remote(epochs) for w in workers], timeout=PACKING_TIMEOUT_S)
            t_many = time.perf_counter() - t0
        finally:
            for w in workers:
                ray.kill(w)  # this benchmark's own actors, by handle
    return {"k": k, "gpu_fraction": frac if gpu else None, "epochs": epochs,
            "processes": "one Ray actor per trial, each warmed by a one-epoch trial",
            "cpus_per_actor": per_cpu, "distinct_processes": len(set(pids)),
            "one_samples_per_s": one,
            "packed_samples_per_s": many, "one_wall_s": t_one, "packed_wall_s": t_many,
            # by the clock: k trials' work in t_many against one trial's in t_one (a sum of
            # each trial's own rate counts trials that did not overlap as if they had)
            "value": k * t_one / t_many,
            "sum_of_rates": sum(many) / one}
