"""The console progress view: its pure formatting functions, and `ProgressView` fed fake Ray
trials (the real sweep's output is checked in tests/test_sweep.py and tests/test_secrets.py);
what Ctrl-C before a new sweep's first save leaves."""

import pickle
from pathlib import Path

import pytest

from study.records import Outcome, ParamSpec, TrialReport
from study.spaces import load_space
from study.sweep import progress
from study.sweep.progress import (
    ProgressView,
    best_config,
    duration,
    eta,
    first_step_warning,
    format_line,
    outcome_text,
    short_reason,
    starting_line,
)
from tests.helpers import FakeTrial

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "search_spaces" / "smoke.yaml"


@pytest.mark.parametrize(("s", "text"), [(0, "0s"), (-3, "0s"), (59.4, "59s"), (60, "1m00s"),
                                        (187, "3m07s"), (3599, "59m59s"), (7500, "2h05m")])
def test_duration(s, text) -> None:
    assert duration(s) == text


def test_eta_is_none_before_a_trial_finished_and_zero_after_the_last() -> None:
    assert eta(5, [], [3.0, 4.0], 2) is None
    assert eta(0, [], [], 2) == 0.0
    assert eta(0, [10.0], [], 2) == 0.0


def test_eta_from_mean_wall_time_and_concurrency() -> None:
    assert eta(4, [8.0, 12.0], [], 2) == pytest.approx(20.0)  # 4 x 10 s, 2 at a time
    assert eta(4, [10.0], [], 1) == pytest.approx(40.0)
    # fewer trials left than slots: the last one takes a whole trial's time
    assert eta(1, [10.0], [], 4) == pytest.approx(10.0)
    # the running trials have done part of their work (at most one mean's worth each)
    assert eta(2, [10.0], [4.0, 30.0], 2) == pytest.approx((20.0 - 4.0 - 10.0) / 2)
    assert eta(2, [10.0], [30.0, 30.0], 2) == 0.0  # overdue: never negative
    assert eta(3, [10.0], [], 0) == pytest.approx(30.0)  # no concurrency seen yet: one slot


SPACE = (ParamSpec("n_heads", "categorical", values=(1, 2, 4)),
         ParamSpec("norm", "categorical", values=("pre_ln",)),  # one level: never differs
         ParamSpec("attn_dropout", "float", low=0.0, high=0.2),
         ParamSpec("qk_norm_gain", "float", low=4.0, high=16.0, log=True,
                   when=(("qk_norm", ("l2",)),)))


def test_best_config_shows_the_searched_fields_that_vary() -> None:
    config = {"d_model": 32, "n_heads": 4, "norm": "pre_ln", "attn_dropout": 0.123456,
              "qk_norm": "none"}
    assert best_config(config, SPACE) == "n_heads=4 attn_dropout=0.123"
    with_gain = {**config, "qk_norm": "l2", "qk_norm_gain": 7.3412}
    assert best_config(with_gain, SPACE) == "n_heads=4 attn_dropout=0.123 qk_norm_gain=7.34"
    assert best_config({}, SPACE) == ""


def test_outcome_text() -> None:
    assert outcome_text(Outcome.COMPLETED, 3, "completed 3 epochs") == "completed"
    assert outcome_text(Outcome.EARLY_STOPPED, 4) == "early_stopped at epoch 4"
    assert outcome_text(Outcome.EARLY_STOPPED, 0) == "early_stopped"
    long = "ValueError: patch_size 128 exceeds the signal " + "x" * 200 + "\nsecond line"
    text = outcome_text(Outcome.ERROR, 1, "\n" + long)
    assert text.startswith("error: ValueError: patch_size 128") and text.endswith("...")
    assert len(text) == len("error: ") + progress.REASON_CHARS
    assert outcome_text(Outcome.DIVERGED, 2, "seed 1: loss nan at epoch 2") == (
        "diverged: seed 1: loss nan at epoch 2")
    assert outcome_text(Outcome.ERROR, 0, "") == "error"
    assert short_reason("a\nb") == "a"


