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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from study.config import TrialConfig
    from study.tasks.base import TaskData

Builder = Callable[["TrialConfig"], "TaskData"]


@dataclass(frozen=True)
class TaskEntry:
    """Where a task's builder lives, the integer its data RNG seeds mix in, and what the task
    is known to need before any of its data is built (checked by `conflict`)."""

    module: str  # the module `study.tasks.<module>` that defines the builder
    builder: str  # the builder's name in that module: fn(cfg) -> TaskData
    rng_tag: int | None = None  # generated sequence tasks: seeds are [data_seed, rng_tag, ...]
    per_token: bool = False  # a target per input position (no class counts, no long tail)
    truncatable: bool = True  # False where the label needs the end of the input
    symbols: bool = False  # draws its content symbols from `vocab_size` (at least 2)
    distinct_keys: bool = False  # a row's keys are distinct symbols: vocab_size >= longest row


# name -> entry, in display order (the order of CHOICES["task"]). The rng_tag values are part
# of the generated data: changing one changes that task's data for every data_seed.
TASKS: dict[str, TaskEntry] = {
    "digits": TaskEntry("digits", "build"),
    "mnist1d": TaskEntry("mnist1d", "build"),
    "copy": TaskEntry("sequences", "build_copy", rng_tag=1, per_token=True, symbols=True),
    "reverse": TaskEntry("sequences", "build_reverse", rng_tag=2, per_token=True, symbols=True),
    "sort": TaskEntry("sequences", "build_sort", rng_tag=3, per_token=True, symbols=True),
    "associative_recall": TaskEntry("sequences", "build_associative_recall", rng_tag=4,
                                    truncatable=False, symbols=True, distinct_keys=True),
    "listops": TaskEntry("sequences", "build_listops", rng_tag=6, truncatable=False),
    "many_class": TaskEntry("sequences", "build_many_class", rng_tag=5, symbols=True),
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


def length_grid(lo: int, hi: int, factors: Sequence[float]) -> list[int]:
    """Evaluation lengths of a generated sequence task: up to 6 evenly spaced in [lo, hi], then
    round(f * hi) for every OOD factor (at least hi + 1) and the midpoint between hi and each."""
    grid = {lo + round(i * (hi - lo) / 5) for i in range(6)}
    for f in factors:
        far = max(hi + 1, round(f * hi))
        grid.add(far)
        mid = round((hi + far) / 2)
        if hi < mid < far:
            grid.add(mid)
    return sorted(grid)


def conflict(cfg: TrialConfig) -> str | None:
    """Why `cfg` asks its task for something the task cannot give (None: nothing), known from
    the task table alone, so a search space is refused before any data is built."""
    entry = TASKS[cfg.task]
    if entry.per_token and (cfg.imbalance > 1 or cfg.label_noise > 0):
        return (f"imbalance/label_noise: task {cfg.task} has per-token targets; long tail and "
                "label noise apply to classification tasks")
    if cfg.length_mode == "truncate" and (entry.per_token or not entry.truncatable):
        return (f"length_mode: truncate would cut the labelled end of task {cfg.task}'s inputs; "
                "use pad or bucket")
    if entry.symbols and cfg.vocab_size < 2:
        return f"vocab_size: task {cfg.task} needs at least 2 symbols"
    if entry.distinct_keys:
        longest = max(length_grid(cfg.min_len, cfg.max_len, cfg.ood_len_factors))
        if longest > cfg.vocab_size:
            return (f"vocab_size: {cfg.vocab_size} keys, but {cfg.task} needs {longest} "
                    "distinct keys for its longest evaluation set (pairs = ood_len_factors x "
                    f"max_len); set vocab_size >= {longest}")
    return None


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
