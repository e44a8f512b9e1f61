"""Why packed trials of the new path are slow on a GPU: k plain processes, no Ray.

On an H200 (2026-11-27) a 2-seed default-study trial of the new path (CUDA graphs, batched
seeds) took 5.3 s of its own time with 8 trials packed on the GPU, against 0.88 s for a 4-seed
trial alone. The suspicion: without MPS, kernels of different processes do not run at the same
time (the GPU switches between their contexts), so trials whose time is the GPU's, as captured
ones are, queue behind each other, while today's eager trials, bound by their own host threads,
overlap. This probe measures it with nothing else in the way:

    python -m benchmarks.packing_probe [--k 1 2 4 8] [--trials 2] [--epochs 10]
        [--paths new today] [--mps] [--out DIR]

For each path (`new`: the default study's trial as the file runs it, `step_mode: auto`,
`seed_batching: vmap`; `today`: `step_mode: eager`, `seed_batching: lockstep`) and each k, k
processes start at once, each capping its GPU memory at 1/k as a packed trial does, builds its
data and trains one warm-up trial, then all start together (a shared start file) and each
trains `--trials` trials of the default study's configuration (2 seeds, their own data, dropout;
`study.trainable.lockstep`, what a sweep's trial runs, without Ray). Reported per (path, k):
each trial's seconds, the trials per second of all k together and `scaling`, that rate over
the same path's rate with k = 1 (k = 8 packed trials reaching 7.8x one was measured for eager
processes of a small model on an H100). `--mps` runs the new path again with a CUDA MPS daemon
of its own (its pipe and log folders under a temp dir, stopped at the end), where
`nvidia-cuda-mps-control` exists. Written to `packing-probe-<device>.json` in DIR (default
benchmarks/results). On the CPU it runs too (a check of the probe itself; there the processes
share 2 cores, so the scaling says nothing about a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PATHS = {"new": {"step_mode": "auto", "batching": "vmap"},
         "today": {"step_mode": "eager", "batching": "lockstep"}}
# one configuration of the default study (search_spaces/default.yaml): its fixed part and
# mid-range values of its parameters, dropout included (it changed which kernels ran before)
STUDY_TRIAL = {"n_heads": 4, "attn_dropout": 0.15, "attn_temperature": 1.0,
               "init": "xavier_uniform", "norm": "pre_ln", "weight_decay": 0.01,
               "label_smoothing": 0.1}
SEEDS = 2
START_POLL_S = 0.01


def trial_config(path: str, epochs: int) -> dict[str, Any]:
    """The config dict a sweep hands its trainable for this probe's trial on `path`."""
    from benchmarks.trials import DEFAULT_TRIAL

    return {**DEFAULT_TRIAL, **STUDY_TRIAL, "epochs": epochs,
            "step_mode": PATHS[path]["step_mode"]}


def rates(walls: Sequence[float], trials_each: int) -> float:
    """Trials per second of processes that each trained `trials_each` trials, started
    together: all their trials over the slowest one's wall time."""
    return len(walls) * trials_each / max(walls)