def line(**kw) -> str:
    args = dict(done=3, total=8, elapsed=27.0, eta_s=41.0, trial_id="29c111e1",
                outcome="early_stopped at epoch 1", metric="val_acc", value=0.14071,
                running=2, early_stopped=1, failed=0, best=(0.51674, "n_heads=2 qk_norm=l2"))
    return format_line(**{**args, **kw})


def test_format_line() -> None:
    assert line() == ("[3/8] elapsed 27s, ETA ~41s | 29c111e1 early_stopped at epoch 1, "
                      "val_acc 0.1407 | running 2, early-stopped 1, failed 0 | best val_acc "
                      "0.5167: n_heads=2 qk_norm=l2")
    assert "ETA" not in line(eta_s=None)  # no estimate before a trial finished
    assert "ETA" not in line(done=8, eta_s=0.0)  # nothing left
    assert "best" not in line(best=None)
    assert line(value=None).split(" | ")[1] == "29c111e1 early_stopped at epoch 1"
    assert "nan" not in line(value=float("nan"))
    assert line(best=(0.5, "")).endswith("| best val_acc 0.5000")


def test_starting_line_names_the_sweep_and_its_space() -> None:
    spec = load_space(SMOKE)
    text = starting_line("smoke_x", spec)
    assert text.startswith("sweep smoke_x: 4 trials x 2 seeds, 3 epochs each, of ")
    for p in ("n_heads", "attn_temperature", "qk_norm", "qk_norm_gain", "attn_dropout"):
        assert p in text
    assert "ASHA" in text and text.endswith("starting Ray")


def report(epoch: int, val: float, outcome: Outcome | None = None, msg: str = "") -> dict:
    return {**TrialReport(epoch=epoch, metrics={"val_acc": val}, outcome=outcome,
                          message=msg).to_ray(), "training_iteration": epoch}


