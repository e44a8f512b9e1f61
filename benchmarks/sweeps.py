"""Whole sweeps (real Ray, Optuna and MLflow on this machine).

- `harness`: two 32-trial sweeps, each in its own process (`benchmarks.sweep_child`) under
  `benchmarks.diskio`: tiny trials (the bytes its process tree wrote per trial) and the default
  study's trials (the harness overhead: 1 - the trials' own time / (the command's wall time x
  concurrency)); and `report_ahead`, tiny trials one at a time with synchronous reports and
  with epochs computed ahead (`study.ahead`).
- `study_speedup`: a reduced default study run both ways, each a `study sweep` command: today's
  path (the eager step, `seed_batching: lockstep`, synchronous reports) and the default, wall
  time of the whole command.
- `search_epochs`: TPE + ASHA (the defaults) against random search without early stopping on a
  small space, 3 searcher seeds each: epochs trained until random search's best val_acc is
  reached (random search's: the mean over the orders its independent trials could have run
  in, `simulated_order_epochs`; TPE + ASHA's: as its reports came).

The pure parts (`overhead_frac`, `epochs_to_reach`, `search_ratio`, ...) are tested in
tests/test_bench.py.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import diskio
from study.records import Outcome

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPACE = ROOT / "search_spaces" / "default.yaml"

# 32 tiny trials: digits, a one-layer d_model-16 model, two epochs, one seed
TINY_SPACE = """
name: bench_tiny
task: digits
fixed: {d_model: 16, d_ff: 32, n_layers: 1, n_heads: 2, batch_size: 128, lr: 0.01}
params:
  attn_temperature: {type: float, low: 0.5, high: 2.0, log: true}
  attn_dropout: {type: float, low: 0.0, high: 0.2}
design: random
budget: {epochs: %(epochs)d}
seeds: 1
objective: {metric: val_acc, mode: max}
searcher_seed: 0
num_trials: %(trials)d
max_concurrent: 2
resources: {cpu: 1, gpu: 0}
"""

# the search comparison: digits, tiny models, the learning rate matters most
SEARCH_SPACE = """
name: bench_search
task: digits
fixed: {d_ff: 32, n_layers: 1, n_heads: 2, batch_size: 128}
params:
  d_model: [16, 32]
  lr: {type: float, low: 0.0003, high: 0.03, log: true}
  attn_temperature: {type: float, low: 0.25, high: 4.0, log: true}
  attn_dropout: {type: float, low: 0.0, high: 0.3}
  weight_decay: {type: float, low: 0.0001, high: 0.3, log: true}
