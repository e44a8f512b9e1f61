"""Where a trial runs, in which precision and how its process reuses memory: shared by
training, evaluation, the trial entry points and benchmarks."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys

import torch

from study.config import TrialConfig, switched_on


def resolve_device(cfg: TrialConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype `autocast` computes in on `device` (None: full precision)."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on the CPU."""
    dtype = autocast_dtype(device)
    if dtype is not None:
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


# glibc's mallopt parameters (malloc.h) and the values set: freed memory up to 1 GB stays in
# the process, and blocks up to 32 MB (glibc's largest mmap threshold) come from the heap
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TRIM_BYTES, _MMAP_BYTES = 1 << 30, 32 << 20
KEEP_FREED_ENV = "STUDY_KEEP_FREED_MEMORY"


def keep_freed_enabled() -> bool:
    """Whether `keep_freed_memory` applies (`KEEP_FREED_ENV` unset, or anything but "0")."""
    return switched_on(KEEP_FREED_ENV)


@functools.cache
def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of returning it to the system
    (glibc's `mallopt`: a fixed 32 MB mmap threshold and a 1 GB trim threshold). On the CPU an
    evaluation chunk's activations are megabytes each, which glibc's defaults serve from fresh
    pages: the default model's per-epoch evaluation took 9,000 to 34,000 page faults (about 40
    with this) and 7 to 27% more time, a 3-epoch trial 3 to 10% more. The process keeps up to
    its peak heap: each malloc arena (the main thread's, and one per thread that allocates,
    such as the one computing epochs ahead) keeps up to 1 GB it has freed. A thread's arena
    gains less (faults fell by half in a test, not 10x: glibc unmaps its extra heaps once they
    are empty). Linux with glibc only; `KEEP_FREED_ENV`
    set to 0 leaves malloc as it is. Returns whether the settings took effect (once per
    process)."""
    if not keep_freed_enabled() or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt  # absent on a libc other than glibc (e.g. musl)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                         _TRIM_BYTES))
