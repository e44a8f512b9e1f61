"""Sweep designs (README "Designs"): parsing, the configurations each design runs, the searcher
handing them out in order, no early stopping outside `search`, analysis settings, replicates
with their own data seed, and the SweepSpec JSON round trip of all of it."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import random
from pathlib import Path
from typing import Any

import optuna
import pytest

from study.metrics import ALL_METRICS
from study.records import DEFAULT_MIN_EFFECT, Outcome, SweepSpec, TrialRecord, TrialReport
from study.spaces import SpaceError, infeasible, load_space, parse_space
from study.sweep.searcher import FINISHED, StudySearch, make_sampler

ROOT = Path(__file__).resolve().parent.parent
State = optuna.trial.TrialState

# 3 x 2 x 3 x 2 = 36 grid points; d_model 32 refuses no n_heads level
BASE = """
name: d
task: digits
fixed: {d_model: 32, d_ff: 32, n_layers: 1, batch_size: 256}
params:
  n_heads: [1, 2, 4]
  norm: [pre_ln, post_ln]
  attn_dropout: {type: float, values: [0.0, 0.1, 0.2]}
  qk_norm: [none, l2]
budget: {epochs: 2}
objective: {metric: val_acc, mode: max}
"""
LEVELS = {"n_heads": (1, 2, 4), "norm": ("pre_ln", "post_ln"), "attn_dropout": (0.0, 0.1, 0.2),
          "qk_norm": ("none", "l2")}
GRID = math.prod(len(v) for v in LEVELS.values())  # 36


def space(extra: str, base: str = BASE) -> SweepSpec:
    return parse_space(base + extra, "d.yaml")


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


# --- parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("extra", "design", "fraction", "bases", "trials"), [
    pytest.param("", "search", None, None, 8, id="no-key-is-search"),
    pytest.param("design: search\nnum_trials: 5\n", "search", None, None, 5, id="search"),
    pytest.param("design: random\nnum_trials: 5\n", "random", None, None, 5, id="random"),
    pytest.param("design: {kind: random}\nsearcher: random\n", "random", None, None, 8,
                 id="random-mapping-with-its-searcher"),
    pytest.param("design: factorial\n", "factorial", None, None, GRID, id="factorial"),
    pytest.param(f"design: factorial\nnum_trials: {GRID}\n", "factorial", None, None, GRID,
                 id="factorial-with-agreeing-num-trials"),
    pytest.param("design: {kind: factorial, fraction: 0.5}\n", "factorial", 0.5, None, GRID // 2,
                 id="factorial-fraction"),
    pytest.param("design: {kind: factorial, fraction: 1}\n", "factorial", 1.0, None, GRID,
                 id="factorial-fraction-one"),
    pytest.param("design: {kind: one_at_a_time, bases: 3}\n", "one_at_a_time", None, 3,
                 3 * (1 + 2 + 1 + 2 + 1), id="one-at-a-time"),
])
def test_designs_parse(extra: str, design: str, fraction: float | None, bases: int | None,
                       trials: int) -> None:
    s = space(extra)
    assert (s.design, s.design_fraction, s.design_bases, s.num_trials) == (
        design, fraction, bases, trials)
    assert s.early_stopping == (design == "search")
    fixed_list = design in ("factorial", "one_at_a_time")
    assert len(s.design_points) == (trials if fixed_list else 0)
    if design != "search":
        assert s.searcher == "random"  # the design chooses; the searcher key does not apply
    assert f"design: {design}" in s.summary()


CONDITIONAL = BASE.replace("  qk_norm: [none, l2]\n", "  qk_norm: [none, l2]\n"
                           "  qk_norm_gain: {type: float, values: [4.0, 8.0], "
                           "when: {qk_norm: l2}}\n")
RANGE = BASE.replace("{type: float, values: [0.0, 0.1, 0.2]}", "{type: float, low: 0, high: 0.2}")
BAD = [
    pytest.param(BASE + "design: grid\n", "design.kind: 'grid'", id="unknown-design"),
    pytest.param(BASE + "design: [factorial]\n", "design: expected one of", id="design-list"),
    pytest.param(RANGE + "design: factorial\n",
                 "params.attn_dropout: design factorial needs explicit levels; write "
                 "{type: float, values: [...]}", id="factorial-range"),
    pytest.param(RANGE + "design: {kind: one_at_a_time, bases: 2}\n",
                 "params.attn_dropout: design one_at_a_time needs explicit levels",
                 id="oat-range"),
    pytest.param(CONDITIONAL + "design: factorial\n",
                 "params.qk_norm_gain: design factorial does not take conditional params",
                 id="factorial-conditional"),
    pytest.param(CONDITIONAL + "design: {kind: one_at_a_time, bases: 2}\n",
                 "does not take conditional params", id="oat-conditional"),
    pytest.param(BASE + "design: factorial\nnum_trials: 10\n",
                 f"num_trials: 10, but design factorial runs {GRID} trials", id="num-trials"),
    pytest.param(BASE + "design: {kind: one_at_a_time, bases: 2}\nnum_trials: 10\n",
                 "design one_at_a_time runs 14 trials", id="oat-num-trials"),
    pytest.param(BASE + "design: {kind: factorial, fraction: 0.05}\n",
                 "design.fraction: 0.05 keeps 2 of 36 feasible grid points, fewer than the 3 "
                 "the smallest set found holding every level of every param has; use "
                 "fraction >= 0.09",
                 id="fraction-too-small"),
    pytest.param(BASE + "design: {kind: factorial, fraction: 1.5}\n",
                 "design.fraction: expected a number in (0, 1]", id="fraction-range"),
    pytest.param(BASE + "design: {kind: factorial, fraction: 0}\n", "design.fraction",
                 id="fraction-zero"),
    pytest.param(BASE + "design: {kind: factorial, bases: 2}\n",
                 "design.bases: not a key of design factorial", id="bases-on-factorial"),
    pytest.param(BASE + "design: {kind: random, fraction: 0.5}\n", "design.fraction: not a key",
                 id="fraction-on-random"),
    pytest.param(BASE + "design: one_at_a_time\n", "one_at_a_time needs bases", id="no-bases"),
    pytest.param(BASE + "design: {kind: one_at_a_time, bases: 0}\n", "design.bases: must be >= 1",
                 id="zero-bases"),
    pytest.param(BASE + "design: {kind: one_at_a_time, bases: 99}\n",
                 "design.bases: only 36 distinct feasible base configurations", id="many-bases"),
    pytest.param(BASE + "design: {kind: search}\ndesign_x: 1\n", "unknown key 'design_x'",
                 id="unknown-top-key"),
    pytest.param(BASE + "design: random\nsearcher: tpe\n",
                 "searcher: tpe contradicts design random", id="random-with-tpe"),
    pytest.param(BASE + "design: factorial\nsearcher: random\n",
                 "searcher: random contradicts design factorial", id="factorial-with-searcher"),
    pytest.param(BASE.replace("{epochs: 2}", "{epochs: 2, grace_period: 1}") + "design: random\n",
                 "budget.grace_period: design random has no early stopping", id="asha-key"),
    pytest.param(BASE + "design: factorial\nconstraints: ['n_heads != 4']\n",
                 "params.n_heads: level 4 is in no feasible grid point", id="dead-level"),
    pytest.param(BASE + "design: factorial\nconstraints: ['n_heads > 8']\n",
                 "constraints: no configuration", id="no-feasible-point"),
    pytest.param(BASE.replace("values: [0.0, 0.1, 0.2]}", "values: [0.0, 0.1], low: 0}"),
                 "give either values or low/high", id="values-and-range"),
    pytest.param(BASE.replace("values: [0.0, 0.1, 0.2]}", "values: [0.0, 0.1, 0.1]}"),
                 "values: a value is repeated", id="repeated-level"),
    pytest.param(BASE.replace("n_heads: [1, 2, 4]", "n_heads: {type: float, values: [1, 2]}"),
                 "n_heads is an int field; use type: int", id="int-levels-as-float"),
    pytest.param(BASE + "analysis: {min_effect: {test_accuracy: 0.01}}\n",
                 "analysis.min_effect.test_accuracy: unknown metric", id="effect-metric"),
    pytest.param(BASE + "analysis: {min_effect: {test_acc: 0}}\n",
                 "analysis.min_effect.test_acc: expected a finite number > 0", id="effect-zero"),
    pytest.param(BASE + "analysis: {min_effect: {test_acc: .inf}}\n",
                 "expected a finite number > 0", id="effect-inf"),
    pytest.param(BASE + "analysis: {min_effect: {ece: -0.1}}\n", "min_effect.ece",
                 id="effect-negative"),
    pytest.param(BASE + "analysis: {min_effect: [test_acc]}\n", "analysis.min_effect: expected a "
                 "mapping", id="effect-list"),
    pytest.param(BASE + "analysis: {min_trials: 0}\n", "analysis.min_trials: must be >= 1",
                 id="min-trials"),
    pytest.param(BASE + "analysis: {min_trial: 3}\n", "analysis.min_trial: unknown key",
                 id="analysis-key"),
    pytest.param(BASE + "vary_data_seed: maybe\n", "vary_data_seed: expected true or false",
                 id="vary-not-bool"),
]


@pytest.mark.parametrize(("text", "needle"), BAD)
def test_bad_designs_one_line_errors(tmp_path: Path, text: str, needle: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(SpaceError) as e:
        load_space(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and needle in msg, msg


def test_bad_design_exits_2_from_the_cli(cli, tmp_path: Path) -> None:
    r = cli("spaces", "validate", str(write(tmp_path, RANGE + "design: factorial\n")))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "needs explicit levels" in r.stderr


# --- the configurations of each design ---------------------------------------------------------

def _key(point: dict[str, Any]) -> tuple:
    return tuple(point[k] for k in LEVELS)


@pytest.mark.parametrize("seed", [pytest.param(0, id="seed0"), pytest.param(7, id="seed7")])
def test_factorial_is_exactly_the_product(seed: int) -> None:
    s = space(f"design: factorial\nsearcher_seed: {seed}\n")
    keys = [_key(p) for p in s.design_points]
    assert sorted(keys, key=repr) == sorted(itertools.product(*LEVELS.values()), key=repr)
    assert all(set(p) == set(LEVELS) for p in s.design_points)  # sampled params only


def test_factorial_drops_infeasible_points_and_says_so(cli, tmp_path: Path) -> None:
    extra = "design: factorial\nconstraints: [\"not (n_heads == 4 and norm == 'post_ln')\"]\n"
    s = space(extra)
    expected = [c for c in itertools.product(*LEVELS.values()) if c[:2] != (4, "post_ln")]
    assert sorted(map(_key, s.design_points), key=repr) == sorted(expected, key=repr)
    assert s.num_trials == len(expected) == GRID - 6
    assert "36 grid points, 6 infeasible dropped" in s.design_note
    out = cli("spaces", "validate", str(write(tmp_path, BASE + extra)))
    assert out.returncode == 0 and "6 infeasible dropped" in out.stdout
    assert f"-> {GRID - 6} trials" in out.stdout


@pytest.mark.parametrize(("fraction", "seed"), [
    pytest.param(0.1, 0, id="0.1"),
    pytest.param(0.25, 1, id="0.25"),
    pytest.param(0.5, 2, id="0.5"),
    pytest.param(0.9, 3, id="0.9"),
])
def test_fractional_factorial_keeps_every_level(fraction: float, seed: int) -> None:
    s = space(f"design: {{kind: factorial, fraction: {fraction}}}\nsearcher_seed: {seed}\n")
    keys = [_key(p) for p in s.design_points]
    assert len(keys) == round(fraction * GRID) == s.num_trials
    assert len(set(keys)) == len(keys)  # a subset of the grid, no repeats
    assert set(keys) <= set(itertools.product(*LEVELS.values()))
    for i, levels in enumerate(LEVELS.values()):
        assert {k[i] for k in keys} == set(levels)
    again = space(f"design: {{kind: factorial, fraction: {fraction}}}\nsearcher_seed: {seed}\n")
    assert again.design_points == s.design_points  # seeded


@pytest.mark.parametrize("bases", [pytest.param(1, id="1"), pytest.param(2, id="2"),
                                   pytest.param(4, id="4")])
def test_one_at_a_time_varies_one_param_around_each_base(bases: int) -> None:
    s = space(f"design: {{kind: one_at_a_time, bases: {bases}}}\nsearcher_seed: 3\n")
    per = 1 + sum(len(v) - 1 for v in LEVELS.values())
    # every point once: a point two bases share (bases fewer than 3 params apart, where no 4
    # are that far apart in this 36-point space) is not run twice
    keys = [_key(p) for p in s.design_points]
    assert len(set(keys)) == len(keys) == s.num_trials
    repeats = bases * per - s.num_trials
    assert (f"{repeats} repeated dropped" in s.design_note) == (repeats > 0)
    if repeats:  # the blocks are no longer whole: the points are distinct, as checked
        assert bases == 4
        return
    blocks = [s.design_points[i * per:(i + 1) * per] for i in range(bases)]
    assert len({_key(b[0]) for b in blocks}) == bases  # distinct bases
    for block in blocks:
        base, variations = block[0], block[1:]
        varied: dict[str, set] = {k: set() for k in LEVELS}
        for v in variations:
            (diff,) = [k for k in LEVELS if v[k] != base[k]]  # exactly one param differs
            varied[diff].add(v[diff])
        for k, levels in LEVELS.items():  # every other level of every param, once
            assert varied[k] == set(levels) - {base[k]}


def test_one_at_a_time_drops_infeasible_variations() -> None:
    s = space("design: {kind: one_at_a_time, bases: 2}\n"
              "constraints: [\"not (n_heads == 4 and norm == 'post_ln')\"]\n")
    assert s.num_trials == len(s.design_points) < 2 * 7
    assert "infeasible dropped" in s.design_note
    assert all(infeasible(s, p) is None for p in s.design_points)


def test_numeric_levels_in_the_search_design_are_chosen_among() -> None:
    s = space("design: search\nsearcher: random\n")
    p = s.param("attn_dropout")
    assert p is not None and p.levels == (0.0, 0.1, 0.2) and (p.low, p.high) == (0.0, 0.2)
    rng = random.Random(0)
    assert {s.sample(rng)["attn_dropout"] for _ in range(60)} == {0.0, 0.1, 0.2}
    search = StudySearch(s)
    seen = set()
    for i in range(30):
        cfg = search.suggest(f"t{i}")
        assert cfg is not None
        seen.add(cfg["attn_dropout"])
    assert seen == {0.0, 0.1, 0.2}


# --- the searcher hands out exactly the design's configurations ----------------------------

@pytest.mark.parametrize("extra", [
    pytest.param("design: factorial\n", id="factorial"),
    pytest.param("design: {kind: factorial, fraction: 0.25}\n", id="fraction"),
    pytest.param("design: {kind: one_at_a_time, bases: 2}\n", id="one-at-a-time"),
])
def test_study_search_suggests_the_design_in_order(extra: str) -> None:
    s = space(extra + "searcher_seed: 5\n")
    assert isinstance(make_sampler(s), optuna.samplers.RandomSampler)
    search = StudySearch(s)
    got = []
    for i in range(s.num_trials):
        cfg = search.suggest(f"t{i}")
        assert cfg is not None and {k: cfg[k] for k in s.fixed} == s.fixed
        got.append({k: cfg[k] for k in cfg if k not in s.fixed})
        search.on_trial_complete(f"t{i}", TrialReport(2, {"val_acc": 0.5},
                                                      Outcome.COMPLETED).to_ray())
    assert got == list(s.design_points)
    assert search.suggest("one_more") == FINISHED
    assert [t.state for t in search.study.trials] == [State.COMPLETE] * s.num_trials
    assert search.resampled == 0


def test_a_restored_design_search_goes_on_where_it_stopped(tmp_path: Path) -> None:
    s = space("design: {kind: one_at_a_time, bases: 2}\n")
    a = StudySearch(s)
    first = [a.suggest(f"t{i}") for i in range(3)]
    a.save(str(tmp_path / "s.pkl"))
    pickle.loads(pickle.dumps(a))  # Ray pickles the searcher with the tuner
    b = StudySearch(s)
    b.restore(str(tmp_path / "s.pkl"))
    rest = [b.suggest(f"u{i}") for i in range(s.num_trials - 3)]
    strip = [{k: c[k] for k in c if k not in s.fixed} for c in first + rest if c is not None]
    assert strip == list(s.design_points) and b.suggest("x") == FINISHED


def test_random_design_samples_with_a_seeded_random_sampler() -> None:
    s = space("design: random\nsearcher_seed: 4\nnum_trials: 4\n")
    sampler = make_sampler(s)
    assert isinstance(sampler, optuna.samplers.RandomSampler)
    a = [StudySearch(s).suggest("t") for _ in range(2)]
    assert a[0] == a[1]  # the same seed, the same first configuration
    assert StudySearch(s).suggest("t") != StudySearch(s.replace(searcher_seed=5)).suggest("t")


# --- no early stopping outside `search` ---------------------------------------------------------

@pytest.mark.parametrize(("extra", "scheduler"), [
    pytest.param("", "AsyncHyperBandScheduler", id="search"),
    pytest.param("design: random\n", "FIFOScheduler", id="random"),
    pytest.param("design: factorial\n", "FIFOScheduler", id="factorial"),
    pytest.param("design: {kind: one_at_a_time, bases: 1}\n", "FIFOScheduler", id="oat"),
])
def test_scheduler_per_design(extra: str, scheduler: str) -> None:
    from study.sweep.lifecycle import _scheduler

    assert type(_scheduler(space(extra))).__name__ == scheduler


def test_trials_override_is_refused_for_a_fixed_design() -> None:
    from study.sweep.lifecycle import override

    s = space("design: factorial\n")
    assert override(s, {"num_trials": GRID}).num_trials == GRID
    with pytest.raises(SpaceError, match=f"--trials: design factorial runs exactly {GRID}"):
        override(s, {"num_trials": 5})
    assert override(space("design: random\n"), {"num_trials": 5}).num_trials == 5


def test_flags_are_checked_and_followed_like_the_files_values() -> None:
    """--gpu, --epochs, --max-concurrent are written into the file's text, which is parsed
    again: the defaults that follow them (seed batching on a GPU) follow, and so do the checks
    and a fixed design's points; the text kept is the user's file."""
    from study.sweep.lifecycle import override

    base = space("")
    assert base.gpu == 0 and base.seed_batching == "lockstep"
    packed = override(base, {"gpu": 0.125, "max_concurrent": 8, "epochs": 3})
    assert (packed.gpu, packed.seed_batching, packed.max_concurrent) == (0.125, "vmap", 8)
    assert packed.epochs == packed.fixed["epochs"] == 3 and packed.text == base.text
    kept = space("seed_batching: lockstep\n")
    assert override(kept, {"gpu": 1.0}).seed_batching == "lockstep"  # the file's own choice
    grid = space("design: factorial\n")
    longer = override(grid, {"epochs": 3})  # the file's budget is 2
    assert longer.epochs == longer.fixed["epochs"] == 3
    assert longer.design_points == grid.design_points and longer.num_trials == grid.num_trials
    with pytest.raises(SpaceError, match=r"--epochs 3: .*constraint 'epochs <= 2'"):
        override(space("design: factorial\nconstraints: ['epochs <= 2']\n"), {"epochs": 3})
    assert override(space(""), {"num_trials": 1}).num_trials == 1  # a short trial run


def test_the_trainable_gets_the_vary_data_seed_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray import tune

    from study.sweep.lifecycle import _trainable

    seen: dict[str, Any] = {}
    monkeypatch.setattr(tune, "with_parameters", lambda fn, **kw: seen.update(kw) or fn)
    monkeypatch.setattr(tune, "with_resources", lambda fn, res: fn)
    _trainable(space("seeds: 3\n"))
    assert seen == {"seeds": 3, "vary_data_seed": True, "seed_batching": "lockstep",
                    "cpus": 1.0, "gpu": 0.0}
    _trainable(space("vary_data_seed: false\n"))
    assert seen["vary_data_seed"] is False


# --- replicates with their own data seed --------------------------------------------------------

def test_lockstep_varies_the_data_seed_per_replicate(one_thread) -> None:
    from study.config import make_config
    from study.train import run_trial
    from study.trainable import lockstep

    config = {"task": "digits", "d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2,
              "epochs": 1, "batch_size": 256, "device": "cpu", "seed": 3, "data_seed": 5}
    (varied,) = lockstep(config, seeds=2, vary_data_seed=True)
    (shared,) = lockstep(config, seeds=2)  # the default keeps one data split
    cfg = make_config(config)
    for k in range(2):
        alone = list(run_trial(cfg.replace(seed=3 + k, data_seed=5 + k)))[-1].metrics
        for m in ("val_acc", "test_acc", "train_loss"):
            assert varied.metrics[f"seed_{k}/{m}"] == alone[m]
    assert varied.metrics["seed_0/test_acc"] == shared.metrics["seed_0/test_acc"]
    assert varied.metrics["seed_1/test_loss"] != shared.metrics["seed_1/test_loss"]
    assert varied.outcome is Outcome.COMPLETED


# --- analysis settings and the JSON round trip ------------------------------------------------

def test_analysis_settings_merge_over_the_defaults() -> None:
    assert set(DEFAULT_MIN_EFFECT) <= set(ALL_METRICS)
    assert DEFAULT_MIN_EFFECT["test_acc"] == 0.01 and DEFAULT_MIN_EFFECT["gen_gap_loss"] == 0.02
    s = space("analysis: {min_effect: {test_acc: 0.05, attn_entropy: 0.1}, min_trials: 5}\n")
    assert s.min_effect == {**DEFAULT_MIN_EFFECT, "test_acc": 0.05, "attn_entropy": 0.1}
    assert s.min_trials == 5
    d = space("")
    assert d.min_effect == DEFAULT_MIN_EFFECT and d.min_trials == 3 and d.vary_data_seed
    assert "min_effect: attn_entropy=0.1, test_acc=0.05 (others default)" in s.summary()


@pytest.mark.parametrize("extra", [
    pytest.param("design: factorial\nvary_data_seed: false\n", id="factorial"),
    pytest.param("design: {kind: factorial, fraction: 0.5}\n", id="fraction"),
    pytest.param("design: {kind: one_at_a_time, bases: 2}\nanalysis: {min_trials: 4}\n",
                 id="oat"),
    pytest.param("design: random\nanalysis: {min_effect: {ece: 0.03}}\n", id="random"),
])
def test_sweep_spec_json_round_trip(extra: str) -> None:
    s = space(extra)
    back = SweepSpec.from_json(s.to_json())
    assert back == s
    assert (back.design, back.design_fraction, back.design_bases, back.min_effect,
            back.min_trials, back.vary_data_seed) == (s.design, s.design_fraction,
                                                      s.design_bases, s.min_effect,
                                                      s.min_trials, s.vary_data_seed)


def test_sweep_spec_json_round_trip_keeps_tuple_valued_levels() -> None:
    """Levels (and `when` values) of a tuple-valued field come back as tuples, not JSON's
    lists, so `levels`, `active` and membership tests agree on a spec read back."""
    s = parse_space("task: copy\nfixed: {vocab_size: 16}\nparams:\n"
                    "  ood_len_factors: [[2.0, 4.0], [3.0]]\n"
                    "  attn_dropout: {type: float, low: 0.0, high: 0.2,\n"
                    "                 when: {ood_len_factors: [[3.0]]}}\n", "t.yaml")
    back = SweepSpec.from_json(s.to_json())
    assert back == s
    assert back.params[0].values == ((2.0, 4.0), (3.0,))
    assert back.params[1].active({"ood_len_factors": (3.0,)})


def test_older_sweep_spec_json_loads_with_defaults() -> None:
    d = json.loads(space("").to_json())
    for key in ("design", "design_fraction", "design_bases", "design_points", "design_note",
                "min_effect", "min_trials", "vary_data_seed"):
        d.pop(key)
    old = SweepSpec.from_json(json.dumps(d))
    assert old.design == "search" and old.design_points == () and old.early_stopping
    assert old.min_effect == DEFAULT_MIN_EFFECT and old.min_trials == 3
    assert old.vary_data_seed is False  # older sweeps shared one data split across replicates


# --- the shipped spaces -------------------------------------------------------------------------

def test_default_space_is_unbiased() -> None:
    s = load_space(ROOT / "search_spaces" / "default.yaml")
    assert not s.early_stopping and s.design in ("random", "factorial")
    assert s.vary_data_seed
    # the size the README states: 36 trials x 2 seeds x 10 epochs
    assert (s.num_trials, s.seeds, s.epochs) == (36, 2, 10)
    smoke = load_space(ROOT / "search_spaces" / "smoke.yaml")
    assert smoke.design == "search" and smoke.early_stopping


def test_factorial_smoke_ships() -> None:
    s = load_space(ROOT / "search_spaces" / "factorial_smoke.yaml")
    assert s.design == "factorial" and s.num_trials == 10 == len(s.design_points)


# --- one tiny real sweep without early stopping -----------------------------------------------

@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module."""
    from study.sweep.lifecycle import init_ray, sweep_environment

    with sweep_environment():
        init_ray(None)
        yield


