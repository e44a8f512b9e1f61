"""Whole trials without Ray: the fast path against today's eager trial, and the cost of seeds.

- `small_trial_speedup`: whole-trial samples/s (training samples of every epoch over the
  trial's wall time, evaluation included) of the fast path (`step_mode: auto`, a CUDA graph on
  a GPU) against today's eager `run_trial` (`step_mode: eager`), same config. On the CPU
  `auto` is the eager step: both sides are then the same eager trial, measured one after the
  other (the ratio shows the run-to-run noise).
- `seeds_cost`: wall time of a trial with k seed replicates over one with a single seed: with
  `study.replicas.train_replicas` (the replicates as one batched computation) where it exists
  and accepts the config, else k `run_trial`s in lockstep (today's trainable).
- `time_split`: where such a trial's wall time goes: training (model building and step capture
  included), the per-epoch evaluation and the final robustness sets; on a GPU also how many
  operations each part dispatches (`*_ops`, `dispatch_split`: each a kernel launch unless a
  captured graph replays it, so a launch-bound trial's cost follows these counts; the counts
  do not depend on the device).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from study.config import TrialConfig
from study.tasks import get_task
from study.train import run_trial

# the default study's model and task (search_spaces/default.yaml, fixed part)
DEFAULT_TRIAL = dict(task="mnist1d", d_model=64, d_ff=128, n_layers=2, n_heads=4, patch_size=4,
                     batch_size=64, lr=0.003)


def default_epochs() -> int:
    """The default study's budget (search_spaces/default.yaml), epochs per trial."""
    from benchmarks.sweeps import DEFAULT_SPACE
    from study.spaces import load_space

    return load_space(DEFAULT_SPACE).epochs


def default_trial(epochs: int, step_mode: str = "auto") -> TrialConfig:
    return TrialConfig(epochs=epochs, step_mode=step_mode, **DEFAULT_TRIAL)


def fast_path(device: torch.device) -> str | None:
    """The step mode `auto` takes on this device when it is not the eager step (None)."""
    from study.step import resolve_step_mode

    mode, _ = resolve_step_mode(default_trial(1), device)
    return None if mode == "eager" else mode


def trial_samples_per_s(cfg: TrialConfig) -> tuple[float, float]:
    """(whole-trial samples/s, wall seconds) of `run_trial(cfg)`, data built beforehand."""
    data = get_task(cfg)
    t0 = time.perf_counter()
    for _ in run_trial(cfg, data):
        pass
    wall = time.perf_counter() - t0
    return len(data.train) * cfg.epochs / wall, wall


def warm_up() -> None:
    """One short trial first: the process's first trial pays one-time costs (lazy
    initialization, allocator growth) that would otherwise land on whichever side runs first."""
    for _ in run_trial(default_trial(1)):
        pass


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))  # (of 2 epochs: their mean, not the faster one)


def small_trial_speedup(device: torch.device, epochs: int = 2, rounds: int = 3
                        ) -> dict[str, Any]:
    """Median over `rounds` of alternating eager / fast-path trials of the default config."""
    path = fast_path(device)
    warm_up()
    eager, fast = [], []
    for _ in range(rounds):  # alternated, so a change in machine load hits both alike
        eager.append(trial_samples_per_s(default_trial(epochs, "eager"))[0])
        fast.append(trial_samples_per_s(default_trial(epochs, "auto"))[0])
    return {"config": {**DEFAULT_TRIAL, "epochs": epochs}, "fast_path": path or "eager",
            "note": None if path else "no faster path than the eager step on this device: "
            "both sides are the same eager trial, alternated (the ratio is run-to-run noise)",
            "eager_samples_per_s": _median(eager), "fast_samples_per_s": _median(fast),
            "eager_runs": eager, "fast_runs": fast,
            "speedup": _median(fast) / _median(eager)}


def matmul_flops_per_s(device: torch.device, n: int | None = None, reps: int = 10) -> float:
    """The device's matmul rate as measured here: FLOP/s of an n x n by n x n product, the
    median of `reps` timings after a warm-up; on the CPU fp32, n = 1024 by default, each
    product timed alone; on CUDA bf16, n = 4096, each timing 20 products back to back
    between CUDA events (one alone is microseconds, which a launch and a sync would swamp)."""
    cuda = device.type == "cuda"
    n = n or (4096 if cuda else 1024)
    batch = 20 if cuda else 1
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for _ in range(reps + 1):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(batch):
                a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2.0 * n**3 * batch / _median(times[1:])


