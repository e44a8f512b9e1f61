"""The step modes compute what the eager step computes (study/step.py).

`compile` is checked on the CPU; `graph` (CUDA graphs) needs CUDA and skips without it. The loss
without boolean indexing (what lets a per-token step keep static shapes) is checked against the
direct formula.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.trials import cpu_autocast
from study.config import CHOICES, make_config
from study.evaluation import epoch_metrics
from study.graphs import Captured, no_collection
from study.model import build_model
from study.params import cast_names
from study.step import (
    GRAPH_WARMUP,
    graph_blocker,
    resolve_step_mode,
    train_state,
    train_step,
    trial_loss,
)
from study.tasks import get_task
from study.tasks.base import IGNORE
from study.train import run_trial

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TINY = {"task": "digits", "d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2,
        "batch_size": 64, "epochs": 2, "lr": 0.01, "seed": 3}


def direct_loss(logits, y, cfg, adjust=0.0):
    """The per-token objective written with boolean indexing, as before."""
    logits = logits.float()
    keep = y != IGNORE
    logits, y = logits[keep], y[keep]
    loss = F.cross_entropy(logits + adjust, y, label_smoothing=cfg.label_smoothing)
    if cfg.z_loss > 0:
        loss = loss + cfg.z_loss * torch.logsumexp(logits, -1).pow(2).mean()
    return loss


@pytest.mark.parametrize("smoothing,z_loss,tau", [
    pytest.param(0.0, 0.0, 0.0, id="plain"),
    pytest.param(0.1, 0.0, 0.0, id="smoothing"),
    pytest.param(0.0, 1e-3, 0.0, id="z_loss"),
    pytest.param(0.1, 1e-3, 1.0, id="all"),
])
def test_static_shape_loss_matches_boolean_indexing(smoothing, z_loss, tau):
    gen = torch.Generator().manual_seed(0)
    cfg = make_config({"label_smoothing": smoothing, "z_loss": z_loss})
    logits = torch.randn(8, 12, 5, generator=gen)
    y = torch.randint(0, 5, (8, 12), generator=gen)
    y[torch.rand(8, 12, generator=gen) < 0.4] = IGNORE
    adjust = tau * torch.randn(5, generator=gen)
    got = trial_loss(logits, y, None, cfg, adjust)
    want = direct_loss(logits, y, cfg, adjust)
    assert torch.allclose(got, want, atol=1e-6), (got, want)


@pytest.mark.parametrize("mode", [pytest.param(m, id=m) for m in CHOICES["step_mode"]])
def test_every_mode_resolves_on_cpu(mode):
    cfg = make_config({**TINY, "step_mode": mode})
    got, why = resolve_step_mode(cfg, torch.device("cpu"))
    want = {"auto": "eager", "eager": "eager", "graph": "eager", "compile": "compile"}[mode]
    assert got == want
    assert (why is not None) == (mode == "graph")  # only an explicit graph request explains
    if why:
        assert "CUDA" in why


@pytest.mark.parametrize("changes,blocked", [
    pytest.param({}, False, id="default"),
    pytest.param({"length_mode": "bucket", "task": "copy"}, True, id="bucket"),
    pytest.param({"arch": "lstm_attention"}, True, id="lstm"),
])
def test_graph_blockers_on_cuda_device(changes, blocked):
    """What cannot be captured is said, whatever the host (the device is only named)."""
    cfg = make_config({**TINY, **changes})
    assert (graph_blocker(cfg, torch.device("cuda")) is not None) == blocked


def run_steps(cfg, steps, device="cpu"):
    """`steps` training steps of `cfg` on fixed batches (the last one partial, so two batch
    shapes), from the same initial weights; the losses and final weights."""
    data = get_task(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.spec).to(device)
    state, _ = train_state(model, cfg, total_steps=steps)
    n = len(data.train)
    losses = []
    for i in range(steps):
        lo = (i * cfg.batch_size) % n
        b = cfg.batch_size if i % 4 != 3 else cfg.batch_size // 2 + 1  # a second shape
        x, y, m = (t[lo:lo + b].to(device) for t in (data.train.x, data.train.y,
                                                     data.train.mask))
        losses.append(float(train_step(state, x, y, m)))
    return state, losses, {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def weight_gaps(a: dict, b: dict, d_model: int) -> dict[str, float]:
    """Largest |a - b| per parameter, leaving out the key bias (`attn.qkv.bias[d:2d]`): the
    softmax is invariant to it (q . b_k is the same for every key), so its gradient is pure
    rounding noise, which Adam scales up to lr-sized steps in whichever path rounds differently."""
    gaps = {}
    for name, w in a.items():
        diff = (w - b[name]).abs()
        if name.endswith("attn.qkv.bias"):
            diff[d_model:2 * d_model] = 0.0
        gaps[name] = float(diff.max())
    return gaps


@pytest.mark.slow
def test_compile_matches_eager_on_cpu():
    torch.set_num_threads(1)
    base = make_config({**TINY, "step_mode": "eager"})
    e_state, e_loss, e_w = run_steps(base, 8)
    c_state, c_loss, c_w = run_steps(base.replace(step_mode="compile"), 8)
    assert c_state.mode == "compile" and e_state.mode == "eager"
    assert c_state.step == e_state.step == 8
    assert max(abs(a - b) for a, b in zip(e_loss, c_loss)) < 1e-4, (e_loss, c_loss)
    # Adam divides by sqrt(v): float noise in a near-zero gradient moves its weight by up to
    # ~lr per step, so weights are compared at a fraction of the learning rate
    gaps = weight_gaps(e_w, c_w, base.d_model)
    assert max(gaps.values()) < 0.5 * base.lr, gaps
    assert float(c_state.gn_sum) == pytest.approx(float(e_state.gn_sum), rel=1e-4)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("changes", [
    pytest.param({}, id="classify"),
    pytest.param({"task": "listops", "attn_entropy_reg": 0.01, "z_loss": 1e-4}, id="stats"),
    pytest.param({"task": "copy", "pos_encoding": "rope"}, id="per_token"),
])
def test_graph_matches_eager_on_cuda(changes):
    base = make_config({**TINY, **changes, "device": "cuda", "step_mode": "eager"})
    steps = GRAPH_WARMUP + 9
    e_state, e_loss, e_w = run_steps(base, steps, "cuda")
    g_state, g_loss, g_w = run_steps(base.replace(step_mode="graph"), steps, "cuda")
    assert g_state.mode == "graph" and len(g_state.graphs) == 2  # two batch shapes captured
    assert g_state.step == steps and int(g_state.step_t) == steps
    assert max(abs(a - b) for a, b in zip(e_loss, g_loss)) < 2e-3, (e_loss, g_loss)
    gaps = weight_gaps(e_w, g_w, base.d_model)
    assert max(gaps.values()) < 2e-3, sorted(gaps.items(), key=lambda kv: -kv[1])[:3]
    assert int(g_state.first_bad) == -1
    assert float(g_state.gn_sum) == pytest.approx(float(e_state.gn_sum), rel=1e-2)


def test_no_collection_pauses_the_collector_and_restores_it():
    assert gc.isenabled()
    with pytest.raises(RuntimeError), no_collection():
        assert not gc.isenabled()
        raise RuntimeError("a failed capture")
    assert gc.isenabled()
    gc.disable()
    try:
        with no_collection():
            pass
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()


@pytest.mark.gpu
@cuda
def test_captures_run_with_the_collector_paused():
    """A finished trial's state is a dead cycle holding its captured graphs; a collection during
    the next trial's capture destroyed them mid-capture, failing it (the trial then trained
    eagerly: seen on an H200). Whether a collection happens to fall inside a capture depends on
    allocation counts, so this checks the cause: the Python code that a capture records (the
    model's forward, in the training step and in the evaluation) sees automatic collection off,
    and the eager warm-up sees it on."""
    cfg = make_config({**TINY, "device": "cuda", "step_mode": "graph"})
    dev = torch.device("cuda")
    data = get_task(cfg).on(dev)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.spec).to(dev)
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda *_: seen.append(gc.isenabled()))
    state, _ = train_state(model, cfg, total_steps=GRAPH_WARMUP + 3)
    x, y, m = (t[:cfg.batch_size] for t in (data.train.x, data.train.y, data.train.mask))
    for _ in range(GRAPH_WARMUP + 3):  # warm-up, capture, replays (which run no Python)
        train_step(state, x, y, m)
    assert state.mode == "graph" and state.graphs
    assert seen == [True] * GRAPH_WARMUP + [False], seen
    seen.clear()
    captured = Captured(lambda: epoch_metrics(model, data, dev), enabled=True)
    captured()
    eager_calls = len(seen)
    captured()  # captured, then replayed
    captured()
    assert captured.graph is not None
    assert seen[:eager_calls] == [True] * eager_calls
    assert seen[eager_calls:] == [False] * eager_calls, seen  # the capture's forwards only
    assert gc.isenabled()


@pytest.mark.gpu
@cuda
def test_graph_flags_divergence_at_the_same_step():
    cfg = make_config({**TINY, "device": "cuda", "lr": 1e6, "grad_clip": 0.0,
                       "step_mode": "eager", "epochs": 3})
    eager = list(run_trial(cfg))[-1]
    graph = list(run_trial(cfg.replace(step_mode="graph")))[-1]
    assert eager.diverged and graph.diverged
    assert eager.diverged == graph.diverged  # "diverged at step N": the same N


@pytest.mark.gpu
@cuda
def test_graph_trial_matches_eager_trial():
    """Every epoch (the evaluation is captured at the second and replayed at the third)."""
    cfg = make_config({**TINY, "device": "cuda", "step_mode": "eager", "epochs": 3})
    eager = [r.metrics for r in run_trial(cfg)]
    graph = [r.metrics for r in run_trial(cfg.replace(step_mode="graph"))]
    assert len(eager) == len(graph) == 3
    for e, g in zip(eager, graph):
        for k in ("train_loss", "val_loss", "test_acc", "ece", "param_norm"):
            assert math.isclose(e[k], g[k], abs_tol=5e-3), (k, e[k], g[k])


@pytest.mark.gpu
@cuda
def test_graph_trial_with_dropout_trains_as_eager_does():
    """Dropout inside a captured step (SDPA's own dropout, a fresh mask every replay): the same
    trial in distribution, not draw for draw."""
    cfg = make_config({**TINY, "device": "cuda", "step_mode": "eager", "epochs": 3,
                       "attn_dropout": 0.2, "resid_dropout": 0.1})
    eager = list(run_trial(cfg))
    graph = list(run_trial(cfg.replace(step_mode="graph")))
    assert len(eager) == len(graph) == 3
    assert all(r.diverged is None for r in eager + graph)
    e, g = eager[-1].metrics, graph[-1].metrics
    assert g["train_loss"] == pytest.approx(e["train_loss"], rel=0.15)
    assert g["val_acc"] == pytest.approx(e["val_acc"], abs=0.1)


@pytest.mark.gpu
@cuda
def test_captured_evaluation_replays_with_the_current_parameters():
    cfg = make_config({**TINY, "device": "cuda"})
    dev = torch.device("cuda")
    data = get_task(cfg).on(dev)
    model = build_model(cfg, data.spec).to(dev)
    captured = Captured(lambda: epoch_metrics(model, data, dev), enabled=True)
    seen = []
    for _ in range(4):
        got = {n: float(v) for n, v in captured().items()}
        want = {n: float(v) for n, v in epoch_metrics(model, data, dev).items()}
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
        seen.append(got["val_loss"])
        with torch.no_grad():  # an optimizer's update: in place
            for p in model.parameters():
                p.mul_(0.9).add_(0.01)
    assert captured.graph is not None, "the evaluation fell back to eager"
    assert len(set(seen)) == 4  # each replay saw that round's parameters


def test_captured_runs_eagerly_off_cuda():
    calls = []
    captured = Captured(lambda: calls.append(1) or {"x": torch.ones(())}, enabled=False)
    assert float(captured()["x"]) == 1.0 and float(captured()["x"]) == 1.0
    assert len(calls) == 2 and captured.graph is None and captured.mode == "eager"


@pytest.mark.parametrize("gpu", [pytest.param(None, id="none"), pytest.param(0.0, id="cpu"),
                                 pytest.param(1.0, id="whole"), pytest.param(0.25, id="share")])
def test_packed_trials_cap_their_gpu_memory(gpu, monkeypatch):
    """A fractional GPU caps the process's memory share at that fraction; no GPU or a whole
    one sets no cap. On the CPU the CUDA calls are recorded (as if a device were there), so
    that the cap's call is checked here, not only on a GPU; on a GPU it is the real call."""
    from study.trainable import gpu_memory_cap

    calls: list[float] = []
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                            lambda f, *a, **k: calls.append(f))
    try:
        got = gpu_memory_cap(gpu)
    finally:  # the cap is per process: lift it for the tests that follow
        torch.cuda.set_per_process_memory_fraction(1.0)
    want = gpu if (gpu is not None and 0 < gpu < 1) else None
    assert got == want
    if calls:  # (on the CPU: every call seen, the lift included)
        assert calls == ([gpu] if want else []) + [1.0]


@pytest.mark.parametrize("error,want", [
    pytest.param(RuntimeError("CUDA error: capture\nmore detail"),
                 "RuntimeError: CUDA error: capture", id="first_line"),
    pytest.param(RuntimeError(), "RuntimeError: ", id="no_message"),
])
def test_a_failed_captures_reason_is_one_line(error, want):
    from study.graphs import why_not

    assert why_not(error) == want


class _GraphOnTheCPU:
    """Stands in for a CUDA graph where there is none: capture records the function (a real
    capture runs nothing), replay runs it."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()


@pytest.mark.parametrize(("batched", "grouped"), [
    pytest.param(False, False, id="single"),
    pytest.param(False, True, id="single_grouped_params"),
    pytest.param(True, False, id="replicas")])
def test_a_captured_step_makes_its_own_gradients(batched: bool, grouped: bool,
                                                 monkeypatch) -> None:
    """The first batch of a shape in `graph` mode (`_replay`: capture, then replay), with the
    capture stood in for on the CPU: the step runs the eager step's operations and no more (its
    backward makes the gradients; no zeroing and no add into kept ones, 31 operations a step
    for the default model before) and lands where the eager step lands."""
    import copy

    import study.step as step_module
    from benchmarks.trials import DEFAULT_TRIAL, kernel_counts
    from study.replicas import Replicas
    from study.step import _captured_step, _eager_step, _replay
    from study.trainable import replicate

    placeholder = torch.zeros(())  # the captured loss (a real capture returns the step's)
    monkeypatch.setattr(step_module, "capture",
                        lambda fn, device: (_GraphOnTheCPU(fn), placeholder))
    monkeypatch.setattr(step_module, "grouped_params", lambda mode: grouped)  # as captured
    cfg = make_config({**DEFAULT_TRIAL, "epochs": 1, "step_mode": "eager"})
    if batched:
        cfgs = [replicate(cfg, k, False) for k in range(2)]
        state: object = Replicas(cfgs, [get_task(c) for c in cfgs])
        batch = state.gather(torch.arange(64).repeat(2, 1))
        steps = (lambda s: s._eager_step, lambda s: s._captured_step)
        params = lambda s: list(s.params.values())
    else:
        data = get_task(cfg)
        state, _ = train_state(build_model(cfg, data.spec), cfg, 100)
        assert (state.groups is not None) == grouped
        batch = tuple(t[:64] for t in (data.train.x, data.train.y, data.train.mask))
        steps = (lambda s: lambda *b: _eager_step(s, *b),
                 lambda s: lambda *b: _captured_step(s, *b))
        params = lambda s: s.trained()  # the leaves where grouped (a deep copy's module
        # parameters are no longer their aliases)
    steps[0](state)(*batch)  # gradients and optimizer state exist, as after the warm-up
    twin = copy.deepcopy(state)
    ops_graph = kernel_counts(lambda: _replay(state, *batch, steps[0](state), steps[1](state)))
    ops_eager = kernel_counts(lambda: steps[0](twin)(*batch))
    # the static inputs and the returned loss are copies
    assert ops_graph.pop("clone") == ops_eager.pop("clone", 0) + 4
    assert ops_graph == ops_eager
    for a, b in zip(params(state), params(twin)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _Casts(TorchDispatchMode):
    """How many dtype casts (`_to_copy`) are dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.n += func.overloadpacket.__name__ == "_to_copy"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("autocast_on", [pytest.param(False, id="full_precision"),
                                         pytest.param(True, id="autocast")])
