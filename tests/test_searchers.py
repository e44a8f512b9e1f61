"""The sweep's parts in process: the searcher adapter, `lockstep`, and a tiny real sweep (real
Ray, Optuna, MLflow) for every searcher, single- and multi-objective."""

from __future__ import annotations

import logging
import math
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest

from study.records import Outcome, SweepSpec, TrialRecord, TrialReport, seed_metric
from study.spaces import infeasible, parse_space
from study.sweep.searcher import StudySearch, sample_config
from study.trainable import lockstep

State = optuna.trial.TrialState

SPACE = """
name: tiny
task: digits
fixed: {{d_model: 16, d_ff: 32, n_layers: 1, batch_size: 256, n_heads: 2}}
params:
  lr: {{type: float, low: 0.001, high: 0.01, log: true}}
  attn_dropout: {{type: float, low: 0.0, high: 0.2}}
  qk_norm: [none, l2]
  qk_norm_gain: {{type: float, low: 4.0, high: 16.0, when: {{qk_norm: l2}}}}
budget: {{epochs: 2, grace_period: 1, reduction_factor: 2}}
seeds: 1
objective: {objective}
searcher: {searcher}
searcher_seed: 0
num_trials: {trials}
max_concurrent: 2
"""
SINGLE = "{metric: val_acc, mode: max}"
MULTI = "[{metric: val_acc, mode: max}, {metric: gen_gap_acc, mode: min}]"


def spec_of(searcher: str = "tpe", objective: str = SINGLE, trials: int = 3) -> SweepSpec:
    return parse_space(SPACE.format(searcher=searcher, objective=objective, trials=trials),
                       f"{searcher}.yaml")


# --- the searcher adapter, without Ray ---------------------------------------------------------

def test_suggestions_are_feasible_and_conditional_params_follow_their_condition() -> None:
    spec = spec_of("random").replace(constraints=("qk_norm == 'l2'",))
    search = StudySearch(spec)
    for i in range(6):
        cfg = search.suggest(f"t{i}")
        assert cfg is not None and infeasible(spec, {k: cfg[k] for k in cfg
                                                     if k not in spec.fixed}) is None
        assert cfg["qk_norm"] == "l2" and "qk_norm_gain" in cfg
        assert {k: cfg[k] for k in spec.fixed} == spec.fixed
    states = [t.state for t in search.study.trials]
    # every infeasible sample (qk_norm none) was told to Optuna as failed, then resampled
    assert states.count(State.FAIL) == search.resampled > 0
    assert states.count(State.RUNNING) == 6 == len(search.live)


def test_outcomes_are_told_to_optuna() -> None:
    search = StudySearch(spec_of("tpe"))
    for tid in ("done", "stopped", "diverged", "crashed", "no_value"):
        search.suggest(tid)
    search.on_trial_result("done", {"val_acc": 0.5, "epoch": 1})
    search.on_trial_result("stopped", {"val_acc": 0.2, "epoch": 1})
    search.on_trial_complete("done", TrialReport(2, {"val_acc": 0.7},
                                                 Outcome.COMPLETED).to_ray())
    search.on_trial_complete("stopped", TrialReport(1, {"val_acc": 0.2}).to_ray())
    search.on_trial_complete("diverged", TrialReport(1, outcome=Outcome.DIVERGED).to_ray())
    search.on_trial_complete("crashed", None, error=True)
    search.on_trial_complete("no_value", TrialReport(2, {}, Outcome.COMPLETED).to_ray())
    by = {t.number: t for t in search.study.trials}
    assert [by[i].state for i in range(5)] == [State.COMPLETE, State.PRUNED, State.FAIL,
                                               State.FAIL, State.FAIL]
    assert by[0].value == 0.7 and by[0].intermediate_values == {1: 0.5}
    assert by[1].intermediate_values == {1: 0.2}  # TPE reads a pruned trial's last value
    assert not search.live


def test_multi_objective_tells_every_value() -> None:
    search = StudySearch(spec_of("nsga2", MULTI))
    search.suggest("a")
    search.on_trial_result("a", {"val_acc": 0.5, "epoch": 1})  # no intermediate values
    search.on_trial_complete("a", {"val_acc": 0.8, "gen_gap_acc": 0.05, "epoch": 2,
                                   "stop_reason": "completed"})
    (t,) = search.study.trials
    assert t.state == State.COMPLETE and t.values == [0.8, 0.05]
    assert search.study.directions == [optuna.study.StudyDirection.MAXIMIZE,
                                       optuna.study.StudyDirection.MINIMIZE]


