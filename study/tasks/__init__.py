"""Task registry: `@register(name)` adds a builder; `get_task(cfg)` builds it once per process."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from study.config import TrialConfig

if TYPE_CHECKING:
    from study.tasks.base import TaskData

Builder = Callable[[TrialConfig], "TaskData"]
_BUILDERS: dict[str, Builder] = {}
_CACHE: dict[tuple, TaskData] = {}  # insertion-ordered; the oldest entry goes first
CACHE_SIZE = 4
# the module that registers each task (imported on first use)
_MODULE_OF = {"copy": "sequences", "reverse": "sequences", "sort": "sequences",
              "associative_recall": "sequences", "listops": "sequences",
              "many_class": "sequences"}

# config fields that shape the data; the cache key is built from them (never from `seed`)
DATA_FIELDS = ("task", "data_seed", "train_fraction", "label_noise", "imbalance", "min_len",
               "max_len", "ood_len_factors", "length_mode", "vocab_size", "n_classes",
               "n_train", "shuffle_seq", "seq_length", "data_path", "text_column", "label_column",
               "tokenizer")


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _BUILDERS[name] = fn
        return fn
    return deco


def get_task(cfg: TrialConfig) -> TaskData:
    """Build (or fetch from the per-process cache) the data of `cfg.task`, with the training
    stressors of `study/tasks/stressors.py` applied."""
    from study.tasks.stressors import apply_stressors

    if cfg.task not in _BUILDERS:
        importlib.import_module(f"study.tasks.{_MODULE_OF.get(cfg.task, cfg.task)}")
    key = tuple(getattr(cfg, f) for f in DATA_FIELDS)
    if key not in _CACHE:
        while len(_CACHE) >= CACHE_SIZE:  # reused Ray workers see many variants of a task
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = apply_stressors(cfg, _BUILDERS[cfg.task](cfg))
    return _CACHE[key]
