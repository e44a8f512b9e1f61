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
of its own (its pipe and log folders under a temp dir, told to quit at the end, a SIGTERM
included), where `nvidia-cuda-mps-control` exists; each such row says whether the daemon
listed a server after it (`mps_valid`: a client that cannot reach the daemon runs without MPS,
silently). Written to `packing-probe-<device>.json` in DIR (default
benchmarks/results). On the CPU it runs too (a check of the probe itself; there the processes
share 2 cores, so the scaling says nothing about a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.mps import MPSDaemon

ROOT = Path(__file__).resolve().parent.parent
# each path's trial settings; today's processes run in `benchmarks.sweeps.todays_env()`, as
# the study section runs today's path (glibc's malloc as it is)
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
    row with the same path (and `mps`) at k = 1 (None where either is a failed row, one with
    an `error` and no rate, or that row is missing)."""
    def key(r: dict[str, Any]) -> tuple[str, bool]:
        return r["path"], bool(r.get("mps", False))

    base = {key(r): r["trials_per_s"] for r in rows if r["k"] == 1 and "trials_per_s" in r}
    return [{**r, "scaling": (r["trials_per_s"] / base[key(r)]
                              if "trials_per_s" in r and key(r) in base else None)}
            for r in rows]


def child(path: str, epochs: int, trials: int, k: int, start_file: str) -> dict[str, Any]:
    """One packed process: data, a warm-up trial, then (once `start_file` exists) `trials`
    timed trials; returns their seconds."""
    import torch

    from study.trainable import lockstep, trial_process

    # as a sweep's worker sets up its process (`run_packed` sets the environment)
    trial_process(1, 1.0 / k if k > 1 else None)
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
        from benchmarks.sweeps import todays_env

        full_env = {**os.environ, **(todays_env() if path == "today" else {}), **(env or {}),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                os.environ.get("PYTHONPATH")]))}
        # output to files, not pipes: a child never blocks on a full pipe before the start
        logs = [(Path(tmp) / f"out{i}", Path(tmp) / f"err{i}") for i in range(k)]
        procs = []
        outs: list[dict[str, Any]] = []
        try:
            for out, err in logs:
                with open(out, "w") as fo, open(err, "w") as fe:
                    procs.append(subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True,
                                                  env=full_env, cwd=ROOT))
            deadline = time.monotonic() + timeout_s
            while (len(list(Path(tmp).glob("start.ready*"))) < k
                   and all(p.poll() is None for p in procs) and time.monotonic() < deadline):
                time.sleep(0.05)
            Path(start).touch()
            for p, (out, err) in zip(procs, logs):
                try:
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    return {"path": path, "k": k, "error": f"not done in {timeout_s:g} s",
                            "pids": [q.pid for q in procs]}
                if p.returncode != 0:
                    return {"path": path, "k": k, "pids": [q.pid for q in procs],
                            "error": (err.read_text() or out.read_text())[-1500:]}
                outs.append(json.loads(out.read_text().strip().splitlines()[-1]))
        finally:
            for p in procs:  # this probe's own children, by their handles
                if p.poll() is None:
                    p.kill()
                    p.wait()
    walls = [o["wall_s"] for o in outs]
    per_trial = [s for o in outs for s in o["trial_s"]]
    return {"path": path, "k": k, "epochs": epochs, "trials_each": trials,
            "trials_per_s": rates(walls, trials), "wall_s": walls,
            "mean_trial_s": sum(per_trial) / len(per_trial), "trial_s": per_trial,
            "outcomes": sorted({str(x) for o in outs for x in o["outcomes"]})}


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
               if k in ("path", "k", "mps", "mps_valid", "trials_per_s", "mean_trial_s",
                        "scaling", "outcomes", "error")}, flush=True)

    for path in args.paths:
        for k in args.k:
            save(run_packed(path, k, args.epochs, args.trials))
    if args.mps and "new" in args.paths:
        with tempfile.TemporaryDirectory() as tmp, MPSDaemon(Path(tmp)) as mps:
            result["mps"] = {"started": mps.why_not is None, "why_not": mps.why_not}
            if mps.why_not is None:
                for k in args.k:
                    row = run_packed("new", k, args.epochs, args.trials, env=mps.env)
                    # the rows count as MPS rows only while the daemon lists a server
                    valid, servers = mps.served()
                    save({**row, "mps": True, "mps_servers": servers, "mps_valid": valid})
        result["mps"]["quit"] = mps.quit
        out.write_text(json.dumps(result, indent=1))
    print(f"written: {out}")
    return result


if __name__ == "__main__":
    # a `timeout` (SIGTERM) unwinds as an exit, so the MPS daemon is told to quit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        path, epochs, trials, k, start = sys.argv[2:7]
        print(json.dumps(child(path, int(epochs), int(trials), int(k), start)))
    else:
        main()
