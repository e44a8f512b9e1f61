"""Search-space files: strict parsing and validation into a frozen `SweepSpec`.

Every error is one line naming the file, the key and the fix (`SpaceError`, exit code 2). The
schema is documented in the README ("Search spaces").
"""

from __future__ import annotations

import ast
import functools
import itertools
import math
import operator
import random
import re
from pathlib import Path
from typing import Any

from study.config import (
    CHOICES,
    FIELD_NAMES,
    ConfigError,
    coerce,
    field_limit_error,
    make_config,
    parse_yaml_mapping,
    read_yaml_text,
)
from study.metrics import (
    ALL_METRICS,
    CORE_METRICS,
    FEW_SHOT_ACC,
    ID_LEN_ACC,
    LEN_GEN_RATIO,
    MANY_SHOT_ACC,
    MEDIUM_SHOT_ACC,
    OOD_LEN_ACC,
)
from study.records import (
    DEFAULT_MIN_EFFECT,
    DEFAULT_MIN_TRIALS,
    DESIGNS,
    FIXED_DESIGNS,
    MULTI_OBJECTIVE_SEARCHERS,
    PARAM_TYPES,
    SEARCHERS,
    SEED_BATCHING,
    ParamSpec,
    SweepSpec,
)

NOT_SEARCHABLE = ("epochs", "seed", "device", "step_mode")
# metrics that are fractions: a smallest effect of interest above 1 cannot be reached
FRACTION_METRICS = frozenset(m for m in ALL_METRICS if m.endswith("_acc")) | {"macro_f1", "ece"}
TOP_KEYS = ("name", "description", "task", "fixed", "params", "constraints", "budget", "seeds",
            "objective", "design", "searcher", "searcher_seed", "num_trials", "max_concurrent",
            "resources", "analysis", "vary_data_seed", "seed_batching")
MAX_GRID = 10_000  # the most design points enumerated (a factorial grid, one_at_a_time's)
# upper limits of a space's own keys (README "Search spaces": limits)
LIMITS = {"num_trials": 1_000_000, "max_concurrent": 10_000, "seeds": 1_000,
          "searcher_seed": 2**32 - 1,  # numpy's RandomState, which Optuna's samplers seed
          "budget.reduction_factor": 1_000, "design.bases": 100,
          "analysis.min_trials": 1_000_000}
MAX_RESOURCE = {"cpu": 1024.0, "gpu": 1024.0}  # per trial
MAX_DESCRIPTION = 10_000  # characters
# constraint expressions: a small arithmetic/comparison grammar, bounded
MAX_CONSTRAINTS, MAX_EXPR_CHARS, MAX_EXPR_NODES = 100, 500, 200
MAX_CONSTANT = 10**12  # |a numeric literal|
MAX_POW = 64  # |the exponent of **|: a literal number
MAX_INT_BITS = 256  # intermediate integers
MAX_STR_CONSTANT = 200  # characters of a string literal
NAME_MAX = 100
_NAME = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{NAME_MAX - 1}}}")
NAME_RULE = (f"1 to {NAME_MAX} letters, digits, '.', '_' or '-', not starting with '.' (it "
             "names a folder under --storage)")


class SpaceError(ConfigError):
    """A bad search-space file."""


