"""What a long sweep writes to disk per trial-epoch, with the state's saves at trial ends under
their budget (`STUDY_STATE_MB_PER_EPOCH`, study/sweep/lifecycle.py), without them, and with a
save at every trial's end (the budget lifted), side by side: `make bench`'s tiny trials, more of
them.

    python -m benchmarks.disk_scaling [--trials N ...] [--ways WAY ...] [--out DIR]

For each N (default 32 and 200), the ways (default all three) one after the other, each a
sweep of its own (`benchmarks.sweeps._timed_sweep`: the bytes its process tree wrote,
`benchmarks.diskio`); written to `disk-scaling-cpu.json` in DIR (default benchmarks/results).
Not part of `make bench` (about 4 minutes on 2 CPU cores with the defaults).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.run import OUT, machine
from benchmarks.sweeps import TINY_SPACE, _timed_sweep
from study.sweep.lifecycle import STATE_MB_ENV

# the default budget; no save at trial ends (Ray's 60 s and final saves only: the rest of what
# the sweep writes, MLflow's store first); a save at every trial's end, as before the budget
WAYS = {"budget": {}, "no_forced_saves": {STATE_MB_ENV: "0"},
        "every_trial_end": {STATE_MB_ENV: "1e9"}}


def scaling(trials: list[int], ways: list[str], epochs: int = 2) -> dict[str, Any]:
    out: dict[str, Any] = {"epochs": epochs, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in trials:
            space = Path(tmp) / f"tiny{n}.yaml"
            space.write_text(TINY_SPACE % {"epochs": epochs, "trials": n})
            for way in ways:
                env = WAYS[way]
                r = _timed_sweep(Path(tmp) / f"{way}{n}", space, n, epochs, env=env)
                out["runs"].append({"trials": n, "way": way, "trials_done": r["trials_done"],
                                    "process_wall_s": r["process_wall_s"], **r["disk"]})
                print(f"{n} trials, {way}: {r['disk']['mb_per_trial_epoch']:.3f} MB per "
                      f"trial-epoch, {r['process_wall_s']:.0f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, nargs="+", default=[32, 200])
    ap.add_argument("--ways", nargs="+", choices=list(WAYS), default=list(WAYS))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    result = {"machine": machine(), **scaling(args.trials, args.ways)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "disk-scaling-cpu.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