def test_view_lines_count_running_trials_and_show_the_best_config(capsys, monkeypatch) -> None:
    spec = load_space(SMOKE).replace(num_trials=3, max_concurrent=2)
    clock = iter([0.0, 1.0, 2.0, 11.0, 12.0, 20.0, 30.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    progress._begun.clear()
    view = ProgressView(spec)
    cfg = {"n_heads": 2, "attn_temperature": 1.0642, "qk_norm": "none", "attn_dropout": 0.18,
           "d_model": 32}
    a, b, c = (FakeTrial(t, {**cfg, "n_heads": n}) for t, n in (("a", 1), ("b", 2), ("c", 4)))
    trials = [a, b, c]
    view.on_step_begin(0, trials)  # t=0: the sweep starts
    for t in (a, b):  # t=1, 2
        t.status = "RUNNING"
        view.on_trial_start(0, trials, t)
    # a is stopped by ASHA at epoch 1; Ray still has it RUNNING when it says so (t=11)
    a.last_result = report(1, 0.25)
    view.on_trial_complete(0, trials, a)
    a.status = "TERMINATED"
    c.status = "RUNNING"
    view.on_trial_start(0, trials, c)  # t=12
    b.last_result = report(3, 0.5, Outcome.COMPLETED, "completed 3 epochs")
    view.on_trial_complete(0, trials, b)  # t=20
    b.status = "TERMINATED"
    c.last_result = report(1, float("nan"), Outcome.DIVERGED, "seed 0: loss nan at epoch 1")
    view.on_trial_complete(0, trials, c)  # t=30: a diverged trial ends as Ray sees it
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    # a ran 10 s, b has run 9 s of its 10, 2 at a time: (2 x 10 - 9) / 2 = 5.5 s
    assert lines[0] == ("[1/3] elapsed 11s, ETA ~6s | a early_stopped at epoch 1, val_acc 0.2500 "
                        "| running 1, early-stopped 1, failed 0 | best val_acc 0.2500: "
                        "n_heads=1 attn_temperature=1.06 qk_norm=none attn_dropout=0.18")
    # b ran 18 s: mean 14 s; c, the last one, has run 8 s of it: 6 s
    assert lines[1].startswith("[2/3] elapsed 20s, ETA ~6s | b completed, val_acc 0.5000 | "
                               "running 1, early-stopped 1, failed 0 | best val_acc 0.5000: "
                               "n_heads=2 ")
    assert lines[2].startswith("[3/3] elapsed 30s | c diverged: seed 0: loss nan at epoch 1 | "
                               "running 0, early-stopped 1, failed 1 | best val_acc 0.5000")


def test_view_after_unpickling_counts_restored_trials_and_forgets_old_times(capsys) -> None:
    """`study resume` unpickles the view from the tuner's file: the finished trials Ray
    restored are counted, times start afresh."""
    spec = load_space(SMOKE).replace(num_trials=3)
    view = ProgressView(spec)
    view.starts["old"] = 5.0
    view = pickle.loads(pickle.dumps(view))
    assert view.starts == {} and view.started is None and view.walls == []
    done = FakeTrial("a", {"n_heads": 4})
    done.status, done.last_result = "TERMINATED", report(3, 0.7, Outcome.COMPLETED)
    view.on_step_begin(0, [done])
    assert view.counts[Outcome.COMPLETED] == 1 and view.best == (0.7, "n_heads=4")
    assert capsys.readouterr().err == ""


def test_ctrl_c_before_the_first_save_discards_only_an_unstarted_sweep(tmp_path: Path) -> None:
    """Ctrl-C while Ray starts leaves `study.json` but nothing Ray Tune could resume: the
    directory goes (the same command starts again); a sweep with a saved state stays."""
    import json

    from mlflow.tracking import MlflowClient

    from study.sweep.lifecycle import META, discard_unstarted

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("x")).info.run_id
    meta = json.dumps({"tracking_uri": uri, "parent_run_id": parent})
    unstarted, saved, running = (tmp_path / n for n in ("unstarted", "saved", "running"))
    for d in (unstarted, saved, running):
        d.mkdir()
        (d / META).write_text(meta)
        (d / "space.yaml").write_text("name: x\n")
    (saved / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    (running / "trainable_abc_1").mkdir()
    assert not discard_unstarted(saved) and (saved / META).exists()
    assert not discard_unstarted(running) and (running / META).exists()
    assert client.get_run(parent).info.status == "RUNNING"
    assert not discard_unstarted(tmp_path / "never")
    assert discard_unstarted(unstarted) and not unstarted.exists()
    assert client.get_run(parent).info.status == "KILLED"


D, C, E = Outcome.DIVERGED, Outcome.COMPLETED, Outcome.ERROR


@pytest.mark.parametrize("ended,warns", [
    pytest.param([(D, "seed 0: diverged at step 1")] * 8, True, id="all_at_step_1"),
    pytest.param([(D, "seed 0: diverged at step 1")] * 3, False, id="too_few"),
    pytest.param([(D, "seed 0: diverged at step 1")] * 7 + [(C, "completed")], False,
                 id="one_completed"),
    pytest.param([(D, "seed 0: diverged at step 12")] * 8, False, id="later_step"),
    pytest.param([(D, "seed 1: diverged at step 1")] * 4 + [(None, ""), (Outcome.INTERRUPTED,
                                                                        "stopped")],
                 True, id="unfinished_left_out"),
    pytest.param([(D, "seed 0: diverged at step 1")] * 4 + [(E, "ValueError: bad")], False,
                 id="an_error"),
])
def test_first_step_warning(ended, warns):
    got = first_step_warning(ended)
    assert (got is not None) == warns, got
    if warns:
        assert "first step" in got and "study trial" in got
