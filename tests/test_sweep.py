"""End to end on CPU with real Ray, real Optuna and real MLflow (SQLite in a temp dir)."""

import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from study.config import FIELD_NAMES
from study.metrics import CORE_METRICS, SEED_INVARIANT_METRICS
from study.records import REPORT_COMPUTE_S, TAG_ORPHAN
from tests.helpers import render_images, stop_group

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
pytestmark = pytest.mark.slow


def runs_of(db: Path, name: str) -> tuple:
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("study.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def sweep_args(tmp_path: Path, space: Path, name: str, *extra: str) -> list[str]:
    return ["sweep", str(space), "--name", name, "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage", str(tmp_path / "ray"), *extra]


def test_smoke_sweep_end_to_end(cli, tmp_path: Path) -> None:
    res = cli(*sweep_args(tmp_path, SMOKE, "smoke_e2e"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "study ui" in res.stderr and "4/4 trials" in res.stderr
    # where the space's relative paths were found, for a resume run from elsewhere
    meta = json.loads((tmp_path / "ray" / "smoke_e2e" / "study.json").read_text())
    assert meta["cwd"] == str(ROOT)
    # the progress a user reads (tests/test_secrets.py checks it on its sweep in more detail):
    # what starts, before any trial finished; an ETA; nothing running at the end
    lines = res.stderr.splitlines()
    progress = [ln for ln in lines if re.match(r"\[\d/4\] elapsed ", ln)]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("sweep smoke_e2e: 4 trials"))
    assert len(progress) == 4 and start < lines.index(progress[0]), res.stderr[-3000:]
    assert "ETA ~" in progress[0] and "running 0," in progress[-1], res.stderr[-3000:]
    # the store the sweep created: 1 KiB pages, written in WAL, and at the end the log folded
    # into the file and the store back in the rollback journal (nothing left beside it)
    assert not (tmp_path / "mlflow.db-wal").exists()
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert db.execute("PRAGMA page_size").fetchone()[0] == 1024
    client, parents, children = runs_of(tmp_path / "mlflow.db", "smoke_e2e")
    assert len(parents) == 1 and len(children) == 4
    exp = client.get_experiment_by_name("smoke_e2e")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on runs
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    for tag in ("git_commit", "version.ray", "version.torch", "ray_cluster_resources"):
        assert tag in parent.data.tags
    arts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "space.yaml" in arts
    assert len({r.data.tags["ray_trial_id"] for r in children}) == 4
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert set(r.data.params) == set(FIELD_NAMES)  # exactly the design-choice fields
        assert r.data.params["task"] == "digits" and r.data.params["d_model"] == "32"
        assert int(r.data.params["d_model"]) % int(r.data.params["n_heads"]) == 0
        reason = r.data.tags["stop_reason"]
        assert reason in ("completed", "early_stopped")
        assert r.info.status == {"completed": "FINISHED", "early_stopped": "KILLED"}[reason]
        hist = client.get_metric_history(r.info.run_id, "val_acc")
        steps = sorted(m.step for m in hist)
        n_epochs = 3 if reason == "completed" else steps[-1]
        assert steps == list(range(1, n_epochs + 1))
        if reason == "early_stopped":
            assert n_epochs < 3 and f"epoch {n_epochs}" in r.data.tags["stop_message"]
        # per-seed values at every epoch, exactly one point per (metric, epoch)
        for k in (0, 1):
            for key in (f"seed_{k}/val_acc", f"seed_{k}/train_loss"):
                seed_steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
                assert sorted(seed_steps) == list(range(1, n_epochs + 1)), (key, seed_steps)
        # the outcome in the run's name and description
        tid = r.data.tags["ray_trial_id"]
        assert r.info.run_name == (f"trial_{tid}" if reason == "completed"
                                   else f"trial_{tid} ({reason})")
        assert r.data.tags["mlflow.note.content"] == f"{reason}: {r.data.tags['stop_message']}"
        for m in CORE_METRICS:
            assert m in r.data.metrics
            # no constant series: the spread across seeds of n_params, epoch, flops_per_sample
            assert (f"{m}_seed_std" in r.data.metrics) == (m not in SEED_INVARIANT_METRICS), m
            assert f"seed_0/{m}" in r.data.metrics and f"seed_1/{m}" in r.data.metrics
        assert "n_params_seed_std" not in r.data.metrics
        assert "epoch_seed_std" not in r.data.metrics
        assert r.data.metrics["flops_per_sample"] > r.data.metrics["n_params"]
        mean = (r.data.metrics["seed_0/val_acc"] + r.data.metrics["seed_1/val_acc"]) / 2
        assert r.data.metrics["val_acc"] == pytest.approx(mean)
        for bookkeeping in ("pid", "timestamp", "time_this_iter_s", "training_iteration",
                            REPORT_COMPUTE_S):
            assert bookkeeping not in r.data.metrics
    assert any(r.data.tags["stop_reason"] == "completed" for r in children)
    # a result's compute_s (tests/test_designs.py sees it arrive) stays out of Ray's saved
    # record of the trial, which keeps only what a resume reads
    state = sorted((tmp_path / "ray" / "smoke_e2e").glob("experiment_state-*.json"))[-1]
    for _, run_json in json.loads(state.read_text())["trial_data"]:
        assert "val_acc" in json.loads(run_json)["last_result"]
        assert REPORT_COMPUTE_S not in run_json

    # the report on this real sweep: every file exists and is non-empty, the page renders
    out = tmp_path / "report"
    rep = cli("report", "--experiment", "smoke_e2e", "--tracking-uri",
              f"sqlite:///{tmp_path / 'mlflow.db'}", "--out", str(out))
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert rep.stdout.strip().endswith(str(out / "index.html"))
    assert "Used " in rep.stderr and "skipped" in rep.stderr
    files = ["trials.csv", "effects.csv", "importance.csv", "measures.csv", "summary.md",
             "index.html"]
    for name in files:
        assert (out / name).stat().st_size > 0, name
    pngs = list((out / "figures").glob("*.png"))
    assert pngs and all(p.stat().st_size > 0 for p in pngs)
    import pandas as pd
    effects = pd.read_csv(out / "effects.csv")
    assert "qk_norm_gain" not in set(effects["param"])  # conditional: left out, said so
    loaded, total = render_images(out / "index.html", tmp_path)
    assert loaded == total == len(pngs)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/index.html" in arts


FAILING = """
name: failing
task: digits
fixed: {d_model: 16, d_ff: 32, n_layers: 1, n_heads: 2, batch_size: 256}
params:
  patch_size: [4, 128]   # 128 exceeds the 64-step digits signal: the model refuses to build
budget: {epochs: 2, grace_period: 2}
seeds: 1
searcher: random
searcher_seed: 0
num_trials: 5
max_concurrent: 2
"""


def test_failing_trial_is_recorded_and_sweep_continues(cli, tmp_path: Path) -> None:
    space = tmp_path / "failing.yaml"
    space.write_text(FAILING)
    res = cli(*sweep_args(tmp_path, space, "failing"))
    assert res.returncode == 0, res.stderr[-3000:]
    _, _, children = runs_of(tmp_path / "mlflow.db", "failing")
    assert len(children) == 5
    by_patch: dict = {}
    for r in children:
        by_patch.setdefault(r.data.params["patch_size"], []).append(r)
    assert set(by_patch) == {"4", "128"}, "the seeded sampler must draw both values"
    # a failed trial's progress line says why, in short
    assert re.search(r"^\[\d/5\] .* error: .*patch_size.* \| running \d, early-stopped 0, "
                     r"failed [1-5]", res.stderr, re.M), res.stderr[-3000:]
    for r in by_patch["128"]:
        assert r.info.status == "FAILED" and r.data.tags["stop_reason"] == "error"
        assert "patch_size" in r.data.tags["stop_message"]
        assert r.info.run_name == f"trial_{r.data.tags['ray_trial_id']} (error)"
        assert r.data.tags["mlflow.note.content"].startswith("error: ")
        assert "patch_size" in r.data.tags["mlflow.note.content"]
    for r in by_patch["4"]:
        assert r.info.status == "FINISHED" and r.data.tags["stop_reason"] == "completed"


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, id="ctrl-c"),
                                 pytest.param(signal.SIGKILL, id="killed-driver")])