budget: {epochs: %(epochs)d}
seeds: 1
objective: {metric: val_acc, mode: max}
%(design)s
searcher_seed: %(seed)d
num_trials: %(trials)d
max_concurrent: 2
resources: {cpu: 1, gpu: 0}
"""


# --- pure helpers --------------------------------------------------------------------------

def overhead_frac(own_s: float, wall_s: float, concurrency: int) -> float:
    """1 - (the trials' own time) / (wall time x trials that could run at once)."""
    return 1.0 - own_s / (wall_s * concurrency)


def trial_spans(results: Sequence[Sequence[Any]]) -> list[tuple[str, float, float]]:
    """(slot, start, end) of each attempt of each trial from its results (time, worker pid,
    trial id, the epoch's own seconds): it starts its first epoch's own seconds before its
    first result and ends with its last; a slot is a worker process (Ray reuses them for later
    trials), and a trial retried on another worker is one span per worker."""
    spans: dict[tuple[str, str], tuple[str, float, float]] = {}
    for t, pid, trial, iter_s in sorted(results):
        key = (str(trial), str(pid))
        if key not in spans:
            spans[key] = (str(pid), float(t) - float(iter_s), float(t))
        else:
            slot, start, _ = spans[key]
            spans[key] = (slot, start, float(t))
    return list(spans.values())


def tail_idle_s(spans: Sequence[tuple[str, float, float]], slots: int) -> float:
    """Slot-seconds left idle at a sweep's end for lack of trials: from the start of the last
    trial to start until the last one ends, the `slots` slots' capacity less the trials' time
    within that window. What a slot does there besides trials (ending its last trial) delays
    no trial, since none is left to start; a gap before the last trial starts is the harness's
    and stays counted. 0 without spans."""
    if not spans:
        return 0.0
    last_start = max(s for _, s, _ in spans)
    end = max(e for _, _, e in spans)
    busy = sum(max(0.0, e - max(s, last_start)) for _, s, e in spans)
    return max(0.0, slots * (end - last_start) - busy)


def mb_per_trial(write_bytes: int, trials: int) -> float:
    return write_bytes / 1e6 / trials


def epochs_to_reach(points: Sequence[tuple[float, float]], target: float) -> tuple[int, bool]:
    """Epochs trained (reports, in time order) until a val_acc >= `target` was reported, and
    whether it was: `points` are (time, val_acc) of every epoch of every trial; when the target
    is never reached, all the epochs trained and False."""
    ordered = sorted(points)
    for i, (_, acc) in enumerate(ordered, 1):
        if acc >= target:
            return i, True
    return len(ordered), False


def random_order_epochs(curves: Sequence[Sequence[float]], target: float) -> float:
    """Expected epochs trained until `target` is reached when the trials of `curves` (each
    trial's val_acc per epoch, all of them trained to the end: no early stopping) run one
    after the other in a uniformly random order. Random search draws its trials independently,
    so every order was as likely as the one the sweep happened to run; this is the mean over
    all of them, not one order's luck. A trial that never reaches it precedes the first that
    does with probability 1/(r+1) (r: the trials that reach it), and each of those is first
    with probability 1/r, so the mean is sum(len of the others) / (r+1) + mean(the epoch
    where each of the r first reaches it)."""
    first = [next((e for e, a in enumerate(c, 1) if a >= target), None) for c in curves]
    hits = [e for e in first if e is not None]
    if not hits:
        raise ValueError(f"no trial reaches {target}")
    misses = sum(len(c) for c, e in zip(curves, first) if e is None)
    return misses / (len(hits) + 1) + sum(hits) / len(hits)


def simulated_order_epochs(curves: Sequence[Sequence[float]], target: float, slots: int,
                           draws: int = 2000, seed: int = 0) -> float:
    """`random_order_epochs` with `slots` trials running at once (a sweep's `max_concurrent`),
    by simulation: each draw runs the trials in a random order, each epoch one time unit, a
    trial starting on the first free slot; epochs are counted in time order (ties in random
    order) until one reaches `target`, as `epochs_to_reach` counts a real sweep's reports. The
    mean over `draws` draws (with one slot it converges to `random_order_epochs`)."""
    rng = np.random.default_rng(seed)
    total = 0
    for _ in range(draws):
        free = [0] * slots
        events = []
        for i in rng.permutation(len(curves)):
            s = int(np.argmin(free))
            events += [(free[s] + e, rng.random(), a) for e, a in enumerate(curves[i], 1)]
            free[s] += len(curves[i])
        events.sort()
        hit = next((n for n, (_, _, a) in enumerate(events, 1) if a >= target), None)
        if hit is None:
            raise ValueError(f"no trial reaches {target}")
        total += hit
    return total / draws


def search_ratio(pairs: Sequence[tuple[Sequence[Sequence[tuple[float, float]]],
                                      Sequence[tuple[float, float]]]],
                 slots: int = 1, seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """For each searcher seed (`seeds`, default 0, 1, ...: the labels of the rows and of
    `not_reached`) a pair (random search's trials, each its (time, val_acc) per
    epoch; TPE+ASHA's (time, val_acc) of every epoch of every trial): the target is the best
    val_acc random search reached; random search's epochs to reach it are the mean over the
    orders its independent trials could have run in (`random_order_epochs` with one slot,
    exact; `simulated_order_epochs` with `slots` at once; the order it did run in is kept as
    `random_epochs_observed`), TPE+ASHA's are counted
    in the order its reports came (`epochs_to_reach`: its trials depend on those before). The
    ratio is TPE+ASHA's epochs over random search's, summed over seeds (each seed's own ratio
    in its row: with a few seeds they are the spread to read, no interval is claimed). A
    TPE+ASHA run that never reached the target counts all its epochs and is listed in
    `not_reached`: the ratio is then a lower bound (`censored`)."""
    rows, rand_total, tpe_total, missed, observed = [], 0.0, 0, [], 0
    labels = list(seeds) if seeds is not None else list(range(len(pairs)))
    for s, (label, (trials, tpe)) in enumerate(zip(labels, pairs, strict=True)):
        rand = [p for t in trials for p in t]
        target = max(acc for _, acc in rand)
        # each trial's epochs in their order; trials in a fixed order (by first report), so
        # the simulation's draws do not depend on the order the store returned them in
        curves = [[acc for _, acc in t] for t in sorted(trials, key=lambda t: t[0] if t else
                                                         (0.0, 0.0))]
        e_rand = (random_order_epochs(curves, target) if slots == 1 else
                  simulated_order_epochs(curves, target, slots, seed=s))
        e_seen, _ = epochs_to_reach(rand, target)
        e_tpe, reached = epochs_to_reach(tpe, target)
        rand_total, tpe_total, observed = rand_total + e_rand, tpe_total + e_tpe, \
            observed + e_seen
        if not reached:
            missed.append(label)
        rows.append({"seed": label, "target_val_acc": target, "random_epochs": e_rand,
                     "random_epochs_observed": e_seen, "random_epochs_total": len(rand),
                     "random_trials_reaching": sum(any(a >= target for a in c)
                                                   for c in curves),
                     "tpe_asha_epochs": e_tpe, "ratio": e_tpe / e_rand,
                     "tpe_asha_epochs_total": len(tpe),
                     "tpe_asha_reached": reached,
                     "tpe_asha_best": max(acc for _, acc in tpe)})
    return {"ratio": tpe_total / rand_total, "ratio_observed_order": tpe_total / observed,
            "per_seed": rows, "not_reached": missed, "censored": bool(missed),
            "random_slots": slots}


# --- runs ----------------------------------------------------------------------------------

def _create_store(uri: str) -> None:
    """Create the MLflow store beforehand (its schema migrations write ~8 MB once), so the
    measured sweep writes what a sweep into an existing store writes."""
    from study.sweep.lifecycle import open_store
    from study.tracking import Tracker, checkpoint_sqlite
    open_store(Tracker(uri))  # as a sweep opens a store it is the first to use
    checkpoint_sqlite(uri)


def _curves(uri: str, parent: str, metric: str = "val_acc"
            ) -> list[list[tuple[float, float]]]:
    """Per child run of `parent`, (timestamp, value) of every epoch's `metric`, in epoch
    (step) order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'", max_results=5000)
    return [[(m.timestamp / 1e3, m.value) for m in sorted(
        client.get_metric_history(r.info.run_id, metric), key=lambda m: (m.step, m.timestamp))]
        for r in runs]


def harness(tmp: Path, trials: int = 32, epochs: int = 2) -> dict[str, Any]:
    """Two sweeps of `trials` trials, each in its own process under `benchmarks.diskio`:
    - `tiny`: trials of half a second (TINY_SPACE, `epochs` epochs), where per-trial costs
      weigh most: bytes written per trial (`disk`) and the harness's seconds per trial;
    - `default`: the default study's own trials (search_spaces/default.yaml: its model, task,
      2 seeds and 10 epochs), as `make sweep` runs them:
      `overhead_frac` (`harness_overhead_frac`) over the whole command's wall time.
    The trials' own time is the sum of every result's own seconds (`compute_s`: what the
    trial measured computing the epoch, the first from the trial's start) less what each
    worker process did once before its first trial could train (`worker_setup_s`: imports, the
    first optimizer and building the data, which it then caches), which the first trial on a
    worker counts as its own but is harness overhead. `overhead_frac` is 1 - (the trials' own
    time + `tail_idle_s`, the slots idle at the end with no trial left to start) / (wall time
    x slots); `overhead_frac_with_tail` counts that idle time as overhead too."""
    tmp.mkdir(parents=True, exist_ok=True)
    space = tmp / "tiny.yaml"
    space.write_text(TINY_SPACE % {"trials": trials, "epochs": epochs})
    tiny = _timed_sweep(tmp / "tiny", space, trials, epochs)
    default = _timed_sweep(tmp / "default", DEFAULT_SPACE, trials, None,
                           setup=worker_setup_s(DEFAULT_SPACE))
    return {
        "trials": trials, "epochs": epochs, "max_concurrent": tiny["max_concurrent"],
        "overhead_frac": default["overhead_frac"], "disk": tiny["disk"],
        "tiny": tiny, "default": default, "report_ahead": report_ahead(tmp / "ahead"),
        "note": "overhead_frac: the default study's trials, over the whole command (Ray's "
                "start and stop included), the slots' idle time at the end with no trial left "
                "to start not counted (overhead_frac_with_tail counts it); disk: the tiny "
                "trials (the most bytes per epoch)"}


def report_ahead(tmp: Path, trials: int = 12, epochs: int = 5) -> dict[str, Any]:
    """The Tuner's wall time for `trials` tiny trials of `epochs` epochs, one at a time (the
    driver keeps a core of its own, as on a GPU machine), with each trial's reports sent
    synchronously (`STUDY_EPOCHS_AHEAD=0`: every epoch waits for the driver's round trip)
    over the same with epochs computed one ahead (`study.ahead`, the default): one run each,
    synchronous first."""
    from study.ahead import AHEAD_ENV

    tmp.mkdir(parents=True, exist_ok=True)
    space = tmp / "tiny1.yaml"
    space.write_text(TINY_SPACE.replace("max_concurrent: 2", "max_concurrent: 1")
                     % {"trials": trials, "epochs": epochs})
    runs = {name: _timed_sweep(tmp / name, space, trials, epochs, env={AHEAD_ENV: flag})
            for name, flag in (("synchronous", "0"), ("ahead", "1"))}
    fit = {name: r["fit_wall_s"] for name, r in runs.items()}
    return {"trials": trials, "epochs": epochs, "max_concurrent": 1, "fit_wall_s": fit,
            "trials_own_s": {name: r["trials_own_s"] for name, r in runs.items()},
            "speedup": fit["synchronous"] / fit["ahead"]}


def _timed_sweep(tmp: Path, space: Path, trials: int, epochs: int | None,
                 setup: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """One sweep of `space` (`trials`, `epochs` overriding it) in its own process, with `env`
    added to its environment: its timing, the harness overhead and its disk writes
    (`harness`)."""
    tmp.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    _create_store(uri)
    out = tmp / "timing.json"
    budget = [str(trials), str(epochs or 0)]
    res = diskio.measure([sys.executable, "-m", "benchmarks.sweep_child", str(space), "sweep",
                          str(tmp / "ray"), uri, str(out), *budget], cwd=tmp,
                         log=tmp / "log.txt", env={**_env(), **(env or {})})
    if res.returncode != 0 or not out.exists():
        raise RuntimeError(f"sweep of {space.name} failed ({res.returncode}): see "
                           f"{tmp / 'log.txt'}")
    from study.spaces import load_space

    spec = load_space(space)
    t = json.loads(out.read_text())
    workers, outcomes, failures = _trial_runs(uri)
    setup = setup or {}
    once = (setup.get("imports_s", 0.0) + setup.get("first_optimizer_s", 0.0)
            + sum(setup.get("data_build_s", {}).values()))
    own = sum(t["iter_s"]) - once * len(workers)
    fit, cmd = t["fit_end"] - t["fit_start"], t["command_end"] - t["command_start"]
    slots = spec.max_concurrent
    tail = tail_idle_s(trial_spans(t["results"]), slots)
    run_epochs = epochs or spec.epochs
    return {
        "space": space.name, "trials": trials, "epochs": run_epochs, "seeds": spec.seeds,
        "max_concurrent": slots, "trials_done": t["done"], "results": len(t["iter_s"]),
        "outcomes": outcomes, "failure_messages": failures,
        "worker_processes": len(workers), "worker_setup_s": setup, "trials_own_s": own,
        "fit_wall_s": fit, "command_wall_s": cmd, "process_wall_s": res.exit_s,
        "before_fit_s": t["fit_start"] - t["command_start"],
        "before_fit_marks_s": {**t.get("marks", {}),
                               "fit_start": t["fit_start"] - t["command_start"]},
        "after_fit_s": t["command_end"] - t["fit_end"],
        "tail_idle_s": tail,
        # over the process's whole wall time, its exit included, as a user waits for it
        "overhead_frac": overhead_frac(own + tail, res.exit_s, slots),
        "overhead_frac_command": overhead_frac(own + tail, cmd, slots),
        "overhead_frac_with_tail": overhead_frac(own, res.exit_s, slots),
        "overhead_frac_fit": overhead_frac(own + tail, fit, slots),
        "overhead_s_per_trial_in_fit": (fit * slots - own - tail) / trials,
        "disk": _disk(res, trials, run_epochs, diskio.dir_bytes(tmp / "ray" / "sweep"))}


# what a worker does once (its imports, then each replicate's data, which it then caches),
# timed in a fresh process: harness overhead that the first trial on each worker counts as its own
_SETUP = """
import json, sys, time
t0 = time.perf_counter()
import torch
import study.replicas, study.train, study.trainable
from study.config import make_config
from study.spaces import load_space
from study.tasks import get_task
from study.trainable import replicate
imports = time.perf_counter() - t0
torch.set_num_threads(1)
t0 = time.perf_counter()
torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # the first one imports torch._dynamo
first_optimizer = time.perf_counter() - t0
spec = load_space(sys.argv[1])
cfg = make_config({**spec.fixed, "epochs": 1})
data = {}
for k in range(spec.seeds):
    r = replicate(cfg, k, spec.vary_data_seed)
    t = time.perf_counter()
    get_task(r)
    data[str(r.data_seed)] = time.perf_counter() - t
print(json.dumps({"imports_s": imports, "first_optimizer_s": first_optimizer,
                  "data_build_s": data}))
"""


def worker_setup_s(space: Path) -> dict[str, Any]:
    """Seconds a fresh worker spends importing the trial code (`imports_s`), making its first
    optimizer (`first_optimizer_s`: torch imports `torch._dynamo` then, about a second) and
    building each replicate's data of `space`'s trials (`data_build_s`, data seed -> s; the
    data differs between trials only in fields a space rarely varies), timed in a fresh
    process."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", _SETUP, str(space)], capture_output=True,
                         text=True, env=_env(), check=True)
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def _trial_runs(uri: str) -> tuple[set[str], dict[str, int], list[str]]:
    """The worker processes a sweep's trials ran in (their `worker_pid` tags), how many trials
    ended each way (`stop_reason`) and the distinct messages of those that failed (at most 5)."""
    from mlflow.tracking import MlflowClient

    from study.records import TAG_MESSAGE, TAG_OUTCOME, TAG_WORKER_PID

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = [r for r in client.search_runs(exps, max_results=5000)
            if TAG_OUTCOME in r.data.tags or TAG_WORKER_PID in r.data.tags]
    pids = {r.data.tags[TAG_WORKER_PID] for r in runs if TAG_WORKER_PID in r.data.tags}
    outcomes: dict[str, int] = {}
    failed: list[str] = []
    for r in runs:
        o = r.data.tags.get(TAG_OUTCOME, "none")
        outcomes[o] = outcomes.get(o, 0) + 1
        msg = r.data.tags.get(TAG_MESSAGE, "")
        if o in (Outcome.ERROR.value, Outcome.DIVERGED.value) and msg not in failed:
            failed.append(msg)
    return pids, outcomes, failed[:5]


