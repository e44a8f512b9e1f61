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
from pathlib import Path
from typing import Any

from study.config import CHOICES, FIELD_NAMES, ConfigError, coerce, make_config, parse_yaml_mapping
from study.metrics import ALL_METRICS, CORE_METRICS
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

NOT_SEARCHABLE = ("epochs", "seed", "device")
TOP_KEYS = ("name", "description", "task", "fixed", "params", "constraints", "budget", "seeds",
            "objective", "design", "searcher", "searcher_seed", "num_trials", "max_concurrent",
            "resources", "analysis", "vary_data_seed", "seed_batching")
MAX_GRID = 100_000  # the largest factorial grid enumerated


class SpaceError(ConfigError):
    """A bad search-space file."""


def infeasible(space: SweepSpec, sampled: dict[str, Any]) -> str | None:
    """Why a sampled configuration cannot run (a broken constraint or an invalid config)."""
    try:
        cfg = make_config(space.resolve(sampled))
    except ConfigError as e:
        return str(e)
    env = cfg.to_dict()
    for text in space.constraints:
        if not _eval(_compiled(text).body, env, text):
            return f"constraint {text!r} does not hold"
    return None


@functools.lru_cache(maxsize=256)
def _compiled(text: str) -> ast.Expression:
    return _check_expr(text, "constraints")


# --- a tiny, safe evaluator for constraint expressions (no eval) ---
_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
        ast.Pow: operator.pow}
_CMP = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
        ast.NotIn: lambda a, b: a not in b}


def _eval(node: ast.AST, env: dict[str, Any], text: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_eval(e, env, text) for e in node.elts)
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        return _BIN[type(node.op)](_eval(node.left, env, text), _eval(node.right, env, text))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        v = _eval(node.operand, env, text)
        return (not v) if isinstance(node.op, ast.Not) else -v
    if isinstance(node, ast.BoolOp):
        vals = (_eval(v, env, text) for v in node.values)
        return all(vals) if isinstance(node.op, ast.And) else any(vals)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, env, text)
        for op, comp in zip(node.ops, node.comparators):
            right = _eval(comp, env, text)
            if not _CMP[type(op)](left, right):
                return False
            left = right
        return True
    raise ValueError(f"unsupported syntax {ast.dump(node)[:40]}")


def _check_expr(text: str, where: str) -> ast.Expression:
    try:
        expr = ast.parse(text, mode="eval")
    except SyntaxError:
        raise SpaceError(f"{where}: cannot parse {text!r}; write e.g. 'd_model % n_heads == 0'"
                         ) from None
    for node in ast.walk(expr):
        if isinstance(node, ast.Name) and node.id not in FIELD_NAMES:
            raise SpaceError(f"{where}: {text!r} uses unknown field {node.id!r}")
        ok = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.Tuple, ast.List, ast.BinOp,
              ast.UnaryOp, ast.Not, ast.USub, ast.BoolOp, ast.And, ast.Or, ast.Compare,
              *_BIN, *_CMP)
        if not isinstance(node, ok):
            raise SpaceError(f"{where}: {text!r} uses unsupported syntax "
                             f"({type(node).__name__}); use arithmetic, comparisons, and/or/not")
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
    _expect(not extra, f"{where}: unknown key(s) {sorted(extra)}; valid: {sorted(allowed)}")
    kind = spec.get("type")
    _expect(kind in PARAM_TYPES, f"{where}.type: {kind!r}; valid: {', '.join(PARAM_TYPES)}")

    def co(v: Any, key: str) -> Any:
        try:
            v = coerce(name, v)
        except ConfigError as e:
            raise SpaceError(f"{where}.{key}: {e}") from None
        if name in CHOICES and v not in CHOICES[name]:
            raise SpaceError(f"{where}.{key}: invalid value {v!r}; valid choices: "
                             f"{', '.join(CHOICES[name])}")
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
        return ParamSpec(name, kind, tuple(co(v, "values") for v in vals), when=tuple(when))
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
    log = bool(spec.get("log", False))
    _expect(not log or low > 0, f"{where}: log scale needs low > 0")
    _expect((kind == "int") == isinstance(low, int),
            f"{where}: {name} is {'an int' if isinstance(low, int) else 'a float'} field; "
            f"use type: {'int' if isinstance(low, int) else 'float'}")
    step = spec.get("step")
    _expect(step is None or not log, f"{where}: step cannot be combined with log")
    if step is not None:
        step = co(step, "step")
        _expect(step > 0, f"{where}.step: must be > 0, got {step}")
    return ParamSpec(name, kind, low=low, high=high, log=log, step=step, when=tuple(when))


