"""`make bench`: the project's performance goals, each a ratio measured side by side in one run.

Writes under benchmarks/results/:
- `attention_<cpu|cuda>.json`: attention-path throughput ratios (`benchmarks.attention`);
- `bench-<device>.json`: every measurement in detail, with the machine, its load, the device
  and package versions;
- `summary-<device>.json`: one number per goal (`SUMMARY_KEYS`; null where not measured on
  this device, the reason in the detailed file),
and prints a table of goal vs measured. `<device>` is `cpu`, or the GPU's name with spaces as
dashes. On the CPU every measurement runs with one PyTorch thread (on a shared 2-core machine
two threads are several times slower, and less repeatable). About 10 to 11 minutes on 2 CPU
cores, 6 of them the harness section's 32 trials of the default study.

`python -m benchmarks.run [--only NAME ...] [--keep] [--search-seeds N ...] [--results DIR]`
runs some sections only (attention, trials, study, harness, search, gpu, study_mps; the others'
keys are null in the summary), keeps the sweeps' temp dir, runs the search comparison with other
searcher seeds (`make bench`: 0 1 2) and writes the JSON files to DIR instead. `gpu` (MFU
and packed trials, `benchmarks.gpu`) and `study_mps` (the new path's study under CUDA MPS,
against the study section's ways, `sweeps.study_mps`) run on CUDA only; on a GPU
the study comparison packs 8 trials per GPU (`--gpu 0.125 --max-concurrent 8`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).parent / "results"
SECTIONS = ("attention", "trials", "study", "harness", "search", "gpu", "study_mps")
SUMMARY_KEYS = ("device", "small_trial_speedup", "seeds4_cost_ratio", "seeds16_cost_ratio",
                "packing_throughput_x8", "study_speedup", "harness_overhead_frac",
                "disk_mb_per_trial", "search_epochs_ratio", "mfu_gpt2_small",
                "attn_step_speedup_T1024", "attn_peak_mem_ratio_T1024")
PACKAGES = ("torch", "ray", "optuna", "mlflow", "numpy", "attention-study")
NO_GPU = "GPU only: no GPU lent to this session (this is a CPU run)"
SMALL_TRIAL_CPU = ("measured on a GPU only (its goal is a GPU goal): on the CPU `step_mode: "
                   "auto` is the eager step, so both sides would be the same trial (earlier "
                   "CPU runs gave 0.99 to 1.10, run-to-run noise); half a minute saved")
SEEDS16_CPU = ("measured on a GPU only (its goal is a GPU goal): on the CPU the replicates' "
               "cost is linear in their number (seeds4_cost_ratio), and 16 take a minute")


def device_name(cuda: bool) -> str:
    """`cpu`, or the GPU's name with spaces as dashes (e.g. NVIDIA-H100-80GB-HBM3)."""
    return torch.cuda.get_device_name().replace(" ", "-") if cuda else "cpu"


GPU_ONLY = " (on a GPU)"  # how the CPU's table marks a goal that holds on a GPU only
Goal = tuple[str, Callable[[float], bool | None]]  # the goal as written; met (None: not scored)


def goals(device: str, epochs: int | None) -> dict[str, Goal]:
    """Summary key -> (the goal as written, whether a value meets it) on this device; keys
    whose goal holds on a GPU only are listed as such on the CPU and not scored there (None:
    their figure is in the table for reference)."""
    gpu = device != "cpu"
    per_trial = float(epochs or 1)

    def gpu_only(text: str, ok: Callable[[float], bool]) -> Goal:
        return (text, ok) if gpu else (f"{text}{GPU_ONLY}", lambda v: None)

    return {
        "small_trial_speedup": gpu_only(">= 8", lambda v: v >= 8),
        "seeds4_cost_ratio": gpu_only("<= 1.3", lambda v: v <= 1.3),
        "seeds16_cost_ratio": gpu_only("<= 2.5", lambda v: v <= 2.5),
        "packing_throughput_x8": gpu_only(">= 7", lambda v: v >= 7),
        "study_speedup": (">= 4", lambda v: v >= 4) if gpu else (">= 2", lambda v: v >= 2),
        "harness_overhead_frac": ("< 0.05", lambda v: v < 0.05),
        "disk_mb_per_trial": (f"<= 1 MB x {per_trial:g} epochs = {per_trial:g}",
                              lambda v: v <= per_trial),
        "search_epochs_ratio": ("<= 0.33", lambda v: v <= 0.33),
        "mfu_gpt2_small": gpu_only(">= 0.40", lambda v: v >= 0.40),
        "attn_step_speedup_T1024": (">= 2.5", lambda v: v >= 2.5) if gpu
        else (">= 1.5", lambda v: v >= 1.5),
        "attn_peak_mem_ratio_T1024": gpu_only("<= 0.5", lambda v: v <= 0.5),
    }


