"""Robustness metrics computed after the final epoch from a task's named evaluation sets."""

from __future__ import annotations

from typing import Any

import torch

from study.config import TrialConfig
from study.model import AttentionModel
from study.tasks.base import TaskData


def robustness_metrics(
    cfg: TrialConfig, data: TaskData, model: AttentionModel, device: torch.device,
    metrics: dict[str, float],
) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    """Metrics that apply to this task (absent otherwise) and their artifact tables."""
    return {}, {}