def test_state_round_trips_through_save_and_restore(tmp_path: Path) -> None:
    a = StudySearch(spec_of("tpe"))
    a.suggest("x")
    a.suggest("y")
    a.on_trial_complete("x", TrialReport(2, {"val_acc": 0.6}, Outcome.COMPLETED).to_ray())
    a.save(str(tmp_path / "s.pkl"))
    b = StudySearch(spec_of("tpe"))
    b.restore(str(tmp_path / "s.pkl"))
    assert b.live == {"y": 1} and len(b.study.trials) == 2
    b.on_trial_complete("y", TrialReport(2, {"val_acc": 0.4}, Outcome.COMPLETED).to_ray())
    assert [t.value for t in b.study.trials] == [0.6, 0.4]
    pickle.loads(pickle.dumps(a))  # Ray pickles the searcher with the tuner


def test_sample_config_is_define_by_run() -> None:
    spec = spec_of("random")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(20):
        t = study.ask()
        cfg = sample_config(spec, t)
        seen.add(cfg["qk_norm"])
        assert ("qk_norm_gain" in t.params) == (cfg["qk_norm"] == "l2")
    assert seen == {"none", "l2"}


# --- lockstep: the trainable's loop, without Ray ----------------------------------------------

def test_lockstep_reports_seed_means_and_matches_single_runs() -> None:
    from study.config import make_config
    from study.train import run_trial

    config = {"task": "digits", "d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2,
              "epochs": 2, "batch_size": 256, "device": "cpu", "seed": 3}
    reports = list(lockstep(config, seeds=2))
    assert [r.epoch for r in reports] == [1, 2]
    assert reports[0].outcome is None and reports[-1].outcome is Outcome.COMPLETED
    cfg = make_config(config)
    alone = [list(run_trial(cfg.replace(seed=3 + k)))[-1].metrics for k in range(2)]
    last = reports[-1].metrics
    for k in range(2):
        assert last[seed_metric(k, "val_acc")] == alone[k]["val_acc"]
    assert last["val_acc"] == pytest.approx((alone[0]["val_acc"] + alone[1]["val_acc"]) / 2)
    assert last["val_acc_seed_std"] == pytest.approx(  # the sample std (ddof=1)
        abs(alone[0]["val_acc"] - alone[1]["val_acc"]) / np.sqrt(2))
    decoded = TrialReport.from_ray({**reports[-1].to_ray(), "pid": 1, "timestamp": 2})
    assert decoded.metrics == last and decoded.outcome is Outcome.COMPLETED


def test_lockstep_records_errors_and_divergence() -> None:
    base = {"task": "digits", "d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2,
            "epochs": 2, "batch_size": 256, "device": "cpu"}
    (err,) = lockstep({**base, "patch_size": 128}, seeds=1)
    assert err.outcome is Outcome.ERROR and "patch_size" in err.message
    reports = list(lockstep({**base, "lr": 1e30, "grad_clip": 0.0}, seeds=2))
    assert reports[-1].outcome is Outcome.DIVERGED and "diverged" in reports[-1].message


# --- a tiny real sweep per searcher -----------------------------------------------------------