def load_space(path: str | Path) -> SweepSpec:
    """Parse and validate a search-space YAML file; raises `SpaceError` with one line."""
    p = Path(path)
    if not p.is_file():
        raise SpaceError(f"{p}: file not found; pass an existing YAML file")
    return parse_space(p.read_text(), str(p), p.stem)


def parse_space(text: str, src: str, default_name: str = "space") -> SweepSpec:
    """Parse and validate the text of a search space; errors name `src`."""
    try:
        data = parse_yaml_mapping(text, src)
    except ConfigError as e:
        raise SpaceError(str(e)) from None
    extra = [k for k in data if k not in TOP_KEYS]
    if extra:
        raise SpaceError(f"{src}: unknown key {extra[0]!r}; valid keys: {', '.join(TOP_KEYS)}")
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
    _expect(not bad, f"{src}: budget: unknown key {sorted(bad)}; "
                     "valid: epochs, grace_period, reduction_factor")
    _expect(not ("epochs" in fixed and "epochs" in budget),
            f"{src}: epochs is given twice (fixed and budget); keep budget.epochs")
    epochs = _int(src, "budget.epochs", budget.get("epochs", fixed.pop("epochs", 10)), 1)
    fixed["epochs"] = epochs
    grace = _int(src, "budget.grace_period", budget.get("grace_period", 1), 1)
    _expect(grace <= epochs, f"{src}: budget.grace_period ({grace}) exceeds epochs ({epochs})")
    rf = _int(src, "budget.reduction_factor", budget.get("reduction_factor", 3), 2)
    try:
        make_config(fixed)  # fixed values alone must form a valid config
    except ConfigError as e:
        raise SpaceError(f"{src}: fixed: {e}") from None
    data_path = fixed.get("data_path")
    if data_path and not Path(data_path).expanduser().is_file():
        raise SpaceError(f"{src}: fixed.data_path: {data_path} not found; give the path of a "
                         "local CSV/JSONL/Parquet file")
    if data_path:  # trials run in other working directories
        fixed["data_path"] = str(Path(data_path).expanduser().resolve())
    params_raw = data.get("params") or {}
    _expect(isinstance(params_raw, dict) and bool(params_raw),
            f"{src}: params: expected a non-empty mapping of field: distribution")
    known: dict[str, Any] = dict(fixed)
    params = []
    for name, spec in params_raw.items():
        _expect(name not in fixed, f"{src}: params.{name}: also in fixed; keep one")
        params.append(_param(src, name, spec, known))
        known[name] = True
    cons_raw = data.get("constraints") or []
    _expect(isinstance(cons_raw, list) and all(isinstance(c, str) for c in cons_raw),
            f"{src}: constraints: expected a list of expressions (strings)")
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
    cpu, gpu = _num(src, "resources.cpu", res.get("cpu", 1)), _num(src, "resources.gpu",
                                                                   res.get("gpu", 0))
    _expect(cpu > 0, f"{src}: resources.cpu must be > 0")
    _expect(gpu >= 0, f"{src}: resources.gpu must be >= 0 (fractions share a GPU)")
    min_effect, min_trials = _analysis(src, data.get("analysis"))
    vary = data.get("vary_data_seed", True)
    _expect(isinstance(vary, bool), f"{src}: vary_data_seed: expected true or false, got {vary!r}")
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
        name=str(data.get("name") or default_name), path=src, text=text, fixed=fixed,
        params=tuple(params), constraints=tuple(cons_raw), epochs=epochs, grace_period=grace,
        reduction_factor=rf, seeds=_int(src, "seeds", data.get("seeds", 1), 1),
        objectives=objectives, searcher=searcher,
        searcher_seed=_int(src, "searcher_seed", data.get("searcher_seed", 0), 0),
        num_trials=_int(src, "num_trials", data.get("num_trials", 8), 1),
        max_concurrent=_int(src, "max_concurrent", data.get("max_concurrent", 2), 1),
        cpu=cpu, gpu=gpu, description=str(data.get("description", "")), design=design,
        design_fraction=fraction, design_bases=bases, min_effect=min_effect,
        min_trials=min_trials, vary_data_seed=vary, seed_batching=batching)
    _check_feasible(space)
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
    extra = sorted(set(raw) - allowed)
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
    extra = sorted(set(raw) - {"min_effect", "min_trials"})
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
        min_effect[metric] = float(v)
    min_trials = _int(src, "analysis.min_trials",
                      raw.get("min_trials", DEFAULT_MIN_TRIALS), 1)
    return min_effect, min_trials


