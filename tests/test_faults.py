"""Faults lose nothing: real Ray, real MLflow, real training, real faults.

Each test breaks a running sweep the way users met it (a killed driver, a damaged experiment
state, a killed Ray worker, a storage or store disk that fills up or turns read-only, a
tracking server that goes away) and counts what MLflow holds afterwards (`audit`): runs deleted
or made twice, trials lost or counted twice, metric points lost or duplicated. Every count must
be zero. The storage and store faults mount small tmpfs file systems (root only; skipped
elsewhere).
"""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from study.server import wait_healthy
from tests.helpers import FakeTrial, on_free_port, run_cli, stop_group

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
EPOCHS, TRIALS = 4, 3
SPACE = f"""
name: faults
task: digits
fixed: {{d_model: 16, d_ff: 32, n_layers: 1, n_heads: 2, batch_size: 256}}
params:
  attn_temperature: {{type: float, low: 0.5, high: 2.0, log: true}}
budget: {{epochs: {EPOCHS}}}
design: random
seeds: 2
num_trials: {TRIALS}
max_concurrent: 2
resources: {{cpu: 1, gpu: 0}}
"""


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "faults.yaml"
    path.write_text(SPACE)
    return path


# --- running and breaking sweeps -----------------------------------------------------------

class Sweep:
    """`study sweep` in the background (its own session, so that what it starts can be
    stopped by group), with its MLflow store and storage."""

    def __init__(self, tmp: Path, space: Path, name: str, uri: str, db: Path,
                 storage: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.uri, self.db, self.storage = name, uri, db, storage
        self.log = tmp / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "study.cli", "sweep", str(space), "--name", name,
             "--tracking-uri", uri, "--storage", str(storage)], cwd=ROOT,
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})})

    @property
    def exp_dir(self) -> Path:
        return self.storage / self.name

    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, what: str, ready: Callable[[], bool], timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the sweep ended before {what}:\n{self.output()[-3000:]}")
            try:
                if ready():
                    return
            except Exception:  # the store is being created or migrated
                pass
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {what}:\n{self.output()[-3000:]}")

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        stop_group(self.proc)  # anything Ray left in the sweep's session
        return rc

    def children(self) -> list[dict[str, Any]]:
        """The sweep's child runs as rows of the store (read straight from its SQLite file)."""
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30) as c:
            rows = c.execute("select r.run_uuid, r.status, r.lifecycle_stage, r.end_time, "
                             "t.key, t.value from runs r join tags t on t.run_uuid = r.run_uuid"
                             ).fetchall()
            steps = dict(c.execute("select run_uuid, count(*) from metrics group by 1"))
            last = dict(c.execute("select run_uuid, max(step) from metrics group by 1"))
            params = c.execute("select run_uuid, key, value from params").fetchall()
        runs: dict[str, dict[str, Any]] = {}
        for rid, status, stage, end, key, value in rows:
            run = runs.setdefault(rid, {"run_id": rid, "status": status, "stage": stage,
                                        "end_time": end, "tags": {}, "config": {},
                                        "points": steps.get(rid, 0),
                                        "last_epoch": last.get(rid, 0)})
            run["tags"][key] = value
        for rid, key, value in params:
            if rid in runs:
                runs[rid]["config"][key] = value
        return [r for r in runs.values() if "mlflow.parentRunId" in r["tags"]]

    def finished(self) -> dict[str, dict[str, Any]]:
        """The child runs closed by now (MLflow status set, the last step of closing one)."""
        return {r["run_id"]: r for r in self.children() if r["status"] != "RUNNING"}

    def running_with_points(self) -> list[dict[str, Any]]:
        return [r for r in self.children() if r["points"] and not r["tags"].get("stop_reason")]


def one_error_line(output: str) -> str:
    """The sweep's error: exactly one line starting with `error:`, and no traceback."""
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    return errors[0]


def ray_trials(exp_dir: Path) -> dict[str, str]:
    """Ray's saved record of the sweep: trial id -> status."""
    state = sorted(exp_dir.glob("experiment_state-*.json"))[-1]
    out = {}
    for trial_json, _ in json.loads(state.read_text())["trial_data"]:
        trial = json.loads(trial_json)
        out[trial["trial_id"]] = trial["status"]
    return out