@pytest.mark.slow
def test_a_factorial_sweep_trains_every_point_to_the_end(ray_session, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from study.sweep import run_sweep

    text = """
name: tiny_factorial
task: digits
fixed: {d_model: 16, d_ff: 32, n_layers: 1, batch_size: 256, n_heads: 2}
params:
  qk_norm: [none, l2]
  attn_dropout: {type: float, values: [0.0, 0.1]}
design: factorial
budget: {epochs: 3}
seeds: 2
objective: {metric: val_acc, mode: max}
max_concurrent: 2
"""
    path = write(tmp_path, text)
    spec = load_space(path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from ray.tune import Callback

    from study.records import REPORT_COMPUTE_S

    class Seconds(Callback):
        """What each result says its epoch took to compute (the trials' own time: Ray's
        time_this_iter_s leaves out what was computed ahead, `study.ahead`)."""

        def __init__(self) -> None:
            self.seen: list[float] = []

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.seen.append(result[REPORT_COMPUTE_S])

    seconds = Seconds()
    summary = run_sweep(path, tracking_uri=uri, storage=tmp_path / "ray", callbacks=[seconds])
    assert len(seconds.seen) == 4 * 3 and all(s > 0 for s in seconds.seen)
    assert summary["complete"] and summary["done"] == 4
    assert summary["counts"]["completed"] == 4 and summary["counts"]["early_stopped"] == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny_factorial")
    runs = [TrialRecord.from_mlflow(r) for r in client.search_runs([exp.experiment_id])
            if "mlflow.parentRunId" in r.data.tags]
    assert all(r.outcome is Outcome.COMPLETED for r in runs)
    got = sorted((r.config["qk_norm"], r.config["attn_dropout"]) for r in runs)
    assert got == sorted((p["qk_norm"], p["attn_dropout"]) for p in spec.design_points)


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed{s}") for s in range(8)])
def test_a_fraction_a_small_enough_cover_allows_is_accepted_whatever_the_seed(seed: int) -> None:
    """6 feasible points of a 3 x 3 grid, fraction 0.5 keeps 3, and 3 points hold every level:
    accepted for every searcher seed (one greedy cover, in the seed's order, could need 4)."""
    s = parse_space("task: digits\nfixed: {d_model: 64}\nparams:\n  n_heads: [1, 2, 4]\n"
                    "  norm: [pre_ln, post_ln, rmsnorm]\nconstraints:\n"
                    "  - n_heads != 2 or norm == 'pre_ln'\n"
                    "  - not (n_heads == 4 and norm == 'rmsnorm')\n"
                    f"design: {{kind: factorial, fraction: 0.5}}\nsearcher_seed: {seed}\n",
                    "c.yaml")
    assert len(s.design_points) == 3
    assert {p["n_heads"] for p in s.design_points} == {1, 2, 4}
    assert {p["norm"] for p in s.design_points} == {"pre_ln", "post_ln", "rmsnorm"}