def summarize(detail: dict[str, Any], device: str) -> dict[str, Any]:
    """The summary's one number per key from the detailed results (None where missing)."""
    def get(*path: str) -> Any:
        node: Any = detail
        for p in path:
            if not isinstance(node, dict) or node.get(p) is None:
                return None
            node = node[p]
        return node

    return {
        "device": device,
        "small_trial_speedup": get("small_trial", "speedup"),
        "seeds4_cost_ratio": get("seeds", "seeds4", "cost_ratio"),
        "seeds16_cost_ratio": get("seeds", "seeds16", "cost_ratio"),
        "packing_throughput_x8": get("packing", "value"),
        "study_speedup": get("study", "speedup"),
        "harness_overhead_frac": get("harness", "overhead_frac"),
        "disk_mb_per_trial": get("harness", "disk", "mb_per_trial"),
        "search_epochs_ratio": get("search", "ratio"),
        "mfu_gpt2_small": get("mfu", "value"),
        "attn_step_speedup_T1024": get("attention_textbook", "speedup"),
        "attn_peak_mem_ratio_T1024": get("attention_textbook", "peak_mem_ratio"),
    }


def table(summary: dict[str, Any], detail: dict[str, Any]) -> str:
    """Goal vs measured, one row per summary key."""
    device = summary["device"]
    rows = [("key", "goal", "measured", "met")]
    for key, (goal, ok) in goals(device, (detail.get("harness") or {}).get("epochs")).items():
        v = summary.get(key)
        censored = key == "search_epochs_ratio" and (detail.get("search") or {}).get("censored")
        if v is None:
            measured, met = "null", "-"
        elif censored:  # a lower bound: above the goal it is not met, below it unknown
            measured, met = f">= {v:.3g} (censored)", "no" if not ok(v) else "unknown"
        else:
            measured, met = f"{v:.3g}", {None: "-", True: "yes", False: "no"}[ok(v)]
        rows.append((key, goal, measured, met))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def machine() -> dict[str, Any]:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    cuda = torch.cuda.is_available()
    return {"platform": platform.platform(), "processor": platform.processor() or None,
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "cuda": torch.version.cuda if cuda else None, "packages": versions}