def audit(sweep: Sweep) -> dict[str, int]:
    """What the store lost or doubled. Runs: deleted child runs; attempts made into two runs
    (tag `study.attempt`); trials Ray finished without a finished run, or that the analysis
    counts other than once. Points: duplicates of a (run, metric, epoch); points missing from
    a run, i.e. a (metric, epoch) every completed run has, up to the run's last epoch (the
    metrics logged at the last epoch only, for completed runs). The counts are printed."""
    from analysis.load import load_sweep

    children = sweep.children()
    live = [r for r in children if r["stage"] == "active"]
    # finished after the last state that reached the disk: kept, not counted (the resumed
    # sweep runs the trial again, in a new run under the same trial id where the state knew
    # the trial, which counts; or may run the configuration again as another trial)
    orphans = ({r["tags"]["ray_trial_id"] for r in live if "study.orphan" in r["tags"]}
               - {r["tags"]["ray_trial_id"] for r in live if "study.orphan" not in r["tags"]})
    # a trial the resumed sweep ran again under a new trial id (the state never knew it): its
    # run is the retry_of of the new trial's run, which counts for both
    trial_of = {r["run_id"]: r["tags"]["ray_trial_id"] for r in live}
    moved = {trial_of[r["tags"]["retry_of"]] for r in live if r["tags"].get("retry_of")
             and trial_of.get(r["tags"]["retry_of"]) not in (None, r["tags"]["ray_trial_id"])}
    attempts = [r["tags"].get("study.attempt") for r in live]
    finished = {r["tags"].get(key) for r in live for key in ("ray_trial_id", "study.replayed_as")
                if r["tags"].get("stop_reason") not in (None, "interrupted")}
    ray = ray_trials(sweep.exp_dir)
    loaded = load_sweep(sweep.uri, experiment=sweep.name)
    counted = list(loaded.trial_table["trial_id"]) if len(loaded.trial_table) else []
    with sqlite3.connect(f"file:{sweep.db}?mode=ro", uri=True, timeout=30) as c:
        groups = c.execute("select run_uuid, key, step, count(*) from metrics "
                           "group by 1, 2, 3").fetchall()
    pairs: dict[str, set[tuple[str, int]]] = {}
    duplicated = 0
    for rid, key, step, n in groups:
        pairs.setdefault(rid, set()).add((key, step))
        duplicated += n - 1
    completed = [r for r in live if r["tags"].get("stop_reason") == "completed"]
    every = set.union(*(pairs.get(r["run_id"], set()) for r in completed)) if completed \
        else set()
    per_epoch = {k for k, s in every if s == 1}
    lost = 0
    for r in live:
        have = pairs.get(r["run_id"], set())
        last = max((s for _, s in have), default=0)
        want = {(k, s) for k in per_epoch for s in range(1, last + 1)}
        if r["tags"].get("stop_reason") == "completed":
            want = every
            lost += 0 if last == EPOCHS else 1  # a completed run has every epoch
        lost += len(want - have)
    counts = {
        "runs_deleted": len(children) - len(live),
        "runs_duplicated": len(attempts) - len(set(attempts)),
        "trials_lost": sum(1 for t, s in ray.items()
                           if s in ("TERMINATED", "ERROR") and t not in finished),
        "trials_miscounted": len(counted) - len(set(counted))
        + len(set(counted) ^ ({r["tags"]["ray_trial_id"] for r in live} - orphans - moved)),
        "points_lost": lost,
        "points_duplicated": duplicated,
    }
    print(f"audit {sweep.name}: {counts} ({len(live)} runs, {len(orphans)} orphaned, "
          f"{sum(n for *_, n in groups)} points)")
    return counts


ZERO = {"runs_deleted": 0, "runs_duplicated": 0, "trials_lost": 0, "trials_miscounted": 0,
        "points_lost": 0, "points_duplicated": 0}


def sqlite_sweep(tmp: Path, space: Path, name: str, db_dir: Path | None = None,
                 storage: Path | None = None, env: dict[str, str] | None = None) -> Sweep:
    db = (db_dir or tmp) / "mlflow.db"
    return Sweep(tmp, space, name, f"sqlite:///{db}", db, storage or tmp / "ray", env)