def not_the_same_study(runs: dict[str, list[dict[str, Any]]], tolerance: float = 0.05
                       ) -> str | None:
    """Why timed sweeps of the same space (`_timed_sweep` results, per way) did not train the
    same study, so their times cannot be compared: trials that raised, no results, diverged
    trials whose counts differ by more than one or `tolerance` of the trials, or a way that
    reported more than `tolerance` fewer or more epochs than another (on an H200 every trial of the
    new path once diverged at its first step: 36 results against 360, a 2.6x "speedup").
    None when they did."""
    errors = {name: outcome_count(rs, Outcome.ERROR) for name, rs in runs.items()}
    if any(errors.values()):
        return (f"trials raised, so the ways did not train the same study: {errors}; see each "
                "round's failure_messages")
    results = {name: sum(int(r["results"]) for r in rs) for name, rs in runs.items()}
    if min(results.values()) == 0:
        return f"a way reported no epoch results {results}: nothing to compare"
    diverged = {name: outcome_count(rs, Outcome.DIVERGED) for name, rs in runs.items()}
    trials = max(sum(sum(r.get("outcomes", {}).values()) for r in rs) for rs in runs.values())
    if max(diverged.values()) - min(diverged.values()) > max(1.0, tolerance * trials):
        return (f"the ways had different numbers of diverged trials {diverged}, so they did "
                "not train the same study; see each round's failure_messages")
    if max(results.values()) > (1 + tolerance) * min(results.values()):
        return (f"the ways reported different numbers of epochs {results} (outcomes: "
                f"{ {name: [r.get('outcomes') for r in rs] for name, rs in runs.items()} }), so "
                "they did not train the same study; see each round's failure_messages")
    return None