def _feasible_points(space: SweepSpec, points: list[dict[str, Any]]
                     ) -> tuple[list[dict[str, Any]], int, str | None]:
    """The points that can run, how many were dropped and the first reason."""
    kept, dropped, why = [], 0, None
    for p in points:
        reason = infeasible(space, p)
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
        missing = [v for v in p.levels if all(pt[p.name] != v for pt in points)]
        _expect(not missing, f"{src}: params.{p.name}: level {missing[0] if missing else ''!r} "
                             f"is in no feasible grid point (e.g. {why}); remove it")
    rng = random.Random(space.searcher_seed)
    rng.shuffle(points)  # an interrupted sweep then holds a random part of the grid
    note = f"{size} grid points{_dropped(dropped, why)}"
    if space.design_fraction is None or space.design_fraction >= 1.0:
        return points, f"full grid: {note}"
    keep = max(1, round(space.design_fraction * len(points)))
    cover = _cover(space, points)
    _expect(len(cover) <= keep,
            f"{src}: design.fraction: {space.design_fraction:g} keeps {keep} of {len(points)} "
            f"feasible grid points, fewer than the {len(cover)} needed to keep every level of "
            f"every param; use fraction >= {math.ceil(len(cover) / len(points) * 100) / 100:g}")
    chosen = {id(p) for p in cover}
    rest = [p for p in points if id(p) not in chosen]
    subset = cover + rest[:keep - len(cover)]
    rng.shuffle(subset)
    return subset, (f"fraction {space.design_fraction:g}: {keep} of the {len(points)} feasible "
                    f"points, every level kept ({note})")


def _cover(space: SweepSpec, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Greedily, points (in their order) that together hold every level of every param."""
    todo = {(p.name, v) for p in space.params for v in p.levels}
    cover: list[dict[str, Any]] = []
    while todo:
        best = max(points, key=lambda pt: sum((k, v) in todo for k, v in pt.items()))
        cover.append(best)
        todo -= set(best.items())
    return cover


def _one_at_a_time(space: SweepSpec) -> tuple[list[dict[str, Any]], str]:
    """`bases` distinct feasible base configurations drawn at random from the levels, each
    followed by its variations: one param set to each of its other levels, the rest held."""
    src, bases = space.path, space.design_bases or 1
    rng = random.Random(space.searcher_seed)
    drawn: list[dict[str, Any]] = []
    for _ in range(1000 + 100 * bases):
        if len(drawn) == bases:
            break
        base = {p.name: rng.choice(p.levels) for p in space.params}
        if base not in drawn and infeasible(space, base) is None:
            drawn.append(base)
    _expect(len(drawn) == bases, f"{src}: design.bases: only {len(drawn)} distinct feasible "
                                 f"base configurations found; use bases <= {len(drawn)}")
    grid: list[dict[str, Any]] = []
    for base in drawn:
        grid.append(base)
        grid.extend({**base, p.name: v} for p in space.params for v in p.levels
                    if v != base[p.name])
    points, dropped, why = _feasible_points(space, grid)
    per = sum(len(p.levels) - 1 for p in space.params)
    return points, (f"{bases} bases x (1 + {per} one-param variations) = {len(grid)} points"
                    + _dropped(dropped, why))


def _int(src: str, key: str, v: Any, minimum: int) -> int:
    _expect(isinstance(v, int) and not isinstance(v, bool),
            f"{src}: {key}: expected an integer, got {v!r}")
    _expect(v >= minimum, f"{src}: {key}: must be >= {minimum}, got {v}")
    return v


def _num(src: str, key: str, v: Any) -> float:
    _expect(isinstance(v, (int, float)) and not isinstance(v, bool),
            f"{src}: {key}: expected a number, got {v!r}")
    return float(v)


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


def _check_feasible(space: SweepSpec, tries: int = 2000) -> None:
    """Refuse a space in which no sampled configuration can run (impossible constraints)."""
    rng = random.Random(0)
    first = None
    for _ in range(tries):
        reason = infeasible(space, space.sample(rng))
        if reason is None:
            return
        first = first or reason
    where = "constraints" if space.constraints and "constraint" in (first or "") else "params"
    raise SpaceError(f"{space.path}: {where}: no configuration of {tries} sampled can run "
                     f"(e.g. {first}); widen the ranges or relax the constraints")
