"""Fuzzing the space parser: whatever the input, `parse_space`/`load_space` return a `SweepSpec`
or raise a one-line `SpaceError`, each within a time bound (hypothesis)."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from study.config import FIELD_NAMES
from study.records import SweepSpec
from study.spaces import TOP_KEYS, SpaceError, load_space, parse_space

ROOT = Path(__file__).resolve().parent.parent
SMOKE = (ROOT / "search_spaces" / "smoke.yaml").read_text()
LIMIT_S = 2.0  # per example
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))  # per test; raise it for a longer hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=LIMIT_S), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextmanager
def time_bound(seconds: float = LIMIT_S) -> Iterator[None]:
    """Fail an example that runs longer than `seconds` (a hang is interrupted, not waited)."""
    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"parsing took over {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check(parse: Callable[[], SweepSpec]) -> None:
    start = time.perf_counter()
    with time_bound():
        try:
            space = parse()
        except SpaceError as e:
            assert "\n" not in str(e) and str(e), repr(str(e))
        else:
            assert isinstance(space, SweepSpec)
    assert time.perf_counter() - start < LIMIT_S


# --- strategies ---------------------------------------------------------------------------------
NUMBERS = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
                    st.sampled_from([0, 1, 2, 4, 32, 0.5, 1e300, -1, 2**31, 2**40]))
WORDS = st.sampled_from([*TOP_KEYS, *FIELD_NAMES, "type", "values", "low", "high", "log", "step",
                         "when", "kind", "fraction", "bases", "metric", "mode", "cpu", "gpu",
                         "epochs", "grace_period", "reduction_factor", "min_effect", "min_trials",
                         "categorical", "int", "float", "factorial", "one_at_a_time", "random",
                         "search", "tpe", "nsga2", "cmaes", "val_acc", "max", "min", "l2",
                         "pre_ln", "digits", "text_file", "../x", ""])
TOKENS = st.sampled_from([*FIELD_NAMES[:40], "+", "-", "*", "/", "//", "%", "**", "(", ")",
                          "==", "!=", "<", ">=", "and", "or", "not", "in", "0", "1", "2", "64",
                          "99999999999", "1e308", "'pre_ln'", "[1, 2]", ",", "lambda", ".",
                          "__class__"])
EXPRESSIONS = st.lists(TOKENS, min_size=1, max_size=12).map(" ".join)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, WORDS, EXPRESSIONS, st.text(max_size=20))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(WORDS, inner, max_size=5)), max_leaves=30)
SPACES = st.dictionaries(st.sampled_from(TOP_KEYS), VALUES, max_size=10)


def _mutate(text: str, edits: list[tuple[int, int, str]]) -> str:
    for pos, kind, chunk in edits:
        i = pos % (len(text) + 1)
        text = (text[:i] + chunk + text[i:] if kind == 0 else text[:i] + text[i + 1:]
                if kind == 1 else text[:i] + chunk + text[i + len(chunk):])
    return text


EDITS = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 2),
                           st.sampled_from(["[", "]", "{", "}", ":", "-", " ", "\n", "*a", "&a ",
                                            "!!", "'", '"', "\t", "0", "1e999", ".nan", "\x00",
                                            "é", "**", "%", "/", "name: ", "<<: "])),
                 min_size=1, max_size=8)


# --- the fuzz tests (about 200 examples in all) -------------------------------------------------
@FUZZ
@given(SPACES)
def test_structured_spaces(data: dict[str, Any]) -> None:
    text = yaml.safe_dump(data, allow_unicode=True)
    check(lambda: parse_space(text, "fuzz.yaml"))


@FUZZ
@given(st.fixed_dictionaries({"params": st.dictionaries(st.sampled_from(FIELD_NAMES), VALUES,
                                                        min_size=1, max_size=4)},
                             optional={k: VALUES for k in TOP_KEYS if k != "params"}))
def test_spaces_with_params(data: dict[str, Any]) -> None:
    text = yaml.safe_dump(data, allow_unicode=True)
    check(lambda: parse_space(text, "fuzz.yaml"))


@FUZZ
@given(EDITS)
def test_mutated_shipped_space(edits: list[tuple[int, int, str]]) -> None:
    text = _mutate(SMOKE, edits)
    check(lambda: parse_space(text, "smoke.yaml"))


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@FUZZ
@given(st.one_of(st.binary(max_size=2000), st.text(max_size=500).map(
    lambda t: t.encode("utf-8", "surrogatepass"))))
def test_random_bytes_as_a_file(folder: Path, raw: bytes) -> None:
    path = folder / "fuzz.yaml"
    path.write_bytes(raw)
    check(lambda: load_space(path))