def study_mps(tmp: Path, study: dict[str, Any] | None, trials: int, epochs: int,
              packed: tuple[float, int] | None) -> dict[str, Any]:
    """The new path's study (default.yaml as it is, `trials`/`epochs`, `packed` on the GPU)
    once more, its trials under a CUDA MPS daemon of its own (`benchmarks.mps`; a local Ray's
    workers inherit the sweep's environment, so they reach it): the question the H200's study
    left (packed captured trials took 5.3 s each against 0.88 s alone), answered on the study
    itself. `study`: the study section of the same run (`study_speedup`), whose ways it is
    compared with (`mps_speedups`)."""
    from benchmarks.mps import MPSDaemon

    tmp.mkdir(parents=True, exist_ok=True)
    space = tmp / "default.yaml"
    space.write_text(packed_space(DEFAULT_SPACE.read_text(), packed))
    out: dict[str, Any] = {"space": "search_spaces/default.yaml", "trials": trials,
                           "epochs": epochs, "packed": packed}
    with MPSDaemon(tmp / "daemon") as mps:
        out["mps"] = {"started": mps.why_not is None, "why_not": mps.why_not}
        if mps.why_not is None:
            # a worker's one-time set-up as the study section timed it (else timed now)
            setup = ((study or {}).get("default", {}).get("rounds") or [{}])[0].get(
                "worker_setup_s") or worker_setup_s(DEFAULT_SPACE)
            out["default_mps"] = _timed_sweep(tmp / "default_mps", space, trials, epochs,
                                              setup=setup, env=mps.env)
            out["mps"]["served"], out["mps"]["servers"] = mps.served()
    out["mps"]["quit"] = mps.quit
    return {**out, **mps_speedups(study, out.get("default_mps"), out["mps"])}