def check_name(name: Any, where: str) -> str:
    """A sweep name that is a safe file name (it names the folder `--storage/NAME/`)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SpaceError(f"{where}: {_short(name)} is not a valid sweep name; use {NAME_RULE}")
    return name


def check_resource(where: str, kind: str, value: Any) -> float:
    """A per-trial amount of `cpu` or `gpu` as Ray accepts it: finite, within MAX_RESOURCE,
    cpu > 0, gpu >= 0, and a GPU amount above 1 whole."""
    _expect(isinstance(value, (int, float)) and not isinstance(value, bool),
            f"{where}: expected a number, got {_short(value)}")
    v = float(value)
    top = MAX_RESOURCE[kind]
    _expect(math.isfinite(v) and (v > 0 if kind == "cpu" else v >= 0),
            f"{where}: expected a finite number {'> 0' if kind == 'cpu' else '>= 0'}, got {v!r}")
    _expect(v <= top, f"{where}: {v:g} exceeds the limit {top:g} per trial")
    _expect(v == 0 or v >= 1e-4, f"{where}: {v:g} is below Ray's precision of 0.0001")
    _expect(kind != "gpu" or v <= 1 or v.is_integer(),
            f"{where}: {v:g} GPUs: Ray takes a fraction of one GPU (<= 1) or a whole number; "
            f"use {math.floor(v)} or {math.ceil(v)}")
    return v


def _short(v: Any, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def infeasible(space: SweepSpec, sampled: dict[str, Any], strict: bool = False) -> str | None:
    """Why a sampled configuration cannot run (a broken constraint or an invalid config).

    A constraint that cannot be evaluated (division by zero, comparing a string with a
    number, a value out of bounds) makes the configuration infeasible, with the reason; with
    `strict` (while a space is parsed) it raises `SpaceError` naming the constraint."""
    try:
        cfg = make_config(space.resolve(sampled))
    except ConfigError as e:
        return str(e)
    if not space.constraints:
        return None
    env = {name: getattr(cfg, name) for name in FIELD_NAMES}  # not asdict: no deep copies
    for i, text in enumerate(space.constraints):
        try:
            holds = _eval(_compiled(text).body, env)
        except _EvalError as e:
            if strict:
                names = sorted({n.id for n in ast.walk(_compiled(text))
                                if isinstance(n, ast.Name)})
                at = " at " + ", ".join(f"{n}={_short(env[n], 40)}" for n in names)
                raise SpaceError(f"{space.path}: constraints[{i}]: {text!r} cannot be evaluated"
                                 f"{at if names else ''}: {e}; fix the expression") from None
            return f"constraint {text!r} cannot be evaluated ({e})"
        if not holds:
            return f"constraint {text!r} does not hold"
    return None


@functools.lru_cache(maxsize=256)
def _compiled(text: str) -> ast.Expression:
    return _check_expr(text, "constraints")


# --- a tiny, safe evaluator for constraint expressions (no eval) ---
# The grammar: config field names, literals (numbers up to MAX_CONSTANT, strings, True/False/
# None), tuples/lists of them, + - * / // % and ** (a literal exponent up to MAX_POW), unary
# - + not, and/or, comparisons (== != < <= > >= in, not in). Arithmetic takes numbers only, and
# integers stay below 2**MAX_INT_BITS: every evaluation is a few microseconds.
_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
        ast.Pow: operator.pow}
_CMP = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
        ast.NotIn: lambda a, b: a not in b}
_SYMBOL: dict[type, str] = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//",
    ast.Mod: "%", ast.Pow: "**", ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=",
    ast.Gt: ">", ast.GtE: ">=", ast.In: "in", ast.NotIn: "not in", ast.USub: "unary -",
    ast.UAdd: "unary +"}


class _EvalError(Exception):
    """A constraint that cannot be evaluated for some configuration."""


def _operands(op: type, *vals: Any) -> None:
    for v in vals:
        if not isinstance(v, (int, float)):
            raise _EvalError(f"{_SYMBOL[op]} needs numbers, got {type(v).__name__} {_short(v)}")


def _bounded(v: Any) -> Any:
    if isinstance(v, int) and v.bit_length() > MAX_INT_BITS:
        raise _EvalError(f"an intermediate value exceeds 2**{MAX_INT_BITS}")
    if isinstance(v, complex):
        raise _EvalError("a complex result (a negative number to a fractional power)")
    return v


def _eval(node: ast.AST, env: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_eval(e, env) for e in node.elts)
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        op = type(node.op)
        left, right = _eval(node.left, env), _eval(node.right, env)
        _operands(op, left, right)
        try:
            return _bounded(_BIN[op](left, right))
        except ZeroDivisionError:
            raise _EvalError(f"division by zero in {_SYMBOL[op]}") from None
        except OverflowError:
            raise _EvalError(f"overflow in {_SYMBOL[op]}") from None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _eval(node.operand, env)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand, env)
        _operands(type(node.op), v)
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BoolOp):
        vals = (_eval(v, env) for v in node.values)
        return all(vals) if isinstance(node.op, ast.And) else any(vals)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, env)
        for cmp, comp in zip(node.ops, node.comparators):
            right = _eval(comp, env)
            try:
                holds = bool(_CMP[type(cmp)](left, right))
            except TypeError:
                raise _EvalError(f"{_SYMBOL[type(cmp)]} between {type(left).__name__} "
                                 f"{_short(left)} and {type(right).__name__} {_short(right)} "
                                 "(compare a field with values of its type)") from None
            if not holds:
                return False
            left = right
        return True
    raise _EvalError(f"unsupported syntax {type(node).__name__}")


def _literal_number(node: ast.AST) -> float | None:
    """The value of a numeric literal, signed or not (None for anything else)."""
    sign = 1
    while isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign, node = (-sign if isinstance(node.op, ast.USub) else sign), node.operand
    if (isinstance(node, ast.Constant) and isinstance(node.value, (int, float))
            and not isinstance(node.value, bool)):
        return sign * node.value
    return None


def _check_expr(text: str, where: str) -> ast.Expression:
    """Parse a constraint and check it against the grammar above; one-line errors."""
    _expect(len(text) <= MAX_EXPR_CHARS, f"{where}: {len(text)} characters, over the limit of "
                                         f"{MAX_EXPR_CHARS}; split it into several constraints")
    try:
        expr = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise SpaceError(f"{where}: cannot parse {_short(text)}; write e.g. "
                         "'d_model % n_heads == 0'") from None
    nodes = list(ast.walk(expr))
    _expect(len(nodes) <= MAX_EXPR_NODES, f"{where}: {_short(text)} has {len(nodes)} syntax "
                                          f"nodes, over the limit of {MAX_EXPR_NODES}; split it")
    ok = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.Tuple, ast.List, ast.BinOp,
          ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.BoolOp, ast.And, ast.Or, ast.Compare,
          *_BIN, *_CMP)
    for node in nodes:
        if isinstance(node, ast.Name) and node.id not in FIELD_NAMES:
            raise SpaceError(f"{where}: {_short(text)} uses unknown field {node.id!r}")
        if not isinstance(node, ok):
            raise SpaceError(f"{where}: {_short(text)} uses unsupported syntax "
                             f"({type(node).__name__}); use arithmetic, comparisons, and/or/not")
        if isinstance(node, ast.Constant):
            v = node.value
            _expect(v is None or isinstance(v, (bool, int, float, str)),
                    f"{where}: {_short(text)}: literal {_short(v)} is not a number, string, "
                    "True, False or None")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                _expect(math.isfinite(v) and abs(v) <= MAX_CONSTANT,
                        f"{where}: {_short(text)}: the number {_short(v, 30)} is beyond "
                        f"+-{MAX_CONSTANT:.0e}; use a smaller literal")
            if isinstance(v, str):
                _expect(len(v) <= MAX_STR_CONSTANT, f"{where}: a string literal over "
                                                    f"{MAX_STR_CONSTANT} characters")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            e = _literal_number(node.right)
            _expect(e is not None and abs(e) <= MAX_POW,
                    f"{where}: {_short(text)}: ** takes a literal exponent between "
                    f"-{MAX_POW} and {MAX_POW} (e.g. n_heads ** 2)")
    return expr


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise SpaceError(msg)


def _param(src: str, name: str, spec: Any, known: dict[str, Any]) -> ParamSpec:
    where = f"{src}: params.{name}"
    _expect(name in FIELD_NAMES, f"{where}: unknown field; valid: {', '.join(FIELD_NAMES)}")
    _expect(name not in NOT_SEARCHABLE,
            f"{where}: {name} is not searchable (epochs: set budget.epochs; seeds: set seeds)")
    if isinstance(spec, list):
        spec = {"type": "categorical", "values": spec}
    _expect(isinstance(spec, dict),
            f"{where}: expected a list of values or a mapping with 'type'")
    allowed = {"type", "values", "low", "high", "log", "step", "when"}
    extra = set(spec) - allowed
    _expect(not extra, f"{where}: unknown key(s) {sorted(extra, key=str)}; valid: "
                       f"{sorted(allowed)}")
    kind = spec.get("type")
    _expect(kind in PARAM_TYPES, f"{where}.type: {kind!r}; valid: {', '.join(PARAM_TYPES)}")

    def co(v: Any, key: str, limits: bool = True) -> Any:
        try:
            v = coerce(name, v)
        except ConfigError as e:
            raise SpaceError(f"{where}.{key}: {e}") from None
        if name in CHOICES and v not in CHOICES[name]:
            raise SpaceError(f"{where}.{key}: invalid value {v!r}; valid choices: "
                             f"{', '.join(CHOICES[name])}")
        err = field_limit_error(name, v) if limits else None
        _expect(err is None, f"{where}.{key}: {err}")
        return v

    when: list[tuple[str, tuple[Any, ...]]] = []
    raw_when = spec.get("when") or {}
    _expect(isinstance(raw_when, dict),
            f"{where}.when: expected a mapping of field: value(s), e.g. {{qk_norm: l2}}")
    for k, vals in raw_when.items():
        _expect(k in known, f"{where}.when: {k!r} must be a param listed earlier or a fixed field")
        vals = vals if isinstance(vals, list) else [vals]
        typed = []
        for v in vals:
            try:
                v = coerce(k, v)
            except ConfigError as e:
                raise SpaceError(f"{where}.when: {e}") from None
            _expect(k not in CHOICES or v in CHOICES[k],
                    f"{where}.when: {k}={v!r} is not a valid value; valid choices: "
                    f"{', '.join(CHOICES.get(k, ()))}")
            typed.append(v)
        when.append((k, tuple(typed)))
    if kind == "categorical":
        vals = spec.get("values")
        _expect(isinstance(vals, list) and len(vals) > 0,
                f"{where}.values: expected a non-empty list")
        levels = tuple(co(v, "values") for v in vals)
        _expect(len(set(levels)) == len(levels), f"{where}.values: a value is repeated")
        return ParamSpec(name, kind, levels, when=tuple(when))
    if "values" in spec:  # numeric levels: a design's grid, or a set to choose among
        both = sorted({"low", "high", "log", "step"} & set(spec))
        _expect(not both, f"{where}: give either values or low/high, not both (also {both})")
        vals = spec["values"]
        _expect(isinstance(vals, list) and len(vals) > 0,
                f"{where}.values: expected a non-empty list of numbers")
        levels = tuple(co(v, "values") for v in vals)
        _expect(all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in levels),
                f"{where}: {name} is not numeric; use type: categorical")
        _expect((kind == "int") == isinstance(levels[0], int),
                f"{where}: {name} is {'an int' if isinstance(levels[0], int) else 'a float'} "
                f"field; use type: {'int' if isinstance(levels[0], int) else 'float'}")
        _expect(len(set(levels)) == len(levels), f"{where}.values: a value is repeated")
        return ParamSpec(name, kind, levels, low=min(levels), high=max(levels), when=tuple(when))
    for key in ("low", "high"):
        _expect(key in spec, f"{where}: {kind} needs '{key}' (a range low..high) or 'values' "
                             "(explicit levels)")
    low, high = co(spec["low"], "low"), co(spec["high"], "high")
    _expect(isinstance(low, (int, float)) and not isinstance(low, bool),
            f"{where}: {name} is not numeric; use type: categorical")
    _expect(all(math.isfinite(float(v)) for v in (low, high)),
            f"{where}: low and high must be finite numbers, got {low!r}, {high!r}")
    _expect(low < high, f"{where}: low ({low}) must be < high ({high})")
    log = spec.get("log", False)
    _expect(isinstance(log, bool), f"{where}.log: expected true or false, got {_short(log)}")
    _expect(not log or low > 0, f"{where}: log scale needs low > 0")
    _expect((kind == "int") == isinstance(low, int),
            f"{where}: {name} is {'an int' if isinstance(low, int) else 'a float'} field; "
            f"use type: {'int' if isinstance(low, int) else 'float'}")
    step = spec.get("step")
    _expect(step is None or not log, f"{where}: step cannot be combined with log")
    if step is not None:
        step = co(step, "step", limits=False)
        _expect(math.isfinite(step) and step > 0, f"{where}.step: must be a finite number > 0, "
                                                  f"got {step}")
        n = (high - low) / step  # Optuna's grid is low, low + step, ...: high must lie on it
        _expect(abs(n - round(n)) <= 1e-9 * max(1.0, abs(n)),
                f"{where}.step: {step} does not divide high - low = {high - low:g}, so high "
                f"({high}) is off the grid; set high to "
                f"{low + step * math.floor(n + 1e-9):g} or change step")
    return ParamSpec(name, kind, low=low, high=high, log=log, step=step, when=tuple(when))


def _check_conditions(src: str, fixed: dict[str, Any], params: list[ParamSpec]) -> None:
    """Refuse a `when:` that can never hold: on a fixed field whose value it does not list, or
    on a param none of whose levels (or no value of whose range) it lists; that param would
    never be used."""
    by_name = {p.name: p for p in params}
    for p in params:
        for k, vals in p.when:
            q = by_name.get(k)
            if q is None:
                held = fixed[k] in vals
                what = f"{k} is fixed to {fixed[k]!r}"
            elif q.levels:
                held = any(v in vals for v in q.levels)
                what = f"no level of params.{k} ({', '.join(map(repr, q.levels))}) is listed"
            else:
                held = any(isinstance(v, (int, float)) and q.low <= v <= q.high for v in vals)
                what = f"params.{k} ranges over [{q.low}, {q.high}]"
            _expect(held, f"{src}: params.{p.name}.when: {k} in {list(vals)!r} never holds "
                          f"({what}), so {p.name} would never be used; fix the condition or "
                          "remove the param")


def load_space(path: str | Path, base: str | Path | None = None) -> SweepSpec:
    """Parse and validate a search-space YAML file; raises `SpaceError` with one line.
    A relative `fixed.data_path` is found from `base` (default: the working directory)."""
    p = Path(path)
    try:
        text = read_yaml_text(p)  # a bounded, UTF-8, non-binary regular file
    except ConfigError as e:
        raise SpaceError(str(e)) from None
    return parse_space(text, str(p), p.stem, base)


def parse_space(text: str, src: str, default_name: str = "space",
                base: str | Path | None = None) -> SweepSpec:
    """Parse and validate the text of a search space; errors name `src`. A relative
    `fixed.data_path` is found from `base` (default: the working directory)."""
    try:
        data = parse_yaml_mapping(text, src)
    except ConfigError as e:
        raise SpaceError(str(e)) from None
    extra = [k for k in data if k not in TOP_KEYS]
    if extra:
        raise SpaceError(f"{src}: unknown key {_short(extra[0])}; valid keys: "
                         f"{', '.join(TOP_KEYS)}")
    raw_name = data.get("name")
    if isinstance(raw_name, int) and not isinstance(raw_name, bool):
        raw_name = str(raw_name)
    sweep_name = None if raw_name is None else check_name(raw_name, f"{src}: name")
    description = data.get("description")
    _expect(description is None or (isinstance(description, (str, int, float))
                                    and not isinstance(description, bool)),
            f"{src}: description: expected text, got {type(description).__name__}")
    description = "" if description is None else str(description)
    _expect(len(description) <= MAX_DESCRIPTION,
            f"{src}: description: {len(description)} characters, over the limit of "
            f"{MAX_DESCRIPTION}; shorten it")
    fixed_raw = data.get("fixed") or {}
    _expect(isinstance(fixed_raw, dict), f"{src}: fixed: expected a mapping of field: value")
    fixed: dict[str, Any] = {}
    for k, v in fixed_raw.items():
        try:
            fixed[k] = coerce(k, v)
        except ConfigError as e:
            raise SpaceError(f"{src}: fixed.{e}") from None
    if "task" in data:
        _expect("task" not in fixed, f"{src}: task is given twice (top level and fixed)")
        try:
            fixed["task"] = coerce("task", data["task"])
        except ConfigError as e:
            raise SpaceError(f"{src}: {e}") from None
    budget = data.get("budget") or {}
    _expect(isinstance(budget, dict), f"{src}: budget: expected a mapping")
    bad = set(budget) - {"epochs", "grace_period", "reduction_factor"}
    _expect(not bad, f"{src}: budget: unknown key {sorted(bad, key=str)}; "
                     "valid: epochs, grace_period, reduction_factor")
    _expect(not ("epochs" in fixed and "epochs" in budget),
            f"{src}: epochs is given twice (fixed and budget); keep budget.epochs")
    epochs = _int(src, "budget.epochs", budget.get("epochs", fixed.pop("epochs", 10)), 1)
    err = field_limit_error("epochs", epochs)
    _expect(err is None, f"{src}: budget.{err}")
    fixed["epochs"] = epochs
    grace = _int(src, "budget.grace_period", budget.get("grace_period", 1), 1)
    _expect(grace <= epochs, f"{src}: budget.grace_period ({grace}) exceeds epochs ({epochs})")
    rf = _int(src, "budget.reduction_factor", budget.get("reduction_factor", 3), 2)
    try:  # fixed values with every other field at its default; the params may mend it
        make_config(fixed)
        fixed_error = None
    except ConfigError as e:
        fixed_error = str(e)
    data_path = fixed.get("data_path")
    if data_path:  # (make_config above refused a '~user' of no user)
        path = Path(base or ".") / Path(data_path).expanduser()  # (an absolute path stays)
        _expect(path.is_file(), f"{src}: fixed.data_path: {data_path} not found; give the path "
                "of a local CSV/JSONL/Parquet file")
        fixed["data_path"] = str(path.resolve())  # trials run in other working directories
    params_raw = data.get("params") or {}
    _expect(isinstance(params_raw, dict) and bool(params_raw),
            f"{src}: params: expected a non-empty mapping of field: distribution")
    known: dict[str, Any] = dict(fixed)
    params = []
    for name, spec in params_raw.items():
        _expect(name not in fixed, f"{src}: params.{name}: also in fixed; keep one")
        params.append(_param(src, name, spec, known))
        known[name] = True
    _check_conditions(src, fixed, params)
    cons_raw = data.get("constraints") or []
    _expect(isinstance(cons_raw, list) and all(isinstance(c, str) for c in cons_raw),
            f"{src}: constraints: expected a list of expressions (strings)")
    _expect(len(cons_raw) <= MAX_CONSTRAINTS,
            f"{src}: constraints: {len(cons_raw)}, over the limit of {MAX_CONSTRAINTS}")
    for i, c in enumerate(cons_raw):
        _check_expr(c, f"{src}: constraints[{i}]")
    objectives = _objectives(src, data.get("objective", {"metric": "val_acc", "mode": "max"}))
    design, fraction, bases = _design(src, data.get("design"))
    searcher = data.get("searcher", "tpe" if design == "search" else "random")
    _expect(searcher in SEARCHERS, f"{src}: searcher: {searcher!r}; valid: {', '.join(SEARCHERS)}")
    if design != "search":
        # the design chooses the trials; a searcher key would say otherwise
        _expect((design == "random" and searcher == "random") or "searcher" not in data,
                f"{src}: searcher: {searcher} contradicts design {design} (which chooses the "
                "trials itself); remove the searcher key, or use design: search")
        asha = sorted({"grace_period", "reduction_factor"} & set(budget))
        _expect(not asha, f"{src}: budget.{asha[0] if asha else ''}: design {design} has no "
                          "early stopping (every trial trains budget.epochs); remove it")
    _expect(len(objectives) == 1 or searcher in MULTI_OBJECTIVE_SEARCHERS,
            f"{src}: searcher: {searcher} is single-objective; use nsga2 (or tpe) for "
            f"{len(objectives)} objectives")
    res = data.get("resources") or {}
    _expect(isinstance(res, dict) and not set(res) - {"cpu", "gpu"},
            f"{src}: resources: expected a mapping with cpu and/or gpu")
    cpu = check_resource(f"{src}: resources.cpu", "cpu", res.get("cpu", 1))
    gpu = check_resource(f"{src}: resources.gpu", "gpu", res.get("gpu", 0))
    _expect(not (fixed.get("device") == "cuda" and gpu == 0),
            f"{src}: fixed.device: cuda, but resources.gpu is 0, so no trial gets a GPU; set "
            "resources.gpu (e.g. 1, or 0.25 to pack 4 trials a GPU) or use device auto")
    min_effect, min_trials = _analysis(src, data.get("analysis"))
    vary = data.get("vary_data_seed", True)
    _expect(isinstance(vary, bool), f"{src}: vary_data_seed: expected true or false, got {vary!r}")
    seeds = _int(src, "seeds", data.get("seeds", 1), 1)
    for key in ("seed", "data_seed") if vary else ("seed",):
        top = fixed.get(key, 0) + seeds - 1  # replicate k runs with seed + k (data_seed + k)
        _expect(top <= 2**31 - 1, f"{src}: seeds: {seeds} replicates from {key} "
                                  f"{fixed.get(key, 0)} reach {key} {top}, over the limit "
                                  f"{2**31 - 1}; lower fixed.{key} or seeds")
    # batched seeds pay off on a GPU; on CPU-only trials they measured no faster than lockstep
    batching = data.get("seed_batching", "vmap" if gpu > 0 else "lockstep")
    _expect(batching in SEED_BATCHING, f"{src}: seed_batching: {batching!r}; valid: "
                                       f"{', '.join(SEED_BATCHING)}")
    if design in FIXED_DESIGNS:
        for p in params:
            _expect(not p.when, f"{src}: params.{p.name}: design {design} does not take "
                                "conditional params (when:); drop the condition or move the "
                                "param to fixed")
            _expect(bool(p.levels), f"{src}: params.{p.name}: design {design} needs explicit "
                                    f"levels; write {{type: {p.kind}, values: [...]}} instead of "
                                    "a low/high range")
    space = SweepSpec(
        name=sweep_name or default_name, path=src, text=text, fixed=fixed,
        params=tuple(params), constraints=tuple(cons_raw), epochs=epochs, grace_period=grace,
        reduction_factor=rf, seeds=seeds,
        objectives=objectives, searcher=searcher,
        searcher_seed=_int(src, "searcher_seed", data.get("searcher_seed", 0), 0),
        num_trials=_int(src, "num_trials", data.get("num_trials", 8), 1),
        max_concurrent=_int(src, "max_concurrent", data.get("max_concurrent", 2), 1),
        cpu=cpu, gpu=gpu, description=description, design=design,
        design_fraction=fraction, design_bases=bases, min_effect=min_effect,
        min_trials=min_trials, vary_data_seed=vary, seed_batching=batching)
    _check_feasible(space, fixed_error)
    why = unmeasured_objective(space)
    _expect(why is None, f"{src}: objective: {why}")
    if design in FIXED_DESIGNS:
        points, note = (_factorial(space) if design == "factorial"
                        else _one_at_a_time(space))
        if "num_trials" in data:
            _expect(data["num_trials"] == len(points),
                    f"{src}: num_trials: {data['num_trials']!r}, but design {design} runs "
                    f"{len(points)} trials ({note}); remove num_trials or set it to "
                    f"{len(points)}")
        space = space.replace(design_points=tuple(points), design_note=note,
                              num_trials=len(points))
    given = isinstance(data.get("analysis"), dict) and "min_trials" in data["analysis"]
    _expect(not given or space.min_trials <= space.num_trials,
            f"{src}: analysis.min_trials: {space.min_trials} is more than the sweep's "
            f"{space.num_trials} trials, so no level could ever be called; lower it (default "
            f"{DEFAULT_MIN_TRIALS}) or raise num_trials")
    return space


def _design(src: str, raw: Any) -> tuple[str, float | None, int | None]:
    """(kind, fraction, bases) of the `design:` key (a name or {kind, fraction, bases})."""
    if raw is None:
        return "search", None, None
    if isinstance(raw, str):
        raw = {"kind": raw}
    _expect(isinstance(raw, dict), f"{src}: design: expected one of {', '.join(DESIGNS)} or a "
                                   "mapping, e.g. {kind: factorial, fraction: 0.5}")
    kind = raw.get("kind")
    _expect(kind in DESIGNS, f"{src}: design.kind: {kind!r}; valid: {', '.join(DESIGNS)}")
    allowed = {"kind"} | ({"fraction"} if kind == "factorial" else set()) | (
        {"bases"} if kind == "one_at_a_time" else set())
    extra = sorted(set(raw) - allowed, key=str)
    _expect(not extra, f"{src}: design.{extra[0] if extra else ''}: not a key of design {kind}; "
                       f"valid: {', '.join(sorted(allowed))}")
    fraction = raw.get("fraction")
    if fraction is not None:
        _expect(isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
                and 0 < fraction <= 1,
                f"{src}: design.fraction: expected a number in (0, 1], got {fraction!r}")
        fraction = float(fraction)
    bases = None
    if kind == "one_at_a_time":
        _expect("bases" in raw, f"{src}: design: one_at_a_time needs bases (the number of "
                                "random base configurations), e.g. {kind: one_at_a_time, "
                                "bases: 3}")
        bases = _int(src, "design.bases", raw["bases"], 1)
    return kind, fraction, bases


def _analysis(src: str, raw: Any) -> tuple[dict[str, float], int]:
    """min_effect (merged over DEFAULT_MIN_EFFECT) and min_trials of the `analysis:` key."""
    raw = {} if raw is None else raw
    _expect(isinstance(raw, dict), f"{src}: analysis: expected a mapping with min_effect "
                                   "and/or min_trials")
    extra = sorted(set(raw) - {"min_effect", "min_trials"}, key=str)
    _expect(not extra, f"{src}: analysis.{extra[0] if extra else ''}: unknown key; valid: "
                       "min_effect, min_trials")
    effects = raw.get("min_effect") or {}
    _expect(isinstance(effects, dict), f"{src}: analysis.min_effect: expected a mapping of "
                                       "metric: smallest effect, e.g. {test_acc: 0.01}")
    min_effect = dict(DEFAULT_MIN_EFFECT)
    for metric, v in effects.items():
        where = f"{src}: analysis.min_effect.{metric}"
        _expect(metric in ALL_METRICS,
                f"{where}: unknown metric; valid: {', '.join(ALL_METRICS)}")
        _expect(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and v > 0, f"{where}: expected a finite number > 0, got {v!r}")
        _expect(v <= 1 or metric not in FRACTION_METRICS,
                f"{where}: {v!r} is more than {metric} can differ by (a fraction: at most 1); "
                "give the smallest difference that matters, e.g. 0.01")
        min_effect[metric] = float(v)
    min_trials = _int(src, "analysis.min_trials",
                      raw.get("min_trials", DEFAULT_MIN_TRIALS), 1)
    return min_effect, min_trials


def _feasible_points(space: SweepSpec, points: list[dict[str, Any]]
                     ) -> tuple[list[dict[str, Any]], int, str | None]:
    """The points that can run, how many were dropped and the first reason."""
    kept, dropped, why = [], 0, None
    for p in points:
        reason = infeasible(space, p, strict=True)
        if reason is None:
            kept.append(p)
        else:
            dropped, why = dropped + 1, why or reason
    return kept, dropped, why


def _dropped(n: int, why: str | None) -> str:
    return f", {n} infeasible dropped (e.g. {why})" if n else ""


def _factorial(space: SweepSpec) -> tuple[list[dict[str, Any]], str]:
    """The full grid over every param's levels (or a `fraction` of it that keeps every level of
    every param), infeasible points dropped, in a seeded random order."""
    src, names = space.path, [p.name for p in space.params]
    size = math.prod(len(p.levels) for p in space.params)
    _expect(size <= MAX_GRID, f"{src}: design: the factorial grid has {size} points (over "
                              f"{MAX_GRID}); use fewer levels or design one_at_a_time/random")
    grid = [dict(zip(names, combo)) for combo in
            itertools.product(*(p.levels for p in space.params))]
    points, dropped, why = _feasible_points(space, grid)
    _expect(bool(points), f"{src}: design: no point of the factorial grid can run (e.g. {why}); "
                          "change the levels or relax the constraints")
    for p in space.params:
        present = {pt[p.name] for pt in points}
        missing = [v for v in p.levels if v not in present]
        _expect(not missing, f"{src}: params.{p.name}: level {missing[0] if missing else ''!r} "
                             f"is in no feasible grid point (e.g. {why}); remove it")
    rng = random.Random(space.searcher_seed)
    rng.shuffle(points)  # an interrupted sweep then holds a random part of the grid
    note = f"{size} grid points{_dropped(dropped, why)}"
    if space.design_fraction is None or space.design_fraction >= 1.0:
        return points, f"full grid: {note}"
    keep = max(1, round(space.design_fraction * len(points)))
    # greedy covers from several orders (a greedy cover need not be the smallest), seeded
    orders = random.Random(space.searcher_seed)
    cover = _cover(space, points)
    for _ in range(COVER_TRIES - 1):
        if len(cover) <= keep:
            break
        other = _cover(space, orders.sample(points, len(points)))
        cover = other if len(other) < len(cover) else cover
    _expect(len(cover) <= keep,
            f"{src}: design.fraction: {space.design_fraction:g} keeps {keep} of {len(points)} "
            f"feasible grid points, fewer than the {len(cover)} the smallest set found holding "
            f"every level of every param has; use fraction >= "
            f"{math.ceil(len(cover) / len(points) * 100) / 100:g}")
    chosen = {id(p) for p in cover}
    rest = [p for p in points if id(p) not in chosen]
    subset = cover + rest[:keep - len(cover)]
    rng.shuffle(subset)
    return subset, (f"fraction {space.design_fraction:g}: {keep} of the {len(points)} feasible "
                    f"points, every level kept ({note})")


COVER_TRIES = 32  # greedy covers tried (from shuffled orders) before a fraction is refused


def _cover(space: SweepSpec, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Greedily, points (in their order) that together hold every level of every param: at
    each step the first point holding the most levels not yet held. Each point's count is
    kept up to date as levels get held (linear in the grid, not quadratic)."""
    import numpy as np

    todo = {(p.name, v) for p in space.params for v in p.levels}
    holders: dict[tuple[str, Any], list[int]] = {}
    for i, pt in enumerate(points):
        for kv in pt.items():
            if kv in todo:
                holders.setdefault(kv, []).append(i)
    gain = np.array([sum(kv in todo for kv in pt.items()) for pt in points], dtype=np.int64)
    cover: list[dict[str, Any]] = []
    while todo:
        i = int(np.argmax(gain))  # the first of the largest, as max() over the points
        if gain[i] == 0:  # a level no point holds (refused before this is called)
            break
        cover.append(points[i])
        for kv in points[i].items():
            if kv in todo:
                todo.discard(kv)
                gain[holders[kv]] -= 1
    return cover


