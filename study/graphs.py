"""CUDA graphs outside the training step: a computation captured once and replayed.

A small model's evaluation on a GPU is launch-bound (an epoch's evaluation of the default model
is ~600 operations for ~10 ms of host time and well under a millisecond of device work), and
it reads only tensors that keep their addresses for the whole trial: the parameters, which the
optimizer updates in place, and the data, resident on the device. `Captured` runs such a
computation eagerly once, captures it in a CUDA graph on its second call and replays it from
then on. The training step's own graphs are in `study.step`.

Memory: each capture keeps a private pool that holds what the captured work allocated, so a
captured evaluation keeps its peak activations (on CUDA at most a few `evaluation.EVAL_ELEMENTS`
chunks; about 10 MB for the default model) for the rest of the trial; the k replicates of a
lockstep trial hold k such pools. Sharing one pool (`torch.cuda.graph_pool_handle`) would
bound that, untried so far.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import torch
from torch.utils._pytree import tree_map

log = logging.getLogger(__name__)

T = TypeVar("T")


@contextlib.contextmanager
def no_collection() -> Iterator[None]:
    """Python's cyclic garbage collector off for a CUDA graph's capture. A collection that runs
    during capture frees whatever dead cycles hold, and an earlier trial's state (its captured
    graphs included) is such a cycle: destroying a `CUDAGraph` while another is capturing fails
    the capture ("operation not permitted when stream is capturing"), and the trial then fell
    back to eager (seen on an H200: 4 replicates after a single trial, 18x slower). torch >= 2.5
    no longer collects before a capture by itself (`torch.compiler.config.force_cudagraph_gc`)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def capture(fn: Callable[[], T], device: torch.device | None = None
            ) -> tuple[torch.cuda.CUDAGraph, T]:
    """`fn()` captured in a new CUDA graph (capture runs nothing; each replay runs it) and its
    outputs, which the graph's replays overwrite; the collector paused (`no_collection`) and
    capture errors kept to this thread. Raises where `fn` cannot be captured, the device
    synchronized again so that the caller can go on eagerly."""
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with no_collection(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn()
    except Exception:
        torch.cuda.synchronize(device)
        raise
    return graph, out


def why_not(e: BaseException) -> str:
    """A failed capture's reason in one line: the error's type and its first line."""
    first = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def _copy(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


class Captured(Generic[T]):
    """`fn()` (no arguments; its result a pytree of device tensors, e.g. a dict of metrics)
    replayed from a CUDA graph. The first call runs `fn` eagerly (lazy CUDA state: kernels'
    first loads, library handles), the second captures it and replays, later ones replay.
    Results are copies: the graph's own outputs are overwritten by the next replay.

    Only for computations whose inputs keep their addresses and shapes between calls and which
    never wait for the host (a host sync fails the capture). Where capture fails, `fn` runs
    eagerly from then on (logged once); off CUDA (`enabled` False) it always does."""

    def __init__(self, fn: Callable[[], T], enabled: bool, name: str = "evaluation") -> None:
        self.fn, self.enabled, self.name = fn, enabled, name
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Any = None

    @property
    def mode(self) -> str:
        """`graph` while captured (or about to be), else `eager`."""
        return "graph" if self.enabled else "eager"

    def __call__(self) -> T:
        self.calls += 1
        if not self.enabled or self.calls == 1:
            return self.fn()
        if self.graph is None:
            try:
                self.graph, self.out = capture(self.fn)
            except Exception as e:  # something here cannot be captured: eager from now
                log.warning("%s falls back to eager: %s", self.name, why_not(e))
                self.enabled = False
                return self.fn()
        self.graph.replay()
        result: T = tree_map(_copy, self.out)
        return result
