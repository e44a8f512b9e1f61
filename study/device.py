"""Where a trial runs and in which precision: shared by training, evaluation and benchmarks."""

from __future__ import annotations

import contextlib

import torch

from study.config import TrialConfig


def resolve_device(cfg: TrialConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
