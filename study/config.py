"""The frozen dataclass of every design choice: the single source of names.

A field's name is used unchanged as the YAML key, the `--set` key, the Ray param-space key, the
MLflow param and the report column. Categorical fields list their valid values in `CHOICES`;
numeric fields are range-checked in `TrialConfig.__post_init__`. The task names come from the
task table `study.tasks.TASKS`; fields that shape a task's data are declared with `data_field`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

# the task table and its data-free checks (standard library only, no import of this module)
from study.tasks import TASKS, conflict


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
    "step_mode": ("auto", "eager", "graph", "compile"),
}


def switched_on(env: str) -> bool:
    """A process-wide switch of the environment variable `env`: on unless it is "0"."""
    import os
    return os.environ.get(env, "1").strip() != "0"


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
    # how the training step runs (study/step.py): auto = a CUDA graph where it can be captured,
    # else eager; the same computation either way
    step_mode: str = "auto"

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
    for f in fields(c):  # each field on its own, then the fields together
        err = field_limit_error(f.name, getattr(c, f.name))
        if err:
            raise ConfigError(err)
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
    longest = max(c.ood_len_factors, default=1.0) * c.max_len
    if longest > _MAX["max_len"]:
        raise ConfigError(f"ood_len_factors: {max(c.ood_len_factors):g} x max_len {c.max_len} "
                          f"asks for sequences of {longest:g}, over the limit {_MAX['max_len']}; "
                          "choose smaller factors")
    if c.few_shot_thr > c.many_shot_thr:
        raise ConfigError("few_shot_thr: must not exceed many_shot_thr")
    if c.attn_kind == "low_rank" and c.pos_encoding == "alibi":
        raise ConfigError(
            "pos_encoding: alibi biases key positions, which attn_kind=low_rank projects away; "
            "use rope/sinusoidal/learned/none with low_rank"
        )
    if c.drop_path > 0 and c.arch == "transformer" and c.n_layers == 1:
        raise ConfigError(f"drop_path: {c.drop_path:g} does nothing with n_layers=1 (the rate "
                          "rises linearly from 0 at the first block to drop_path at the last); "
                          "use n_layers >= 2 or drop_path 0")
    if c.arch == "lstm_attention":
        for name, ok in (("qk_norm", ("none",)), ("attn_kind", ("full",)),
                         ("pos_encoding", ("sinusoidal", "learned", "none"))):
            if getattr(c, name) not in ok:
                raise ConfigError(
                    f"{name}: {getattr(c, name)!r} does not apply to arch=lstm_attention; "
                    f"use {' or '.join(ok)}"
                )
    why = conflict(c)
    if why:
        raise ConfigError(why)
    if c.task == "text_file" and not c.data_path:
        raise ConfigError("data_path: task=text_file needs data_path=PATH to a CSV/JSONL/Parquet")
    if c.data_path.startswith("~"):
        try:
            Path(c.data_path).expanduser()
        except RuntimeError:  # ~user of no user
            raise ConfigError(f"data_path: {c.data_path}: no home folder for '~'; give the "
                              "full path") from None


def field_limit_error(name: str, value: Any) -> str | None:
    """Why `value` is out of range for field `name` on its own (None if it is not): the
    single-field checks of `TrialConfig`, for values checked before a config exists (the
    ranges and levels of a search space)."""
    if isinstance(value, tuple):
        return (None if all(isinstance(x, (int, float)) and math.isfinite(x) for x in value)
                else f"{name}: every value must be finite, got {value!r}")
    limited = (name in _MAX or name in _POSITIVE or name in _FRACTIONS or name in _NON_NEGATIVE
               or name in ("train_fraction", "imbalance"))
    if isinstance(value, bool):  # an int to Python, never a count or a rate here
        return f"{name}: expected a number, got {value!r}" if limited else None
    if not isinstance(value, numbers.Real):  # (numpy scalars are Real; types are checked apart)
        return None
    try:
        x = float(value)  # compared as a float, shown as given
    except OverflowError:  # an int beyond every float: beyond every limit too
        x = -math.inf if typing.cast(Any, value) < 0 else math.inf
    if not math.isfinite(x) and not isinstance(value, numbers.Integral):
        return f"{name}: must be a finite number, got {value!r}"
    if name in _MAX and x > _MAX[name]:
        return f"{name}: {value!r} exceeds the limit {_MAX[name]:g}; choose a smaller value"
    if name in _POSITIVE and x <= 0:
        return f"{name}: must be > 0, got {value!r}"
    if name in _FRACTIONS and not 0.0 <= x < 1.0:
        return f"{name}: must be in [0, 1), got {value!r}"
    if name in _NON_NEGATIVE and x < 0:
        return f"{name}: must be >= 0, got {value!r}"
    if name == "train_fraction" and not 0.0 < x <= 1.0:
        return f"train_fraction: must be in (0, 1], got {value!r}"
    if name == "imbalance" and x < 1.0:
        return f"imbalance: must be >= 1 (n_max / n_min), got {value!r}"
    return None


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
    except (TypeError, ValueError, OverflowError):
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
    return parse_yaml_mapping(read_yaml_text(path), str(path))


# --- YAML input, bounded in time and memory (README "Search spaces": limits) ---
MAX_YAML_BYTES = 128 * 1024  # a config or space file is a few kB; the pure-Python parser
# reads about 150 kB/s of dense YAML on a slow core, so this bounds parsing to about a second
MAX_YAML_DEPTH = 32  # nesting levels, aliases expanded
MAX_YAML_NODES = 20_000  # values, aliases expanded at every use (an alias bomb is refused)


def read_yaml_text(path: str | Path) -> str:
    """The text of a YAML file: a regular file, at most MAX_YAML_BYTES, UTF-8, not binary."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: file not found; pass an existing YAML file")
    if not p.is_file():
        raise ConfigError(f"{p}: not a regular file; pass a YAML file")
    try:
        with p.open("rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e}); check its permissions"
                          ) from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_YAML_BYTES // 1024} KiB, the limit of a YAML "
                          "config file; pass the right file or shorten it")
    if b"\0" in data:
        raise ConfigError(f"{p}: a binary file (it holds NUL bytes), not YAML text; pass a "
                          "YAML file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                          f"{e.start}); save it as UTF-8") from None


