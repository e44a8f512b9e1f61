"""The Ray Tune function: a sampled configuration trained with k seed replicates in one trial.

Ray's `Repeater` cannot be combined with early stopping, so replicates live inside one trial:
each epoch every seed advances once, then one `TrialReport` goes to the driver with the
seed-mean of every metric (the searcher and ASHA act on it), `<name>_seed_std` and per-seed
values `seed_<k>/<name>`. Replicate k uses `seed + k`, and with `vary_data_seed` also
`data_seed + k` (its own generated data, split and test set, so the spread across seeds includes
test-set sampling noise). The last report of a trial that ends by itself carries its outcome
(completed, diverged or error); a trial stopped by ASHA never sends one. The first report of
each attempt also says where it runs (`node_info`: node, host, device, worker pid), and every
report what computing its epoch took (`compute_s`). The epochs are computed one ahead of the
driver (`study.ahead`): epoch e + 1 trains while epoch e's report waits for the driver.

How the replicates train (`batching`, the space's `seed_batching`): `vmap` trains them as one
batched computation (`study.replicas`: stacked parameters, `torch.vmap`), falling back to
`lockstep` where that cannot apply (`replicas.fallback_reason`); `lockstep` runs k separate
`run_trial`s, advanced one epoch each in turn.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from study.records import (
    SEED_BATCHING,
    TAG_DEVICE,
    TAG_HOSTNAME,
    TAG_NODE_ID,
    TAG_WORKER_PID,
    Outcome,
    TrialReport,
    completed_message,
    replayed,
    replicate_seeds,
    seed_metric,
)

if TYPE_CHECKING:
    from study.config import TrialConfig
    from study.tasks.base import TaskData
    from study.train import EpochResult

log = logging.getLogger(__name__)


def seed_summary(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Mean over seeds, `<name>_seed_std` (the sample std, ddof=1, as everywhere in the
    analysis; absent with one seed, where it is unknown, not 0) and `seed_<k>/<name>`.

    A metric only some replicates have (a shot group with no class in one data seed's
    long-tail profile, with `vary_data_seed`) is summarised over those that have it: their
    `seed_<k>` values say which (it used to fail the trial, or vanish, by seed 0's names)."""
    out: dict[str, float] = {}
    for name in dict.fromkeys(n for m in per_seed for n in m):  # every name, first seen first
        have = [(k, float(m[name])) for k, m in enumerate(per_seed) if name in m]
        vals = np.array([v for _, v in have])
        out[name] = float(vals.mean())
        if len(vals) > 1:
            out[f"{name}_seed_std"] = float(vals.std(ddof=1))
        for k, v in have:
            out[seed_metric(k, name)] = v
    return out


def replicate(cfg: TrialConfig, k: int, vary_data_seed: bool) -> TrialConfig:
    """The config of replicate k of `cfg` (a TrialConfig): seed + k, and data_seed + k when
    `vary_data_seed`."""
    seed, data_seed = replicate_seeds(cfg.seed, cfg.data_seed, k, vary_data_seed)
    return cfg.replace(seed=seed, data_seed=data_seed)


def replicate_epochs(cfgs: list[TrialConfig], datas: list[TaskData],
                     batching: str) -> tuple[Iterator[list[EpochResult]], str | None]:
    """Each epoch's `EpochResult`s of the replicates `cfgs` (with their data), trained as
    `batching` says, and why they fell back to lockstep (None when they did not, or when
    `batching` is `lockstep`)."""
    from study.device import resolve_device
    from study.replicas import fallback_reason, train_replicas
    from study.train import run_trial

    if batching not in SEED_BATCHING:
        raise ValueError(f"batching: {batching!r}; valid: {', '.join(SEED_BATCHING)}")
    why = fallback_reason(cfgs, datas) if batching == "vmap" else None
    if batching == "vmap" and why is None:
        return train_replicas(cfgs, datas), None
    # shared data is placed on the device once, not once per replicate
    placed = {id(d): d.on(resolve_device(cfgs[0])) for d in datas}
    runs = [run_trial(c, placed[id(d)]) for c, d in zip(cfgs, datas)]

    def epochs() -> Iterator[list[EpochResult]]:
        for _ in range(cfgs[0].epochs):
            yield [next(r) for r in runs]
    return epochs(), why


