"""Generated sequence tasks with length-generalization (`len:<L>`) and corruption
(`corrupt:<kind>:<severity>`) evaluation sets.

- `copy`, `reverse`, `sort`: the classic algorithmic sequence tasks (Graves et al. 2014, Neural
  Turing Machines; Zaremba & Sutskever 2014), per-token: the input is `s SEP BLANK*n` and each
  BLANK position must output the answer's symbol.
- `associative_recall`: n key-value pairs, SEP, a query key; the label is the queried value
  (Graves et al. 2014; Ba et al. 2016).
- `listops`: nested MAX/MIN/MED/SM expressions over digits, as in Long Range Arena (Tay et al.
  2021, after Nangia & Bowman 2018); the label is the value 0..9.
- `many_class`: `n_classes` classes, each a random prototype; a sample is a noisy prefix of it.

Token ids (all but listops): 0 = PAD, 1 = SEP, 2 = BLANK, 3 .. 3+V-1 the V = `vocab_size`
content symbols, so `ModelSpec.vocab_size` = V + 3. Targets are symbol indices 0..V-1
(symbol id - 3), so copy/reverse/sort/associative_recall have `n_classes` = V (chance 1/V).
listops has its own vocabulary `LISTOPS_TOKENS` (PAD, digits, 4 operators, "[", "]").

Length unit (of `min_len`, `max_len`, `id_lengths` and the L of `len:<L>`): copy/reverse/sort
the content length n (2n+1 tokens); associative_recall the number of pairs n (2n+2 tokens);
listops and many_class tokens. listops lengths are exact (the generator builds a tree of exactly
L tokens); its min_len is clamped to 4, the shortest expression `[ OP d ]`.

Corruption sets are built from the first `N_CORRUPT` clean test rows with each content unit hit
independently with probability 0.05 * severity; edits act on the content and the input is then
rebuilt, so every corrupted row is a valid input of the task. Insertions never take a row past
`max_len` (in the task's unit), so corruption never mixes with length extrapolation.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from study.config import TrialConfig
from study.model import ModelSpec
from study.tasks import length_grid, rng_tag
from study.tasks.base import IGNORE, SEVERITIES, Split, TaskData

PAD, SEP, BLANK, SYM0 = 0, 1, 2, 3
N_LEN = 200  # sequences per `len:<L>` set
N_CORRUPT = 300  # clean test rows each corruption set is built from
KINDS = ("substitution", "deletion", "insertion")
MANY_CLASS_NOISE = 0.1

LISTOPS_OPS = ("MAX", "MIN", "MED", "SM")  # SM = sum mod 10 (LRA's name for SUM_MOD)
LISTOPS_TOKENS = ("<pad>", *"0123456789", *LISTOPS_OPS, "[", "]")
_DIG0, _OP0, _LB, _RB = 1, 11, 15, 16
LISTOPS_MIN_LEN = 4  # "[ OP d ]"
LISTOPS_MAX_ARGS = 5

Row = Any  # a task's content representation before encoding


def _pad(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack 1-D int rows into a zero-padded (N, T) matrix; also return their lengths."""
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    out = np.zeros((len(rows), int(lens.max(initial=1))), dtype=np.int64)
    out[np.arange(out.shape[1])[None, :] < lens[:, None]] = np.concatenate(rows) if rows else []
    return out, lens


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    xt = torch.from_numpy(x)
    return Split(xt, torch.from_numpy(y), xt != PAD)