def compute_use(device: torch.device, epochs: int = 2) -> dict[str, Any]:
    """How much of the device's measured matmul rate the default trial's training uses: its
    training FLOP/s (`flops_per_sample` x the epochs' median samples/s, `step_mode: auto`)
    over `matmul_flops_per_s`. On the CPU, where a trial is compute-bound, 1 / `fraction`
    bounds what any faster path could gain on its training steps."""
    cfg = default_trial(epochs)
    results = list(run_trial(cfg))
    per_s = _median([r.metrics["samples_per_s"] for r in results])
    train = results[-1].metrics["flops_per_sample"] * per_s
    ceiling = matmul_flops_per_s(device)
    how = ("4096-square bf16 products, 20 between CUDA events" if device.type == "cuda"
           else f"a 1024-square fp32 product, {torch.get_num_threads()} thread(s)")
    return {"config": {**DEFAULT_TRIAL, "epochs": epochs}, "train_flops_per_s": train,
            "matmul_flops_per_s": ceiling, "fraction": train / ceiling, "matmul": how}


def replicas_module() -> Any | None:
    """`study.replicas` where it exists and imports, else None."""
    try:
        return importlib.import_module("study.replicas")
    except ImportError:
        return None


def seeds_time(cfg: TrialConfig, k: int, lockstep: bool = False,
               vmap_eval: bool | None = None) -> tuple[float, str]:
    """(wall seconds, mode) of a trial of `cfg` with k replicates (seed + r, shared data),
    data built beforehand: `vmap` (study.replicas), `lockstep` (k run_trials advanced one
    epoch at a time, as the trainable does today; also when `lockstep` is asked for) or
    `single` (k = 1, plain run_trial)."""
    from study.trainable import replicate

    cfgs = [replicate(cfg, r, vary_data_seed=False) for r in range(k)]
    datas = [get_task(c) for c in cfgs]
    reps = replicas_module()
    batched = (k > 1 and not lockstep and reps is not None and hasattr(reps, "train_replicas")
               and reps.fallback_reason(cfgs, datas) is None)
    t0 = time.perf_counter()
    if k == 1:
        mode = "single"
        for _ in run_trial(cfgs[0], datas[0]):
            pass
    elif batched:
        mode = "vmap"
        for _ in reps.train_replicas(cfgs, datas, vmap_eval=vmap_eval):
            pass
    else:
        mode = "lockstep"
        runs = [run_trial(c, d) for c, d in zip(cfgs, datas)]
        for _ in range(cfg.epochs):
            for r in runs:
                next(r)
    return time.perf_counter() - t0, mode


def seeds_cost(ks: tuple[int, ...] = (4, 16), epochs: int = 2) -> dict[str, Any]:
    """Time of k seeds over 1 seed, same config, for each k in `ks`; where the seeds ran
    batched, the first k's lockstep time too, for reference."""
    cfg = default_trial(epochs)
    warm_up()
    one, _ = seeds_time(cfg, 1)
    out: dict[str, Any] = {"config": {**DEFAULT_TRIAL, "epochs": epochs},
                           "data": "shared by the replicates (vary_data_seed: false), built "
                                   "before timing", "one_seed_s": one}
    for k in ks:
        t, mode = seeds_time(cfg, k)
        out[f"seeds{k}"] = {"mode": mode, "wall_s": t, "cost_ratio": t / one}
        if mode != "lockstep" and k == ks[0]:
            t_lock, _ = seeds_time(cfg, k, lockstep=True)
            out[f"seeds{k}"]["lockstep_cost_ratio"] = t_lock / one
    return out


Targets = dict[str, list[tuple[Any, str]]]  # a name -> the (owner, attribute) of its functions