def _one_at_a_time(space: SweepSpec) -> tuple[list[dict[str, Any]], str]:
    """`bases` distinct feasible base configurations drawn at random from the levels, each
    followed by its variations: one param set to each of its other levels, the rest held; a
    point two bases share runs once (identical trials would count one result twice)."""
    src, bases = space.path, space.design_bases or 1
    per = sum(len(p.levels) - 1 for p in space.params)
    _expect(bases * (1 + per) <= MAX_GRID,
            f"{src}: design: {bases} bases x (1 + {per} variations) = {bases * (1 + per)} "
            f"points, over {MAX_GRID}; use fewer bases or levels")
    rng = random.Random(space.searcher_seed)
    drawn: list[dict[str, Any]] = []

    def apart(base: dict[str, Any], other: dict[str, Any]) -> int:
        return sum(base[k] != other[k] for k in base)

    # bases 3 or more params apart share no point (a variation is 1 param from its base);
    # where too few are that far apart, any distinct ones (their shared points run once)
    for far in (3, 1):
        for _ in range(1000 + 100 * bases):
            if len(drawn) == bases:
                break
            base = {p.name: rng.choice(p.levels) for p in space.params}
            if (all(apart(base, d) >= far for d in drawn)
                    and infeasible(space, base, strict=True) is None):
                drawn.append(base)
    _expect(len(drawn) == bases, f"{src}: design.bases: only {len(drawn)} distinct feasible "
                                 f"base configurations found; use bases <= {len(drawn)}")
    grid: list[dict[str, Any]] = []
    for base in drawn:
        grid.append(base)
        grid.extend({**base, p.name: v} for p in space.params for v in p.levels
                    if v != base[p.name])
    # a variation of one base can be another base or its variation: run each point once
    unique = list({tuple(p.items()): p for p in grid}.values())  # (keys in params' order)
    repeats = len(grid) - len(unique)
    points, dropped, why = _feasible_points(space, unique)
    return points, (f"{bases} bases x (1 + {per} one-param variations) = {len(grid)} points"
                    + (f", {repeats} repeated dropped" if repeats else "")
                    + _dropped(dropped, why))