def scaling(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's (path, k, trials_per_s, ...) with `scaling`: its rate over the rate of the
    row with the same path (and `mps`) at k = 1 (None where that row is missing)."""
    base = {(r["path"], r.get("mps", False)): r["trials_per_s"] for r in rows if r["k"] == 1}
    return [{**r, "scaling": (r["trials_per_s"] / base[(r["path"], r.get("mps", False))]
                              if (r["path"], r.get("mps", False)) in base else None)}
            for r in rows]


def child(path: str, epochs: int, trials: int, k: int, start_file: str) -> dict[str, Any]:
    """One packed process: data, a warm-up trial, then (once `start_file` exists) `trials`
    timed trials; returns their seconds."""
    import torch

    from study.trainable import gpu_memory_cap, lockstep, trial_threads

    trial_threads(1)
    gpu_memory_cap(1.0 / k if k > 1 else None)
    batching = PATHS[path]["batching"]
    for _ in lockstep(trial_config(path, 1), SEEDS, True, batching):  # data, warm-up
        pass
    Path(start_file + f".ready{os.getpid()}").touch()
    while not Path(start_file).exists():
        time.sleep(START_POLL_S)
    seconds, outcomes = [], []
    t_all = time.perf_counter()
    for _ in range(trials):
        t0 = time.perf_counter()
        reports = list(lockstep(trial_config(path, epochs), SEEDS, True, batching))
        last = reports[-1] if reports else None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        outcomes.append(None if last is None or last.outcome is None else last.outcome.value)
    return {"wall_s": time.perf_counter() - t_all, "trial_s": seconds, "outcomes": outcomes}


def run_packed(path: str, k: int, epochs: int, trials: int, env: dict[str, str] | None = None,
               timeout_s: float = 600.0) -> dict[str, Any]:
    """k `child` processes of `path`, started together; their results and the rate."""
    with tempfile.TemporaryDirectory() as tmp:
        start = str(Path(tmp) / "start")
        cmd = [sys.executable, "-m", "benchmarks.packing_probe", "--child", path, str(epochs),
               str(trials), str(k), start]
        full_env = {**os.environ, **(env or {}),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                os.environ.get("PYTHONPATH")]))}
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=full_env, cwd=ROOT) for _ in range(k)]
        deadline = time.monotonic() + timeout_s
        while (len(list(Path(tmp).glob("start.ready*"))) < k
               and all(p.poll() is None for p in procs) and time.monotonic() < deadline):
            time.sleep(0.05)
        Path(start).touch()
        outs = []
        for p in procs:
            try:
                so, se = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()  # this probe's own child, by its handle
                so, se = p.communicate()
            if p.returncode != 0:
                return {"path": path, "k": k, "error": (se or so)[-1500:]}
            outs.append(json.loads(so.strip().splitlines()[-1]))
    walls = [o["wall_s"] for o in outs]
    per_trial = [s for o in outs for s in o["trial_s"]]
    return {"path": path, "k": k, "epochs": epochs, "trials_each": trials,
            "trials_per_s": rates(walls, trials), "wall_s": walls,
            "mean_trial_s": sum(per_trial) / len(per_trial), "trial_s": per_trial,
            "outcomes": sorted({str(x) for o in outs for x in o["outcomes"]})}


class MPSDaemon:
    """A CUDA MPS control daemon of this probe's own (its pipe and log folders in `folder`),
    started with `nvidia-cuda-mps-control -d` and told to quit at the end; `env` is what its
    clients need. `why_not` says why it could not start (None when it runs)."""

    def __init__(self, folder: Path) -> None:
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
        self.why_not: str | None = None
        self.binary = shutil.which("nvidia-cuda-mps-control")

    def __enter__(self) -> MPSDaemon:
        if self.binary is None:
            self.why_not = "nvidia-cuda-mps-control is not on this machine"
            return self
        for d in self.env.values():
            Path(d).mkdir(parents=True, exist_ok=True)
        res = subprocess.run([self.binary, "-d"], env={**os.environ, **self.env},
                             capture_output=True, text=True)
        if res.returncode != 0:
            self.why_not = f"nvidia-cuda-mps-control -d: rc {res.returncode} {res.stderr[-300:]}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.binary is not None and self.why_not is None:
            subprocess.run([self.binary], input="quit\n", env={**os.environ, **self.env},
                           capture_output=True, text=True, timeout=30)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    ap.add_argument("--mps", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    import torch

    from benchmarks.run import device_name

    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"device": device_name(torch.cuda.is_available()),
                              "config": trial_config("new", args.epochs), "seeds": SEEDS,
                              "rows": rows}
    out = args.out / f"packing-probe-{result['device']}.json"
    args.out.mkdir(parents=True, exist_ok=True)

    def save(row: dict[str, Any]) -> None:
        rows.append(row)
        rows[:] = scaling(rows)
        out.write_text(json.dumps(result, indent=1))
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()
               if k in ("path", "k", "mps", "trials_per_s", "mean_trial_s", "scaling",
                        "outcomes", "error")}, flush=True)

    for path in args.paths:
        for k in args.k:
            save(run_packed(path, k, args.epochs, args.trials))
    if args.mps and "new" in args.paths:
        with tempfile.TemporaryDirectory() as tmp, MPSDaemon(Path(tmp)) as mps:
            result["mps"] = mps.why_not or "ran"
            if mps.why_not is None:
                for k in args.k:
                    save({**run_packed("new", k, args.epochs, args.trials, env=mps.env),
                          "mps": True})
        out.write_text(json.dumps(result, indent=1))
    print(f"written: {out}")
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        path, epochs, trials, k, start = sys.argv[2:7]
        print(json.dumps(child(path, int(epochs), int(trials), int(k), start)))
    else:
        main()