def test_interrupted_sweep_resumes_without_loss_or_repeats(cli, tmp_path: Path, sig) -> None:
    args = sweep_args(tmp_path, SMOKE, "resumable", "--trials", "6")
    proc = subprocess.Popen([sys.executable, "-m", "study.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        finished_before = _interrupt(proc, tmp_path, sig)
    finally:  # whatever the driver's Ray left in its session (the driver itself is stopped;
        stop_group(proc, timeout=5)  # what is left is stopped for good, no need to wait long)
    _check_resumed(cli, tmp_path, finished_before)


def _interrupt(proc: subprocess.Popen, tmp_path: Path, sig: int) -> set:
    """Send `sig` to the sweep's driver once two trials have finished; check what it left."""
    db = tmp_path / "mlflow.db"
    deadline = time.time() + 300
    finished_before: set = set()
    while time.time() < deadline and proc.poll() is None:
        time.sleep(1.0)
        # read the store only once the driver has created it (study.json follows the parent
        # run), so this reader never races MLflow's first schema migration
        if (tmp_path / "ray" / "resumable" / "study.json").exists():
            try:
                _, _, children = runs_of(db, "resumable")
            except Exception:  # the store may be mid-migration
                continue
            finished_before = {r.data.tags["ray_trial_id"] for r in children
                               if r.data.tags.get("stop_reason")}
            if len(finished_before) >= 2:
                break
    if proc.poll() is not None:
        pytest.fail("the sweep ended before it could be interrupted:\n"
                    + (proc.stdout.read() if proc.stdout else "")[-4000:])
    proc.send_signal(sig)
    proc.wait(timeout=120)
    if sig == signal.SIGINT:  # Ctrl-C: one line saying how to go on, exit 130, no traceback
        out = proc.stdout.read() if proc.stdout else ""
        assert proc.returncode == 130, out[-3000:]
        assert re.search(r"^\[\d/6\] elapsed ", out, re.M) and "Traceback" not in out, out
        assert out.count("interrupted: continue with `study resume resumable") == 1, out
    _, _, children = runs_of(db, "resumable")
    done = {r.data.tags["ray_trial_id"] for r in children
            if r.data.tags.get("stop_reason") not in (None, "interrupted")}
    assert finished_before <= done and len(done) < 6
    if sig == signal.SIGINT:  # Ctrl-C closes the runs it cut short as interrupted
        assert all(r.data.tags.get("stop_reason") for r in children)
    meta = json.loads((tmp_path / "ray" / "resumable" / "study.json").read_text())
    assert meta["num_trials"] == 6
    return finished_before


def _check_resumed(cli, tmp_path: Path, finished_before: set) -> None:
    """`study resume` finishes the sweep: every trial once, the finished ones kept."""
    db = tmp_path / "mlflow.db"
    res = cli("resume", "resumable", "--storage", str(tmp_path / "ray"))
    assert res.returncode == 0, res.stderr[-3000:]
    progress = [ln for ln in res.stderr.splitlines() if re.match(r"\[\d/6\] ", ln)]
    assert progress[-1].startswith("[6/6]") and "running 0," in progress[-1], res.stderr
    _, parents, runs = runs_of(db, "resumable")
    # the runs of attempts the interruption cut short are kept (nothing deletes a run), marked
    # interrupted, and the new run of their restarted trial links to them (tests/test_faults.py)
    cut = [r for r in runs if r.data.tags.get("stop_reason") == "interrupted"]
    children = [r for r in runs if r not in cut]
    assert all(r.info.status == "KILLED" for r in cut)
    linked = {r.data.tags.get("retry_of") for r in children}
    assert all(r.info.run_id in linked for r in cut  # unless Ray's saved state never knew it
               if "does not know the trial" not in r.data.tags["stop_message"])
    # a trial that finished after the last state save that reached the disk (the driver killed
    # before the next save) is replayed from its run, not trained again: no run is orphaned
    # and no trial has two finished runs (README, "What survives a fault")
    assert not [r for r in children if TAG_ORPHAN in r.data.tags]
    ids = [r.data.tags["ray_trial_id"] for r in children]
    assert len(ids) == 6 and len(set(ids)) == 6  # exactly the requested trials, no duplicates
    assert finished_before <= set(ids)  # finished trials were kept
    assert all(r.data.tags.get("stop_reason") in ("completed", "early_stopped") for r in children)
    assert parents[0].info.status == "FINISHED"
    before = {r.data.tags["ray_trial_id"]: r.info.end_time for r in children
              if r.data.tags["ray_trial_id"] in finished_before}
    assert all(t is not None for t in before.values())


def test_bad_space_refused_and_nothing_logged(cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE.read_text().replace("n_heads: [1, 2, 4]", "n_heads: [1, 2, four]"))
    res = cli(*sweep_args(tmp_path, bad, "bad"))
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and str(bad) in res.stderr
    assert "n_heads" in res.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()
    missing = cli(*sweep_args(tmp_path, tmp_path / "missing.yaml", "bad"))
    assert missing.returncode == 2 and not (tmp_path / "mlflow.db").exists()