def _int(src: str, key: str, v: Any, minimum: int) -> int:
    """An integer >= minimum and, for the keys of LIMITS, <= its limit."""
    _expect(isinstance(v, int) and not isinstance(v, bool),
            f"{src}: {key}: expected an integer, got {_short(v)}")
    _expect(v >= minimum, f"{src}: {key}: must be >= {minimum}, got {v}")
    top = LIMITS.get(key)
    _expect(top is None or v <= top, f"{src}: {key}: {_short(v, 30)} exceeds the limit {top}; "
                                     "choose a smaller value")
    return v


def _objectives(src: str, raw: Any) -> tuple[tuple[str, str], ...]:
    items = raw if isinstance(raw, list) else [raw]
    _expect(len(items) > 0, f"{src}: objective: expected at least one {{metric, mode}}")
    out = []
    for i, o in enumerate(items):
        where = f"{src}: objective" + (f"[{i}]" if isinstance(raw, list) else "")
        _expect(isinstance(o, dict) and set(o) <= {"metric", "mode"} and "metric" in o,
                f"{where}: expected {{metric: NAME, mode: max|min}}")
        _expect(o["metric"] in ALL_METRICS,
                f"{where}.metric: unknown metric {o['metric']!r}; valid: {', '.join(ALL_METRICS)}")
        mode = o.get("mode", "max")
        _expect(mode in ("max", "min"), f"{where}.mode: {mode!r}; valid: max, min")
        out.append((o["metric"], mode))
    _expect(len({m for m, _ in out}) == len(out), f"{src}: objective: a metric is repeated")
    _expect(out[0][0] in CORE_METRICS,
            f"{src}: objective: {out[0][0]} is measured after the last epoch only, but the first "
            "objective drives early stopping every epoch; list a per-epoch metric (e.g. val_acc) "
            "first and this one second")
    return tuple(out)


