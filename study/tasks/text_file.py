"""Text classification from a local file (`task: text_file`).

`data_path` names a CSV (`.csv`), JSON-lines (`.jsonl`, or `.json` holding one object per line)
or Parquet (`.parquet`) file, read with pandas; `text_column` holds the text and `label_column`
the label. Rows missing either value are dropped (in CSV only an empty field counts as missing:
"NA" or "null" stay text).

- Split: seeded stratified 70/15/15 train/val/test (`stratified_split` with `data_seed`).
- Labels: the sorted unique label values map to 0..C-1 (sorted by their string form if the
  values cannot be compared).
- Tokens: `tokenizer: char` (characters, case kept) or `word` (lower-cased whitespace tokens).
  The vocabulary comes from the TRAINING split only: id 0 is padding, 1 unknown (UNK), then
  training tokens by frequency (descending), ties broken lexicographically. A row with no token
  (whitespace-only text under `word`) becomes a single UNK.
- Length: every split is padded to its longest row; clean splits share the width of the longest
  clean row. (`length_mode: truncate` is applied generically after the build.)
- Corruption sets `corrupt:<kind>:<severity>` (s = 1..5) from the test split, label kept, at
  rate 0.05 * s per token, seeded by `data_seed`; replacement and inserted tokens are drawn
  uniformly from the vocabulary's real tokens (ids >= 2); the draws are shared by the
  severities of a kind, so a higher severity corrupts a superset of the positions:
  `substitution` (each token replaced, with probability rate, by a different token),
  `deletion` (each token dropped with probability rate; a row keeps at least its first token),
  `insertion` (a random token inserted before each token with probability rate; rows grow, so
  `ModelSpec.max_len` is the longest row of any split, corruption sets included).

Every problem with the file is a one-line `ConfigError` naming the file or key and the fix.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from study.config import ConfigError, TrialConfig
from study.model import ModelSpec
from study.tasks.base import SEVERITIES, Split, TaskData, stratified_split

PAD, UNK = 0, 1
FRACTIONS = (0.7, 0.15, 0.15)
MIN_PER_CLASS = 3
CORRUPTIONS = ("substitution", "deletion", "insertion")
RATE_PER_SEVERITY = 0.05
FORMATS = {".csv": "CSV", ".jsonl": "JSON lines", ".json": "JSON lines", ".parquet": "Parquet"}


@dataclass
class TextData:
    """The built task plus what it was built from (for inspection and tests)."""

    data: TaskData
    vocab: dict[str, int]  # token -> id (ids >= 2)
    classes: list[Any]  # class index -> label value
    tokens: list[list[str]]  # tokenized rows of the file, after dropping incomplete rows
    splits: tuple[np.ndarray, np.ndarray, np.ndarray]  # row indices of train/val/test


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def read_table(path_str: str) -> pd.DataFrame:
    """Read `path_str` by its extension; every failure is a one-line ConfigError."""
    path = Path(path_str).expanduser()
    if not path.exists():
        raise ConfigError(f"data_path: {path} not found; pass an existing CSV, JSONL or Parquet "
                          "file (relative paths are from the working directory)")
    if not path.is_file():
        raise ConfigError(f"data_path: {path} is not a file; pass a CSV, JSONL or Parquet file")
    ext = path.suffix.lower()
    if ext not in FORMATS:
        raise ConfigError(f"data_path: {path}: unsupported extension {ext or '(none)'!r}; use "
                          ".csv, .jsonl (or .json with one object per line) or .parquet")
    if path.stat().st_size == 0:
        raise ConfigError(f"data_path: {path} is empty; it needs a header/columns and rows")
    try:
        if ext == ".csv":
            df = pd.read_csv(path, keep_default_na=False, na_values=[""])
        elif ext == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_json(path, lines=True)
    except Exception as e:
        raise ConfigError(f"data_path: {path}: cannot read as {FORMATS[ext]} ({_one_line(e)}); "
                          "fix the file or give it the extension of its format") from None
    if not isinstance(df, pd.DataFrame):
        raise ConfigError(f"data_path: {path}: expected a table of rows, got {type(df).__name__}")
    return df


def tokenize(text: str, tokenizer: str) -> list[str]:
    return text.lower().split() if tokenizer == "word" else list(text)


def build_vocab(rows: list[list[str]]) -> dict[str, int]:
    """Token -> id from `rows`: by frequency (descending), then lexicographically, from id 2."""
    counts = Counter(t for row in rows for t in row)
    order = sorted(counts, key=lambda t: (-counts[t], t))
    return {t: i + 2 for i, t in enumerate(order)}


def _sorted_labels(values: list[Any]) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=lambda v: (type(v).__name__, str(v)))


def _pad(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    return x, torch.arange(width)[None, :] < lengths[:, None]


def corrupt_rows(rows: list[list[int]], kind: str, rate: float, vocab_size: int,
                 rng: np.random.Generator) -> list[list[int]]:
    """Apply token-level corruption `kind` at `rate` to id rows; new tokens are ids >= 2.

    The random draws do not depend on `rate`, so with the same `rng` seed a higher rate
    corrupts a superset of the positions a lower rate corrupts."""
    out = []
    n_real = vocab_size - 2  # real tokens: ids 2 .. vocab_size - 1
    for r in rows:
        a = np.asarray(r, dtype=np.int64)
        hit = rng.random(len(a)) < rate
        u = rng.random(len(a))
        new = 2 + (u * n_real).astype(np.int64) if n_real > 0 else np.full(len(a), UNK)
        if kind == "substitution":
            if n_real > 1:  # a different real token: skip over the original
                other = 2 + (u * (n_real - 1)).astype(np.int64)
                new = np.where(a >= 2, np.where(other >= a, other + 1, other), new)
            a = np.where(hit, new, a)
        elif kind == "deletion":
            hit[0] = hit[0] and not hit.all()  # keep at least the first token
            a = a[~hit]
        elif kind == "insertion":
            a = np.insert(a, np.flatnonzero(hit), new[hit])
        else:
            raise ValueError(f"unknown corruption {kind!r}")
        out.append(a.tolist())
    return out


def prepare(cfg: TrialConfig) -> TextData:
    """Read, validate, split, tokenize and encode `cfg.data_path`."""
    df = read_table(cfg.data_path)
    path = Path(cfg.data_path).expanduser()
    cols = ", ".join(map(str, df.columns)) or "(none)"
    for key, col in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        if col not in df.columns:
            raise ConfigError(f"{key}: column {col!r} not in {path}; available columns: {cols}; "
                              f"set {key}=NAME")
    if cfg.text_column == cfg.label_column:
        raise ConfigError(f"label_column: {cfg.label_column!r} is also the text_column; set "
                          "text_column and label_column to two different columns")
    df = df[[cfg.text_column, cfg.label_column]].dropna()
    if len(df) == 0:
        raise ConfigError(f"data_path: {path} has no rows with both {cfg.text_column!r} and "
                          f"{cfg.label_column!r}; add labelled rows")
    labels = df[cfg.label_column].tolist()
    odd = next((v for v in labels if not isinstance(v, (str, int, float, bool))), None)
    if odd is not None:
        raise ConfigError(f"label_column: {cfg.label_column!r} in {path} holds a "
                          f"{type(odd).__name__} ({str(odd)[:40]!r}); labels must be text or "
                          "numbers, one per row")
    classes = _sorted_labels(list(dict.fromkeys(labels)))
    if len(classes) < 2:
        raise ConfigError(f"label_column: {cfg.label_column!r} in {path} has a single class "
                          f"({classes[0]!r}); classification needs at least 2 classes")
    counts = Counter(labels)
    small = [c for c in classes if counts[c] < MIN_PER_CLASS]
    if small:
        c = small[0]
        raise ConfigError(
            f"label_column: class {c!r} in {path} has only {counts[c]} row(s); each class needs "
            f"at least {MIN_PER_CLASS} rows for the stratified 70/15/15 train/val/test split "
            f"({len(small)} class(es) too small); add rows or drop those classes")
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[v] for v in labels], dtype=np.int64)
    tokens = [tokenize(str(t), cfg.tokenizer) for t in df[cfg.text_column].tolist()]
    tr, va, te = stratified_split(y, FRACTIONS, cfg.data_seed)
    vocab = build_vocab([tokens[i] for i in tr])
    ids = [[vocab.get(t, UNK) for t in row] or [UNK] for row in tokens]
    width = max(len(r) for r in ids)

    def split(idx: np.ndarray, rows: list[list[int]] | None = None) -> Split:
        rows = rows if rows is not None else [ids[i] for i in idx]
        x, mask = _pad(rows, max(width, *(len(r) for r in rows)))
        return Split(x, torch.from_numpy(y[idx]), mask)

    V = len(vocab) + 2
    extra: dict[str, Split] = {}
    test_rows = [ids[i] for i in te]
    for k, kind in enumerate(CORRUPTIONS):
        for s in SEVERITIES:
            rng = np.random.default_rng([cfg.data_seed, 202, k])  # nested across severities
            extra[f"corrupt:{kind}:{s}"] = split(
                te, corrupt_rows(test_rows, kind, RATE_PER_SEVERITY * s, V, rng))
    max_len = max([width] + [s.x.shape[1] for s in extra.values()])
    spec = ModelSpec(n_classes=len(classes), max_len=max_len, vocab_size=V)
    data = TaskData(spec, split(tr), split(va), split(te), extra)
    return TextData(data, vocab, classes, tokens, (tr, va, te))


def build(cfg: TrialConfig) -> TaskData:
    return prepare(cfg).data