def mps_speedups(study: dict[str, Any] | None, run: dict[str, Any] | None,
                 mps: dict[str, Any]) -> dict[str, Any]:
    """`speedup_mps`: today's path's wall time in `study` (the study section) over the MPS
    sweep `run`'s, and `speedup_vs_no_mps`: the new path's without MPS over it; both null,
    with `reason`, where the daemon did not start, it listed no server after the sweep (its
    trials ran without MPS), the study section did not run or has no valid figure, or the
    ways did not train the same study (`not_the_same_study`); the figures are then kept as
    `*_if_valid` where they exist."""
    out: dict[str, Any] = {"speedup_mps": None, "speedup_vs_no_mps": None}
    if run is None:
        return {**out, "reason": f"no MPS daemon: {mps.get('why_not')}"}
    if study is None or "lockstep" not in study or "default" not in study:
        return {**out, "reason": "the study section did not run in this run: nothing to "
                                 "compare with (run --only study study_mps)"}
    figures = {"speedup_mps": study["lockstep"]["wall_s"] / run["process_wall_s"],
               "speedup_vs_no_mps": study["default"]["wall_s"] / run["process_wall_s"]}
    why = not_the_same_study({"lockstep": study["lockstep"]["rounds"],
                              "default": study["default"]["rounds"], "default_mps": [run]})
    if why is None and not mps.get("served"):
        why = ("the daemon listed no MPS server after the sweep: its trials did not reach it "
               "and ran without MPS")
    if why is None:
        return figures
    return {**out, **{f"{k}_if_valid": v for k, v in figures.items()}, "reason": why}


