"""The task table `TASKS` (the single source of task names) and `get_task(cfg)`, which builds a
task's data once per process.

Adding a task: write its builder `fn(cfg: TrialConfig) -> TaskData` in a module of this package
and add one `TASKS` row; `CHOICES["task"]` in `study/config.py` is read from the table.

This module imports only the standard library at import time: `study/config.py` imports
`TASKS` from it, so it must not import `study.config` (or torch) before a task is built.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from study.config import TrialConfig
    from study.tasks.base import TaskData

Builder = Callable[["TrialConfig"], "TaskData"]


@dataclass(frozen=True)
class TaskEntry:
    """Where a task's builder lives, and the integer its data RNG seeds mix in."""

    module: str  # the module `study.tasks.<module>` that defines the builder
    builder: str  # the builder's name in that module: fn(cfg) -> TaskData
    rng_tag: int | None = None  # generated sequence tasks: seeds are [data_seed, rng_tag, ...]


# name -> entry, in display order (the order of CHOICES["task"]). The rng_tag values are part
# of the generated data: changing one changes that task's data for every data_seed.
TASKS: dict[str, TaskEntry] = {
    "digits": TaskEntry("digits", "build"),
    "mnist1d": TaskEntry("mnist1d", "build"),
    "copy": TaskEntry("sequences", "build_copy", rng_tag=1),
    "reverse": TaskEntry("sequences", "build_reverse", rng_tag=2),
    "sort": TaskEntry("sequences", "build_sort", rng_tag=3),
    "associative_recall": TaskEntry("sequences", "build_associative_recall", rng_tag=4),
    "listops": TaskEntry("sequences", "build_listops", rng_tag=6),
    "many_class": TaskEntry("sequences", "build_many_class", rng_tag=5),
    "text_file": TaskEntry("text_file", "build"),
}

_CACHE: dict[tuple, TaskData] = {}  # insertion-ordered; the oldest entry goes first
CACHE_SIZE = 4


def rng_tag(name: str) -> int:
    """The integer task `name` mixes into its data RNG seeds (generated sequence tasks)."""
    tag = TASKS[name].rng_tag
    if tag is None:
        raise KeyError(f"task {name!r} has no rng_tag in study.tasks.TASKS")
    return tag


def builder(name: str) -> Builder:
    """The builder of task `name` (its module is imported on first use)."""
    entry = TASKS[name]
    return getattr(importlib.import_module(f"study.tasks.{entry.module}"), entry.builder)


@functools.cache
def data_fields() -> tuple[str, ...]:
    """The config fields that shape the data: those marked `data_field` in study/config.py."""
    from study.config import TrialConfig

    return tuple(f.name for f in fields(TrialConfig) if f.metadata.get("data"))


def __getattr__(name: str) -> tuple[str, ...]:
    # `DATA_FIELDS` (= data_fields()), the fields the cache key is built from (never `seed`), is
    # computed on first access: study.config cannot be imported while it imports this module
    if name == "DATA_FIELDS":
        return data_fields()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_task(cfg: TrialConfig) -> TaskData:
    """Build (or fetch from the per-process cache) the data of `cfg.task`, with the training
    stressors of `study/tasks/stressors.py` applied."""
    from study.tasks.stressors import apply_stressors

    key = tuple(getattr(cfg, f) for f in data_fields())
    if key not in _CACHE:
        while len(_CACHE) >= CACHE_SIZE:  # reused Ray workers see many variants of a task
            _CACHE.pop(next(iter(_CACHE)))
        data = apply_stressors(cfg, builder(cfg.task)(cfg))
        # what the model may assume about its inputs: measured here, once, on the host
        data.spec = replace(data.spec, padded=data.has_padding())
        _CACHE[key] = data
    return _CACHE[key]