@pytest.mark.parametrize("changes", [pytest.param({}, id="tiny"),
                                     pytest.param({"embed": "conv", "qk_norm": "l2",
                                                   "pos_encoding": "learned"}, id="conv_l2")])
def test_grouped_parameters_train_as_the_modules_own(monkeypatch, autocast_on, changes) -> None:
    """A step on `ParamGroups` (what captured steps use, `step.grouped_params`, run here on the
    CPU's eager step) trains as the module's own parameters do: the same losses and, through
    the module's aliases of the leaves, the same parameters and evaluation. Under autocast
    (CUDA's bf16; the CPU's stands in) it casts the `Linear`/`Conv1d` parameters a group at a
    time: two casts a group a step against autocast's two a parameter."""
    cfg = make_config({**TINY, **changes, "step_mode": "eager"})
    data = get_task(cfg)
    if autocast_on:
        monkeypatch.setattr("study.step.autocast", cpu_autocast)
        monkeypatch.setattr("study.step.autocast_dtype", lambda device: torch.bfloat16)
    out = {}
    for grouped in (False, True):
        monkeypatch.setattr("study.step.grouped_params", lambda mode, g=grouped: g)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, data.spec)
        state, _ = train_state(model, cfg, 100)
        assert (state.groups is not None) == grouped
        with _Casts() as casts:
            losses = [train_step(state, data.train.x[i:i + 64], data.train.y[i:i + 64],
                                 data.train.mask[i:i + 64]).item() for i in range(0, 320, 64)]
        out[grouped] = (losses, {n: p.detach().clone() for n, p in model.named_parameters()},
                        epoch_metrics(model, data, torch.device("cpu")), casts.n, state)
    (l0, p0, m0, c0, _), (l1, p1, m1, c1, s1) = out[False], out[True]
    # bf16 autocast: the groups' casts round in another order (4.6e-5 seen after 5 steps)
    assert l1 == pytest.approx(l0, rel=2e-4 if autocast_on else 1e-5)
    assert p1.keys() == p0.keys()
    d = cfg.d_model
    for n, a in p0.items():
        b = p1[n]
        if n.endswith("qkv.bias"):  # the key bias: its gradient is rounding noise (softmax is
            # invariant to it), which Adam scales to lr-sized steps either way
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        # (bf16: the conv weight, 6.4e-5 apart after 5 steps, a small part of one Adam step)
        tol = {"rtol": 1e-3, "atol": 2e-4} if autocast_on else {"rtol": 1e-4, "atol": 1e-5}
        torch.testing.assert_close(a, b, **tol, msg=n)
    assert float(m1["val_loss"]) == pytest.approx(float(m0["val_loss"]), rel=1e-4)
    assert s1.groups is not None
    n_cast = sum(len(names) for (_, c), names in s1.groups.groups.items() if c)
    n_groups = sum(1 for _, c in s1.groups.groups if c)
    if autocast_on:
        assert n_cast == len(cast_names(model)) > 0
        assert c1 == c0 - 5 * (2 * n_cast - 2 * n_groups), (c0, c1)  # 5 steps
    else:
        assert n_cast == 0 and c1 == c0