def outcome_count(rounds: Sequence[dict[str, Any]], outcome: Outcome) -> int:
    """Trials of timed sweeps (`_timed_sweep` results) that ended with `outcome`."""
    return sum(int(r.get("outcomes", {}).get(outcome.value, 0)) for r in rounds)


def _disk(res: diskio.DiskWrites, trials: int, epochs: int,
          state: dict[str, int]) -> dict[str, Any]:
    return {"write_bytes": res.write_bytes, "cancelled_write_bytes": res.cancelled_write_bytes,
            "mb_per_trial": mb_per_trial(res.write_bytes, trials),
            "mb_per_trial_epoch": mb_per_trial(res.write_bytes, trials) / epochs,
            "by_process": {k: round(v / 1e6, 3) for k, v in res.by_command().items()},
            "experiment_dir_bytes": {k: v for k, v in state.items() if v > 0}}


def _env() -> dict[str, str]:
    import os
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]  # keep the caller's
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def todays_env() -> dict[str, str]:
    """The environment today's path runs in: reports synchronous, as Ray makes them by
    itself (`study.ahead`: no epoch computed ahead of the driver), and malloc as glibc sets
    it (`study.device.keep_freed_memory` off)."""
    from study.ahead import AHEAD_ENV
    from study.device import KEEP_FREED_ENV
    return {AHEAD_ENV: "0", KEEP_FREED_ENV: "0"}


