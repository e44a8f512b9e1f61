"""The task table and the data cache, checked against independent sources: the table against
`CHOICES` and the builders that exist, the cache key (`DATA_FIELDS`) against fresh builds and
the fields the task code reads, and every task against a one-epoch trial."""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch

import study
import study.tasks as T
from study.config import CHOICES, ConfigError, TrialConfig
from study.metrics import CORE_METRICS
from study.tasks.base import Split, TaskData

SAMPLE = Path(study.__file__).parent / "data" / "sample_sentiment.csv"
FIELDS = tuple(f.name for f in fields(TrialConfig))
NON_DATA = tuple(f for f in FIELDS if f not in T.DATA_FIELDS)


@pytest.fixture(autouse=True)
def fresh_cache():
    """No test sees (or leaves) data another test built through `get_task`."""
    T._CACHE.clear()
    yield
    T._CACHE.clear()




# ---------------------------------------------------------------- the table


def discovered_builders() -> set[tuple[str, str]]:
    """(module, function) of every public function in the modules of `study.tasks` that takes
    one argument and returns a `TaskData`: the builders that exist, found without the table."""
    found = set()
    for info in pkgutil.iter_modules(T.__path__):
        mod = importlib.import_module(f"study.tasks.{info.name}")
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if fn.__module__ != mod.__name__ or name.startswith("_"):
                continue
            sig = inspect.signature(fn)
            if sig.return_annotation in ("TaskData", TaskData) and len(sig.parameters) == 1:
                found.add((info.name, name))
    return found


def test_table_choices_and_existing_builders_agree():
    assert CHOICES["task"] == tuple(T.TASKS)  # config's choices are read from the table
    table = {(e.module, e.builder) for e in T.TASKS.values()}
    assert len(table) == len(T.TASKS), "two tasks share a builder"
    assert table == discovered_builders()
    for name in T.TASKS:
        fn = T.builder(name)
        assert callable(fn) and list(inspect.signature(fn).parameters) == ["cfg"], name


def test_rng_tags_are_unique_and_keep_their_values():
    tags = {name: e.rng_tag for name, e in T.TASKS.items() if e.rng_tag is not None}
    assert len(set(tags.values())) == len(tags)
    # part of the generated data: a changed tag changes that task's data for every data_seed
    assert tags == {"copy": 1, "reverse": 2, "sort": 3, "associative_recall": 4,
                    "many_class": 5, "listops": 6}
    assert {n for n, e in T.TASKS.items() if e.module == "sequences"} == set(tags)
    with pytest.raises(KeyError, match="digits"):
        T.rng_tag("digits")


# ---------------------------------------------------------------- the cache key


def candidates(name: str, value: Any) -> list[Any]:
    """Values to try in place of `value` for field `name`, most local first."""
    if isinstance(value, bool):
        return [not value]
    if name in CHOICES:
        return [c for c in CHOICES[name] if c != value]
    if isinstance(value, int):
        return [value + 1, value * 2, value - 1, 1, 2, 8]
    if isinstance(value, float):
        return [value + 0.1, value * 2, value / 2, 0.5, 1.5]
    if isinstance(value, tuple):
        return [tuple(v + 0.5 for v in value), value + (value[-1] + 1,)]
    if isinstance(value, str):
        return [value + "_alt"]
    raise AssertionError(f"no candidate values for {name}={value!r}")


def changed(cfg: TrialConfig, name: str) -> TrialConfig:
    """`cfg` with field `name` set to another valid value."""
    for v in candidates(name, getattr(cfg, name)):
        try:
            return cfg.replace(**{name: v})
        except ConfigError:
            continue
    raise AssertionError(f"{name}: no valid alternative to {getattr(cfg, name)!r}")


DIGITS = TrialConfig(task="digits", device="cpu")
# the generic stressors on, so their random draws are part of what is compared
STRESSED = {"train_fraction": 0.5, "label_noise": 0.1, "imbalance": 2.0}
FRESH_BASES = {
    "digits": DIGITS.replace(**STRESSED),
    "many_class": TrialConfig(task="many_class", n_train=256, n_classes=8, vocab_size=8,
                              max_len=8, device="cpu", **STRESSED),
}


