"""The frozen dataclass of every design choice: the single source of names.

A field's name is used unchanged as the YAML key, the `--set` key, the Ray param-space key, the
MLflow param and the report column. Categorical fields list their valid values in `CHOICES`;
numeric fields are range-checked in `TrialConfig.__post_init__`. The task names come from the
task table `study.tasks.TASKS`; fields that shape a task's data are declared with `data_field`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from study.tasks import TASKS  # the task table (standard library only, no import of this module)


class ConfigError(ValueError):
    """A bad configuration value: the message is one line naming the key and the fix."""


CHOICES: dict[str, tuple[str, ...]] = {
    "task": tuple(TASKS),
    "arch": ("transformer", "lstm_attention"),
    "qk_norm": ("none", "layernorm", "l2"),
    "init": ("xavier_uniform", "normal_002", "small_init", "deepnorm"),
    "norm": ("pre_ln", "post_ln", "rmsnorm", "none"),
    "pos_encoding": ("sinusoidal", "learned", "rope", "alibi", "none"),
    "attn_kind": ("full", "local", "low_rank"),
    "channel_attention": ("none", "se"),
    "embed": ("patch", "conv"),
    "length_mode": ("pad", "bucket", "truncate"),
    "tokenizer": ("char", "word"),
    "device": ("auto", "cpu", "cuda"),
}


def data_field(default: Any) -> Any:
    """A field that shapes the task data: it is part of the data cache key
    (`study.tasks.DATA_FIELDS`), so configs differing in it never share built data."""
    return dataclasses.field(default=default, metadata={"data": True})


@dataclass(frozen=True)
class TrialConfig:
    """One trial: the task, the training budget and every attention design choice."""

    # task and data (fields declared with `data_field` shape the built data)
    task: str = data_field("digits")
    seed: int = 0  # initialization, data order and dropout (the replicate seed)
    data_seed: int = data_field(0)  # the generated data and its train/val/test split
    # fraction of the training split kept (sample-size curves)
    train_fraction: float = data_field(1.0)
    label_noise: float = data_field(0.0)  # fraction of training labels flipped to another class
    # long-tail ratio rho = n_max / n_min on the training split
    imbalance: float = data_field(1.0)
    many_shot_thr: int = 100  # classes with more training samples are "many-shot"
    few_shot_thr: int = 20  # classes with fewer training samples are "few-shot"
    # sequence tasks
    min_len: int = data_field(4)
    max_len: int = data_field(16)
    ood_len_factors: tuple[float, ...] = data_field((2.0, 4.0))
    length_mode: str = data_field("pad")
    vocab_size: int = data_field(16)
    n_classes: int = data_field(50)  # many_class task only
    n_train: int = data_field(4000)  # generated tasks: training sequences
    # continuous signals (digits, mnist1d)
    embed: str = "patch"
    patch_size: int = 4
    # mnist1d: permute time steps (positional inductive bias)
    shuffle_seq: bool = data_field(False)
    # mnist1d: points per sequence (the generator's final_seq_length)
    seq_length: int = data_field(40)
    # user data (task: text_file)
    data_path: str = data_field("")
    text_column: str = data_field("text")
    label_column: str = data_field("label")
    tokenizer: str = data_field("char")
    # architecture
    arch: str = "transformer"
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 128
    # dropout
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    emb_dropout: float = 0.0
    # attention temperature and normalization of q, k
    attn_temperature: float = 1.0
    learned_temperature: bool = False
    qk_norm: str = "none"
    qk_norm_gain: float = 10.0  # initial learnable gain of qk_norm=l2
    # initialization, normalization, positions, attention kind
    init: str = "xavier_uniform"
    init_scale: float = 1.0
    norm: str = "pre_ln"
    pos_encoding: str = "sinusoidal"
    attn_kind: str = "full"
    attn_window: int = 4
    attn_rank: int = 8
    channel_attention: str = "none"
    # regularization
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    drop_path: float = 0.0
    attn_entropy_reg: float = 0.0
    z_loss: float = 0.0
    logit_adjust_tau: float = 0.0
    # optimization
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"{name}: invalid value {value!r}; valid choices: {', '.join(allowed)}"
                )
        _check_ranges(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrialConfig:
        return dataclasses.replace(self, **changes)


_POSITIVE = ("d_model", "n_heads", "n_layers", "d_ff", "epochs", "batch_size", "patch_size",
             "attn_window", "attn_rank", "min_len", "max_len", "vocab_size", "n_train",
             "seq_length", "attn_temperature", "lr", "qk_norm_gain", "init_scale", "imbalance",
             "n_classes")
_FRACTIONS = ("attn_dropout", "resid_dropout", "emb_dropout", "drop_path", "label_smoothing",
              "label_noise", "warmup_frac")
_NON_NEGATIVE = ("weight_decay", "attn_entropy_reg", "z_loss", "logit_adjust_tau", "grad_clip",
                 "seed", "data_seed", "many_shot_thr", "few_shot_thr")


# upper limits of sizes and seeds: beyond them a trial cannot run on any machine this harness
# targets (or a seed overflows torch's generator); the message names the limit. Real-valued
# fields need only be finite: an absurd learning rate is a legitimate way to study divergence.
_MAX = {"seed": 2**31 - 1, "data_seed": 2**31 - 1, "d_model": 16384, "d_ff": 65536,
        "n_heads": 1024, "n_layers": 256, "epochs": 100_000, "batch_size": 1 << 20,
        "patch_size": 4096, "attn_window": 1 << 16, "attn_rank": 1 << 16, "min_len": 1 << 16,
        "max_len": 1 << 16, "vocab_size": 1 << 20, "n_train": 10_000_000, "seq_length": 1 << 16,
        "n_classes": 100_000, "many_shot_thr": 10_000_000, "few_shot_thr": 10_000_000}


def _check_ranges(c: TrialConfig) -> None:
    for f in fields(c):
        v = getattr(c, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{f.name}: must be a finite number, got {v!r}")
        if isinstance(v, tuple) and not all(math.isfinite(x) for x in v):
            raise ConfigError(f"{f.name}: every value must be finite, got {v!r}")
    for name, top in _MAX.items():
        if getattr(c, name) > top:
            raise ConfigError(f"{name}: {getattr(c, name)!r} exceeds the limit {top:g}; "
                              "choose a smaller value")
    for name in _POSITIVE:
        if getattr(c, name) <= 0:
            raise ConfigError(f"{name}: must be > 0, got {getattr(c, name)!r}")
    for name in _FRACTIONS:
        if not 0.0 <= getattr(c, name) < 1.0:
            raise ConfigError(f"{name}: must be in [0, 1), got {getattr(c, name)!r}")
    for name in _NON_NEGATIVE:
        if getattr(c, name) < 0:
            raise ConfigError(f"{name}: must be >= 0, got {getattr(c, name)!r}")
    if not 0.0 < c.train_fraction <= 1.0:
        raise ConfigError(f"train_fraction: must be in (0, 1], got {c.train_fraction!r}")
    if c.imbalance < 1.0:
        raise ConfigError(f"imbalance: must be >= 1 (n_max / n_min), got {c.imbalance!r}")
    if c.d_model % c.n_heads:
        raise ConfigError(
            f"n_heads: {c.n_heads} does not divide d_model={c.d_model}; "
            "choose n_heads so that d_model % n_heads == 0"
        )
    if c.pos_encoding == "rope" and (c.d_model // c.n_heads) % 2:
        raise ConfigError("pos_encoding: rope needs an even head size d_model / n_heads")
    if c.min_len > c.max_len:
        raise ConfigError(f"min_len: {c.min_len} exceeds max_len={c.max_len}")
    if any(f <= 1.0 for f in c.ood_len_factors):
        raise ConfigError("ood_len_factors: every factor must be > 1 (longer than training)")
    if c.few_shot_thr > c.many_shot_thr:
        raise ConfigError("few_shot_thr: must not exceed many_shot_thr")
    if c.attn_kind == "low_rank" and c.pos_encoding == "alibi":
        raise ConfigError(
            "pos_encoding: alibi biases key positions, which attn_kind=low_rank projects away; "
            "use rope/sinusoidal/learned/none with low_rank"
        )
    if c.arch == "lstm_attention":
        for name, ok in (("qk_norm", ("none",)), ("attn_kind", ("full",)),
                         ("pos_encoding", ("sinusoidal", "learned", "none"))):
            if getattr(c, name) not in ok:
                raise ConfigError(
                    f"{name}: {getattr(c, name)!r} does not apply to arch=lstm_attention; "
                    f"use {' or '.join(ok)}"
                )
    if c.task == "text_file" and not c.data_path:
        raise ConfigError("data_path: task=text_file needs data_path=PATH to a CSV/JSONL/Parquet")


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(TrialConfig))
_TYPES: dict[str, Any] = typing.get_type_hints(TrialConfig)


def coerce(name: str, value: Any) -> Any:
    """Convert `value` (a YAML value or a `--set` string) to the type of field `name`."""
    if name not in _TYPES:
        raise ConfigError(
            f"unknown key {name!r}; valid keys: {', '.join(FIELD_NAMES)}"
        )
    typ = _TYPES[name]
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if typing.get_origin(typ) is tuple or isinstance(typ, types.GenericAlias):
            if isinstance(value, str):
                value = [v for v in value.strip("()[] ").split(",") if v.strip()]
            return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"unhandled type {typ} for {name}")
    tname = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{name}: expected {tname}, got {value!r}")


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse repeated `key=value` strings into a typed dict."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{item!r}: expected key=value, e.g. --set epochs=3")
        key, value = item.split("=", 1)
        out[key.strip()] = coerce(key.strip(), value.strip())
    return out


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found; pass an existing YAML file")
    return parse_yaml_mapping(p.read_text(), str(p))


def parse_yaml_mapping(text: str, source: str) -> dict[str, Any]:
    """Parse YAML text that must hold a mapping; errors name `source`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}:{where} malformed YAML ({getattr(e, 'problem', e)})"
                          ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of key: value at the top level")
    return data


def make_config(values: dict[str, Any] | None = None, source: str = "") -> TrialConfig:
    """Build a validated config from untyped values; errors are prefixed with `source`."""
    prefix = f"{source}: " if source else ""
    try:
        typed = {k: coerce(k, v) for k, v in (values or {}).items()}
        return TrialConfig(**typed)
    except ConfigError as e:
        raise ConfigError(prefix + str(e)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrialConfig:
    """YAML file (optional) + `--set` overrides -> validated TrialConfig."""
    values: dict[str, Any] = {}
    source = ""
    if path is not None:
        values.update(load_yaml_mapping(path))
        source = str(path)
    try:
        sets = parse_set(overrides or [])
    except ConfigError as e:
        raise ConfigError(f"--set {e}") from None
    values.update(sets)
    return make_config(values, source)


def field_defaults() -> dict[str, Any]:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else None)
            for f in fields(TrialConfig)}


__all__ = ["CHOICES", "FIELD_NAMES", "ConfigError", "TrialConfig", "coerce", "field_defaults",
           "load_config", "make_config", "parse_set"]