def _edit_symbols(s: np.ndarray, kind: str, rate: float, V: int, cap: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Substitute (with a different symbol), delete (keeping >= 1) or insert before each hit
    symbol; insertions are cut to `cap` symbols."""
    hit = rng.random(len(s)) < rate
    if kind == "substitution":
        s = s.copy()
        s[hit] = (s[hit] + rng.integers(1, V, int(hit.sum()))) % V
        return s
    if kind == "deletion":
        if hit.all():
            hit[rng.integers(len(s))] = False
        return s[~hit]
    return np.insert(s, np.flatnonzero(hit), rng.integers(0, V, int(hit.sum())))[:cap]


# ---------------------------------------------------------------- copy / reverse / sort

def _encode_algorithmic(rows: Sequence[np.ndarray], mode: str) -> Split:
    """Input `s SEP BLANK*n`; targets IGNORE except at the BLANKs, which hold the answer."""
    S, n = _pad(rows)
    N, W = S.shape
    T = 2 * W + 1
    t = np.arange(T)[None, :]
    nn_ = n[:, None]
    j = np.arange(W)[None, :]
    if mode == "copy":
        ans = S
    elif mode == "reverse":
        ans = np.take_along_axis(S, np.clip(nn_ - 1 - j, 0, W - 1), 1)
    else:
        ans = np.sort(np.where(j < nn_, S, np.iinfo(np.int64).max), axis=1)
    x = np.zeros((N, T), dtype=np.int64)
    x[:, :W] = np.where(j < nn_, S + SYM0, PAD)
    x[t == nn_] = SEP
    blank = (t > nn_) & (t <= 2 * nn_)
    x[blank] = BLANK
    y = np.full((N, T), IGNORE, dtype=np.int64)
    y[blank] = np.take_along_axis(ans, np.clip(t - nn_ - 1, 0, W - 1), 1)[blank]
    return _split(x, y)


def _algorithmic(cfg: TrialConfig, mode: str) -> TaskData:
    V, hi = cfg.vocab_size, cfg.max_len

    def sample(rng: np.random.Generator, lengths: np.ndarray) -> list[np.ndarray]:
        M = rng.integers(0, V, (len(lengths), int(lengths.max())))
        return [M[i, :n] for i, n in enumerate(lengths)]

    n_eval = max(500, cfg.n_train // 5)
    return _assemble(cfg, _Task(
        mode, cfg.min_len, hi, cfg.n_train, n_eval, sample,
        lambda rows: _encode_algorithmic(rows, mode),
        lambda s, kind, rate, rng: _edit_symbols(s, kind, rate, V, hi, rng),
        ModelSpec(n_classes=V, max_len=0, vocab_size=V + SYM0, per_token=True)))


def build_copy(cfg: TrialConfig) -> TaskData:
    return _algorithmic(cfg, "copy")


def build_reverse(cfg: TrialConfig) -> TaskData:
    return _algorithmic(cfg, "reverse")


def build_sort(cfg: TrialConfig) -> TaskData:
    return _algorithmic(cfg, "sort")


# ---------------------------------------------------------------- associative recall

ARRow = tuple[np.ndarray, np.ndarray, int]  # keys, values (symbol indices), query index


def _encode_recall(rows: Sequence[ARRow]) -> Split:
    seqs, labels = [], np.empty(len(rows), dtype=np.int64)
    for i, (k, v, q) in enumerate(rows):
        s = np.empty(2 * len(k) + 2, dtype=np.int64)
        s[0:-2:2], s[1:-2:2] = k + SYM0, v + SYM0
        s[-2], s[-1] = SEP, k[q] + SYM0
        seqs.append(s)
        labels[i] = v[q]
    return _split(_pad(seqs)[0], labels)


def _edit_recall(row: ARRow, kind: str, rate: float, V: int, cap: int,
                 rng: np.random.Generator) -> ARRow:
    """Edit non-queried pairs: substitute values, delete pairs, or insert pairs with unused
    keys (at most `cap` pairs); the label never changes."""
    k, v, q = row
    hit = rng.random(len(k)) < rate
    if kind != "insertion":
        hit[q] = False
    if kind == "substitution":
        v = v.copy()
        v[hit] = (v[hit] + rng.integers(1, V, int(hit.sum()))) % V
        return k, v, q
    if kind == "deletion":
        return k[~hit], v[~hit], int((~hit[:q]).sum())
    pos = np.flatnonzero(hit)[:max(0, cap - len(k))]
    new_k = rng.choice(np.setdiff1d(np.arange(V), k), size=len(pos), replace=False)
    new_v = rng.integers(0, V, len(pos))
    return np.insert(k, pos, new_k), np.insert(v, pos, new_v), q + int((pos <= q).sum())


def build_associative_recall(cfg: TrialConfig) -> TaskData:
    V, hi = cfg.vocab_size, cfg.max_len  # vocab_size >= the longest row: study.tasks.conflict

    def sample(rng: np.random.Generator, lengths: np.ndarray) -> list[ARRow]:
        N, W = len(lengths), int(lengths.max())
        keys = np.argsort(rng.random((N, V)), axis=1)[:, :W]  # distinct keys per row
        vals = rng.integers(0, V, (N, W))
        qs = rng.integers(0, lengths)
        return [(keys[i, :n], vals[i, :n], int(qs[i])) for i, n in enumerate(lengths)]

    n_eval = max(500, cfg.n_train // 5)
    return _assemble(cfg, _Task(
        "associative_recall", cfg.min_len, hi, cfg.n_train, n_eval, sample, _encode_recall,
        lambda row, kind, rate, rng: _edit_recall(row, kind, rate, V, hi, rng),
        ModelSpec(n_classes=V, max_len=0, vocab_size=V + SYM0)))


# ---------------------------------------------------------------- listops

def _apply_op(op: str, args: list[int]) -> int:
    if op == "MAX":
        return max(args)
    if op == "MIN":
        return min(args)
    if op == "MED":  # lower median for an even count
        return sorted(args)[(len(args) - 1) // 2]
    return sum(args) % 10


def evaluate_listops(tokens: Sequence[str]) -> int:
    """Reference evaluator of a ListOps expression given as token strings, e.g.
    `"[ MAX 2 9 [ MIN 4 7 ] 0 ]".split()` -> 9. Also accepts LRA's fused "[MAX" tokens and
    "SUM_MOD" for "SM"; raises ValueError on a malformed expression."""
    stack: list[tuple[list[str], list[int]]] = []  # per open list: [operator], arguments
    result: int | None = None
    fused = (["[", t[1:]] if t.startswith("[") and t != "[" else [t] for t in tokens)
    for tok in (t for pair in fused for t in pair):
        if result is not None:
            raise ValueError(f"tokens after the end of the expression: {tok!r}")
        if tok == "[":
            stack.append(([], []))
        elif tok in (*LISTOPS_OPS, "SUM_MOD"):
            if not stack or stack[-1][0] or stack[-1][1]:
                raise ValueError(f"misplaced operator {tok!r}")
            stack[-1][0].append("SM" if tok == "SUM_MOD" else tok)
        elif tok == "]":
            if not stack or not stack[-1][0] or not stack[-1][1]:
                raise ValueError("']' closes a list without operator or arguments")
            op, args = stack.pop()
            value = _apply_op(op[0], args)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        elif len(tok) == 1 and tok.isdigit():
            if not stack or not stack[-1][0]:
                raise ValueError(f"digit {tok!r} outside a list or before its operator")
            stack[-1][1].append(int(tok))
        else:
            raise ValueError(f"unknown token {tok!r}")
    if result is None:
        raise ValueError("incomplete expression")
    return result


def render_listops(row: Sequence[int] | np.ndarray | torch.Tensor) -> list[str]:
    """Token strings of an encoded listops row (padding dropped)."""
    return [LISTOPS_TOKENS[int(i)] for i in row if int(i) != PAD]


def _gen_listops(L: int, r: random.Random, out: list[int]) -> int:
    """Append a random expression of exactly L >= 4 tokens to `out`; return its value.

    The L - 3 argument tokens are split over k <= LISTOPS_MAX_ARGS arguments, m of them
    sub-lists (each >= 4 tokens, sizes by stars and bars) and k - m digits, in random order;
    depth and arity are therefore random and the length exact."""
    rand = r.random  # int(lo + rand() * n) is several times faster than r.randint
    B = L - 3
    while True:
        lo = min(2, B)
        k = lo + int(rand() * (min(LISTOPS_MAX_ARGS, B) - lo + 1))
        if B == k or B - k >= 3:
            break
    m = 0 if B == k else 1 + int(rand() * min(k, (B - k) // 3))
    extra = B - k - 3 * m
    cuts = [-1, *sorted(r.sample(range(extra + m - 1), m - 1)), extra + m - 1] if m else []
    sizes = [4 + cuts[i + 1] - cuts[i] - 1 for i in range(m)] + [1] * (k - m)
    r.shuffle(sizes)
    op = int(rand() * len(LISTOPS_OPS))
    out += [_LB, _OP0 + op]
    args = []
    for size in sizes:
        if size == 1:
            d = int(rand() * 10)
            out.append(_DIG0 + d)
            args.append(d)
        else:
            args.append(_gen_listops(size, r, out))
    out.append(_RB)
    return _apply_op(LISTOPS_OPS[op], args)


ListopsRow = tuple[np.ndarray, int]


def _edit_listops(row: ListopsRow, kind: str, rate: float, cap: int,
                  rng: np.random.Generator) -> ListopsRow:
    """Edit digit tokens only: substitute a digit, delete one from a list that keeps >= 1
    argument, or insert a random digit before a digit (same list) while the row has < `cap`
    tokens; the label is recomputed with `evaluate_listops`."""
    toks = row[0].tolist()
    hit = (rng.random(len(toks)) < rate).tolist()
    draw = rng.integers(1, 10, len(toks)).tolist()  # a digit shift, or an inserted digit
    digit = [_DIG0 <= t < _DIG0 + 10 for t in toks]
    out: list[int] = []
    if kind == "substitution":
        out = [(_DIG0 + (t - _DIG0 + s) % 10) if h and d else t
               for t, h, d, s in zip(toks, hit, digit, draw)]
    elif kind == "deletion":
        n_args: list[int] = []  # argument count per list, in order of "["
        stack: list[int] = []
        parent = {}
        for i, t in enumerate(toks):
            if t == _LB:
                if stack:
                    n_args[stack[-1]] += 1
                stack.append(len(n_args))
                n_args.append(0)
            elif t == _RB:
                stack.pop()
            elif digit[i]:
                n_args[stack[-1]] += 1
                parent[i] = stack[-1]
        for i, t in enumerate(toks):
            if digit[i] and hit[i] and n_args[parent[i]] > 1:
                n_args[parent[i]] -= 1
            else:
                out.append(t)
    else:
        room = cap - len(toks)
        for t, h, d, s in zip(toks, hit, digit, draw):
            if h and d and room > 0:
                out.append(_DIG0 + s)
                room -= 1
            out.append(t)
    return np.array(out, dtype=np.int64), evaluate_listops(render_listops(out))


def _encode_listops(rows: Sequence[ListopsRow]) -> Split:
    return _split(_pad([t for t, _ in rows])[0], np.array([v for _, v in rows], dtype=np.int64))


def build_listops(cfg: TrialConfig) -> TaskData:
    lo = max(LISTOPS_MIN_LEN, cfg.min_len)
    hi = max(lo, cfg.max_len)

    def sample(rng: np.random.Generator, lengths: np.ndarray) -> list[ListopsRow]:
        r = random.Random(int(rng.integers(2**63)))
        rows = []
        for L in lengths.tolist():
            out: list[int] = []
            value = _gen_listops(L, r, out)
            rows.append((np.array(out, dtype=np.int64), value))
        return rows

    n_eval = max(500, cfg.n_train // 5)
    return _assemble(cfg, _Task(
        "listops", lo, hi, cfg.n_train, n_eval, sample, _encode_listops,
        lambda row, kind, rate, rng: _edit_listops(row, kind, rate, hi, rng),
        ModelSpec(n_classes=10, max_len=0, vocab_size=len(LISTOPS_TOKENS))))


# ---------------------------------------------------------------- many_class

MCRow = tuple[np.ndarray, int]  # symbol indices, class


def build_many_class(cfg: TrialConfig) -> TaskData:
    """Class c has a random prototype; a sample is a prefix of length in [min_len, max_len]
    with each symbol replaced by a different one with probability 0.1. Prototypes are as long
    as the longest `len:` set, so OOD samples continue the prototype past max_len. Splits are
    balanced: n_train // n_classes (>= 1) training samples per class."""
    V, C, hi = cfg.vocab_size, cfg.n_classes, cfg.max_len
    grid = length_grid(cfg.min_len, hi, cfg.ood_len_factors)
    # not [data_seed, tag, 0]: numpy's SeedSequence drops trailing zeros, so that was the
    # stream of `_assemble`'s training lengths (prototype symbols and lengths correlated 0.99)
    proto_rng = np.random.default_rng([cfg.data_seed, rng_tag("many_class"), 3])
    protos = proto_rng.integers(0, V, (C, max(grid)))

    def sample(rng: np.random.Generator, lengths: np.ndarray) -> list[MCRow]:
        labels = rng.permutation(np.arange(len(lengths)) % C)
        W = int(lengths.max())
        P = protos[labels, :W]
        hit = rng.random(P.shape) < MANY_CLASS_NOISE
        P = np.where(hit, (P + rng.integers(1, V, P.shape)) % V, P)
        return [(P[i, :n], int(labels[i])) for i, n in enumerate(lengths)]

    def encode(rows: Sequence[MCRow]) -> Split:
        x = _pad([s + SYM0 for s, _ in rows])[0]
        return _split(x, np.array([c for _, c in rows], dtype=np.int64))

    def edit(row: MCRow, kind: str, rate: float, rng: np.random.Generator) -> MCRow:
        return _edit_symbols(row[0], kind, rate, V, hi, rng), row[1]

    per_class_eval = -(-max(500, cfg.n_train // 5) // C)
    return _assemble(cfg, _Task(
        "many_class", cfg.min_len, hi, max(1, cfg.n_train // C) * C, per_class_eval * C,
        sample, encode, edit, ModelSpec(n_classes=C, max_len=0, vocab_size=V + SYM0)))


# ---------------------------------------------------------------- assembly

@dataclass
class _Task:
    name: str
    lo: int  # training length range, in the task's unit
    hi: int
    n_train: int
    n_eval: int  # val and test size each
    sample: Callable[[np.random.Generator, np.ndarray], list[Row]]
    encode: Callable[[Sequence[Row]], Split]
    edit: Callable[[Row, str, float, np.random.Generator], Row]
    spec: ModelSpec  # max_len filled in by `_assemble`


def _assemble(cfg: TrialConfig, task: _Task) -> TaskData:
    """Train/val/test at lengths uniform in [lo, hi], the `len:` and `corrupt:` sets, and the
    spec's max_len; every random stream is derived from `cfg.data_seed` alone."""
    tag = rng_tag(task.name)  # from the task table study.tasks.TASKS
    rng = np.random.default_rng([cfg.data_seed, tag])
    rows = [task.sample(rng, rng.integers(task.lo, task.hi + 1, n))
            for n in (task.n_train, task.n_eval, task.n_eval)]
    train, val, test = (task.encode(r) for r in rows)
    extra: dict[str, Split] = {}
    for L in length_grid(task.lo, task.hi, cfg.ood_len_factors):
        r = np.random.default_rng([cfg.data_seed, tag, 1, L])
        extra[f"len:{L}"] = task.encode(task.sample(r, np.full(N_LEN, L)))
    clean = rows[2][:N_CORRUPT]
    for k, kind in enumerate(KINDS):
        for sev in SEVERITIES:
            r = np.random.default_rng([cfg.data_seed, tag, 2, k, sev])
            extra[f"corrupt:{kind}:{sev}"] = task.encode(
                [task.edit(row, kind, 0.05 * sev, r) for row in clean])
    max_len = max(s.x.shape[1] for s in (train, val, test, *extra.values()))
    spec = ModelSpec(task.spec.n_classes, max_len, task.spec.vocab_size,
                     per_token=task.spec.per_token)
    return TaskData(spec, train, val, test, extra, id_lengths=(task.lo, task.hi))
