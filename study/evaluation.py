"""Evaluation of a trained model: loss, accuracy, calibration, attention statistics, robustness.

Everything stays on the device; `study.train` reads an epoch's values in one transfer. This
module never imports `study.train` (training imports evaluation, not the other way round).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from study import metrics as M
from study.config import TrialConfig
from study.device import autocast
from study.model import AttentionModel
from study.robustness import Table, corruption_metrics, length_metrics, long_tail_metrics
from study.tasks.base import IGNORE, Split, TaskData

EVAL_BATCH = 512
STATS_BATCH = 256  # evaluation batch on which attention statistics are computed


@dataclass
class EvalOut:
    """Evaluation of one split, all tensors on the device. `conf`, `pred` and `target` are over
    labelled examples (per-token tasks: labelled positions)."""

    loss: torch.Tensor
    acc: torch.Tensor
    conf: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    example_correct: torch.Tensor  # (N,) fraction of an example's labels predicted correctly


@torch.no_grad()
def evaluate(model: AttentionModel, split: Split, device: torch.device) -> EvalOut:
    model.eval()
    losses, confs, preds, targets, ex = [], [], [], [], []
    for i in range(0, len(split), EVAL_BATCH):
        x, y, m = (t[i:i + EVAL_BATCH].to(device, non_blocking=True)
                   for t in (split.x, split.y, split.mask))
        with autocast(device):
            logits, _ = model(x, m)
        logits = logits.float()
        if y.dim() == 2:  # per-token: keep labelled positions; logits cover the token grid
            keep = y != IGNORE
            c = (logits.argmax(-1) == y) & keep
            ex.append(c.sum(1) / keep.sum(1).clamp_min(1))
            logits, y = logits[keep], y[keep]
        else:
            ex.append((logits.argmax(-1) == y).float())
        losses.append(F.cross_entropy(logits, y, reduction="none"))
        p = logits.softmax(-1)
        conf, pred = p.max(-1)
        confs.append(conf)
        preds.append(pred)
        targets.append(y)
    loss = torch.cat(losses)
    pred, target = torch.cat(preds), torch.cat(targets)
    return EvalOut(loss.mean(), (pred == target).float().mean(), torch.cat(confs), pred, target,
                   torch.cat(ex).float())


@torch.no_grad()
def attention_stats(model: AttentionModel, split: Split, device: torch.device) -> dict:
    """Mean and lowest-head attention entropy (nats) and the largest logit on one batch."""
    model.eval()
    x, m = split.x[:STATS_BATCH].to(device), split.mask[:STATS_BATCH].to(device)
    with autocast(device):
        _, st = model(x, m, stats=True)
    per_head = st.entropy.float().mean(0)  # (L, nh)
    return {M.ATTN_ENTROPY: per_head.mean(), M.ATTN_ENTROPY_MIN: per_head.min(),
            M.ATTN_MAX_LOGIT: st.max_logit.float()}


def epoch_metrics(model: AttentionModel, data: TaskData, device: torch.device) -> dict:
    """Train (in eval mode), val and test loss/accuracy, ECE on test, attention statistics and
    the parameter norm, as device tensors."""
    tr, va, te = (evaluate(model, s, device) for s in (data.train, data.val, data.test))
    out = {M.TRAIN_LOSS: tr.loss, M.TRAIN_ACC: tr.acc, M.VAL_LOSS: va.loss, M.VAL_ACC: va.acc,
           M.TEST_LOSS: te.loss, M.TEST_ACC: te.acc,
           M.ECE: M.expected_calibration_error(te.conf, te.pred == te.target)}
    out.update(attention_stats(model, data.val, device))
    out[M.PARAM_NORM] = torch.sqrt(sum((p.detach().float().pow(2).sum()
                                        for p in model.parameters()),
                                       torch.zeros((), device=device)))
    return out


def robustness_metrics(
    cfg: TrialConfig, data: TaskData, model: AttentionModel, device: torch.device,
    metrics: dict[str, float],
) -> tuple[dict[str, float], dict[str, Table]]:
    """Metrics that apply to this task (absent otherwise) and their artifact tables."""
    out: dict[str, float] = {}
    tables: dict[str, Table] = {}
    names = list(data.extra)
    accs = dict(zip(names, torch.stack(
        [evaluate(model, data.extra[n], device).acc for n in names]).tolist())) if names else {}
    by_len = {int(n.split(":")[1]): a for n, a in accs.items() if n.startswith("len:")}
    if by_len and data.id_lengths is not None:
        out.update(length_metrics(by_len, data.id_lengths))
        tables["per_length"] = [
            {"length": L, "acc": a, "split": "id" if L <= data.id_lengths[1] else "ood",
             "n": len(data.extra[f"len:{L}"])} for L, a in sorted(by_len.items())]
    by_kind = {(n.split(":")[1], int(n.split(":")[2])): a for n, a in accs.items()
               if n.startswith("corrupt:")}
    if by_kind:
        out.update(corruption_metrics(by_kind, metrics[M.TEST_ACC]))
        tables["per_corruption"] = [{"kind": k, "severity": s, "acc": a}
                                    for (k, s), a in sorted(by_kind.items())]
    if cfg.imbalance > 1 and data.train_counts is not None:
        te = evaluate(model, data.test, device)
        lt, table = long_tail_metrics(te.pred.cpu().numpy(), te.target.cpu().numpy(),
                                      data.train_counts, cfg.many_shot_thr, cfg.few_shot_thr)
        out.update(lt)
        tables["per_class"] = table
    return out, tables