def resume(sweep: Sweep) -> subprocess.CompletedProcess:
    res = run_cli("resume", sweep.name, "--storage", str(sweep.storage), timeout=400)
    print(res.stderr[-2000:])
    return res


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Small tmpfs file systems (a disk to fill or make read-only), unmounted at the end."""
    mounted: list[Path] = []

    def mount(name: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        # above the 100 MB a sweep checks for at its start
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=110m", "tmpfs", str(where)],
                             capture_output=True, text=True)
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs (root only): {res.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path) -> None:
    """Fill a disk to its last byte (a real full disk: writes fail with ENOSPC)."""
    try:
        with open(disk / "filler", "wb") as f:
            while True:
                f.write(b"\0" * (1 << 20))
    except OSError:
        pass
    for size in (4096, 1):  # the last partial blocks
        try:
            with open(disk / f"filler_{size}", "wb") as f:
                while True:
                    f.write(b"\0" * size)
                    f.flush()
        except OSError:
            pass


def read_only(disk: Path) -> None:
    """Remount a tmpfs read-only (retried while a save holds a file open for writing)."""
    for _ in range(100):
        res = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True,
                             text=True)
        if res.returncode == 0:
            return
        time.sleep(0.05)
    pytest.fail(f"could not remount {disk} read-only: {res.stderr}")


# --- 1, 6: a killed driver, a report meanwhile, a damaged state, a resume ------------------

def test_killed_driver_report_damaged_state_and_resume(space, tmp_path) -> None:
    """kill -9 of the driver mid-trial: the report shows its running run as interrupted (the
    heartbeat stopped); a resume of a truncated experiment state is refused in one line (exit
    2) before it touches MLflow; once the state is back, the resume keeps every run (the
    unfinished one marked interrupted, the restarted trial's new run linked to it)."""
    from analysis.load import driver_gone, load_sweep

    sweep = sqlite_sweep(tmp_path, space, "killed", env={"STUDY_HEARTBEAT_S": "1"})
    sweep.wait_until("a trial finished while another one runs", lambda: (
        len(sweep.finished()) >= 1 and bool(sweep.running_with_points())))
    os.kill(sweep.proc.pid, signal.SIGKILL)
    sweep.finish()
    before = {r["run_id"]: r for r in sweep.children()}
    unfinished = {rid for rid, r in before.items() if not r["tags"].get("stop_reason")}
    assert unfinished and len(unfinished) < len(before)

    # 6: once the heartbeat is stale, the report counts the RUNNING run as interrupted
    from mlflow.tracking import MlflowClient
    parent = MlflowClient(sweep.uri).get_run(
        next(iter(before.values()))["tags"]["mlflow.parentRunId"])
    assert parent.info.status == "RUNNING" and parent.data.tags["study.heartbeat_s"] == "1"
    deadline = time.time() + 30
    while not driver_gone(MlflowClient(sweep.uri).get_run(parent.info.run_id)):
        assert time.time() < deadline, "the killed driver's heartbeat did not go stale"
        time.sleep(0.5)
    loaded = load_sweep(sweep.uri, experiment="killed")
    assert loaded.skipped.get("running", 0) == 0
    assert loaded.skipped.get("interrupted", 0) == len(unfinished)
    shown = loaded.runs.set_index("run_id")["stop_reason"]
    assert all(shown[rid] == "interrupted" for rid in unfinished)

    # 1: every copy of the experiment state truncated (the one Ray saved last, and the last
    # one the sweep checked whole, set aside): refused before MLflow is touched, the way out
    states = [*sweep.exp_dir.glob("experiment_state-*.json"),
              *sweep.exp_dir.glob(".saved-experiment_state-*.json")]
    good = {f: f.read_bytes() for f in states}
    for f, data in good.items():
        f.write_bytes(data[: len(data) // 2])
    res = resume(sweep)
    assert res.returncode == 2, res.stderr[-3000:]
    line = one_error_line(res.stderr)
    assert "cannot resume killed" in line and "experiment_state-" in line
    assert "JSONDecodeError" in line and "--name" in line and "stay in MLflow" in line
    assert {r["run_id"]: r for r in sweep.children()} == before  # nothing changed
    (sweep.exp_dir / "tuner.pkl").rename(sweep.exp_dir / "tuner.bak")
    for f, data in good.items():
        f.write_bytes(data)
    res = resume(sweep)
    assert res.returncode == 2 and "tuner.pkl is missing" in one_error_line(res.stderr)
    assert {r["run_id"]: r for r in sweep.children()} == before

    # the state back and the store moved, its new address given: the resume finishes the
    # sweep there, where the trials (whose callback Ray restores as pickled) write too, and
    # keeps every run
    (sweep.exp_dir / "tuner.bak").rename(sweep.exp_dir / "tuner.pkl")
    old_db, moved = sweep.db, tmp_path / "moved" / "mlflow.db"
    moved.parent.mkdir()
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{old_db}{suffix}").exists():
            Path(f"{old_db}{suffix}").rename(f"{moved}{suffix}")
    sweep.db, sweep.uri = moved, f"sqlite:///{moved}"
    res = run_cli("resume", sweep.name, "--storage", str(sweep.storage), "--tracking-uri",
                  sweep.uri, timeout=400)
    print(res.stderr[-2000:])
    assert res.returncode == 0, res.stderr[-3000:]
    assert not old_db.exists()  # nothing written at the store's old place
    after = {r["run_id"]: r for r in sweep.children()}
    assert set(before) <= set(after)
    for rid, r in before.items():
        if rid in unfinished:  # marked interrupted, KILLED, its points kept
            assert after[rid]["status"] == "KILLED", after[rid]
            assert after[rid]["tags"]["stop_reason"] == "interrupted"
            assert after[rid]["points"] == r["points"]
            retried = [a for a in after.values() if a["tags"].get("retry_of") == rid]
            assert len(retried) == 1 and retried[0]["tags"]["retries"] == "1"
            assert retried[0]["tags"]["stop_reason"] == "completed"
            # the same trial restarted, or, if it started after the last save, a new trial
            # of the same configuration (the resumed searcher suggests it again)
            assert retried[0]["config"] == r["config"]
        elif r["status"] == "RUNNING":  # the kill came while it was being closed: now closed
            assert after[rid]["status"] != "RUNNING"
            assert after[rid]["tags"]["stop_reason"] == r["tags"]["stop_reason"]
        else:  # finished runs are never changed, but for one mark: a run that finished
            # after the last state Ray saved (the kill fell between its close and the save) is
            # tagged an orphan, kept, and its trial runs again in a new run that counts
            tags = dict(after[rid]["tags"])
            if tags.pop("study.orphan", None) is not None:
                # (the same trial id, or, where the state never knew the trial, a new trial
                # of the same configuration)
                again = [a for a in after.values() if a["run_id"] != rid
                         and (a["tags"].get("ray_trial_id") == r["tags"]["ray_trial_id"]
                              or a["config"] == r["config"])
                         and a["status"] == "FINISHED" and "study.orphan" not in a["tags"]]
                assert len(again) == 1, (rid, again)
            assert {**after[rid], "tags": tags} == r
    assert audit(sweep) == ZERO
    assert load_sweep(sweep.uri, experiment="killed").used == TRIALS


def test_trials_finished_after_the_last_save_are_replayed_not_trained_again(space,
                                                                          tmp_path) -> None:
    """A driver killed after trials finished that Ray's saved state does not have as finished
    (here no save at trial ends, `STUDY_STATE_MB_PER_EPOCH=0`, and Ray's periodic one far
    apart): the resume replays them from their MLflow runs (`study.sweep.journal`), so no
    finished trial trains again; their runs stay as they were but for a `study.replayed_as`
    mark where the state never knew the trial, every trial counts once, no point is lost or
    doubled, and the sweep ends with its trials."""
    from analysis.load import load_sweep

    # 5 trials, 2 at a time: Ray's one save (when the first two start) knows those two as
    # running, not the later ones
    trials = TRIALS + 2
    five = tmp_path / "five.yaml"
    five.write_text(space.read_text().replace(f"num_trials: {TRIALS}", f"num_trials: {trials}"))
    env = {"STUDY_STATE_MB_PER_EPOCH": "0", "TUNE_GLOBAL_CHECKPOINT_S": "100000"}
    sweep = sqlite_sweep(tmp_path, five, "replayed", env=env)
    sweep.wait_until("three trials finished while another one runs", lambda: (
        len(sweep.finished()) >= 3 and bool(sweep.running_with_points())))
    os.kill(sweep.proc.pid, signal.SIGKILL)
    sweep.finish()
    before = {r["run_id"]: r for r in sweep.children()}
    done = {rid for rid, r in before.items() if r["status"] != "RUNNING"}
    known = {t for t, status in ray_trials(sweep.exp_dir).items()
             if status in ("TERMINATED", "ERROR")}
    saved = ray_trials(sweep.exp_dir)
    ids = {before[rid]["tags"]["ray_trial_id"] for rid in done}
    assert not known & ids  # none saved as finished
    assert ids & set(saved) and ids - set(saved)  # some known to the state, some not
    res = run_cli("resume", sweep.name, "--storage", str(sweep.storage), timeout=400)
    print(res.stderr[-2000:])
    assert res.returncode == 0, res.stderr[-3000:]
    after = {r["run_id"]: r for r in sweep.children()}
    assert set(before) <= set(after)
    for rid in done:  # kept as they were, but for the mark of the trial that replayed them
        tags = dict(after[rid]["tags"])
        tags.pop("study.replayed_as", None)
        assert {**after[rid], "tags": tags} == before[rid]
        assert "study.orphan" not in tags
    new = [r for rid, r in after.items() if rid not in before]
    # trained again: only the trials that had not finished, each in one new run
    assert len(new) == len(before) - len(done) + (trials - len(before))
    finished_configs = [json.dumps(before[rid]["config"], sort_keys=True) for rid in done]
    assert not [r for r in new if json.dumps(r["config"], sort_keys=True) in finished_configs]
    ray = ray_trials(sweep.exp_dir)
    assert sorted(ray.values()) == ["TERMINATED"] * trials
    assert sum("study.replayed_as" in after[rid]["tags"] for rid in done) == len(ids - set(saved))
    stands_for = {after[rid]["tags"].get("study.replayed_as") or after[rid]["tags"]["ray_trial_id"]
                  for rid in done}
    assert stands_for <= set(ray)  # each finished run is a trial of the resumed sweep
    assert audit(sweep) == ZERO
    assert load_sweep(sweep.uri, experiment="replayed").used == trials


# --- 3, 7: a killed worker is retried in a new, linked run; where each attempt ran ---------

def test_killed_worker_retry_is_recorded_once(space, tmp_path) -> None:
    sweep = sqlite_sweep(tmp_path, space, "worker")
    killed: dict[str, Any] = {}

    def kill_a_worker() -> bool:
        # a trial with epochs to go: its worker is still its own (Ray reuses a worker for the
        # next trial once one ends)
        for r in sweep.running_with_points():
            if r["last_epoch"] > EPOCHS - 2:
                continue
            pid = int(r["tags"]["worker_pid"])
            # only a process of this sweep's session (Ray's worker, started by its driver)
            assert os.getsid(pid) == sweep.proc.pid, "the trial's worker is not ours"
            assert "ray::" in Path(f"/proc/{pid}/cmdline").read_text()
            os.kill(pid, signal.SIGKILL)
            killed.update(r)
            return True
        return False

    sweep.wait_until("a trial reported an epoch", kill_a_worker)
    rc = sweep.finish()
    assert rc == 0, sweep.output()[-3000:]
    runs = {r["run_id"]: r for r in sweep.children()}
    old = runs[killed["run_id"]]
    assert old["status"] == "KILLED" and old["tags"]["stop_reason"] == "interrupted"
    assert "attempt 1 failed" in old["tags"]["stop_message"]
    assert "died" in old["tags"]["stop_message"]  # Ray's reason: the actor died
    (new,) = [r for r in runs.values() if r["tags"].get("retry_of") == old["run_id"]]
    assert new["tags"]["ray_trial_id"] == old["tags"]["ray_trial_id"]
    assert new["tags"]["retries"] == "1" and new["tags"]["stop_reason"] == "completed"
    assert new["tags"]["worker_pid"] != old["tags"]["worker_pid"]
    assert sorted(r["tags"]["retries"] for r in runs.values()) == ["0"] * TRIALS + ["1"]
    # 7: every attempt's run says where it ran
    for r in runs.values():
        assert len(r["tags"]["node_id"]) == 56, r["tags"]  # Ray's hex node id
        assert r["tags"]["hostname"] == socket.gethostname()
        assert r["tags"]["device"] == "CPU" and int(r["tags"]["worker_pid"]) > 0
    assert audit(sweep) == ZERO


# --- 2: the storage fills up or turns read-only mid-sweep ----------------------------------

@pytest.mark.parametrize("fault", ["read_only", "full"])
def test_storage_fault_ends_the_sweep_non_zero(space, tmp_path, tmpfs, fault) -> None:
    disk = tmpfs("storage")
    sweep = sqlite_sweep(tmp_path, space, f"storage_{fault}", storage=disk)
    sweep.wait_until("a trial finished", lambda: len(sweep.finished()) >= 1)
    finished = sweep.finished()
    (read_only if fault == "read_only" else fill)(disk)
    rc = sweep.finish()
    line = one_error_line(sweep.output())
    assert rc == 1, sweep.output()[-3000:]
    assert line.startswith(f"error: the sweep's state could not be saved in {sweep.exp_dir}")
    assert ("Read-only file system" if fault == "read_only" else "No space left") in line
    after = {r["run_id"]: r for r in sweep.children()}
    assert all(after[rid] == r for rid, r in finished.items())  # finished runs untouched
    assert all(r["tags"].get("stop_reason") for r in after.values())  # none left RUNNING
    if fault == "read_only":
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    else:
        for f in disk.glob("filler*"):
            f.unlink()
    # the failed save may have truncated Ray's newest state file (a full disk), never the
    # copy the sweep checked whole and set aside: the resume starts from the newest whole one
    assert f"continue with `study resume storage_{fault}`" in line
    res = resume(sweep)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3/3 trials recorded" in res.stderr
    if fault == "full":
        print("damaged and set aside:", sorted(p.name for p in sweep.exp_dir.glob(".dam*")))
    assert all(r["run_id"] in {x["run_id"] for x in sweep.children()} for r in after.values())
    assert audit(sweep) == ZERO


# --- 4: the MLflow store refuses writes (its disk is full) ---------------------------------

def test_store_refusing_writes_stops_cleanly_and_resumes(space, tmp_path, tmpfs) -> None:
    disk = tmpfs("store")
    sweep = sqlite_sweep(tmp_path, space, "store_full", db_dir=disk)
    sweep.wait_until("a trial finished", lambda: len(sweep.finished()) >= 1)
    fill(disk)
    rc = sweep.finish()
    line = one_error_line(sweep.output())
    assert rc == 1, sweep.output()[-3000:]
    assert f"the MLflow store {sweep.uri} refused a write" in line
    assert "study resume store_full" in line and str(sweep.exp_dir / "mlflow_spool.jsonl") in line
    assert (sweep.exp_dir / "mlflow_spool.jsonl").is_file()
    assert len(sweep.output().splitlines()) < 12  # progress lines and the error, no traceback
    for f in disk.glob("filler*"):
        f.unlink()
    res = resume(sweep)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (sweep.exp_dir / "mlflow_spool.jsonl").exists()  # every kept write delivered
    assert audit(sweep) == ZERO


# --- 5: the tracking server goes away and comes back -----------------------------------------

def _server(tmp: Path, port: int) -> subprocess.Popen | None:
    """`mlflow server` on a SQLite backend (proxied artifacts) on `port`, or None if it did
    not come up there."""
    log = (tmp / "server.log").open("a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if wait_healthy(f"http://127.0.0.1:{port}", proc):
        return proc
    stop_group(proc)
    return None


def test_server_outage_buffers_and_delivers_every_point_once(space, tmp_path) -> None:
    box: dict[str, Any] = {}

    def start(port: int) -> subprocess.Popen | None:
        box["port"] = port
        return _server(tmp_path, port)

    server = on_free_port(start)
    port = box["port"]
    uri = f"http://127.0.0.1:{port}"
    sweep = Sweep(tmp_path, space, "outage", uri, tmp_path / "server.db", tmp_path / "ray",
                  env={"STUDY_STORE_OUTAGE_S": "300"})
    try:
        sweep.wait_until("a trial reported an epoch", lambda: bool(sweep.running_with_points()))
        stop_group(server)
        spool = sweep.exp_dir / "mlflow_spool.jsonl"
        sweep.wait_until("writes were kept on disk",
                         lambda: spool.is_file() and len(spool.read_text().splitlines()) >= 2)
        kept = len(spool.read_text().splitlines())
        restarted = _server(tmp_path, port)
        assert restarted is not None, "the server did not come back on its port"
        server = restarted
        rc = sweep.finish()
        assert rc == 0, sweep.output()[-3000:]
        assert not spool.exists()  # delivered
        assert "3/3 trials recorded" in sweep.output()
        print(f"{kept} spool records while the server was away")
        assert audit(sweep) == ZERO
    finally:
        stop_group(sweep.proc)
        stop_group(server)


# --- the spool alone: a driver killed mid-write, its writes delivered once -------------------

def test_spool_left_by_a_dead_driver_is_delivered_once(tmp_path, monkeypatch) -> None:
    """Writes kept while the store was away (a closed port), the spool's last line cut short
    (the driver killed while writing it), delivered by a new process's tracker: once, however
    often the spool is replayed."""
    from mlflow.tracking import MlflowClient

    from study import tracking
    from study.records import SweepSpec

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    live = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = SweepSpec(name="spool", path="", text="name: spool\n", fixed={}, params=())
    parent = tracking.Tracker(live).start_parent("spool", "sweep_spool", spec, {})
    spool = tmp_path / "spool.jsonl"
    with socket.socket() as s:  # a port nobody listens on: the store is away
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    away = tracking.Tracker(dead, spool=spool)
    ref = away.start_child(parent, "t1", {"n_heads": 2}, 1)
    for epoch in (1, 2, 3):
        away.log_metrics(ref, {"val_acc": 0.1 * epoch, "seed_0/val_acc": 0.1 * epoch}, epoch)
    from study.records import Outcome
    away.finish_child(ref, Outcome.COMPLETED, "completed 3 epochs")
    assert away.outbox.pending and away.fault is None  # waiting, not refused
    lines = spool.read_text().splitlines()
    assert len(lines) == 5
    spool.write_text("\n".join(lines) + '\n{"op": "metrics", "ref": "' + ref[:5])  # cut short
    copy = spool.read_text()
    tracking._OUTBOXES.clear()  # a new driver process

    for _ in range(2):  # the second replay: as if the first one's driver died at its end
        spool.write_text(copy)
        tracking._OUTBOXES.clear()
        tracking.Tracker(live, spool=spool).flush()
        assert not spool.exists()
    client = MlflowClient(live)
    (run,) = client.search_runs([client.get_run(parent).info.experiment_id],
                                "tags.ray_trial_id = 't1'")
    assert run.data.tags["stop_reason"] == "completed" and run.info.status == "FINISHED"
    for key in ("val_acc", "seed_0/val_acc"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [1, 2, 3], (key, steps)
    tracking._OUTBOXES.clear()


# --- a resume's bookkeeping, unit by unit: every run kept, each trial counted once ----------

def test_resume_keeps_every_run_replays_finished_trials_and_links_restarts(tmp_path) -> None:
    """`TrackingCallback._sync` on a resume whose saved state is older than MLflow: a run
    closed halfway is closed; a finished run whose trial Ray knows as not finished (it ended
    after the last saved state) is replayed by that trial, its recorded reports in the trial's
    config; one whose trial Ray does not know is offered to the searcher, and the trial it hands
    the configuration to replays it (tagged `study.replayed_as`); replays log nothing and close
    nothing; unfinished runs are marked interrupted, and the new runs of the restarted trials
    (the same trial id, or the same configuration) link to them. Every trial counts once."""
    from analysis.load import load_sweep
    from study import tracking
    from study.records import REPLAY_KEY, Outcome, SweepSpec, TrialReport, replayed
    from study.sweep import journal
    from study.sweep.callbacks import TrackingCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = SweepSpec(name="sync", path="", text="name: sync\n", fixed={}, params=(), seeds=1)
    tr = tracking.Tracker(uri)
    parent = tr.start_parent("sync", "sweep_sync", spec, {"objective": '[["val_acc", "max"]]'})
    cfg = {h: {"n_heads": h, "epochs": 2} for h in (1, 2, 4, 8, 16)}
    runs = {}
    for tid, h in (("done", 1), ("half", 2), ("unknown", 4), ("lost", 8), ("restart", 2),
                   ("stale", 16)):
        runs[tid] = tr.start_child(parent, tid, cfg[h], 1)
        for epoch in (1, 2):
            tr.log_metrics(runs[tid], {"val_acc": 0.1 * epoch + h / 100,
                                       "seed_0/val_acc": 0.1 * epoch}, epoch)
    tr.finish_child(runs["done"], Outcome.COMPLETED, "completed 2 epochs")
    tr.finish_child(runs["unknown"], Outcome.COMPLETED, "completed 2 epochs")
    tr.finish_child(runs["stale"], Outcome.EARLY_STOPPED, "stopped by ASHA at epoch 2")
    tr._set_tags(runs["half"], {"stop_reason": "completed", "stop_message": "completed 2 "
                                "epochs"})  # a driver killed while closing it
    last = TrialReport(2, {"val_acc": 0.2}, Outcome.COMPLETED, "completed 2 epochs").to_ray()
    trials = [FakeTrial("done", cfg[1], "TERMINATED", last),
              FakeTrial("half", cfg[2], "TERMINATED", last),
              FakeTrial("restart", cfg[2], "PENDING"),
              FakeTrial("stale", cfg[16], "PENDING")]  # "unknown", "lost": unknown to Ray
    before = {tid: tr.client.get_run(rid) for tid, rid in runs.items()}
    cb = TrackingCallback(tr, parent, spec)
    cb.on_step_begin(0, trials)
    client = tr.client
    get = {tid: client.get_run(rid) for tid, rid in runs.items()}
    assert all(r.info.lifecycle_stage == "active" for r in get.values())
    assert get["half"].info.status == "FINISHED" and get["done"].info.status == "FINISHED"
    for tid in ("unknown", "stale"):  # finished runs: unchanged
        assert get[tid].data.tags == before[tid].data.tags
        assert get[tid].info.status == before[tid].info.status
    for tid in ("lost", "restart"):
        assert get[tid].info.status == "KILLED"
        assert get[tid].data.tags["stop_reason"] == "interrupted"
    assert "does not know the trial" in get["lost"].data.tags["stop_message"]
    # "stale" replays its run: each epoch's objective, and no outcome (ASHA stopped it)
    assert replayed(trials[3].config) == [{"val_acc": 0.1 + 16 / 100, "epoch": 1.0},
                                          {"val_acc": 0.2 + 16 / 100, "epoch": 2.0}]
    assert trials[3].config[REPLAY_KEY]["run"] == runs["stale"]
    assert cb.runs == {"done": runs["done"], "half": runs["half"], "stale": runs["stale"]}
    # "unknown" is offered to the searcher, with its outcome on its last report
    (offer,) = journal.pending()
    assert offer.run_id == runs["unknown"] and offer.config["n_heads"] == 4
    assert offer.reports[-1] == {"val_acc": 0.2 + 4 / 100, "epoch": 2.0,
                                 "stop_reason": "completed", "stop_message": "completed 2 epochs"}
    replay = journal.with_replay(cfg[4], offer.run_id, offer.reports)
    journal.offer([])
    # Ray restarts "restart" and replays "stale"; the resumed searcher suggests "lost"'s
    # configuration as "again", and hands "unknown"'s run to "replay"
    for trial in (FakeTrial("restart", cfg[2], "RUNNING"), trials[3],
                  FakeTrial("again", cfg[8], "RUNNING"), FakeTrial("replay", replay, "RUNNING")):
        trial.status = "RUNNING"
        cb.on_trial_start(0, trials, trial)
        for result in replayed(trial.config) or [TrialReport(
                epoch, {"val_acc": 0.3, "seed_0/val_acc": 0.3}).to_ray() for epoch in (1, 2)]:
            cb.on_trial_result(0, trials, trial, result)
        if replayed(trial.config) is None:
            new = client.get_run(cb.runs[trial.trial_id]).data.tags
            assert new["retries"] == "1"
            assert new["retry_of"] == runs["lost" if trial.trial_id == "again"
                                           else trial.trial_id]
        trial.last_result = last
        cb.on_trial_complete(0, trials, trial)
    assert cb.runs["replay"] == runs["unknown"] and cb.runs["stale"] == runs["stale"]
    for tid in ("unknown", "stale"):  # nothing logged again, nothing closed again
        now = client.get_run(runs[tid])
        assert now.info.status == before[tid].info.status
        assert now.data.metrics == before[tid].data.metrics
        assert len(client.get_metric_history(runs[tid], "val_acc")) == 2
        tags = dict(now.data.tags)
        assert tags.pop("study.replayed_as", None) == ("replay" if tid == "unknown" else None)
        assert tags == before[tid].data.tags
    loaded = load_sweep(uri, experiment="sync")
    assert loaded.used == 5 and loaded.skipped.get("early_stopped") == 1  # "stale"
    assert not loaded.skipped.get("orphaned") and not loaded.skipped.get("interrupted")
    assert sorted(loaded.trial_table["trial_id"]) == ["again", "done", "half", "restart",
                                                      "stale", "unknown"]
    assert len(loaded.runs) == 8  # every run kept: the 6 first ones, 2 restarts

    # a later resume, from a state that knows "replay" as finished: its run is that trial's
    trials += [FakeTrial("replay", replay, "TERMINATED", last),
               FakeTrial("again", cfg[8], "TERMINATED", last)]
    trials[2].status = trials[3].status = "TERMINATED"
    cb = TrackingCallback(tr, parent, spec)
    cb.on_step_begin(0, trials)
    assert cb.runs["replay"] == runs["unknown"] and not journal.pending()
    assert not cb.replaying

    # a state saved while a trial replayed a run whose mark never reached the store: the
    # trial replays it again, and the run is not offered to a second one
    tr.finish_child(extra := tr.start_child(parent, "gone", cfg[8], 1), Outcome.COMPLETED, "ok")
    trials.append(FakeTrial("saved", journal.with_replay(cfg[8], tr.run_id(extra), []),
                            "PENDING"))
    cb = TrackingCallback(tr, parent, spec)
    cb.on_step_begin(0, trials)
    assert not journal.pending() and cb.replaying == {"saved"}
    assert cb.runs["saved"] == tr.run_id(extra)
    assert tr.client.get_run(cb.runs["saved"]).data.tags["study.replayed_as"] == "saved"
    tracking._OUTBOXES.clear()


def test_forced_state_saves_stay_within_their_budget_per_epoch(monkeypatch, tmp_path) -> None:
    """The save at a trial's end is made only while the forced saves have written under
    `STUDY_STATE_MB_PER_EPOCH` per epoch result (two copies of the state each: Ray's staging
    and the storage); one over it waits, pending, for more epochs; 0 turns them off."""
    from study.sweep import lifecycle

    class Controller:  # what the scheduler reads of Ray's controller
        experiment_state_path = str(tmp_path / "staging" / "experiment_state-x.json")
        experiment_path = str(tmp_path / "storage")
        saves = 0

        def checkpoint(self, force: bool, wait: bool) -> None:
            self.saves += 1
            for d in (tmp_path / "staging", tmp_path / "storage"):
                d.mkdir(exist_ok=True)
                (d / "experiment_state-x.json").write_bytes(b"{}" * 500)  # 1000 bytes

    class Policy:
        def on_trial_result(self, *a: object) -> str:
            return "CONTINUE"

        def on_trial_complete(self, *a: object) -> None:
            pass

    monkeypatch.setenv("STUDY_STATE_MB_PER_EPOCH", "0.001")  # 1000 bytes an epoch result
    saver = lifecycle._ray_class("SaveOnTrialEnd")(Policy())
    ctl = Controller()

    def trial_ends(epochs: int) -> None:
        for _ in range(epochs):
            saver.on_trial_result(ctl, None, {"epoch": 1})
        saver.on_trial_complete(ctl, None, {})
        saver.save_if_pending()

    trial_ends(1)  # nothing written yet: saved (2000 bytes: staged and copied)
    assert ctl.saves == 1 and saver.written == 2000 and not saver.pending
    trial_ends(1)  # 2000 + 2000 > 2 epochs x 1000: waits
    assert ctl.saves == 1 and saver.pending
    trial_ends(2)  # 4 epochs: 4000 bytes may be written
    assert ctl.saves == 2 and saver.written == 4000
    monkeypatch.setenv("STUDY_STATE_MB_PER_EPOCH", "0")
    trial_ends(100)
    assert ctl.saves == 2 and saver.pending


def test_a_replay_runs_to_its_runs_end_whatever_asha_decides() -> None:
    """ASHA restarts empty on a resume, so it may stop a replay of a run that completed (the
    searcher would then be told PRUNED, not the run's value): the sweep's scheduler passes it
    the replay's results, so its rungs learn them, and lets the replay go on."""
    from study.records import Outcome, TrialReport
    from study.sweep import journal, lifecycle
    from study.sweep.searcher import StudySearch
    from tests.test_searchers import spec_of

    spec = spec_of("tpe", trials=12)
    sched = lifecycle._ray_class("SaveOnTrialEnd")(lifecycle._scheduler(spec))
    search = StudySearch(spec)
    fresh = FakeTrial("fresh", search.suggest("fresh"), "RUNNING")
    reports = [TrialReport(1, {"val_acc": 0.3}).to_ray(),
               TrialReport(2, {"val_acc": 0.95}, Outcome.COMPLETED, "done").to_ray()]
    replay = FakeTrial("rep", journal.with_replay(search.suggest("rep"), "run1", reports),
                       "RUNNING")
    plain = FakeTrial("plain", search.suggest("plain"), "RUNNING")
    for t in (fresh, replay, plain):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, fresh, {"val_acc": 0.9, "epoch": 1.0,
                                               "training_iteration": 1}) == "CONTINUE"
    # the same first epoch: ASHA stops the plain trial, not the replay
    assert sched.on_trial_result(None, plain, {**reports[0], "training_iteration": 1}) == "STOP"
    decisions = [sched.on_trial_result(None, replay, {**r, "training_iteration": i})
                 for i, r in enumerate(reports, 1)]
    assert decisions == ["CONTINUE", "CONTINUE"]
    # its rungs hold the replay's value as they hold the others'
    assert any(recorded.get("rep") == 0.3 for bracket in sched.policy._brackets
               for _, recorded in bracket._rungs)


def test_a_finished_trial_whose_rerun_was_not_closed_counts_its_rerun(tmp_path) -> None:
    """A trial with an orphaned finished run (an earlier resume left it) and a newer run its
    driver never closed, which Ray has as finished: the newer run is closed with Ray's record
    and counted (the orphan stood for it: the newer run was marked interrupted and the trial
    never counted)."""
    from analysis.load import load_sweep
    from study import tracking
    from study.records import (
        TAG_ORPHAN,
        TAG_RETRIES,
        TAG_RETRY_OF,
        Outcome,
        SweepSpec,
        TrialReport,
    )
    from study.sweep.callbacks import TrackingCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = SweepSpec(name="rerun", path="", text="name: rerun\n", fixed={}, params=(), seeds=1)
    tr = tracking.Tracker(uri)
    parent = tr.start_parent("rerun", "sweep_rerun", spec, {"objective": '[["val_acc", "max"]]'})
    cfg = {"n_heads": 2, "epochs": 2}
    old = tr.start_child(parent, "t", cfg, 1)
    tr.finish_child(old, Outcome.COMPLETED, "completed 2 epochs")
    tr.set_tags(old, {TAG_ORPHAN: "ended after the saved state"})
    new = tr.start_child(parent, "t", cfg, 1, {TAG_RETRY_OF: old, TAG_RETRIES: "1"})
    for epoch in (1, 2):
        tr.log_metrics(new, {"val_acc": 0.1 * epoch, "seed_0/val_acc": 0.1 * epoch}, epoch)
    last = TrialReport(2, {"val_acc": 0.2}, Outcome.COMPLETED, "completed 2 epochs").to_ray()
    cb = TrackingCallback(tr, parent, spec)
    cb.on_step_begin(0, [FakeTrial("t", cfg, "TERMINATED", last)])
    assert cb.runs == {"t": new}
    run = tr.client.get_run(new)
    assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == "completed"
    loaded = load_sweep(uri, experiment="rerun")
    assert loaded.used == 1 and len(loaded.runs) == 2  # counted once, both runs kept
    tracking._OUTBOXES.clear()


@pytest.mark.parametrize("rerun", [pytest.param(None, id="rerun-running"),
                                   pytest.param("interrupted", id="rerun-interrupted"),
                                   pytest.param("completed", id="rerun-completed")])
def test_a_trial_ran_again_counts_its_new_run_not_its_orphan(rerun) -> None:
    """A trial that finished after the saved state a resume ran from keeps its run as an orphan
    and runs again under the same trial id: the new run is the trial's, whatever its state
    (so a sweep stopped again closes it, and a report counts it as running or interrupted)."""
    from study.records import Outcome, TrialRecord, current_runs

    def rec(run_id: str, outcome: str | None, start: int, orphan: bool = False,
            retry_of: str | None = None) -> TrialRecord:
        return TrialRecord(run_id, "t1", "RUNNING" if outcome is None else "FINISHED",
                           None if outcome is None else Outcome(outcome), "", {}, {}, {},
                           start_time=start, orphan=orphan, retry_of=retry_of)

    orphan = rec("old", "early_stopped", 1, orphan=True)
    new = rec("new", rerun, 2, retry_of="old")
    assert current_runs([orphan, new])["t1"] is new
    assert current_runs([new, orphan])["t1"] is new
    assert current_runs([orphan])["t1"] is orphan  # alone, it is still the trial's record


def test_a_spool_begun_after_delivered_creates_still_finds_their_runs(tmp_path) -> None:
    """A run created while the store was up, whose later write waits in a new spool (the old
    one was removed when the queue emptied): the new spool names the run, so a new driver
    delivers the write to it (not to the attempt id, which the store does not know); and a
    write whose delivery failed inside `pump` is checked before it is sent again."""
    from mlflow.tracking import MlflowClient

    from study import tracking
    from study.records import SweepSpec

    live = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = SweepSpec(name="spool2", path="", text="name: spool2\n", fixed={}, params=())
    tracking._OUTBOXES.clear()
    tr = tracking.Tracker(live, spool=tmp_path / "spool.jsonl")
    parent = tr.start_parent("spool2", "sweep_spool2", spec, {})
    box, ref = tr.outbox, "attempt-1"
    # the create waited (the store was away at the trial's start), so the callback holds the
    # attempt id as the run's ref; then the store came back and took it and a first point
    box._keep({"op": "create", "ref": ref, "parent": parent, "trial": "t1", "params": {},
               "tags": {tracking.TAG_ATTEMPT: ref}, "id": "c1"})
    box._keep({"op": "metrics", "ref": ref, "step": 1, "ts": 0, "metrics": {"val_acc": 0.1},
               "tags": {}, "id": "w1"})
    assert box.pump()
    run_id = box.ids[ref]
    assert not (tmp_path / "spool.jsonl").exists()  # nothing waits
    # the store turns away the next write: it waits, in a new spool
    box._keep({"op": "metrics", "ref": ref, "step": 2, "ts": 1, "metrics": {"val_acc": 0.2},
               "tags": {}, "id": "w2"})
    first = (tmp_path / "spool.jsonl").read_text().splitlines()[0]
    assert run_id in first
    tracking._OUTBOXES.clear()  # the driver died; a new one delivers the spool
    tracking.Tracker(live, spool=tmp_path / "spool.jsonl").flush()
    steps = [m.step for m in MlflowClient(live).get_metric_history(run_id, "val_acc")]
    assert sorted(steps) == [1, 2]

    box = tracking.Tracker(live).outbox
    box.ids[ref] = run_id
    op = {"op": "metrics", "ref": ref, "step": 3, "ts": 2, "metrics": {"val_acc": 0.3},
          "tags": {}, "id": "w3"}
    box.pending.append(op)
    real = box.tracker._log_points
    box.tracker._log_points = lambda *a, **k: (_ for _ in ()).throw(OSError("reply lost"))
    assert not box.pump()
    assert op.get("resent") is True  # its re-send checks the store first
    box.tracker._log_points = real
    box.next_try = 0.0
    assert box.pump()
    steps = [m.step for m in MlflowClient(live).get_metric_history(run_id, "val_acc")]
    assert sorted(steps) == [1, 2, 3]
    tracking._OUTBOXES.clear()


def test_a_run_created_without_its_params_still_says_its_config(tmp_path) -> None:
    """A driver killed between creating a trial's run and logging its params (seen once in the
    killed-driver test): the run carries its config from its first write (tag `study.config`),
    so the analysis reads it and a resumed sweep links the trial's next attempt by it."""
    from mlflow.tracking import MlflowClient

    from study import tracking
    from study.config import make_config
    from study.records import TAG_CONFIG, SweepSpec, mlflow_params
    from study.sweep.journal import config_key

    live = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = SweepSpec(name="noparams", path="", text="name: noparams\n", fixed={}, params=())
    tracking._OUTBOXES.clear()
    tr = tracking.Tracker(live)
    parent = tr.start_parent("noparams", "sweep_noparams", spec, {})
    config = make_config({"task": "digits", "attn_temperature": 1.0700120234, "n_heads": 2,
                          "d_model": 16}).to_dict()

    def killed(*args, **kwargs):  # the driver dies before the params reach the store
        raise KeyboardInterrupt

    tr._log_params = killed
    with pytest.raises(KeyboardInterrupt):
        tr.start_child(parent, "t1", config, seeds=2)
        tr.flush()
    tracking._OUTBOXES.clear()
    (run,) = tracking.Tracker(live).child_runs(parent)
    assert MlflowClient(live).get_run(run.run_id).data.params == {}  # no param arrived
    assert TAG_CONFIG in MlflowClient(live).get_run(run.run_id).data.tags
    assert run.config["attn_temperature"] == config["attn_temperature"]
    assert run.config["n_heads"] == 2 and run.config["task"] == "digits"
    assert config_key(run.config) == config_key(config)  # what links the next attempt
    # the tag holds exactly the params the run would have had
    assert json.loads(MlflowClient(live).get_run(run.run_id).data.tags[TAG_CONFIG]) == \
        mlflow_params(config)