def _section(detail: dict[str, Any], name: str, fn: Callable[[], Any],
             save: Callable[[], None] | None = None) -> None:
    """Run one measurement into `detail[name]`; one that fails is recorded with its reason
    (its summary key stays null) and the others still run. `save` writes what is measured so
    far, so a run stopped at a time limit keeps its finished sections."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    print(f"[bench] {name} ... (load {load:.1f})", flush=True)
    try:
        detail[name] = fn()
    except Exception as e:
        detail[name] = {"value": None, "error": f"{type(e).__name__}: {e}"}
        print(f"[bench] {name} FAILED: {type(e).__name__}: {e}", flush=True)
    took = time.perf_counter() - t0
    detail["timing"][name] = {"seconds": took, "load_before": load,
                              "load_after": os.getloadavg()[0]}
    print(f"[bench] {name}: {took:.0f} s", flush=True)
    if save is not None:
        save()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--keep", action="store_true",
                        help="keep the sweeps' stores and logs (the temp dir is printed)")
    parser.add_argument("--search-seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="searcher seeds of the search comparison (default 0 1 2)")
    parser.add_argument("--results", type=Path, default=OUT,
                        help=f"where the JSON files go (default {OUT})")
    args = parser.parse_args(argv)
    out_dir: Path = args.results
    from benchmarks import attention, gpu, sweeps, trials

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    from study.device import keep_freed_memory

    device = device_name(cuda)
    detail: dict[str, Any] = {"device": device, "machine": machine(), "started": time.time(),
                              "load_at_start": list(os.getloadavg()), "timing": {},
                              "sections": args.only,
                              # as in a sweep's trials (this process runs the trials sections)
                              "keep_freed_memory": keep_freed_memory()}
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    if not (cuda and "gpu" in args.only):
        reason = NO_GPU if not cuda else "section gpu not run (--only)"
        detail["packing"] = {"value": None, "reason": reason}
        detail["mfu"] = {"value": None, "reason": reason}

    def save() -> dict[str, Any]:
        summary = summarize(detail, device)
        out_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(detail.get("attention"), dict) and "error" not in detail["attention"]:
            att = {"device": torch.cuda.get_device_name() if cuda else "cpu",
                   "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                   **detail["attention"]}
            (out_dir / f"attention_{'cuda' if cuda else 'cpu'}.json").write_text(
                json.dumps(att, indent=1))
        (out_dir / f"bench-{device}.json").write_text(json.dumps(detail, indent=1))
        (out_dir / f"summary-{device}.json").write_text(json.dumps(summary, indent=1))
        return summary

    def section(name: str, fn: Callable[[], Any]) -> None:
        _section(detail, name, fn, save)

    if "attention" in args.only:
        section("attention", lambda: attention.attention_ratios(dev))
        section("attention_textbook", lambda: attention.textbook_comparison(dev))
        section("attention_short_rows", lambda: attention.short_rows(dev))
        if not cuda:
            detail["attention_textbook"]["note"] = (
                "CPU: T = 256, not 1024 (a 4-layer step at T = 1024 takes seconds per step on "
                "2 cores); the summary keys keep their names")
    if "trials" in args.only:
        # on a GPU at the default study's budget (10 epochs): with 2, a captured step's trial
        # is mostly its one-time costs; on the CPU both sides are the same eager trial
        epochs = trials.default_epochs() if cuda else 2
        if cuda:
            section("small_trial", lambda: trials.small_trial_speedup(dev, epochs=epochs))
        else:
            detail["small_trial"] = {"speedup": None, "reason": SMALL_TRIAL_CPU}
        section("seeds", lambda: trials.seeds_cost(ks=(4, 16) if cuda else (4,), epochs=epochs))
        if not cuda:  # 16 seeds cost 16 of one on the CPU, as 4 cost 4: a minute saved
            detail["seeds"]["seeds16"] = {"cost_ratio": None, "reason": SEEDS16_CPU}
        # a captured training step's operations, one seed and batched (about one kernel each:
        # what a launch-bound device pays per step), autocast's casts included (on the CPU its
        # bf16 autocast stands in for CUDA's: on an H200 one seed's step launched 175 kernels,
        # what the CPU counted that way for the same code)
        section("step_kernels", lambda: {f"seeds{k}": sum(trials.step_kernels(
            trials.default_trial(epochs), k, casts=not cuda).values()) for k in (1, 4, 16)})
        # how much of the device's matmul rate the default trial's training uses
        section("compute_use", lambda: trials.compute_use(dev, epochs))
        # where those trials' time goes (training, per-epoch evaluation, robustness sets)
        section("time_split", lambda: {f"seeds{k}": trials.time_split(
            trials.default_trial(epochs), k) for k in ((1, 4, 16) if cuda else (1, 4))})
    if "study" in args.only:
        # on a GPU: the whole default study (its trials and epochs), 8 trials packed per GPU,
        # each way once (212 s both ways on an H100); on the CPU each way twice, A B B A
        section("study", lambda: sweeps.study_speedup(
            tmp / "study", **(sweeps.default_study_budget() | {"packed": (0.125, 8),
                                                                "rounds": 1}
                              if cuda else {})))
    if "harness" in args.only:
        section("harness", lambda: sweeps.harness(tmp / "harness"))
    if "search" in args.only:
        section("search", lambda: sweeps.search_epochs(tmp / "search", args.search_seeds))
    if cuda and "gpu" in args.only:
        section("mfu", gpu.mfu_gpt2_small)
        section("packing", gpu.packing)
    if "study_mps" in args.only:
        # last: the new path's study once more under CUDA MPS, against the study section's
        # ways (a time limit that cuts it keeps every section before)
        if cuda:
            section("study_mps", lambda: sweeps.study_mps(
                tmp / "study_mps", detail.get("study"), packed=(0.125, 8),
                **sweeps.default_study_budget()))
        else:
            detail["study_mps"] = {"speedup_mps": None, "reason": NO_GPU}
    detail["finished"] = time.time()
    detail["load_at_end"] = list(os.getloadavg())
    if args.keep:
        detail["tmp_dir"] = str(tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = save()
    print(table(summary, detail))
    print(f"wrote {out_dir / f'summary-{device}.json'} and {out_dir / f'bench-{device}.json'} "
          f"(load average {detail['load_at_start'][0]:.1f} at start, "
          f"{detail['load_at_end'][0]:.1f} at end, on {os.cpu_count()} CPUs)")
    failed = [k for k, v in detail.items() if isinstance(v, dict) and "error" in v]
    if failed:  # recorded and saved above; the command still says it did not all run
        raise SystemExit(f"[bench] failed sections: {', '.join(failed)}")
    return summary


if __name__ == "__main__":
    # a `timeout` (SIGTERM: scripts/gpu-check's limits) unwinds as an exit, so that a section's
    # context managers finish (study_mps tells its MPS daemon to quit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