@contextlib.contextmanager
def patched(targets: Targets, wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]]
            ) -> Iterator[None]:
    """Each function of `targets` replaced by `wrap(name, function)` for the duration. A call
    made inside another call of the same group runs unwrapped, so it is timed, counted or
    ranged once (the batched replicates' `epoch_values` calls its `Captured` evaluation)."""
    depth = dict.fromkeys(targets, 0)

    def once(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        wrapped = wrap(name, fn)

        def call(*args: Any, **kwargs: Any) -> Any:
            if depth[name]:
                return fn(*args, **kwargs)
            depth[name] += 1
            try:
                return wrapped(*args, **kwargs)
            finally:
                depth[name] -= 1
        return call

    with contextlib.ExitStack() as stack:
        for name, owners in targets.items():
            for owner, attr in owners:
                stack.enter_context(mock.patch.object(owner, attr,
                                                      once(name, getattr(owner, attr))))
        yield


@contextlib.contextmanager
def _timed(targets: Targets) -> Iterator[dict[str, float]]:
    """Seconds spent in each named group of functions (`(owner, attribute)` pairs, patched for
    the duration), the device synchronized around each call so its queued work counts where
    it was queued."""
    spent = dict.fromkeys(targets, 0.0)

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                spent[name] += time.perf_counter() - t0
        return timed

    with patched(targets, wrap):
        yield spent


class _Dispatches(TorchDispatchMode):
    """Counts the ATen operations dispatched (after vmap's batching rules: the physical
    operations) under the key `key` gives each one's name (None: not counted); by default
    all of them, under the phase `phase` names."""

    def __init__(self, key: Callable[[str], str | None] | None = None) -> None:
        super().__init__()
        self.phase = "train_ops"
        self.counts: dict[str, int] = {}
        self.key = key or (lambda _: self.phase)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        key = self.key(func.overloadpacket.__name__)
        if key is not None:
            self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


# operations that make a view, read a scalar to the host or only mark or choose: no kernel
NO_KERNEL = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "alias", "as_strided", "t", "transpose",
    "permute", "expand", "unsqueeze", "squeeze", "select", "slice", "split", "split_with_sizes",
    "unbind", "detach", "lift_fresh", "_local_scalar_dense", "_fused_sdp_choice",
    "_record_function_enter_new", "_record_function_exit"})


def cpu_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """`study.device.autocast` as on CUDA, wherever the trial runs: the CPU's bf16 autocast
    stands in for CUDA's (patched in, with `study.device.autocast_dtype` as bf16, where a
    count or a test needs what a GPU's mixed precision does)."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def kernels_as_on_cuda(casts: bool = False) -> Iterator[None]:
    """Attention through SDPA wherever the trial runs, as `study.model.attend` calls it on
    CUDA (on the CPU it writes some attention out), so a CPU counts the operations a GPU would
    launch. Without dropout that is one fused kernel; with dropout SDPA's CPU math path still
    counts its own operations (bmm, softmax, dropout), which CUDA's fused kernels do not
    launch separately. The parameters (`step.grouped_params`) and batched replicates'
    projections (`replicas.fused_projections`) are those of a captured step. With `casts`, the
    training step runs under the CPU's bf16 autocast standing in for CUDA's, so that the
    count includes autocast's casts (the CPU then computes in bf16: counts only)."""
    from study import model, replicas, step

    with contextlib.ExitStack() as stack:
        for owner in (model, replicas):
            stack.enter_context(mock.patch.object(owner, "written_out", lambda *a: False))
        stack.enter_context(mock.patch.object(replicas, "fused_projections", lambda mode: True))
        stack.enter_context(mock.patch.object(step, "grouped_params", lambda mode: True))
        if casts:
            for owner in (step, replicas):
                stack.enter_context(mock.patch.object(owner, "autocast", cpu_autocast))
                stack.enter_context(mock.patch.object(owner, "autocast_dtype",
                                                      lambda device: torch.bfloat16))
        yield


def step_kernels(cfg: TrialConfig, k: int, casts: bool = False) -> dict[str, int]:
    """The operations that compute something (`NO_KERNEL` left out: on a device, about one
    kernel launch each) of one training step of `cfg` with k replicates, by name,
    after 2 steps of warm-up, the optimizer fused as on CUDA (AdamW's fused kernel): k = 1 is a
    trial's step (`step.train_step`), k > 1 the batched replicates' (`Replicas.train_step`), on
    the first batch of each replicate's training split, both on the device the trial would use.
    A launch-bound device's step costs about what these counts say. The step is a captured
    one's (`kernels_as_on_cuda`: SDPA's attention, the parameters as `ParamGroups`, batched
    projections fused); with `casts` on the CPU, under the CPU's bf16 autocast, so that
    autocast's casts are counted too (the old code counted 175 for one seed so, what an H200
    launched). Not counted: work a kernel does inside (e.g. CUDA's `baddbmm` likely copies
    the bias into its output first)."""
    from study import replicas
    from study.device import resolve_device
    from study.model import build_model
    from study.step import FUSED_ADAMW, train_state, train_step
    from study.trainable import replicate

    cfgs = [replicate(cfg.replace(step_mode="eager"), r, vary_data_seed=False)
            for r in range(k)]
    datas = [get_task(c) for c in cfgs]
    step: Callable[[], Any]
    with kernels_as_on_cuda(casts):  # the step is built under it (its parameters)
        if k == 1:
            data, rows = datas[0], slice(0, cfg.batch_size)
            device = resolve_device(cfgs[0])  # where the batched replicates run too
            state, _ = train_state(build_model(cfgs[0], data.spec).to(device), cfgs[0], 100)
            batch = tuple(t[rows].to(device) for t in (data.train.x, data.train.y,
                                                        data.train.mask))
            step = functools.partial(train_step, state, *batch)
        else:
            adamw = replicas.adamw
            with mock.patch.object(replicas, "adamw", lambda *a, **kw: adamw(*a, **{
                    **kw, "fused": FUSED_ADAMW})):
                reps = replicas.Replicas(cfgs, datas)
            step = functools.partial(reps.train_step,
                                     *reps.gather(torch.arange(cfg.batch_size).repeat(k, 1)))
        for _ in range(2):
            step()
        return kernel_counts(step)