@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module (each sweep would otherwise start its own)."""
    from study.sweep.lifecycle import init_ray, sweep_environment

    with sweep_environment():
        init_ray(None)
        yield


def _process_state() -> tuple:
    return ({k: os.environ.get(k) for k in ("RAY_AIR_NEW_OUTPUT", "RAY_CHDIR_TO_TRIAL_DIR",
                                            "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")},
            list(warnings.filters), logging.getLogger("ray").level,
            logging.getLogger("optuna").level)


@pytest.mark.slow
@pytest.mark.parametrize(("searcher", "objective"), [
    pytest.param("tpe", SINGLE, id="tpe"),
    pytest.param("random", SINGLE, id="random"),
    pytest.param("cmaes", SINGLE, id="cmaes"),
    pytest.param("nsga2", SINGLE, id="nsga2"),
    pytest.param("tpe", MULTI, id="tpe-multi"),
    pytest.param("nsga2", MULTI, id="nsga2-multi"),
    pytest.param("random", MULTI, id="random-multi"),
])
def test_every_searcher_runs_a_real_sweep(ray_session, tmp_path: Path, searcher: str,
                                          objective: str) -> None:
    from mlflow.tracking import MlflowClient

    from study.sweep import run_sweep

    space = tmp_path / f"{searcher}.yaml"
    space.write_text(SPACE.format(searcher=searcher, objective=objective, trials=3))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = _process_state()
    summary = run_sweep(space, name=f"s_{searcher}", tracking_uri=uri, storage=tmp_path / "ray")
    assert _process_state() == before  # nothing process-wide left changed
    assert summary["complete"] and summary["done"] == 3
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(f"s_{searcher}")
    runs = [TrialRecord.from_mlflow(r) for r in client.search_runs([exp.experiment_id])
            if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 3
    spec = spec_of(searcher, objective)
    lr = spec.param("lr")
    assert lr is not None
    for r in runs:
        assert r.outcome in (Outcome.COMPLETED, Outcome.EARLY_STOPPED)
        assert lr.low <= r.config["lr"] <= lr.high
        assert all(math.isfinite(v) for v in r.metrics.values())
    # the searcher told Optuna how every trial ended (its state is saved with the sweep)
    (state_file,) = (tmp_path / "ray" / f"s_{searcher}").glob("searcher-state-*.pkl")
    study = pickle.loads(state_file.read_bytes())["study"]
    told = [t for t in study.trials if t.state in (State.COMPLETE, State.PRUNED)]
    assert len(told) == 3 and not any(t.state == State.RUNNING for t in study.trials)
    assert len(study.directions) == len(spec.objectives)


@pytest.mark.parametrize("n,want", [pytest.param(8, 3, id="small"), pytest.param(16, 3, id="16"),
                                    pytest.param(30, 6, id="30"),
                                    pytest.param(400, 10, id="large")])
def test_tpe_startup_is_a_fifth_of_the_budget_within_bounds(n, want):
    from study.sweep.searcher import tpe_startup
    assert tpe_startup(n) == want


def test_a_sampler_that_keeps_proposing_infeasible_points_falls_back_to_feasible_draws(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_RESAMPLE infeasible proposals (forced here with 1) a suggestion is a seeded
    random draw that runs, enqueued so the study records it; the same seed gives the same
    sequence (a space with too few runnable draws is refused when parsed: test_spaces)."""
    import study.sweep.searcher as S

    monkeypatch.setattr(S, "MAX_RESAMPLE", 1)
    spec = parse_space("task: digits\nfixed: {n_heads: 1}\nparams:\n"
                       "  d_model: {type: int, low: 1, high: 1000}\n"
                       "constraints: ['d_model > 900']\nsearcher: random\nnum_trials: 20\n",
                       "s.yaml")
    runs = []
    for _ in range(2):
        search = StudySearch(spec)
        runs.append([search.suggest(f"t{i}")["d_model"] for i in range(20)])
        assert search.resampled > 0  # the fallback was used
        live = [t for t in search.study.trials if t.state == State.RUNNING]
        assert sorted(t.params["d_model"] for t in live) == sorted(runs[-1])
    assert runs[0] == runs[1] and min(runs[0]) > 900


def test_conditions_on_an_unsampled_param_see_its_default() -> None:
    """`when: {learned_temperature: false}` holds where learned_temperature is not sampled
    (its own condition fails) and so keeps its default, false, as the trial runs it."""
    spec = parse_space("task: digits\nparams:\n  qk_norm: [none, l2]\n"
                       "  learned_temperature: {type: categorical, values: [false, true],\n"
                       "                        when: {qk_norm: none}}\n"
                       "  attn_temperature: {type: float, low: 0.25, high: 4.0, log: true,\n"
                       "                     when: {learned_temperature: false}}\n"
                       "searcher: random\nnum_trials: 30\n", "c.yaml")
    search = StudySearch(spec)
    for i in range(30):
        config = search.suggest(f"t{i}")
        learned = config.get("learned_temperature", False)
        assert ("attn_temperature" in config) == (not learned), config


