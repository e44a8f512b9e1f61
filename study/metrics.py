"""Metric names (defined once, read by tracking and analysis) and their pure computations."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # names only: `analysis/` imports this module and never loads torch
    import torch

# --- names: other parts and users' scripts read these exactly ---
TRAIN_LOSS, TRAIN_ACC = "train_loss", "train_acc"
VAL_LOSS, VAL_ACC = "val_loss", "val_acc"
TEST_LOSS, TEST_ACC = "test_loss", "test_acc"
GEN_GAP_ACC, GEN_GAP_LOSS = "gen_gap_acc", "gen_gap_loss"
ECE = "ece"
ATTN_ENTROPY, ATTN_ENTROPY_MIN = "attn_entropy", "attn_entropy_min"
ATTN_MAX_LOGIT = "attn_max_logit"
GRAD_NORM, PARAM_NORM, N_PARAMS = "grad_norm", "param_norm", "n_params"
SAMPLES_PER_S, EPOCH = "samples_per_s", "epoch"

# the metrics every trial reports, in display order
CORE_METRICS: tuple[str, ...] = (
    TRAIN_LOSS, TRAIN_ACC, VAL_LOSS, VAL_ACC, TEST_LOSS, TEST_ACC, GEN_GAP_ACC, GEN_GAP_LOSS,
    ECE, ATTN_ENTROPY, ATTN_ENTROPY_MIN, ATTN_MAX_LOGIT, GRAD_NORM, PARAM_NORM, N_PARAMS,
    SAMPLES_PER_S, EPOCH,
)

# robustness metrics (present only where they apply to the task)
ID_LEN_ACC, OOD_LEN_ACC, LEN_GEN_RATIO = "id_len_acc", "ood_len_acc", "len_gen_ratio"
BALANCED_ACC, MACRO_F1 = "balanced_acc", "macro_f1"
MANY_SHOT_ACC, MEDIUM_SHOT_ACC, FEW_SHOT_ACC = "many_shot_acc", "medium_shot_acc", "few_shot_acc"
CORRUPT_ACC, CORRUPT_REL = "corrupt_acc", "corrupt_rel"
ROBUSTNESS_METRICS: tuple[str, ...] = (
    ID_LEN_ACC, OOD_LEN_ACC, LEN_GEN_RATIO, BALANCED_ACC, MACRO_F1, MANY_SHOT_ACC,
    MEDIUM_SHOT_ACC, FEW_SHOT_ACC, CORRUPT_ACC, CORRUPT_REL,
)
ALL_METRICS: tuple[str, ...] = CORE_METRICS + ROBUSTNESS_METRICS

# what a higher value means for each metric (used by sweeps and reports)
HIGHER_IS_BETTER = {TRAIN_ACC: True, VAL_ACC: True, TEST_ACC: True, TRAIN_LOSS: False,
                    VAL_LOSS: False, TEST_LOSS: False, GEN_GAP_ACC: False, GEN_GAP_LOSS: False,
                    ECE: False, ID_LEN_ACC: True, OOD_LEN_ACC: True, LEN_GEN_RATIO: True,
                    BALANCED_ACC: True, MACRO_F1: True, MANY_SHOT_ACC: True,
                    MEDIUM_SHOT_ACC: True, FEW_SHOT_ACC: True, CORRUPT_ACC: True,
                    CORRUPT_REL: True}

ECE_BINS = 15


def expected_calibration_error(conf: torch.Tensor, correct: torch.Tensor,
                               n_bins: int = ECE_BINS) -> torch.Tensor:
    """ECE with equal-width confidence bins (Guo et al. 2017): sum_b |B|/n |acc_b - conf_b|."""
    import torch

    conf = conf.float()
    correct = correct.float()
    # bin b holds confidences in (b/n, (b+1)/n]
    bins = torch.clamp(torch.ceil(conf * n_bins).long() - 1, min=0, max=n_bins - 1)
    s_conf = torch.zeros(n_bins, device=conf.device).index_add_(0, bins, conf)
    s_acc = torch.zeros(n_bins, device=conf.device).index_add_(0, bins, correct)
    return (s_acc - s_conf).abs().sum() / conf.numel()