def kernel_counts(fn: Callable[[], Any]) -> dict[str, int]:
    """The operations `fn()` dispatches that compute something (`NO_KERNEL` left out), by
    name: on a device, about one kernel launch each."""
    counter = _Dispatches(lambda name: None if name in NO_KERNEL else name)
    with counter:
        fn()
    return counter.counts


def _phases() -> Targets:
    """The functions of a trial's per-epoch evaluation and of its final robustness sets. The
    evaluation is timed at its `Captured` call (the CUDA graph's replay, or `epoch_metrics`
    where nothing is captured), never inside it: a timer's device sync inside a capture
    would fail it."""
    from study import train
    from study.graphs import Captured

    reps = replicas_module()
    targets: Targets = {
        "eval": [(Captured, "__call__")], "robustness": [(train, "robustness_metrics")]}
    if reps is not None:  # batched replicates: their batched evaluations too
        targets["eval"].append((reps.Replicas, "epoch_values"))
        targets["robustness"].append((reps.Replicas, "robustness_accs"))
    return targets


def dispatch_split(cfg: TrialConfig, k: int, as_cuda: bool = False) -> dict[str, int]:
    """Operations dispatched by a trial of `cfg` with k replicates (`seeds_time`'s trial) in
    training (the rest), the per-epoch evaluation and the robustness sets. `as_cuda`: the
    evaluation runs as it does on CUDA wherever the trial runs (CUDA's chunk sizes,
    `evaluation.eval_rows`, and the batched replicate evaluation) and the training step as a
    captured one runs (`kernels_as_on_cuda`: attention, parameters, projections; since
    2026-11-27 evening, so `train_ops` from before are not comparable), so a CPU counts what a
    GPU would launch there."""
    from study import evaluation, replicas

    counter = _Dispatches()

    def phase(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            outer, counter.phase = counter.phase, name
            try:
                return fn(*args, **kwargs)
            finally:
                counter.phase = outer
        return counted

    def cuda_rows(model: Any, seq_len: int, device: torch.device, k: int = 1) -> int:
        return rows(model, seq_len, torch.device("cuda"), k)

    rows = evaluation.eval_rows
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched({f"{n}_ops": o for n, o in _phases().items()}, phase))
        if as_cuda:
            for module in (evaluation, replicas):
                stack.enter_context(mock.patch.object(module, "eval_rows", cuda_rows))
            stack.enter_context(kernels_as_on_cuda())
        with counter:
            seeds_time(cfg, k, vmap_eval=True if as_cuda else None)
    return {p: counter.counts.get(p, 0) for p in ("train_ops", "eval_ops", "robustness_ops")}


def time_split(cfg: TrialConfig, k: int) -> dict[str, Any]:
    """Where a trial of `cfg` with k replicates spends its wall time (`seeds_time`'s trial):
    `eval_s` (the per-epoch evaluation: `epoch_metrics`, or the batched `epoch_values`),
    `robustness_s` (the final robustness sets), `train_s` (the rest: building the models,
    the training steps and their capture); on CUDA also the operations each part dispatches
    (its launches), counted in a second run (`dispatch_split`; on the CPU, where a trial is
    compute-bound, `python -m benchmarks.profile_trial --ops-as-cuda` counts what a GPU would
    launch, outside `make bench`'s 15 minutes)."""
    targets = {f"{name}_s": owners for name, owners in _phases().items()}
    with _timed(targets) as spent:
        wall, mode = seeds_time(cfg, k)
    return {"k": k, "mode": mode, "wall_s": wall, **spent,
            "train_s": wall - spent["eval_s"] - spent["robustness_s"],
            **(_counted(cfg, k) if torch.cuda.is_available() else {})}


def _counted(cfg: TrialConfig, k: int) -> dict[str, Any]:
    """`dispatch_split`, or why it could not count (the timings above stand without it)."""
    try:
        return dict(dispatch_split(cfg, k))
    except Exception as e:  # e.g. a backend that refuses a Python dispatch mode in capture
        return {"ops_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