def unmeasured_objective(space: SweepSpec) -> str | None:
    """Why an objective can never be measured in `space` (None: it can): the length metrics
    exist only on generated sequence tasks (their `len:` sets; the out-of-distribution ones need
    `ood_len_factors`), the shot groups only with `imbalance` > 1. The searcher marks every
    trial that lacks its objective as failed, so such a sweep would fail every trial."""
    from study.config import TrialConfig
    from study.tasks import TASKS

    default = TrialConfig()
    params = {p.name: p for p in space.params}

    def values(name: str) -> list[Any]:
        p = params.get(name)
        if p is not None:
            return list(p.levels) if p.levels else [p.low, p.high]
        return [space.fixed.get(name, getattr(default, name))]

    for metric, _ in space.objectives:
        if metric in (ID_LEN_ACC, OOD_LEN_ACC, LEN_GEN_RATIO):
            other = [t for t in values("task") if TASKS[t].module != "sequences"]
            if other:
                return (f"{metric} is measured on generated sequence tasks only (their len: "
                        f"sets), not on task {other[0]}; choose another objective")
            if metric != ID_LEN_ACC and not any(values("ood_len_factors")):
                return (f"{metric} needs lengths beyond training, but ood_len_factors is empty; "
                        "give factors (e.g. [2.0, 4.0]) or another objective")
        if metric in (MANY_SHOT_ACC, MEDIUM_SHOT_ACC, FEW_SHOT_ACC) and all(
                float(v) <= 1 for v in values("imbalance")):
            return (f"{metric} is measured only on a long-tailed training split (imbalance > 1), "
                    "and imbalance is 1 here; set imbalance or choose another objective")
    return None


