"""Metric names (defined once, read by tracking and analysis) and their pure computations."""

from __future__ import annotations

import math
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
FLOPS_PER_SAMPLE = "flops_per_sample"  # analytic training cost, `training_flops_per_sample`
SAMPLES_PER_S, EPOCH = "samples_per_s", "epoch"

# the metrics every trial reports, in display order
CORE_METRICS: tuple[str, ...] = (
    TRAIN_LOSS, TRAIN_ACC, VAL_LOSS, VAL_ACC, TEST_LOSS, TEST_ACC, GEN_GAP_ACC, GEN_GAP_LOSS,
    ECE, ATTN_ENTROPY, ATTN_ENTROPY_MIN, ATTN_MAX_LOGIT, GRAD_NORM, PARAM_NORM, N_PARAMS,
    FLOPS_PER_SAMPLE, SAMPLES_PER_S, EPOCH,
)
# metrics that are the same in every seed replicate of a configuration by construction
# (structure and cost of the config, the epoch counter): their spread across seeds is
# identically 0, so no `<name>_seed_std` series is logged for them
SEED_INVARIANT_METRICS: frozenset[str] = frozenset({N_PARAMS, FLOPS_PER_SAMPLE, EPOCH})

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
                    CORRUPT_REL: True, FLOPS_PER_SAMPLE: False}

ECE_BINS = 15


def training_flops_per_sample(matmul_params: float, tokens: float, attn_pairs: float,
                              n_attn_layers: int, d_attn: int,
                              once_params: float = 0.0) -> float:
    """Training FLOPs per sample, analytic (Kaplan et al. 2020, "Scaling Laws for Neural
    Language Models", section 2.1), independent of the machine and of its load:

        forward  = 2 * N * T + 2 * N_once + 2 * 2 * L * P * d
        training = 3 * forward          (the backward pass costs about twice the forward)

    N: weights of the matmuls applied at every token (linear layers, convolutions counted at
    the positions they run at, LSTM input and recurrent weights; embedding lookups and
    positional tables are not matmuls); T: tokens per sample as the model sees them;
    N_once: weights applied once per sample (a pooled classification head, squeeze-excite
    gates); L: self-attention layers (0 for `lstm_attention`); d: attention width (d_model);
    P: query-key pairs per sample and layer, T^2 for full and local attention (the local
    window is a mask, the scores are still computed), 2 * T * r for low-rank attention of
    rank r (scores against r projected keys, plus the projection of keys and values along
    the sequence). The factor 2 * 2 counts a multiply-add as 2 FLOPs for each of Q K^T and
    A V. Softmax, norms and activations are left out (lower order)."""
    forward = 2.0 * matmul_params * tokens + 2.0 * once_params \
        + 4.0 * n_attn_layers * attn_pairs * d_attn
    return 3.0 * forward


def expected_calibration_error(conf: torch.Tensor, correct: torch.Tensor,
                               n_bins: int = ECE_BINS,
                               weight: torch.Tensor | None = None) -> torch.Tensor:
    """ECE with equal-width confidence bins (Guo et al. 2017): sum_b |B|/n |acc_b - conf_b|,
    over the last dim (leading dims: one ECE each, e.g. `(k, N)` for k replicates). `weight`
    (0/1, conf's shape) counts only the rows it marks (the labelled ones) without selecting
    them, which on a GPU would wait for the device."""
    import torch

    conf, correct = conf.float(), correct.float()
    w = torch.ones_like(conf) if weight is None else weight.float()
    conf = torch.where(w > 0, conf, 0.0)  # an unmarked row counts for nothing, NaN or not
    lead = conf.shape[:-1]
    K = math.prod(lead)
    conf, correct, w = (t.reshape(K, t.shape[-1]) for t in (conf, correct, w))  # (K, N)
    # bin b holds confidences in (b/n, (b+1)/n]; row r's bins are offset by r * n_bins
    bins = torch.clamp(torch.ceil(conf * n_bins).long() - 1, min=0, max=n_bins - 1)
    bins = (bins + n_bins * torch.arange(K, device=conf.device)[:, None]).flatten()
    s_conf = torch.zeros(K * n_bins, device=conf.device).index_add_(0, bins, (conf * w).flatten())
    s_acc = torch.zeros(K * n_bins, device=conf.device).index_add_(
        0, bins, (correct * w).flatten())
    return ((s_acc - s_conf).view(K, n_bins).abs().sum(1) / w.sum(1)).view(lead)