class _YamlLimit(Exception):
    """A YAML document beyond the limits above (or with a duplicate key)."""

    def __init__(self, msg: str, mark: Any = None) -> None:
        super().__init__(msg)
        self.mark = mark


def _yaml_children(node: Any) -> list[Any]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_expansion(root: Any) -> None:
    """Refuse a node graph whose expansion (every alias replaced by its value) is too large or
    too deep, or is recursive; iterative, so a deep graph cannot exhaust the stack."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            kids = _yaml_children(node)
            size[key] = min(1 + sum(size[id(k)] for k in kids), MAX_YAML_NODES + 1)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_YAML_NODES:
                raise _YamlLimit(f"its aliases expand to more than {MAX_YAML_NODES} values (an "
                                 "alias bomb?); write the values out", node.start_mark)
            if depth[key] > MAX_YAML_DEPTH:
                raise _YamlLimit(f"nested deeper than {MAX_YAML_DEPTH} levels; flatten it",
                                 node.start_mark)
            continue
        if key in size:
            continue
        if key in on_path:
            raise _YamlLimit("an alias refers to a value that holds it (a recursive "
                             "structure); write the values out", node.start_mark)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _yaml_children(node) if id(k) not in size)


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader with bounded nesting and alias expansion, refusing duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self._depth >= MAX_YAML_DEPTH:  # before the recursion, not after it
            raise _YamlLimit(f"nested deeper than {MAX_YAML_DEPTH} levels; flatten it",
                             self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: Any) -> Any:
        _check_expansion(node)
        return super().construct_document(node)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                except TypeError:  # unhashable: the constructor refuses it below
                    continue
                if dup:
                    raise _YamlLimit(f"duplicate key {key!r} (a mapping holds each key once); "
                                     "keep one", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def parse_yaml_mapping(text: str, source: str) -> dict[str, Any]:
    """Parse YAML text that must hold a mapping; errors name `source`. Bounded: at most
    MAX_YAML_BYTES characters, MAX_YAML_DEPTH levels and MAX_YAML_NODES values (aliases
    expanded); duplicate keys are refused."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_YAML_BYTES // 1024} KiB, the limit of a "
                          "YAML config; shorten it")
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader refuses unprintable characters here
        data = loader.get_single_data()
    except _YamlLimit as e:
        where = f" line {e.mark.line + 1}:" if e.mark is not None else ""
        raise ConfigError(f"{source}:{where} {e}") from None
    except yaml.reader.ReaderError as e:
        char = e.character if isinstance(e.character, int) else ord(e.character[:1] or "\0")
        raise ConfigError(f"{source}: not YAML text (unprintable character #x{char:04x} at "
                          f"position {e.position}); pass a YAML text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"{source}:{where} malformed YAML ({_one_line(problem)})") from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as e:
        # e.g. an integer of more than 4300 digits, or an impossible timestamp
        what = ("an integer of more than 4300 digits" if "integer string conversion" in str(e)
                else f"{type(e).__name__}: {_one_line(e)[:200]}")
        raise ConfigError(f"{source}: malformed YAML ({what}); fix the value") from None
    finally:
        if loader is not None:
            loader.dispose()
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
    try:
        return make_config(values)
    except ConfigError as e:  # blame what gave the key: a --set value, else the file
        key = str(e).split(":", 1)[0]
        where = "--set " if key in sets else f"{source}: " if source else ""
        raise ConfigError(f"{where}{e}") from None


def field_defaults() -> dict[str, Any]:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else None)
            for f in fields(TrialConfig)}


__all__ = ["CHOICES", "FIELD_NAMES", "ConfigError", "TrialConfig", "coerce", "field_defaults",
           "load_config", "make_config", "parse_set"]