def todays_path(text: str) -> str:
    """A space file run the way trials ran before the fast paths: the eager step
    (`step_mode: eager`) and seeds in lockstep (`seed_batching: lockstep`); run it in
    `todays_env()`."""
    import yaml

    raw = yaml.safe_load(text)
    raw["fixed"] = {**(raw.get("fixed") or {}), "step_mode": "eager"}
    raw["seed_batching"] = "lockstep"
    return yaml.safe_dump(raw, sort_keys=False)


def default_study_budget() -> dict[str, int]:
    """The default study's own size: its `num_trials` and epochs per trial."""
    from study.spaces import load_space

    spec = load_space(DEFAULT_SPACE)
    return {"trials": spec.num_trials, "epochs": spec.epochs}


def packed_space(text: str, packed: tuple[float, int] | None) -> str:
    """A space file with trials packed on a GPU: `packed` = (each trial's GPU fraction,
    max_concurrent), as `study sweep --gpu F --max-concurrent K` sets them (None: as it is)."""
    if packed is None:
        return text
    import yaml

    raw = yaml.safe_load(text)
    raw["resources"] = {**(raw.get("resources") or {}), "gpu": packed[0]}
    raw["max_concurrent"] = packed[1]
    return yaml.safe_dump(raw, sort_keys=False)


# what a sweep's driver and workers import, loaded once before timed sweeps (file cache)
WARM_IMPORTS = ("import mlflow, optuna, ray, ray.tune, torch; "
                "import study.sweep.lifecycle, study.trainable, study.replicas")