def test_nsga2_generations_advance_within_a_sweep_whose_trials_asha_mostly_stops() -> None:
    """regularization.yaml: 40 trials, ASHA keeping about 1 in 9 to the end. NSGA-II's
    generations fill with completed trials only, so with Optuna's default of 50 the whole
    sweep stayed in its random generation 0; sized to the expected completions it advances."""
    from study.spaces import load_space
    from study.sweep.searcher import expected_completed, nsga2_population

    spec = load_space(Path(__file__).resolve().parent.parent / "search_spaces"
                      / "regularization.yaml")
    assert expected_completed(spec) == pytest.approx(40 / 9)
    assert nsga2_population(spec) == 2
    search = StudySearch(spec)
    for i in range(spec.num_trials):
        search.suggest(f"t{i}")
        number = search.live.pop(f"t{i}")
        if i % 9 in (0, 4):  # completed
            search.study.tell(number, [0.5 + 0.01 * i, 0.1])
        else:  # stopped by ASHA
            search.study.tell(number, state=State.PRUNED)
    generations = {t.system_attrs.get("NSGAIISampler:generation") for t in search.study.trials}
    assert max(generations) >= 2


FACTORIAL = """
name: grid
task: digits
fixed: {d_model: 16, d_ff: 32, n_layers: 1, batch_size: 256, n_heads: 2}
params:
  lr: [0.001, 0.003, 0.01]
  attn_dropout: [0.0, 0.1, 0.2]
budget: {epochs: 2}
design: factorial
seeds: 1
"""


@pytest.mark.parametrize("design", [
    *(pytest.param(s, id=s) for s in ("tpe", "random", "cmaes", "nsga2")),
    pytest.param("factorial", id="factorial")])
def test_a_resumed_searcher_hands_out_unsaved_finished_runs_to_replay(tmp_path: Path,
                                                                      design: str) -> None:
    """Trials suggested after the searcher's state was saved (a killed driver's resume offers
    the runs that finished, `study.sweep.journal`): the restored searcher hands each finished
    run's configuration, with its reports, to one trial, once; no configuration is handed out
    twice; a sampler that proposes again in order (seeded random draws, a fixed design's list)
    also proposes the unfinished run's configuration again (its retry), even before the
    finished one's; the study records the replays as the trials they were."""
    from study.config import make_config
    from study.records import REPLAY_KEY, replayed
    from study.sweep import journal

    spec = (parse_space(FACTORIAL, "grid.yaml") if design == "factorial"
            else spec_of(design, trials=12))
    a = StudySearch(spec)
    first = [a.suggest(f"t{i}") for i in range(2)]
    a.save(str(tmp_path / "s.pkl"))  # the last state saved
    later = [a.suggest(f"t{i}") for i in range(2, 5)]  # t2 still runs; t3, t4 finished
    assert all(isinstance(c, dict) for c in [*first, *later])

    def reports(value: float) -> list[dict]:
        return [TrialReport(1, {"val_acc": value / 2}).to_ray(),
                TrialReport(2, {"val_acc": value}, Outcome.COMPLETED, "done").to_ray()]

    offers = [journal.Offer(f"run{i}", make_config(later[i]).to_dict(), reports(0.5 + i / 10))
              for i in (1, 2)]
    b = StudySearch(spec)
    b.restore(str(tmp_path / "s.pkl"))
    journal.offer(list(offers), {journal.config_key(later[0])})
    try:
        got = [b.suggest(f"n{i}") for i in range(5)]
    finally:
        journal.offer([])
    assert not journal.pending()
    keys = [journal.config_key(c) for c in got if isinstance(c, dict)]
    assert len(keys) == 5 and len(set(keys)) == 5  # nothing handed out twice
    replays = {c[REPLAY_KEY]["run"]: c for c in got if REPLAY_KEY in c}
    assert sorted(replays) == ["run1", "run2"]
    for offer in offers:
        assert replayed(replays[offer.run_id]) == offer.reports
        assert journal.config_key(replays[offer.run_id]) == offer.key
    if design in ("random", "factorial"):  # proposed again in order: t2 retried, first
        assert keys[:3] == [journal.config_key(c) for c in later]
        assert not [t for t in b.study.trials if t.state == State.FAIL and t.number >= 2]
    for i, cfg in enumerate(got):  # the replayed ends, told as the trials ended then
        if REPLAY_KEY in cfg:
            b.on_trial_result(f"n{i}", cfg[REPLAY_KEY]["reports"][0])
            b.on_trial_complete(f"n{i}", cfg[REPLAY_KEY]["reports"][-1])
    told = [t for t in b.study.trials if t.state == State.COMPLETE]
    assert sorted(t.values[0] for t in told) == [0.6, 0.7]
    for t in told:
        source = later[round(t.values[0] * 10) - 5]
        assert t.params == {k: v for k, v in source.items() if k in t.params}
        assert t.intermediate_values == {1: t.values[0] / 2}


