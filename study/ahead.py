"""A trial's epochs computed one ahead of the driver.

Ray Tune's function trainables report synchronously: `tune.report` blocks the training thread
until the driver has taken the result (its callbacks: MLflow's writes, ASHA's decision, the
searcher) and asked for the next one. Every epoch thus waits out one round trip to the driver,
during which the trial's CPU or GPU is idle: tens of milliseconds, next to epochs of a fraction
of a second to a few seconds (the harness overhead of `make bench`).

`one_ahead` runs a trial's epochs in a thread of their own that may compute epoch e + 1 while
epoch e's report waits for the driver, never further ahead: what the driver learns and decides
is unchanged, and every epoch is reported once, in order. When the consumer leaves while an
epoch is computed ahead (ASHA stopped the trial on the report it was waiting in), that epoch
is cancelled at its next training batch or evaluation chunk (`check_cancelled`, `Cancelled`)
and the thread is joined before `one_ahead` returns, so a reused Ray actor never runs two
trials at once. (A stop that comes while the consumer waits for an epoch, not in a report,
takes effect at the next report, as it did before.)

Measured on the 2-core CPU machine (`make bench`, the harness section's `report_ahead`: 12
tiny trials of 5 epochs, one at a time, so the driver has a core of its own, as on a GPU
machine): the Tuner's wall time 1.17x shorter (13.1 s against 15.4 s) than with synchronous
reports, one run each. With every core training (two such trials at a time there) the driver's
work competes with the trials' and the two ways took the same time. `STUDY_EPOCHS_AHEAD=0` in
the environment of a sweep that starts its own local Ray (its workers inherit it) reports
synchronously, as Ray does by itself.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

AHEAD_ENV = "STUDY_EPOCHS_AHEAD"

_local = threading.local()


def ahead_enabled() -> bool:
    """Whether epochs are computed ahead (`AHEAD_ENV` unset, or anything but "0")."""
    from study.config import switched_on
    return switched_on(AHEAD_ENV)


class Cancelled(BaseException):
    """Raised in a thread whose work was cancelled (`check_cancelled`). A BaseException, so a
    trial's own `except Exception` (which records the trial's errors) lets it through."""


def check_cancelled() -> None:
    """Raise `Cancelled` if this thread's work was cancelled (a no-op outside `one_ahead`)."""
    event = getattr(_local, "cancel", None)
    if event is not None and event.is_set():
        raise Cancelled


_DONE = object()


def _timed(items: Iterator[T], start: float | None) -> Iterator[tuple[T, float]]:
    t = start if start is not None else time.perf_counter()
    for item in items:
        yield item, time.perf_counter() - t
        t = time.perf_counter()


@contextmanager
def one_ahead(items: Iterator[T], start: float | None = None, ahead: bool = True
              ) -> Iterator[Iterator[tuple[T, float]]]:
    """Iterate `items` in a thread of their own, at most one item ahead of the consumer: item
    n + 1 is computed while the consumer holds item n, item n + 2 only once it asks for n + 1.
    Yields `(item, seconds)`, `seconds` what computing the item took in that thread (the first
    one's counted from `start`, a `time.perf_counter()` value, when given). An exception raised
    by `items` is raised to the consumer, in its place. On leaving the block (the items
    exhausted, or the consumer stopped) the thread is cancelled and joined. With `ahead`
    False, the items are computed in the consumer's thread when it asks for them, timed the
    same way."""
    if not ahead:
        yield _timed(items, start)
        return
    out: queue.Queue = queue.Queue()
    permit = threading.Semaphore(0)
    cancel = threading.Event()

    def produce() -> None:
        _local.cancel = cancel
        try:
            for item, seconds in _timed(items, start):
                out.put((item, seconds, None))
                permit.acquire()
                if cancel.is_set():
                    return
            out.put((_DONE, 0.0, None))
        except Cancelled:
            pass
        except BaseException as e:  # handed to the consumer, raised there
            out.put((_DONE, 0.0, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:  # a generator cancelled at its yield ends here, not in GC
                close()

    def consume() -> Iterator[tuple[T, float]]:
        while True:
            item, seconds, error = out.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            permit.release()  # the next item may now be computed
            yield item, seconds

    thread = threading.Thread(target=produce, name="trial-epochs", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        cancel.set()
        permit.release()
        thread.join()