# feasibility probe: random draws of a space (at parse time, and a searcher's fallback draws)
FEASIBLE_TRIES = 2000
# a searched space needs this many of the probe's draws to run: at that share (0.5%) the
# searcher's fallback of FEASIBLE_TRIES draws misses with probability about 5e-5
MIN_FEASIBLE = 10


def _check_feasible(space: SweepSpec, fixed_error: str | None = None,
                    tries: int = FEASIBLE_TRIES) -> None:
    """Refuse a space in which no sampled configuration can run (impossible constraints, or
    fixed values no level of the params mends: then `fixed_error`, their own reason, is given
    as the fixed values' fault), or, searched, too few for a searcher to find one
    (`MIN_FEASIBLE` of `tries`; a fixed design's points are checked one by one)."""
    rng = random.Random(0)
    first, only_fixed, feasible = None, fixed_error is not None, 0
    need = 1 if space.design in FIXED_DESIGNS else MIN_FEASIBLE
    for _ in range(tries):
        reason = infeasible(space, space.sample(rng), strict=True)
        if reason is None:
            feasible += 1
            if feasible >= need:
                return
            continue
        first = first or reason
        only_fixed = only_fixed and reason == fixed_error
    if feasible == 0 and only_fixed:
        raise SpaceError(f"{space.path}: fixed: {fixed_error}")
    where = "constraints" if space.constraints and "constraint" in (first or "") else "params"
    if feasible:
        raise SpaceError(f"{space.path}: {where}: only {feasible} of {tries} sampled "
                         f"configurations can run (the others fail, e.g. {first}), too few for a "
                         "searcher to find; widen the ranges or relax the constraints")
    raise SpaceError(f"{space.path}: {where}: no configuration of {tries} sampled can run "
                     f"(e.g. {first}); widen the ranges or relax the constraints")
