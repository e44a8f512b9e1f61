"""Where a default trial's time goes, operator by operator (`torch.profiler`): the profile a
session with a GPU takes before it changes anything (`scripts/gpu-check` runs it).

    python -m benchmarks.profile_trial [--epochs N] [--seeds 1 4] [--out DIR] [--ops-as-cuda]
    python -m benchmarks.profile_trial --mfu BATCH [--out DIR]      (CUDA)

For each number of seeds, one trial of the default config (`benchmarks.trials.seeds_time`:
data built beforehand, batched replicates where they apply), after a warm-up trial, profiled
whole: the operators by self device time (CUDA) or self CPU time, and the trial's phases
(`time_split`'s training, per-epoch evaluation and robustness sets) as profiler ranges. Written
to `profile-<device>.txt` in DIR (default benchmarks/results). `--ops-as-cuda` prints instead
the operations each phase dispatches with the evaluation run as on CUDA
(`benchmarks.trials.dispatch_split`): on a CPU, what a GPU would launch. `--mfu BATCH`
profiles instead the MFU measurement's GPT-2-small step at that batch
(`benchmarks.gpu.mfu_profile`: device time by kind of kernel, how busy the GPU was, the
matmul kernels' rate against the peak), written to `profile-mfu-<device>.txt` and `.json`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.gpu import mfu_profile
from benchmarks.run import device_name
from benchmarks.trials import (
    _phases,
    default_trial,
    dispatch_split,
    patched,
    seeds_time,
    warm_up,
)
from study.config import TrialConfig


def _ranged(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` inside a profiler range named after its phase."""
    def inner(*args: Any, **kwargs: Any) -> Any:
        with record_function(f"phase:{name}"):
            return fn(*args, **kwargs)
    return inner


def profile_trial(epochs: int, k: int, rows: int = 30, cfg: TrialConfig | None = None) -> str:
    """The profile tables of one trial of `cfg` (the default config) with k seeds."""
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    cfg = (cfg or default_trial(epochs)).replace(epochs=epochs)
    with patched(_phases(), _ranged), profile(activities=activities) as prof:
        wall, mode = seeds_time(cfg, k)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    phases = [e for e in events if e.key.startswith("phase:")]
    lines = [f"## {k} seed(s), {epochs} epochs, mode {mode}: {wall:.2f} s wall "
             "(profiled: the profiler's own overhead included)", "",
             "phases (CPU time inside each range; the rest of the trial is training):"]
    lines += [f"  {e.key}: {e.count} calls, {e.cpu_time_total / 1e6:.3f} s CPU"
              + (f", {e.device_time_total / 1e6:.3f} s device" if cuda else "")
              for e in phases]
    lines += ["", events.table(sort_by=sort, row_limit=rows, max_name_column_width=60), ""]
    return "\n".join(lines)


def write_mfu_profile(prof: dict[str, Any], out: Path, device: str) -> Path:
    """`mfu_profile`'s result as `profile-mfu-<device>.json` (without its table) and `.txt`
    (a summary line per kind, then the table) in `out`; returns the text file's path."""
    out.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in prof.items() if k != "table"}
    (out / f"profile-mfu-{device}.json").write_text(json.dumps(data, indent=1) + "\n")
    busy = prof["busy_frac"]
    lines = [f"## MFU step, batch {prof['config']['batch']}, mode {prof['config']['step_mode']}: "
             f"{prof['steps']} steps in {prof['wall_s']:.3f} s"
             + (f", device busy {busy:.1%} of it" if busy is not None else ""), "",
             "share of the profiled time by kind:"]
    lines += [f"  {kind}: {share:.1%}" for kind, share in prof["shares"].items()]
    if prof["matmul_peak_frac"] is not None:
        lines.append(f"matmul kernels at {prof['matmul_peak_frac']:.1%} of the dense bf16 peak")
    path = out / f"profile-mfu-{device}.txt"
    path.write_text("\n".join([*lines, "", prof["table"], ""]))
    print(path.read_text(), flush=True)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs per trial (default: 10 on a GPU, 2 on the CPU)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--ops-as-cuda", action="store_true",
                    help="print the operations each phase dispatches, evaluation as on CUDA")
    ap.add_argument("--mfu", type=int, metavar="BATCH", default=None,
                    help="profile the MFU measurement's GPT-2-small step at this batch (CUDA)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.mfu is not None:
        if not cuda:
            ap.error("--mfu profiles the GPT-2-small step on a GPU: no CUDA device here")
        write_mfu_profile(mfu_profile(args.mfu), args.out, device_name(cuda))
        return
    if not cuda:
        torch.set_num_threads(1)
    epochs = args.epochs or (10 if cuda else 2)
    if args.ops_as_cuda:
        for k in args.seeds:
            print(f"{k} seed(s), {epochs} epochs:",
                  dispatch_split(default_trial(epochs), k, as_cuda=True))
        return
    warm_up()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile-{device_name(cuda)}.txt"
    path.write_text("")
    for k in args.seeds:  # each profile kept as soon as it is taken (a run may be cut short)
        text = profile_trial(epochs, k)
        with path.open("a") as f:
            f.write(text + "\n")
        print(text, flush=True)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