def test_a_restored_searcher_reports_its_running_trials_epochs() -> None:
    """A trial running when the state was saved reports its epochs to Optuna after a resume
    as it would have without one (TPE ranks a pruned trial by its last intermediate value)."""
    spec = spec_of("tpe", trials=12)
    a = StudySearch(spec)
    a.suggest("known")
    b = StudySearch(spec)
    b.set_state(pickle.loads(pickle.dumps(a.get_state())))
    for s in (a, b):  # a: uninterrupted; b: resumed
        s.on_trial_result("known", TrialReport(1, {"val_acc": 0.8}).to_ray())
        s.on_trial_complete("known", TrialReport(1, {"val_acc": 0.8}).to_ray())
    assert b.study.trials[0].state == a.study.trials[0].state == State.PRUNED
    assert b.study.trials[0].intermediate_values == a.study.trials[0].intermediate_values \
        == {1: 0.8}


CATEGORICAL = """
name: cats
task: digits
fixed: {d_model: 16, d_ff: 32, n_layers: 1, batch_size: 256, n_heads: 2}
params:
  qk_norm: [none, l2]
  attn_dropout: [0.0, 0.1]
budget: {epochs: 2}
searcher: random
searcher_seed: 0
seeds: 1
num_trials: 16
"""


def test_a_resumed_random_search_goes_on_as_the_uninterrupted_one() -> None:
    """A seeded random search over 4 configurations repeats them; after a resume whose lost
    window holds 8 finished runs, the restored searcher replays those 8 and then proposes what
    the uninterrupted search proposed, with no FAIL trial: a replayed configuration is not
    banned (one was, and a discrete space then ran out of configurations and raised)."""
    from study.config import make_config
    from study.records import REPLAY_KEY
    from study.sweep import journal

    spec = parse_space(CATEGORICAL, "cats.yaml")
    a = StudySearch(spec)
    saved = pickle.dumps(a.get_state())
    uninterrupted = [a.suggest(f"t{i}") for i in range(14)]
    assert all(isinstance(c, dict) for c in uninterrupted)
    done = [TrialReport(2, {"val_acc": 0.5}, Outcome.COMPLETED, "done").to_ray()]
    b = StudySearch(spec)
    b.set_state(pickle.loads(saved))
    journal.offer([journal.Offer(f"run{i}", make_config(c).to_dict(), done)
                   for i, c in enumerate(uninterrupted[:8])])
    try:
        got = [b.suggest(f"n{i}") for i in range(14)]
    finally:
        journal.offer([])
    assert [REPLAY_KEY in c for c in got] == [True] * 8 + [False] * 6
    assert [journal.config_key(c) for c in got] == [journal.config_key(c)
                                                    for c in uninterrupted]
    assert not [t for t in b.study.trials if t.state == State.FAIL]


def test_a_retry_is_handed_out_once_and_offers_do_not_outlive_their_sweep(tmp_path) -> None:
    """An unfinished run's configuration is retried once (a later proposal of it, while runs
    wait to be replayed, is not a retry); a resume whose store cannot be read leaves no offer
    of an earlier sweep for the searcher of this one."""
    from study import tracking
    from study.records import SweepSpec
    from study.sweep import callbacks, journal

    journal.offer([journal.Offer("r", {}, [])], {"key"})
    assert journal.to_retry("key") and not journal.to_retry("key")
    spec = SweepSpec(name="s", path="", text="name: s\n", fixed={}, params=(), seeds=1)
    tr = tracking.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def away(parent: str) -> list:
        raise ConnectionError("store away")

    tr.child_runs = away  # type: ignore[method-assign]
    try:
        callbacks.TrackingCallback(tr, "parent", spec).on_step_begin(0, [])
        assert callbacks.halted() and "store away" in str(callbacks.halted())
        assert not journal.pending()
    finally:
        callbacks.clear_halt()
        journal.offer([])
