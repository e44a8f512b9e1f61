"""Robustness metrics as pure functions of accuracies and predictions, no model involved
(`study.evaluation.robustness_metrics` evaluates a task's named sets after the final epoch).

- Length generalization (`len:<L>` sets): `id_len_acc` (lengths inside the training range),
  `ood_len_acc` (all longer lengths), `len_gen_ratio` = ood / id, table `per_length`.
- Long tail (`imbalance > 1`): `balanced_acc`, `macro_f1`, `many_shot_acc`, `medium_shot_acc`,
  `few_shot_acc` (classes with > `many_shot_thr`, in between, < `few_shot_thr` training
  examples; a group with no class is absent), table `per_class`.
- Corruption and shift (`corrupt:<kind>:<severity>` sets): `corrupt_acc` (mean over kinds and
  severities), `corrupt_rel` = corrupt_acc / test_acc, table `per_corruption`.
Metrics that do not apply to a task are absent, never NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from study import metrics as M

Table = list[dict[str, Any]]


def length_metrics(accs: dict[int, float], id_range: tuple[int, int]) -> dict[str, float]:
    """Mean accuracy over in-range lengths, over longer lengths, and their ratio."""
    ident = [a for L, a in accs.items() if id_range[0] <= L <= id_range[1]]
    ood = [a for L, a in accs.items() if L > id_range[1]]
    out: dict[str, float] = {}
    if ident:
        out[M.ID_LEN_ACC] = float(np.mean(ident))
    if ood:
        out[M.OOD_LEN_ACC] = float(np.mean(ood))
    if ident and ood and out[M.ID_LEN_ACC] > 0:
        out[M.LEN_GEN_RATIO] = out[M.OOD_LEN_ACC] / out[M.ID_LEN_ACC]
    return out


def long_tail_metrics(pred: np.ndarray, target: np.ndarray, train_counts: np.ndarray,
                      many_thr: int, few_thr: int) -> tuple[dict[str, float], Table]:
    """Balanced accuracy, macro F1 and accuracy by shot group (Liu et al. 2019's split into
    many/medium/few-shot classes by training count)."""
    C = len(train_counts)
    from sklearn.metrics import f1_score  # a second to import: only long-tailed tasks need it

    present = [c for c in range(C) if (target == c).any()]
    recall = {c: float((pred[target == c] == c).mean()) for c in present}
    out = {M.BALANCED_ACC: float(np.mean(list(recall.values()))),
           M.MACRO_F1: float(f1_score(target, pred, labels=present, average="macro",
                                      zero_division=0))}
    groups = {M.MANY_SHOT_ACC: [c for c in present if train_counts[c] > many_thr],
              M.MEDIUM_SHOT_ACC: [c for c in present
                                  if few_thr <= train_counts[c] <= many_thr],
              M.FEW_SHOT_ACC: [c for c in present if train_counts[c] < few_thr]}
    for name, cs in groups.items():
        if cs:
            out[name] = float(np.mean([recall[c] for c in cs]))
    table = [{"class": c, "train_count": int(train_counts[c]), "test_acc": recall[c]}
             for c in present]
    return out, table


def corruption_metrics(accs: dict[tuple[str, int], float],
                       test_acc: float) -> dict[str, float]:
    corrupt = float(np.mean(list(accs.values())))
    out = {M.CORRUPT_ACC: corrupt}
    if test_acc > 0:
        out[M.CORRUPT_REL] = corrupt / test_acc
    return out