def study_speedup(tmp: Path, trials: int = 4, epochs: int = 3,
                  packed: tuple[float, int] | None = None, rounds: int = 2) -> dict[str, Any]:
    """default.yaml with `trials`/`epochs`, both ways (today's path: `todays_path`; the new
    path: the file as it is), each sweep in its own process (`_timed_sweep`, as the harness
    section runs one): the speedup of the sweeps' process wall times (start to the process's
    exit), and per way where the time went (before and after the Tuner's fit, the trials' own
    seconds, slots idle at the end, harness seconds per trial), each the mean over its rounds
    (every round in `rounds`). With 2 `rounds` the ways run in the order A B B A and
    each way's time is its mean, so what a first run pays (cold caches) or a drifting machine
    load falls on both alike. `packed` = (gpu fraction, max_concurrent) packs trials on a GPU.
    The CPU's default (4 trials, 3 epochs) keeps `make bench` under 15 minutes: there both
    paths run the same computation (the README says why)."""
    tmp.mkdir(parents=True, exist_ok=True)
    text = DEFAULT_SPACE.read_text()
    variants = {"lockstep": (todays_path(text), todays_env()), "default": (text, {})}
    out: dict[str, Any] = {"space": "search_spaces/default.yaml", "trials": trials,
                           "epochs": epochs, "seed_batching_key": True,
                           "todays_path": "step_mode: eager, seed_batching: lockstep, "
                                          "reports synchronous (STUDY_EPOCHS_AHEAD=0), glibc "
                                          "malloc as it is (STUDY_KEEP_FREED_MEMORY=0)",
                           "packed": packed, "rounds": rounds}
    setup = worker_setup_s(DEFAULT_SPACE)
    # what every sweep imports, loaded once first (the file cache), so that no way pays it
    warm = subprocess.run([sys.executable, "-c", WARM_IMPORTS], cwd=tmp, env=_env(),
                          capture_output=True, text=True)
    if warm.returncode != 0:
        raise RuntimeError(f"importing what a sweep imports failed: {warm.stderr[-2000:]}")
    order = [name for r in range(rounds) for name in (list(variants) if r % 2 == 0
                                                      else list(variants)[::-1])]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for name, (body, _) in variants.items():
        (tmp / f"{name}.yaml").write_text(packed_space(body, packed))
    for i, name in enumerate(order):
        runs[name].append(_timed_sweep(tmp / f"{name}{i}", tmp / f"{name}.yaml", trials, epochs,
                                       setup=setup, env=variants[name][1]))
    for name, rs in runs.items():  # each number the mean over the way's rounds
        numbers = [k for k, v in rs[0].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[name] = {"wall_s": float(np.mean([r["process_wall_s"] for r in rs])),
                     **{k: float(np.mean([r[k] for r in rs])) for k in numbers},
                     "rounds": rs}
    out["order"] = order
    out["speedup"] = out["lockstep"]["wall_s"] / out["default"]["wall_s"]
    why = not_the_same_study(runs)
    if why is not None:
        out["speedup_if_valid"], out["speedup"] = out["speedup"], None
        out["reason"] = why
    return out


def search_epochs(tmp: Path, seeds: Sequence[int] = (0, 1, 2), trials: int = 16,
                  epochs: int = 6, tpe_trials: int = 32) -> dict[str, Any]:
    """Random search (no early stopping, `trials` trials) and TPE + ASHA as a `search` design
    runs them by default (ASHA's grace period and reduction factor: `SweepSpec`'s defaults;
    `tpe_trials` trials, so that its early-stopped trials spend about the epochs random
    search spends and a miss is a real one), at most `epochs` epochs a trial, per searcher
    seed, in one Ray session; `search_ratio` compares them."""
    from study.records import SweepSpec
    from study.spaces import load_space
    from study.sweep.lifecycle import init_ray, run_sweep, sweep_environment
    from study.sweep.searcher import tpe_startup

    tmp.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    asha = {"grace_period": SweepSpec.grace_period,
            "reduction_factor": SweepSpec.reduction_factor}
    pairs = []
    slots = 1
    # MLflow puts a new store's artifacts under ./mlruns: keep them in `tmp`
    with contextlib.chdir(tmp), sweep_environment():
        init_ray(None)
        for seed in seeds:
            runs = []
            for kind, design, n in (("random", "design: random", trials),
                                    ("tpe_asha", "searcher: tpe", tpe_trials)):
                space = tmp / f"{kind}_{seed}.yaml"
                space.write_text(SEARCH_SPACE % {"epochs": epochs, "design": design,
                                                 "seed": seed, "trials": n})
                res = run_sweep(space, name=f"{kind}_{seed}", tracking_uri=uri,
                                storage=tmp / "ray")
                runs.append(_curves(uri, res["parent_run_id"]))
                slots = load_space(space).max_concurrent
            pairs.append((runs[0], [p for t in runs[1] for p in t]))
    out = search_ratio(pairs, slots, seeds)
    out.update({"task": "digits", "trials_per_sweep": {"random": trials, "tpe_asha": tpe_trials},
                "max_epochs": epochs, "searcher_seeds": list(seeds), "asha": asha,
                "sizing": f"random search: {trials} trials x {epochs} epochs; TPE+ASHA: "
                          f"{tpe_trials} trials of at most {epochs} epochs (early-stopped, so "
                          "about as many epochs in all); a 1-layer d_model 16/32 model on "
                          "digits (a few seconds per trial on 2 CPU cores), TPE's "
                          f"{tpe_startup(tpe_trials)} random start-up trials included; ASHA "
                          f"grace {asha['grace_period']}, reduction factor "
                          f"{asha['reduction_factor']} (the defaults); {slots} trials at once"})
    return out
