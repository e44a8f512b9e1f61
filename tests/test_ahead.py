"""`study.ahead`: a trial's epochs computed one ahead of the driver, in order, cancelled when
the trial stops."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from study.ahead import Cancelled, check_cancelled, one_ahead


def _recorded(n: int, started: list[int], done: dict[int, threading.Event],
              closed: list[bool]) -> Iterator[int]:
    try:
        for i in range(1, n + 1):
            started.append(i)
            done[i].set()
            yield i
    finally:
        closed.append(True)


@pytest.mark.parametrize("ahead", [pytest.param(True, id="ahead"),
                                   pytest.param(False, id="in-step")])
def test_every_item_once_in_order_with_its_seconds(ahead: bool) -> None:
    with one_ahead(iter(range(5)), time.perf_counter(), ahead) as items:
        got = list(items)
    assert [i for i, _ in got] == list(range(5))
    assert all(s >= 0 for _, s in got)


def test_the_next_item_is_computed_while_the_consumer_holds_one_never_two() -> None:
    started: list[int] = []
    done = {i: threading.Event() for i in range(1, 6)}
    closed: list[bool] = []
    with one_ahead(_recorded(5, started, done, closed)) as items:
        first, _ = next(items)
        assert first == 1
        # item 2 is computed while item 1 is held...
        assert done[2].wait(10)
        # ...but not item 3, until item 2 is asked for
        assert not done[3].wait(0.3)
        assert started == [1, 2]
        second, _ = next(items)
        assert second == 2 and done[3].wait(10)
    assert closed == [True]  # the consumer left: the items were closed, in their own thread


def test_a_consumer_that_stops_cancels_the_item_computed_ahead() -> None:
    entered = threading.Event()
    finished: list[int] = []

    def slow() -> Iterator[int]:
        yield 1
        entered.set()
        for _ in range(10_000):  # "training batches", each checking for a cancel
            check_cancelled()
            time.sleep(0.001)
        finished.append(2)
        yield 2

    threads = threading.active_count()
    with one_ahead(slow()) as items:
        assert next(items)[0] == 1
        assert entered.wait(10)
    # the block returned with the thread joined and item 2 cancelled, not finished
    assert finished == [] and threading.active_count() == threads


def test_an_error_of_the_items_reaches_the_consumer_in_its_place() -> None:
    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("boom")

    got = []
    with pytest.raises(ValueError, match="boom"), one_ahead(failing()) as items:
        for i, _ in items:
            got.append(i)
    assert got == [1]


def test_cancelled_passes_through_a_trials_own_error_handler() -> None:
    check_cancelled()  # outside one_ahead: nothing to cancel
    with pytest.raises(Cancelled):
        try:
            raise Cancelled
        except Exception:  # what `trainable.lockstep` catches to record a trial's error
            pytest.fail("Cancelled was caught as a trial's error")



def test_a_trial_stopped_after_an_epoch_does_not_finish_the_one_computed_ahead() -> None:
    from study.trainable import lockstep

    config = {"task": "digits", "epochs": 3, "d_model": 16, "n_heads": 2, "n_layers": 1,
              "d_ff": 32, "batch_size": 16}
    epochs: list[int] = []
    next_epoch_began = threading.Event()

    def recorded() -> Iterator:
        for report in lockstep(config, seeds=1):
            epochs.append(report.epoch)  # in the producing thread, as soon as it is computed
            yield report
            next_epoch_began.set()

    with one_ahead(recorded()) as reports:
        first, seconds = next(reports)
        assert first.epoch == 1 and first.outcome is None and seconds > 0
        assert next_epoch_began.wait(30)
    # epoch 2 (over a hundred steps and an evaluation) was cancelled midway, never finished
    assert epochs == [1]
