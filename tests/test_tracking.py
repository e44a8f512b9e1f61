"""Tracker retries transient SQLite locks (a reader such as `study ui` or `study report`)."""

import contextlib
import sqlite3

import pytest

from study import tracking
from tests.helpers import FakeTrial


def test_retry_rides_out_a_locked_store(monkeypatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return x * 2

    assert tracking._retry(flaky, 21) == 42 and len(calls) == 3


def test_retry_does_not_hide_other_errors(monkeypatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def broken():
        calls.append(1)
        raise ValueError("bad param")

    with pytest.raises(ValueError, match="bad param"):
        tracking._retry(broken)
    assert calls == [1]


def test_retry_gives_up_on_a_lock_that_stays(monkeypatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)

    def stuck():
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(sqlite3.OperationalError):
        tracking._retry(stuck)


# --- what the driver writes: names, tags, one point per (metric, epoch) -----------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A fresh SQLite store (migrated once for the module: migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    d = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def _parent(uri: str, name: str) -> tuple[tracking.Tracker, str]:
    from study.records import SweepSpec

    tr = tracking.Tracker(uri)
    spec = SweepSpec(name=name, path="", text=f"name: {name}\n", fixed={}, params=())
    return tr, tr.start_parent(name, f"sweep_{name}", spec, {})


def test_experiment_opens_on_runs_not_traces(store) -> None:
    from mlflow.tracking import MlflowClient

    from study.records import EXPERIMENT_KIND_ML, TAG_EXPERIMENT_KIND

    tr, _ = _parent(store, "kind")
    exp = MlflowClient(store).get_experiment_by_name("kind")
    assert exp.tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND_ML == "custom_model_development"
    # an experiment created without the tag (an older store) gets it on the next sweep
    client = MlflowClient(store)
    old = client.create_experiment("older")
    assert tr.experiment_id("older") == old
    assert client.get_experiment(old).tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND_ML


@pytest.mark.parametrize(("outcome", "message", "name", "note"), [
    ("completed", "completed 3 epochs", "trial_t0", "completed: completed 3 epochs"),
    ("early_stopped", "stopped by ASHA at epoch 4", "trial_t0 (early_stopped)",
     "early_stopped: stopped by ASHA at epoch 4"),
    ("diverged", "seed 1: diverged at step 7", "trial_t0 (diverged)",
     "diverged: seed 1: diverged at step 7"),
    ("error", "ValueError: bad", "trial_t0 (error)", "error: ValueError: bad"),
])
def test_finished_run_is_named_and_described_by_outcome(store, outcome, message, name,
                                                        note) -> None:
    from study.records import Outcome

    tr, pid = _parent(store, f"named_{outcome}")
    rid = tr.start_child(pid, "t0", {"n_heads": 2}, 1)
    assert tr.client.get_run(rid).info.run_name == "trial_t0"
    tr.finish_child(rid, outcome, message)
    run = tr.client.get_run(rid)
    assert run.info.run_name == name and run.data.tags["mlflow.runName"] == name
    assert run.data.tags["mlflow.note.content"] == note
    assert run.data.tags["stop_reason"] == outcome and run.data.tags["stop_message"] == message
    assert run.info.status == Outcome(outcome).mlflow_status


def test_report_logs_no_constant_seed_spread() -> None:
    from study.metrics import SEED_INVARIANT_METRICS
    from study.records import TrialReport, is_logged_metric
    from study.trainable import seed_summary

    per_seed = [{"val_acc": 0.5, "n_params": 10.0, "epoch": 2.0, "flops_per_sample": 7.0},
                {"val_acc": 0.7, "n_params": 10.0, "epoch": 2.0, "flops_per_sample": 7.0}]
    assert {"n_params", "epoch", "flops_per_sample"} <= SEED_INVARIANT_METRICS
    raw = TrialReport(2, seed_summary(per_seed)).to_ray()
    for name in ("n_params", "epoch", "flops_per_sample"):
        assert f"{name}_seed_std" not in raw and not is_logged_metric(f"{name}_seed_std")
    logged = TrialReport.from_ray(raw).logged_metrics()
    assert logged["val_acc"] == pytest.approx(0.6)
    assert logged["val_acc_seed_std"] == pytest.approx(0.1 * 2 ** 0.5)  # sample std, ddof=1
    assert logged["seed_1/val_acc"] == 0.7 and logged["seed_0/n_params"] == 10.0
    assert not any(k.endswith("_seed_std") and k[:-9] in SEED_INVARIANT_METRICS
                   for k in logged)


def test_a_metric_some_seeds_lack_is_summarised_over_those_that_have_it() -> None:
    """A robustness metric only some replicates have (a shot group with no class in one data
    seed's profile): mean, spread and per-seed values over the seeds that have it, wherever
    seed 0 stands (it failed the trial when seed 0 had it, vanished when it did not)."""
    from study.trainable import seed_summary

    per_seed = [{"val_acc": 0.5}, {"val_acc": 0.7, "few_shot_acc": 0.2},
                {"val_acc": 0.6, "few_shot_acc": 0.4}]
    out = seed_summary(per_seed)
    assert out["few_shot_acc"] == pytest.approx(0.3)
    assert out["few_shot_acc_seed_std"] == pytest.approx(0.2 / 2 ** 0.5)
    assert out["seed_1/few_shot_acc"] == 0.2 and out["seed_2/few_shot_acc"] == 0.4
    assert "seed_0/few_shot_acc" not in out and out["val_acc"] == pytest.approx(0.6)
    one = seed_summary([{"val_acc": 0.5, "few_shot_acc": 0.1}, {"val_acc": 0.7}])
    assert one["few_shot_acc"] == 0.1 and "few_shot_acc_seed_std" not in one
    assert list(one) == ["val_acc", "val_acc_seed_std", "seed_0/val_acc", "seed_1/val_acc",
                         "few_shot_acc", "seed_0/few_shot_acc"]


def test_replicates_with_different_shot_groups_finish_the_trial() -> None:
    """mnist1d at imbalance 19.5 with `vary_data_seed`: data seed 2 leaves its rarest class 19
    training examples (few-shot), data seed 3 leaves it 20 (not), so only the first replicate
    has `few_shot_acc`; the trial completes and reports it for that replicate."""
    from study.records import Outcome
    from study.trainable import lockstep

    cfg = {"task": "mnist1d", "imbalance": 19.5, "data_seed": 2, "seed": 0, "epochs": 1,
           "d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2, "batch_size": 128,
           "device": "cpu"}
    last = list(lockstep(cfg, seeds=2, vary_data_seed=True, batching="vmap"))[-1]
    assert last.outcome == Outcome.COMPLETED, last.message
    assert "seed_0/few_shot_acc" in last.metrics and "seed_1/few_shot_acc" not in last.metrics
    assert last.metrics["few_shot_acc"] == last.metrics["seed_0/few_shot_acc"]


def test_callback_logs_every_epoch_once_per_seed(store) -> None:
    """Per-seed values at every epoch, the last one not logged again when the trial ends."""
    from study.records import SweepSpec, TrialReport
    from study.sweep.callbacks import TrackingCallback
    from study.trainable import seed_summary

    tr, pid = _parent(store, "per_epoch")
    cb = TrackingCallback(tr, pid, SweepSpec(name="x", path="", text="", fixed={}, params=(),
                                             seeds=2))
    cb._synced = True
    results = [TrialReport(e, seed_summary([{"val_acc": 0.1 * e, "epoch": float(e)},
                                            {"val_acc": 0.2 * e, "epoch": float(e)}])).to_ray()
               for e in (1, 2, 3)]
    trial = FakeTrial("t9", {"n_heads": 2}, last_result=results[-1])
    cb.on_trial_start(0, [trial], trial)
    for r in results:
        cb.on_trial_result(0, [trial], trial, dict(r))
    cb.on_trial_complete(0, [trial], trial)
    rid = cb.runs["t9"]
    for key in ("seed_0/val_acc", "seed_1/val_acc", "val_acc", "val_acc_seed_std"):
        hist = tr.client.get_metric_history(rid, key)
        assert sorted(m.step for m in hist) == [1, 2, 3], key
    assert [m.value for m in sorted(tr.client.get_metric_history(rid, "seed_1/val_acc"),
                                    key=lambda m: m.step)] == pytest.approx([0.2, 0.4, 0.6])
    run = tr.client.get_run(rid)
    assert "epoch_seed_std" not in run.data.metrics and "seed_0/epoch" in run.data.metrics
    assert run.info.run_name == "trial_t9 (early_stopped)"  # it sent no outcome
    assert run.data.tags["mlflow.note.content"] == "early_stopped: stopped by ASHA at epoch 3"


def test_callback_gives_a_retried_trial_a_new_linked_run(store) -> None:
    """Ray restarts a retried trial from epoch 1: a new run, never two points per epoch; the
    failed attempt's run is kept, marked interrupted, and linked from the new one."""
    from study.records import SweepSpec, TrialReport
    from study.sweep.callbacks import TrackingCallback

    tr, pid = _parent(store, "retried")
    cb = TrackingCallback(tr, pid, SweepSpec(name="x", path="", text="", fixed={}, params=()))
    cb._synced = True
    first = TrialReport(1, {"val_acc": 0.3}).to_ray()
    trial = FakeTrial("t1", {"n_heads": 2}, last_result=first)
    cb.on_trial_start(0, [trial], trial)
    cb.on_trial_result(0, [trial], trial, dict(first))
    old = cb.runs["t1"]
    cb.on_trial_recover(0, [trial], trial)
    cb.on_trial_start(0, [trial], trial)  # Ray starts the trial again: the new run is kept
    cb.on_trial_result(0, [trial], trial, dict(first))
    new = cb.runs["t1"]
    assert new != old and tr.client.get_run(old).info.lifecycle_stage == "active"
    assert [m.step for m in tr.client.get_metric_history(new, "val_acc")] == [1]
    assert [m.step for m in tr.client.get_metric_history(old, "val_acc")] == [1]
    before = tr.client.get_run(old)
    assert before.info.status == "KILLED" and before.data.tags["stop_reason"] == "interrupted"
    assert tr.client.get_run(new).data.tags["retry_of"] == old
    assert tr.client.get_run(new).data.tags["retries"] == "1"
    assert set(tr.children(pid)) == {"t1"} and tr.children(pid)["t1"].run_id == new


# --- the SQLite store a sweep writes: WAL, small pages, a self-contained file at the end ----

def _pragma(path, name: str):
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(f"PRAGMA {name}").fetchone()[0]


def test_a_new_store_gets_wal_and_small_pages(tmp_path) -> None:
    from study.sweep.lifecycle import open_store

    path = tmp_path / "new.db"
    tr = tracking.Tracker(f"sqlite:///{path}")
    open_store(tr)
    _parent(tr.uri, "wal")
    assert _pragma(path, "journal_mode") == "wal"
    assert _pragma(path, "page_size") == tracking.SQLITE_PAGE_SIZE


def test_mlflows_connections_checkpoint_the_log_less_often(tmp_path) -> None:
    """After `prepare_sqlite`, MLflow's own SQLite connections in this process let the
    write-ahead log grow to WAL_CHECKPOINT_PAGES pages before a checkpoint (SQLite's default
    is 1000), whether opened before or after it; and what they write still reaches the file."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path = tmp_path / "w.db"
    uri = f"sqlite:///{path}"
    _parent(uri, "before")  # MLflow's engine and a pooled connection, opened before
    tracking.prepare_sqlite(uri)
    tr, parent = _parent(uri, "after")
    tr.log_metrics(tr.start_child(parent, "t0", {"n_heads": 2}, 1), {"val_acc": 0.5}, 1)
    tr.flush()
    with SqlAlchemyStore._engine_map[uri].connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == \
            tracking.WAL_CHECKPOINT_PAGES == 10_000
    tracking.checkpoint_sqlite(uri)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("select count(*) from metrics").fetchone()[0] == 1


def test_an_existing_store_keeps_its_pages_and_runs(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    path = tmp_path / "old.db"
    uri = f"sqlite:///{path}"
    tr, parent = _parent(uri, "before")  # made by MLflow alone: rollback journal, 4 KiB pages
    assert _pragma(path, "journal_mode") == "delete"
    pages = _pragma(path, "page_size")
    tracking.prepare_sqlite(uri)
    assert _pragma(path, "journal_mode") == "wal" and _pragma(path, "page_size") == pages
    assert MlflowClient(uri).get_run(parent).info.run_id == parent


def test_checkpoint_leaves_every_write_in_the_database_file(tmp_path) -> None:
    """After a sweep's end (`checkpoint_sqlite`) a copy of the file alone holds every run,
    though this process's MLflow client stays open, and the store is back in the rollback
    journal (it opens on read-only media); the client still writes afterwards."""
    import shutil

    from mlflow.tracking import MlflowClient

    path = tmp_path / "s.db"
    uri = f"sqlite:///{path}"
    tracking.prepare_sqlite(uri)
    tr, parent = _parent(uri, "copy")
    tr.log_metrics(tr.start_child(parent, "t0", {"n_heads": 2}, 1), {"val_acc": 0.5}, 1)
    tracking.checkpoint_sqlite(uri)
    assert _pragma(path, "journal_mode") == "delete"
    shutil.copy(path, tmp_path / "copy.db")
    copy = MlflowClient(f"sqlite:///{tmp_path / 'copy.db'}")
    exp = copy.get_experiment_by_name("copy")
    runs = copy.search_runs([exp.experiment_id])
    assert len(runs) == 2 and any(r.data.metrics.get("val_acc") == 0.5 for r in runs)
    tr.log_metrics(tr.start_child(parent, "t1", {"n_heads": 4}, 1), {"val_acc": 0.6}, 1)
    assert len(MlflowClient(uri).search_runs([exp.experiment_id])) == 3


def test_a_percent_encoded_path_is_the_file_mlflow_opens(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/my%20store.db"
    assert tracking.sqlite_file(uri) == tmp_path / "my store.db"
    tracking.prepare_sqlite(uri)
    assert [p.name for p in tmp_path.iterdir()] == ["my store.db"]


@pytest.mark.parametrize("uri", [
    pytest.param("postgresql://u@127.0.0.1:1/db", id="postgresql"),
    pytest.param("http://127.0.0.1:1", id="http"),
    pytest.param("sqlite:///:memory:", id="memory"),
])
def test_other_stores_are_left_alone(uri, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tracking.prepare_sqlite(uri)
    tracking.checkpoint_sqlite(uri)
    assert list(tmp_path.iterdir()) == []


def test_a_busy_store_is_left_in_its_journal_mode(tmp_path) -> None:
    """Another process holding a write lock: the sweep does not wait on it, nor fail."""
    path = tmp_path / "busy.db"
    with sqlite3.connect(path) as db:
        db.execute("create table t (x)")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("begin exclusive")
    try:
        tracking.prepare_sqlite(f"sqlite:///{path}")
    finally:
        holder.execute("rollback")
        holder.close()
    assert _pragma(path, "journal_mode") == "delete"


@pytest.mark.parametrize(("uri", "want"), [
    pytest.param("sqlite:///store.db", "store.db", id="relative"),
    pytest.param("sqlite+pysqlite:///store.db", "store.db", id="driver"),
    pytest.param("sqlite:///my%20store.db?timeout=5", "my store.db", id="encoded"),
    pytest.param("sqlite:///~/store.db", "~/store.db", id="tilde-is-literal"),
    pytest.param("sqlite:///:memory:", None, id="memory"),
    pytest.param("sqlite:///", None, id="empty"),
    pytest.param("sqlite:///a%00b.db", None, id="nul"),
    pytest.param("postgresql://u@h/db", None, id="other"),
])
def test_sqlite_file_is_the_file_sqlalchemy_opens(uri, want, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    got = tracking.sqlite_file(uri)
    assert got == (None if want is None else (tmp_path / want).resolve())


@pytest.mark.parametrize(("uri", "memory"), [
    pytest.param("sqlite://", True, id="short"),
    pytest.param("sqlite:///:memory:", True, id="memory"),
    pytest.param("sqlite+pysqlite:///:memory:?cache=shared", True, id="driver-query"),
    pytest.param("sqlite:///store.db", False, id="file"),
    pytest.param("sqlite:////abs/:memory:", False, id="file-named-memory"),
    pytest.param("postgresql://u@h/db", False, id="other"),
])
def test_in_memory_sqlite_uris(uri, memory) -> None:
    assert tracking.sqlite_in_memory(uri) is memory
    if memory:  # left as given: no file to resolve
        assert tracking.resolve_uri(uri) == uri
