"""Evaluation of a trained model: loss, accuracy, calibration, attention statistics, robustness.

Everything stays on the device; `study.train` reads an epoch's values in one transfer. This
module never imports `study.train` (training imports evaluation, not the other way round).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from study import metrics as M
from study.ahead import check_cancelled
from study.config import TrialConfig
from study.device import autocast
from study.model import AttentionModel
from study.robustness import Table, corruption_metrics, length_metrics, long_tail_metrics
from study.tasks.base import IGNORE, Split, TaskData

EVAL_BATCH = 512  # rows per evaluation chunk on the CPU (and the fewest anywhere)
STATS_BATCH = 256  # evaluation batch on which attention statistics are computed
# CUDA: a chunk's widest activation, in elements, for all replicates together (2^26: 128 MB in
# bf16; the chunk's peak is a few such tensors, its fp32 logits and a padding mask besides). A
# small model's evaluation is launch-bound there, so fewer, larger chunks are faster.
EVAL_ELEMENTS = 2**26
# CUDA: the most rows in one call of a fused attention kernel (replicates folded in), below
# the 65,535 blocks a CUDA grid dimension allows, which some SDPA kernels map the batch to
EVAL_MAX_ROWS = 2**15


@dataclass
class EvalOut:
    """Evaluation of one split, all tensors on the device: loss and accuracy over labelled
    examples (per-token tasks: labelled positions), ECE where asked for (else None), and each
    row's outputs with `keep` marking the labelled ones. `conf`, `pred` and `target` select
    the labelled ones: a host sync on a GPU, so per-epoch metrics never call them."""

    loss: torch.Tensor
    acc: torch.Tensor
    ece: torch.Tensor | None
    example_correct: torch.Tensor  # (N,) fraction of an example's labels predicted correctly
    all_conf: torch.Tensor  # (N[, T]) every row (position), labelled or not
    all_pred: torch.Tensor
    all_target: torch.Tensor
    keep: torch.Tensor  # (N[, T]) bool: labelled

    @property
    def conf(self) -> torch.Tensor:
        return self.all_conf[self.keep]

    @property
    def pred(self) -> torch.Tensor:
        return self.all_pred[self.keep]

    @property
    def target(self) -> torch.Tensor:
        return self.all_target[self.keep]


def eval_rows(model: AttentionModel, seq_len: int, device: torch.device, k: int = 1) -> int:
    """Rows of each of `k` replicates per evaluation chunk of inputs `seq_len` long: on the CPU
    `EVAL_BATCH` over all replicates (compute-bound: larger chunks gain nothing); on CUDA as
    many as keep the chunk's widest activation (replicates x rows x tokens x width) within
    `EVAL_ELEMENTS` and all replicates' rows within `EVAL_MAX_ROWS`, never fewer than on the
    CPU."""
    least = max(1, EVAL_BATCH // k)
    if device.type != "cuda":
        return least
    cfg, tokens = model.cfg, model.embed.n_tokens(seq_len)
    width = max(cfg.d_ff, 3 * cfg.d_model, cfg.n_heads * tokens,
                model.spec.n_classes if model.spec.per_token else 0)
    return max(least, min(EVAL_ELEMENTS // (k * tokens * width), EVAL_MAX_ROWS // k))


@dataclass
class Outputs:
    """Per-row (per-token tasks: per-position) outputs of k models, `(k, N[, T])`, before the
    unlabelled positions are dropped: loss (0 where unlabelled), confidence, prediction and
    target. `chunk_outputs` makes one per chunk; `Outputs.cat` joins them."""

    loss: torch.Tensor
    conf: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor

    @staticmethod
    def cat(parts: list[Outputs]) -> Outputs:
        return Outputs(*(torch.cat([getattr(p, f) for p in parts], 1)
                         for f in ("loss", "conf", "pred", "target")))

    def labelled(self) -> torch.Tensor:
        return self.target != IGNORE

    def correct(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Labelled and predicted right (`keep`: `labelled()`, where the caller has it)."""
        return (self.pred == self.target) & (self.labelled() if keep is None else keep)

    def scores(self, ece: bool = False, keep: torch.Tensor | None = None,
               correct: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`(k,)` loss, accuracy and ECE (None unless `ece`) of each replicate over its labelled
        rows (positions), from sums over the labelled mask: no selection of labelled rows, so
        no host sync on a GPU and no operations per replicate. `keep`, `correct`: `labelled()`
        and `correct()`, where the caller has them."""
        keep = self.labelled() if keep is None else keep  # (k, N[, T])
        correct = self.correct(keep) if correct is None else correct
        dims = tuple(range(1, keep.dim()))
        n = keep.sum(dims)  # (k,)
        loss = self.loss.sum(dims) / n  # unlabelled positions hold a loss of 0
        acc = correct.sum(dims) / n
        err = (M.expected_calibration_error(self.conf.flatten(1), correct.flatten(1),
                                            weight=keep.flatten(1)) if ece else None)
        return loss, acc, err

    def eval_outs(self, ece: bool = False) -> list[EvalOut]:
        """Each replicate's `EvalOut` (with its ECE if `ece`), computed for all k at once
        (`scores`; the k `EvalOut`s hold views)."""
        keep = self.labelled()
        correct = self.correct(keep)
        loss, acc, err = self.scores(ece, keep, correct)
        ex = (correct.sum(2) / keep.sum(2).clamp_min(1) if keep.dim() == 3  # per-token
              else correct.float())
        return [EvalOut(loss[r], acc[r], None if err is None else err[r], ex[r].float(),
                        self.conf[r], self.pred[r], self.target[r], keep[r])
                for r in range(len(loss))]


def chunk_outputs(logits: torch.Tensor, y: torch.Tensor) -> Outputs:
    """`Outputs` of one chunk: logits `(k, n[, T], C)` and targets `(k, n[, T])` (IGNORE where
    unlabelled)."""
    logits = logits.float()
    loss = F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=IGNORE,
                           reduction="none").view(y.shape)
    conf, pred = logits.softmax(-1).max(-1)
    return Outputs(loss, conf, pred, y)


@torch.no_grad()
def outputs(model: AttentionModel, split: Split, device: torch.device) -> Outputs:
    """`model`'s `Outputs` on `split` (k = 1), in chunks of `eval_rows`."""
    model.eval()
    rows = eval_rows(model, split.x.shape[1], device)
    parts = []
    for i in range(0, len(split), rows):
        check_cancelled()
        x, y, m = (t[i:i + rows].to(device, non_blocking=True)
                   for t in (split.x, split.y, split.mask))
        with autocast(device):
            logits, _ = model(x, m)
        parts.append(chunk_outputs(logits[None], y[None]))
    return Outputs.cat(parts)


def evaluate(model: AttentionModel, split: Split, device: torch.device,
             ece: bool = False) -> EvalOut:
    return outputs(model, split, device).eval_outs(ece)[0]


def set_accuracies(model: AttentionModel, sets: dict[str, Split],
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Accuracy (over labelled examples or positions) on each named set, as `evaluate` gives
    it, in the order of `sets` (`sets_accuracy` for one model)."""
    accs = sets_accuracy(lambda s: outputs(model, s, device), sets)
    return {n: a[0] for n, a in accs.items()}


def sets_accuracy(outputs_of: Callable[[Split], Outputs],
                  sets: dict[str, Split]) -> dict[str, torch.Tensor]:
    """`(k,)` accuracies on each named set of the k models whose `Outputs` `outputs_of` gives
    (one model: `outputs`; batched replicates: theirs), in the order of `sets`; sets whose rows
    have the same shape are evaluated together, as one split (the default study's 25
    corruption sets: one chunk on CUDA, not 50)."""
    groups: dict[tuple, list[str]] = {}
    for name, s in sets.items():
        if len(s) == 0:
            raise ValueError(f"evaluation set {name!r} is empty")
        key = tuple(tuple(t.shape[1:]) for t in (s.x, s.y, s.mask)) + (s.x.dtype, s.y.dtype)
        groups.setdefault(key, []).append(name)
    accs: dict[str, torch.Tensor] = {}
    for names in groups.values():
        joined = Split(*(torch.cat([getattr(sets[n], f) for n in names])
                         for f in ("x", "y", "mask")))
        out = outputs_of(joined)
        keep = out.labelled()  # (k, N[, T])
        correct = out.correct(keep)
        dims = tuple(range(1, keep.dim()))
        start = 0
        for n in names:
            end = start + len(sets[n])
            accs[n] = correct[:, start:end].sum(dims) / keep[:, start:end].sum(dims)
            start = end
    return {n: accs[n] for n in sets}


def accuracies_on_host(accs: dict[str, torch.Tensor], k: int) -> list[dict[str, float]]:
    """`sets_accuracy`'s `(k,)` accuracies as k dicts of floats, read in one transfer."""
    if not accs:
        return [{} for _ in range(k)]
    host = torch.stack(list(accs.values())).float().T.tolist()  # (k, sets)
    return [dict(zip(accs, row)) for row in host]


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
    tr, va = (evaluate(model, s, device) for s in (data.train, data.val))
    te = evaluate(model, data.test, device, ece=True)
    out = {M.TRAIN_LOSS: tr.loss, M.TRAIN_ACC: tr.acc, M.VAL_LOSS: va.loss, M.VAL_ACC: va.acc,
           M.TEST_LOSS: te.loss, M.TEST_ACC: te.acc, M.ECE: te.ece}
    out.update(attention_stats(model, data.val, device))
    out[M.PARAM_NORM] = param_norm(model.parameters())
    return out


def param_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of `params` in fp32, from one multi-tensor norm: three operations,
    not three per parameter (on a GPU an epoch's evaluation is launch-bound, and the
    per-parameter sum was a quarter of its operations)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
        [p.detach().float() for p in params])))


def robustness_metrics(
    cfg: TrialConfig, data: TaskData, model: Callable[[], AttentionModel],
    device: torch.device, metrics: dict[str, float], accs: dict[str, float] | None = None,
) -> tuple[dict[str, float], dict[str, Table]]:
    """Metrics that apply to this task (absent otherwise) and their artifact tables, for the
    trained model `model()` (called only where a metric needs it); `accs`: its accuracies on
    `data.extra` where already computed (batched replicates), else `set_accuracies`."""
    out: dict[str, float] = {}
    tables: dict[str, Table] = {}
    if accs is None:
        trained = model()
        accs = accuracies_on_host(
            sets_accuracy(lambda s: outputs(trained, s, device), data.extra), 1)[0]
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
        te = evaluate(model(), data.test, device)
        lt, table = long_tail_metrics(te.pred.cpu().numpy(), te.target.cpu().numpy(),
                                      data.train_counts, cfg.many_shot_thr, cfg.few_shot_thr)
        out.update(lt)
        tables["per_class"] = table
    return out, tables