def lockstep(config: dict[str, Any], seeds: int, vary_data_seed: bool = False,
             batching: str = "lockstep") -> Iterator[TrialReport]:
    """One `TrialReport` per epoch for `seeds` replicates of `config` (seed, seed + 1, ...;
    with `vary_data_seed` also data_seed, data_seed + 1, ...), trained as `batching` says
    (`vmap` or `lockstep`, see the module docstring)."""
    from study.config import make_config
    from study.tasks import get_task

    try:
        cfg = make_config(config)
        cfgs = [replicate(cfg, k, vary_data_seed) for k in range(seeds)]
        # the data is cached by its fields (never `seed`): replicates share it unless each has
        # its own data_seed
        datas = [get_task(r) for r in cfgs]
        epochs, why = replicate_epochs(cfgs, datas, batching)
        if why is not None:
            log.info("seed_batching vmap falls back to lockstep: %s", why)
        for epoch, results in enumerate(epochs, start=1):
            bad = [(k, r.diverged) for k, r in enumerate(results) if r.diverged]
            if bad:
                k, reason = bad[0]
                yield TrialReport(epoch, outcome=Outcome.DIVERGED, message=f"seed {k}: {reason}")
                return
            report = TrialReport(epoch, seed_summary([r.metrics for r in results]))
            if epoch == cfg.epochs:
                report.outcome, report.message = Outcome.COMPLETED, completed_message(epoch)
                report.tables = {k: r.artifacts for k, r in enumerate(results) if r.artifacts}
            yield report
    except Exception as e:  # a trial's own error: recorded, never retried
        tb = traceback.format_exc(limit=-3).strip().splitlines()
        yield TrialReport(outcome=Outcome.ERROR, message=f"{type(e).__name__}: {e}"[:500],
                          traceback="\n".join(tb[-6:]))


def trial_threads(cpus: float | None = None) -> int | None:
    """Limit torch's intra-op threads to the trial's CPUs (`cpus`, else what Ray gave this
    trial), so trials packed on a node do not oversubscribe its cores. Returns the thread
    count set, or None when the trial's CPUs are unknown (nothing is changed)."""
    import torch

    if cpus is None:
        try:
            from ray import tune

            pgf = tune.get_context().get_trial_resources()
            cpus = None if pgf is None else pgf.required_resources.get("CPU")
        except Exception:  # not inside a Tune trial
            cpus = None
    if cpus is None:
        return None
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    return n


def gpu_memory_cap(gpu: float | None) -> float | None:
    """Cap this process's share of its GPU's memory at the trial's fraction `gpu` (Ray's
    fractional GPUs share a device but not its memory: without the cap one packed trial can
    take what the others need). Returns the fraction set, or None (no CUDA, or a whole GPU)."""
    import torch

    if gpu is None or not 0 < gpu < 1 or not torch.cuda.is_available():
        return None
    torch.cuda.set_per_process_memory_fraction(gpu)
    return gpu


def node_info(config: dict[str, Any]) -> dict[str, str]:
    """Where this attempt runs (`NODE_TAGS`): Ray's node id, the host, the device the trial
    trains on ("CPU" or the GPU's name) and this worker's pid."""
    import os
    import socket

    import torch

    info = {TAG_HOSTNAME: socket.gethostname(), TAG_WORKER_PID: str(os.getpid()),
            TAG_NODE_ID: "unknown", TAG_DEVICE: "CPU"}
    try:
        import ray
        info[TAG_NODE_ID] = str(ray.get_runtime_context().get_node_id())
    except Exception:  # not inside Ray
        pass
    try:
        from study.config import make_config
        from study.device import resolve_device
        device = resolve_device(make_config(config))
    except Exception:  # a bad config: the trial reports its own error
        device = torch.device("cpu")
    if device.type == "cuda":
        info[TAG_DEVICE] = torch.cuda.get_device_name(device)
    return info


def trial_process(cpus: float | None = None, gpu: float | None = None) -> None:
    """Set up the process a trial runs in (a sweep's worker, or a benchmark's packed trial):
    torch's threads for its `cpus` (`trial_threads`), reuse of the memory it frees
    (`study.device.keep_freed_memory`) and its share `gpu` of the GPU's memory
    (`gpu_memory_cap`)."""
    from study.device import keep_freed_memory

    trial_threads(cpus)
    keep_freed_memory()
    gpu_memory_cap(gpu)


def trainable(config: dict[str, Any], seeds: int = 1, vary_data_seed: bool = False,
              seed_batching: str = "vmap", cpus: float | None = None,
              gpu: float | None = None) -> None:
    """Entry point run by Ray Tune workers (`tune.with_parameters` passes the space's `seeds`,
    `vary_data_seed`, `seed_batching`, the trial's `cpus` and its GPU fraction `gpu`)."""
    from ray import tune

    from study.ahead import ahead_enabled, one_ahead

    recorded = replayed(config)
    if recorded is not None:  # it finished before a resume: its reports again, no training
        for result in recorded:
            tune.report(result)
        return
    start = time.perf_counter()
    trial_process(cpus, gpu)
    node = node_info(config)
    # the next epoch trains while the driver takes this one's report (`study.ahead`)
    with one_ahead(lockstep(config, seeds, vary_data_seed, seed_batching), start,
                   ahead_enabled()) as reports:
        for report, seconds in reports:
            report.node, node = node, {}  # where it runs: in the attempt's first report only
            report.compute_s = seconds
            tune.report(report.to_ray())
