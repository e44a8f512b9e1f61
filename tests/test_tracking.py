"""Tracker retries transient SQLite locks (a reader such as `study ui` or `study report`)."""

import sqlite3

import pytest

from study import tracking


def test_retry_rides_out_a_locked_store(monkeypatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return x * 2

    assert tracking._retry(flaky, 21) == 42 and len(calls) == 3


def test_retry_does_not_hide_other_errors(monkeypatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def broken():
        calls.append(1)
        raise ValueError("bad param")

    with pytest.raises(ValueError, match="bad param"):
        tracking._retry(broken)
    assert calls == [1]


def test_retry_gives_up_on_a_lock_that_stays(monkeypatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)

    def stuck():
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(sqlite3.OperationalError):
        tracking._retry(stuck)