def test_data_fields_are_the_marked_config_fields():
    assert T.DATA_FIELDS == T.data_fields()
    assert "task" in T.DATA_FIELDS and "data_seed" in T.DATA_FIELDS
    assert "seed" not in T.DATA_FIELDS  # replicates share their data


def test_every_config_field_read_by_task_code_is_a_data_field():
    """An independent source: the `cfg.<field>` the task modules read (builders and
    stressors) must all be in the cache key, or configs that differ in them would share data."""
    read = set()
    for path in Path(T.__file__).parent.glob("*.py"):
        read |= set(re.findall(r"\bcfg\.([a-z_][a-z0-9_]*)\b", path.read_text()))
    read &= set(FIELDS)  # not methods such as cfg.replace
    assert read, "no cfg.<field> found: the pattern no longer matches the task code"
    assert read <= set(T.DATA_FIELDS), sorted(read - set(T.DATA_FIELDS))


@pytest.mark.parametrize("name", [pytest.param(f, id=f) for f in NON_DATA])
def test_non_data_field_hits_the_cache(name):
    assert T.get_task(changed(DIGITS, name)) is T.get_task(DIGITS)


@pytest.mark.parametrize("name", [pytest.param(f, id=f) for f in T.DATA_FIELDS])
def test_data_field_misses_the_cache(name):
    base = T.get_task(DIGITS)
    assert T.get_task(changed(DIGITS, name)) is not base


def all_splits(data: TaskData) -> dict[str, Split]:
    return {"train": data.train, "val": data.val, "test": data.test, **data.extra}


def assert_identical(a: TaskData, b: TaskData) -> None:
    assert a.spec == b.spec and a.id_lengths == b.id_lengths
    assert (a.train_counts is None) == (b.train_counts is None)
    if a.train_counts is not None:
        assert a.train_counts.tolist() == b.train_counts.tolist()
    sa, sb = all_splits(a), all_splits(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        for t in ("x", "y", "mask"):
            assert torch.equal(getattr(sa[k], t), getattr(sb[k], t)), (k, t)


@pytest.fixture(scope="module")
def reference() -> dict[str, TaskData]:
    T._CACHE.clear()
    out = {task: T.get_task(cfg) for task, cfg in FRESH_BASES.items()}
    T._CACHE.clear()
    return out


@pytest.mark.parametrize("name", [pytest.param(f, id=f) for f in NON_DATA])
@pytest.mark.parametrize("task", list(FRESH_BASES))
def test_non_data_field_does_not_shape_fresh_data(task, name, reference):
    """Built afresh (cache cleared) with the field changed, the data (stressors included) is
    identical: the field may safely be left out of the cache key."""
    T._CACHE.clear()
    assert_identical(T.get_task(changed(FRESH_BASES[task], name)), reference[task])


# ---------------------------------------------------------------- every task runs a trial

SMALL = {"epochs": 1, "n_train": 256, "d_model": 32, "n_heads": 2, "d_ff": 64, "device": "cpu"}
TASK_OVERRIDES: dict[str, dict[str, Any]] = {
    # needs as many keys as pairs in its longest length set (4 x max_len = 64)
    "associative_recall": {"vocab_size": 64},
    "text_file": {"data_path": str(SAMPLE)},
}


@pytest.mark.parametrize("task", [pytest.param(t, id=t) for t in T.TASKS])
def test_every_task_runs_a_one_epoch_trial(task, one_thread):
    from study.train import run_trial

    cfg = TrialConfig(task=task, **{**SMALL, **TASK_OVERRIDES.get(task, {})})
    *_, last = run_trial(cfg)
    missing = set(CORE_METRICS) - set(last.metrics)
    assert not missing, sorted(missing)
    bad = {k: v for k, v in last.metrics.items() if not math.isfinite(v)}
    assert not bad, bad


@pytest.mark.parametrize("task,padded", [("mnist1d", False), ("digits", False),
                                         ("listops", True), ("sort", True)])
def test_get_task_tells_the_model_whether_any_split_is_padded(task, padded):
    data = T.get_task(TrialConfig(task=task, n_train=256))
    splits = [data.train, data.val, data.test, *data.extra.values()]
    assert data.spec.padded is padded
    assert padded == any(not bool(s.mask.all()) for s in splits)
