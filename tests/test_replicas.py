"""Seed replicates as one batched computation (`study.replicas`): the same results as the
unbatched `run_trial` (exactly as far as float rounding goes without dropout, in distribution
with dropout), separate dropout streams, reproducibility, the fallbacks to lockstep, the
`seed_batching` key and the trial's thread count."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.trials import cpu_autocast
from study import metrics as M
from study.config import TrialConfig, make_config
from study.model import AttnStats, attend_written_out, build_model
from study.records import Outcome, SweepSpec, seed_metric
from study.replicas import (
    SHORT_ROW,
    Replicas,
    fallback_reason,
    folded_sdpa,
    fused_linear,
    train_replicas,
)
from study.spaces import SpaceError, parse_space
from study.step import stacked_loss, trial_loss
from study.tasks import get_task
from study.tasks.base import IGNORE
from study.train import EpochResult, run_trial
from study.trainable import lockstep, replicate, trial_threads

# a per-replicate loop in vmap's fallback would show up as this warning: make it an error
pytestmark = pytest.mark.filterwarnings("error:There is a performance drop:UserWarning")

SMALL = {"task": "digits", "d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2,
         "epochs": 2, "batch_size": 128, "device": "cpu", "seed": 3}
# two layers: drop_path leaves the first block alone, so one layer would not exercise it
DROPOUT = {"attn_dropout": 0.2, "resid_dropout": 0.2, "emb_dropout": 0.2, "drop_path": 0.2,
           "n_layers": 2}
# compared within float rounding (rtol); differences of two such values: absolute
CLOSE = (M.TRAIN_LOSS, M.TRAIN_ACC, M.VAL_LOSS, M.VAL_ACC, M.TEST_LOSS, M.TEST_ACC, M.ECE,
         M.ATTN_ENTROPY, M.ATTN_ENTROPY_MIN, M.PARAM_NORM, M.GRAD_NORM, M.N_PARAMS,
         M.FLOPS_PER_SAMPLE, M.EPOCH)
GAPS = (M.GEN_GAP_ACC, M.GEN_GAP_LOSS)


def replicas_of(changes: dict, seeds: int = 2, vary_data_seed: bool = True):
    cfg = make_config({**SMALL, **changes})
    cfgs = [replicate(cfg, k, vary_data_seed) for k in range(seeds)]
    return cfgs, [get_task(c) for c in cfgs]


def assert_matches(batched: list[list[EpochResult]], alone: list[list[EpochResult]]) -> None:
    """Per replicate and epoch, the batched results equal the unbatched ones within float
    rounding. `attn_max_logit` gets a looser tolerance: it reads raw logits, which include
    q . b_k, and the key bias of full attention has a gradient of pure rounding noise (the
    softmax is invariant to it) that Adam scales up to lr-sized steps in either path."""
    assert len(batched) == len(alone[0])
    for epoch, results in enumerate(batched):
        for k, got in enumerate(results):
            want = alone[k][epoch]
            assert got.diverged is None and want.diverged is None
            assert got.metrics.keys() == want.metrics.keys()
            for name in CLOSE:
                assert got.metrics[name] == pytest.approx(want.metrics[name], rel=1e-4,
                                                          abs=1e-6), (epoch, k, name)
            for name in GAPS:
                assert got.metrics[name] == pytest.approx(want.metrics[name], abs=1e-5)
            assert got.metrics[M.ATTN_MAX_LOGIT] == pytest.approx(
                want.metrics[M.ATTN_MAX_LOGIT], rel=1e-2)
            extra = set(got.metrics) - set(CLOSE) - set(GAPS) - {M.ATTN_MAX_LOGIT,
                                                                 M.SAMPLES_PER_S}
            for name in extra:  # robustness metrics of the final epoch
                assert got.metrics[name] == pytest.approx(want.metrics[name], rel=1e-4)
            assert got.artifacts.keys() == want.artifacts.keys()


def unbatched(cfgs, datas) -> list[list[EpochResult]]:
    return [list(run_trial(c, d)) for c, d in zip(cfgs, datas)]


def without_speed(results: list[list[EpochResult]]) -> list[list[dict[str, float]]]:
    return [[{k: v for k, v in r.metrics.items() if k != M.SAMPLES_PER_S} for r in epoch]
            for epoch in results]


# --- attention: the replicate axis folded into the batch axis ---------------------------------

# on the CPU, 6 keys go to `attend` (written out) and 20 to the fold itself (`_SDPA`)
@pytest.mark.parametrize("T", [pytest.param(6, id="T6_attend"), pytest.param(20, id="T20_fold")])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "shared_bool", "key_bool"])
def test_folded_sdpa_is_sdpa_per_replicate_with_its_gradients(mask_kind: str, T: int) -> None:
    g = torch.Generator().manual_seed(0)
    R, B, H, D = 3, 4, 2, 8
    q, k, v = (torch.randn(R, B, H, T, D, generator=g, requires_grad=True) for _ in range(3))
    lengths = torch.randint(1, T + 1, (R, B), generator=g)
    masks = {"none": None,
             "bool": (torch.rand(R, B, 1, T, T, generator=g) > 0.3) | torch.eye(T).bool(),
             "float": torch.randn(R, B, H, T, T, generator=g),
             "shared_bool": (torch.rand(B, 1, T, T, generator=g) > 0.3) | torch.eye(T).bool(),
             # the padding mask the model builds for full attention: real keys only
             "key_bool": (torch.arange(T) < lengths[..., None])[:, :, None, None, :]}
    mask = masks[mask_kind]
    dim = None if mask is None or mask_kind == "shared_bool" else 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback (nor any other) warning
        out = torch.vmap(lambda q, k, v, m: folded_sdpa(q, k, v, attn_mask=m, scale=0.3),
                         in_dims=(0, 0, 0, dim))(q, k, v, mask)
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    for r in range(R):
        m = None if mask is None else (mask if dim is None else mask[r])
        want = F.scaled_dot_product_attention(q[r], k[r], v[r], attn_mask=m, scale=0.3)
        torch.testing.assert_close(out[r], want)
        want_grads = torch.autograd.grad((want * w[r]).sum(), (q, k, v))
        for got_g, want_g in zip(grads, want_grads):
            torch.testing.assert_close(got_g[r], want_g[r])


@pytest.mark.parametrize("bias", [pytest.param(True, id="bias"),
                                  pytest.param(False, id="no_bias")])
@pytest.mark.parametrize("x_dim", [pytest.param(0, id="x_per_replicate"),
                                   pytest.param(None, id="x_shared")])
@pytest.mark.parametrize("lead", [pytest.param((5,), id="rows"),
                                  pytest.param((4, 3), id="tokens")])
def test_batched_linear_is_each_replicates_linear_with_its_gradients(bias, x_dim, lead) -> None:
    """`fused_linear` (`_Linear`) under vmap: each replicate's `F.linear` and its gradients
    (input, weight, bias), from one batched product forward and three kernels backward."""
    g = torch.Generator().manual_seed(4)
    R, n_in, n_out = 3, 6, 5
    x = torch.randn(*((R,) if x_dim == 0 else ()), *lead, n_in, generator=g, requires_grad=True)
    w = torch.randn(R, n_out, n_in, generator=g, requires_grad=True)
    b = torch.randn(R, n_out, generator=g, requires_grad=True) if bias else None
    out = torch.vmap(_linear, in_dims=(x_dim, 0, 0 if bias else None))(x, w, b)
    assert out.shape == (R, *lead, n_out)
    up = torch.randn(out.shape, generator=g)
    inputs = (x, w, b) if bias else (x, w)
    with _Ops() as ops:
        grads = torch.autograd.grad(out, inputs, up)
    assert sorted(ops.names) == sorted(["bmm", "bmm"] + (["sum"] if bias else [])
                                       + (["sum"] if x_dim is None else [])), ops.names
    want_grads = [torch.zeros_like(t) for t in inputs]
    for r in range(R):
        xr = x[r] if x_dim == 0 else x
        want = F.linear(xr, w[r], None if b is None else b[r])
        torch.testing.assert_close(out[r], want)
        for acc, gr in zip(want_grads, torch.autograd.grad((want * up[r]).sum(), inputs)):
            acc += gr
    for got, want_g in zip(grads, want_grads):
        torch.testing.assert_close(got, want_g)


def test_fused_linear_outside_vmap_is_f_linear_with_its_gradients() -> None:
    """`_Linear` called on one replicate's tensors (no vmap) is `F.linear`, gradients too."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 6, generator=g, requires_grad=True)
    w = torch.randn(5, 6, generator=g, requires_grad=True)
    b = torch.randn(5, generator=g, requires_grad=True)
    up = torch.randn(4, 3, 5, generator=g)
    got = _linear(x, w, b)
    want = F.linear(x, w, b)
    torch.testing.assert_close(got, want)
    for a, c in zip(torch.autograd.grad(got, (x, w, b), up),
                    torch.autograd.grad(want, (x, w, b), up)):
        torch.testing.assert_close(a, c)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """`fused_linear` on a layer holding `w` and `b` (as the stateless copy's do)."""
    return fused_linear(cast(torch.nn.Linear, SimpleNamespace(weight=w, bias=b)), x)


class _Ops(TorchDispatchMode):
    """The names of the computing operations dispatched (views and detaches left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name not in ("view", "_unsafe_view", "reshape", "t", "transpose", "expand",
                        "unsqueeze", "squeeze", "select", "slice", "detach", "alias",
                        "as_strided", "permute", "ones_like"):
            self.names.append(name)
        return func(*args, **(kwargs or {}))


class _InputDtypes(TorchDispatchMode):
    """The dtype of the first input of every operation dispatched (the physical operations,
    forward and backward) whose name contains one of `names`."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        self.names = names
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if any(n in func.name() for n in self.names):
            self.seen.append((func.name(), args[0].dtype))
        return func(*args, **(kwargs or {}))


ATTENTION_OPS = ("scaled_dot_product", "flash_attention")
COMPUTE_OPS = ("mm", "convolution", *ATTENTION_OPS)  # mm, addmm, bmm, baddbmm too


@pytest.mark.parametrize("mask_kind", ["none", "float"])
def test_folded_sdpa_under_autocast_runs_in_its_dtype_forward_and_backward(mask_kind: str
                                                                            ) -> None:
    """fp32 q, k, v (RoPE or a learned temperature promote them) under autocast: the fold
    computes attention in the autocast dtype both ways, as SDPA does for one model, and
    matches it per replicate. (CUDA's bf16 autocast is what trials use; the CPU's stands in:
    before the fix the backward recomputed in fp32 there, 3x slower on an H100.)"""
    g = torch.Generator().manual_seed(3)
    R, B, H, T, D = 2, 3, 2, 20, 8
    q, k, v = (torch.randn(R, B, H, T, D, generator=g, requires_grad=True) for _ in range(3))
    mask = None if mask_kind == "none" else torch.randn(R, B, H, T, T, generator=g)
    w = torch.randn(R, B, H, T, D, generator=g)
    with _InputDtypes(*ATTENTION_OPS) as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.vmap(lambda q, k, v, m: folded_sdpa(q, k, v, attn_mask=m, scale=0.3),
                         in_dims=(0, 0, 0, None if mask is None else 0))(q, k, v, mask)
        grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    assert out.dtype == torch.bfloat16
    assert seen.seen and {dt for _, dt in seen.seen} == {torch.bfloat16}, seen.seen
    assert {gr.dtype for gr in grads} == {torch.float32}  # autograd's cast back, as autocast's
    for r in range(R):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = F.scaled_dot_product_attention(q[r], k[r], v[r], scale=0.3,
                                                  attn_mask=None if mask is None else mask[r])
            want_grads = torch.autograd.grad((want.float() * w[r]).sum(), (q, k, v))
        torch.testing.assert_close(out[r], want, atol=2e-2, rtol=2e-2)
        for got_g, want_g in zip(grads, want_grads):
            torch.testing.assert_close(got_g[r], want_g[r], atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("changes", [pytest.param({}, id="default"),
                                     pytest.param({"pos_encoding": "rope"}, id="rope"),
                                     pytest.param({"embed": "conv"}, id="conv_embed")])
def test_batched_replicates_under_autocast_compute_as_each_replicates_model(
        monkeypatch, changes) -> None:
    """Under autocast (CUDA's bf16 in trials; the CPU's stands in) the batched forward and
    training loss compute what each replicate's own module computes, every matmul and
    convolution in bf16. Before, vmap decomposed `F.linear` with a bias ahead of autocast
    (every projection's output fp32) and `F.conv1d` escaped it (the conv embedding in fp32)."""
    cfgs, datas = replicas_of(changes, vary_data_seed=False)
    bf16 = torch.bfloat16
    monkeypatch.setattr("study.replicas.autocast", cpu_autocast)
    monkeypatch.setattr("study.replicas.autocast_dtype", lambda device: bf16)  # cast groups
    reps = Replicas(cfgs, datas)
    x, y, m = reps.val.rows(0, 48)
    xs, ys, ms = (t.expand(reps.k, *t.shape) for t in (x, y, m))  # (k, B, ...)
    with _InputDtypes(*COMPUTE_OPS) as ops, torch.no_grad():
        reps.base.eval()
        (got,) = reps._forward(x, m, reps.val.shared)
        reps.base.train()  # SMALL has no dropout: the same function, in training mode
        losses = reps._losses(reps.working_params(), xs, ys, ms, reps.adjust)  # (k,)
    assert ops.seen and {dt for _, dt in ops.seen} == {bf16}, sorted(set(ops.seen))
    for r in range(reps.k):
        model = reps.model(r)
        with torch.no_grad(), torch.autocast("cpu", dtype=bf16):
            want, _ = model.eval()(x, m)
            logits, st = model.train()(x, m)
            want_loss = trial_loss(logits, y, st, cfgs[r], reps.adjust[r])
        assert got[r].dtype == want.dtype == bf16
        torch.testing.assert_close(got[r].float(), want.float(), atol=3e-2, rtol=3e-2)
        assert losses[r].item() == pytest.approx(want_loss.item(), rel=1e-2)


@pytest.mark.parametrize("changes", [pytest.param({}, id="default"),
                                     pytest.param({"embed": "conv"}, id="conv_embed")])
def test_autocast_groups_are_cast_once_with_the_same_values(monkeypatch, changes) -> None:
    """Under autocast (CUDA's bf16; the CPU's stands in) the parameters autocast would cast
    one by one (every `Linear`'s and `Conv1d`'s) are cast as their groups, one kernel each
    way per group: the same losses as autocast's own casts and the same gradients (but for
    the order the norm sums them in), with two casts a group against two a parameter."""
    bf16 = torch.bfloat16
    monkeypatch.setattr("study.replicas.autocast", cpu_autocast)
    cfgs, datas = replicas_of(changes, vary_data_seed=False)
    model = build_model(cfgs[0], datas[0].spec)
    cast = {f"{mn}.{pn}" for mn, m in model.named_modules()
            if type(m) in (torch.nn.Linear, torch.nn.Conv1d)
            for pn, _ in m.named_parameters(recurse=False)}
    got = {}
    for grouped in (False, True):
        monkeypatch.setattr("study.replicas.autocast_dtype",
                            lambda device, g=grouped: bf16 if g else None)
        reps = Replicas(cfgs, datas)
        with _InputDtypes("_to_copy") as casts:
            loss, gn = reps._clipped(*reps.gather(torch.arange(2 * 16).view(2, 16)))
        grads = reps.flat._split({g: f.grad for g, f in reps.flat.leaves.items()})
        got[grouped] = loss, gn, grads, len(casts.seen), reps
    (l0, g0, grads0, n0, reps0), (l1, g1, grads1, n1, reps1) = got[False], got[True]
    assert {c for _, c in reps0.flat.groups} == {False}  # no autocast: no cast group
    cast_groups = [names for (_, c), names in reps1.flat.groups.items() if c]
    assert sorted(n for names in cast_groups for n in names) == sorted(cast)
    assert {t.dtype for t in reps1.params.values()} == {torch.float32}  # the leaves stay fp32
    assert torch.equal(l0, l1)
    # the norm sums its groups in another order: equal up to that rounding (and so the
    # clipped gradients)
    torch.testing.assert_close(g0, g1, rtol=1e-6, atol=0)
    for n in grads0:
        torch.testing.assert_close(grads0[n], grads1[n], rtol=1e-6, atol=1e-9, msg=n)
    assert n1 == n0 - 2 * len(cast) + 2 * len(cast_groups), (n0, n1, len(cast))


@pytest.mark.parametrize("per_token", [pytest.param(False, id="classify"),
                                       pytest.param(True, id="per_token")])
def test_stacked_loss_is_each_replicates_trial_loss(per_token: bool) -> None:
    """`stacked_loss` on k replicates' stacked outputs (a sum per replicate) is each one's
    `trial_loss` (k = 1: the mean inside the kernel), with label smoothing, z-loss, the logit
    adjustment, the entropy regulariser and unlabelled positions."""
    g = torch.Generator().manual_seed(1)
    cfg = TrialConfig(label_smoothing=0.1, z_loss=1e-2, attn_entropy_reg=0.05)
    shape = (2, 5, 7) if per_token else (2, 5)  # (replicates, B[, T])
    logits = torch.randn(*shape, 4, generator=g)
    y = torch.randint(0, 4, shape, generator=g)
    if per_token:
        y[torch.rand(shape, generator=g) < 0.4] = IGNORE
    adjust = torch.randn(2, 4, generator=g)
    entropy = torch.rand(2, 3, 2, generator=g)  # (replicates, layers, heads)
    got = stacked_loss(logits, y, entropy, cfg, adjust)
    assert got.shape == (2,)
    for r in range(2):
        st = AttnStats(entropy=entropy[r], max_logit=torch.zeros(()))
        want = trial_loss(logits[r], y[r], st, cfg, adjust[r])
        assert got[r].item() == pytest.approx(want.item(), rel=1e-6)


# --- equivalence with run_trial ---------------------------------------------------------------

@pytest.mark.parametrize(("changes", "vary_data_seed"), [
    pytest.param({}, True, id="default"),
    pytest.param({"pos_encoding": "rope"}, False, id="rope"),
    pytest.param({"pos_encoding": "alibi"}, True, id="alibi"),
    pytest.param({"qk_norm": "l2"}, False, id="qk_norm_l2"),
    pytest.param({"learned_temperature": True}, True, id="learned_temperature"),
    pytest.param({"norm": "post_ln"}, False, id="post_ln"),
    pytest.param({"attn_kind": "local"}, True, id="local"),
    pytest.param({"attn_kind": "low_rank"}, False, id="low_rank"),
    pytest.param({"attn_entropy_reg": 0.01, "z_loss": 1e-3, "label_smoothing": 0.1,
                  "logit_adjust_tau": 1.0, "imbalance": 5.0}, True, id="loss_terms"),
    pytest.param({"embed": "conv", "channel_attention": "se", "norm": "rmsnorm",
                  "qk_norm": "layernorm", "grad_clip": 0.0}, True, id="conv_se_rms"),
])
@pytest.mark.parametrize("fused", [pytest.param(False, id="eager_projections"),
                                   pytest.param(True, id="captured_steps_projections")])
def test_batched_replicates_match_unbatched_trials(changes: dict, vary_data_seed: bool,
                                                   fused: bool, one_thread,
                                                   monkeypatch) -> None:
    """(`fused`: the projections captured steps use, `fused_linear`, on the CPU's eager step.)"""
    monkeypatch.setattr("study.replicas.fused_projections", lambda mode: fused)
    cfgs, datas = replicas_of(changes, vary_data_seed=vary_data_seed)
    reps = Replicas(cfgs, datas)
    assert any(getattr(m.forward, "func", None) is fused_linear
               for m in reps.base.modules()) == fused
    assert fallback_reason(cfgs, datas) is None
    batched = list(train_replicas(cfgs, datas, vmap_eval=True))
    assert_matches(batched, unbatched(cfgs, datas))


def test_module_evaluation_matches_too(one_thread) -> None:
    """The CPU default evaluates each replicate's own module (`epoch_metrics` itself)."""
    cfgs, datas = replicas_of({})
    assert_matches(list(train_replicas(cfgs, datas, vmap_eval=False)), unbatched(cfgs, datas))


def test_the_batched_model_masks_padding_if_any_replicate_has_it() -> None:
    """Replicates with their own data may differ in padding: the one batched model masks it
    when any of them has it (each replicate's own module keeps its own spec)."""
    cfgs, datas = replicas_of({})
    assert not any(d.spec.padded for d in datas)
    assert Replicas(cfgs, datas).base.spec.padded is False
    padded = [datas[0], replace(datas[1], spec=replace(datas[1].spec, padded=True))]
    reps = Replicas(cfgs, padded)
    assert reps.base.spec.padded is True
    assert [m.spec.padded for m in reps.models] == [False, True]


def test_per_token_task_matches(one_thread) -> None:
    cfgs, datas = replicas_of({"task": "sort", "epochs": 1, "n_train": 512})
    assert datas[0].spec.per_token
    assert_matches(list(train_replicas(cfgs, datas, vmap_eval=True)), unbatched(cfgs, datas))


@pytest.mark.parametrize("changes", [pytest.param({}, id="classification"),
                                     pytest.param({"task": "sort", "n_train": 256},
                                                  id="per_token")])
def test_robustness_sets_batched_are_each_replicates_own(changes, one_thread) -> None:
    """Replicates sharing their data evaluate the robustness sets in one batched pass: each
    replicate's accuracies are its own module's (`set_accuracies`); with their own data
    (sets that may differ) each module evaluates its own."""
    from study.evaluation import set_accuracies

    cfgs, datas = replicas_of(changes, vary_data_seed=False)
    reps = Replicas(cfgs, datas, vmap_eval=True)
    got = reps.robustness_accs()
    assert got is not None and len(got) == 2 and got[0].keys() == datas[0].extra.keys()
    for r in range(2):
        want = set_accuracies(reps.model(r), reps.datas[r].extra, torch.device("cpu"))
        for name, acc in want.items():
            assert got[r][name] == pytest.approx(float(acc), abs=1e-6), name
    assert Replicas(*replicas_of(changes, vary_data_seed=True),
                    vmap_eval=True).robustness_accs() is None
    assert Replicas(cfgs, datas, vmap_eval=False).robustness_accs() is None


# --- dropout: separate streams, same distribution, reproducible -------------------------------

def test_dropout_streams_are_separate_per_replicate(one_thread) -> None:
    """Replicates with the same seed (same initial weights and data order) differ only where
    dropout draws differ: with dropout they do, without they stay identical."""
    for changes, differ in (({}, False), (DROPOUT, True)):
        cfg = make_config({**SMALL, **changes})
        reps = Replicas([cfg] * 3, [get_task(cfg)] * 3)
        reps.train_epoch()
        p = torch.cat([t.detach().reshape(3, -1) for t in reps.params.values()], 1)
        same = [torch.equal(p[0], p[1]), torch.equal(p[1], p[2]), torch.equal(p[0], p[2])]
        assert same == ([False] * 3 if differ else [True] * 3), changes


def test_dropout_results_have_the_unbatched_distribution(one_thread) -> None:
    """Same seeds with dropout: batched and unbatched replicates share initial weights and data
    order but not dropout masks; over 8 seeds the final metrics have the same distribution."""
    cfgs, datas = replicas_of({**DROPOUT, "epochs": 3, "batch_size": 64, "lr": 0.01}, seeds=8,
                              vary_data_seed=False)
    batched = list(train_replicas(cfgs, datas))[-1]
    alone = [list(run_trial(c, d))[-1] for c, d in zip(cfgs, datas)]
    for name in (M.VAL_ACC, M.TEST_LOSS):
        b = np.array([r.metrics[name] for r in batched])
        u = np.array([r.metrics[name] for r in alone])
        assert stats.ttest_ind(b, u, equal_var=False).pvalue > 0.05, name
        assert 0.5 < b.std() / u.std() < 2.0, name  # the same spread, not just the same mean
        assert not np.array_equal(b, u)  # the masks really differ from run_trial's
        assert len(set(b.round(6))) > 1  # and between replicates


def test_batched_trials_are_reproducible(one_thread) -> None:
    cfgs, datas = replicas_of(DROPOUT)
    first, second = (without_speed(list(train_replicas(cfgs, datas))) for _ in range(2))
    assert first == second


# --- divergence -------------------------------------------------------------------------------

def test_a_diverged_replicate_stays_in_its_own_slice(one_thread) -> None:
    cfgs, datas = replicas_of({})
    reps = Replicas(cfgs, datas)
    with torch.no_grad():
        reps.params["head.weight"][1].fill_(float("nan"))
    idx = torch.arange(2 * 16).view(2, 16)
    reps.train_step(*reps.gather(idx))
    assert reps.first_bad.tolist() == [-1, 1]
    assert all(torch.isfinite(p[0]).all() for p in reps.params.values())
    assert reps.gn_sum[0] > 0 and reps.gn_sum[1] == 0  # non-finite norms are not summed


def test_lockstep_reports_divergence_in_both_modes(one_thread) -> None:
    base = {**SMALL, "lr": 1e30, "grad_clip": 0.0}
    reports = {b: list(lockstep(base, seeds=2, batching=b)) for b in ("vmap", "lockstep")}
    for r in reports.values():
        assert r[-1].outcome is Outcome.DIVERGED and r[-1].message.startswith("seed 0: diverged")
    assert reports["vmap"][-1].message == reports["lockstep"][-1].message


# --- the trainable: batching, fallbacks, threads ----------------------------------------------

def test_lockstep_reports_the_batched_replicates(one_thread) -> None:
    reports = list(lockstep(SMALL, seeds=2, vary_data_seed=True, batching="vmap"))
    assert [r.epoch for r in reports] == [1, 2] and reports[-1].outcome is Outcome.COMPLETED
    cfgs, datas = replicas_of({})
    alone = [list(run_trial(c, d))[-1].metrics for c, d in zip(cfgs, datas)]
    last = reports[-1].metrics
    for k in range(2):
        assert last[seed_metric(k, M.VAL_LOSS)] == pytest.approx(alone[k][M.VAL_LOSS], rel=1e-4)
    assert last[M.VAL_LOSS] == pytest.approx(
        (last[seed_metric(0, M.VAL_LOSS)] + last[seed_metric(1, M.VAL_LOSS)]) / 2)
    assert f"{M.VAL_LOSS}_seed_std" in last
    (bad,) = lockstep(SMALL, seeds=2, batching="pmap")
    assert bad.outcome is Outcome.ERROR and "batching" in bad.message


@pytest.mark.parametrize(("changes", "why"), [
    pytest.param({"length_mode": "bucket"}, "length_mode=bucket", id="bucket"),
    pytest.param({"arch": "lstm_attention"}, "lstm_attention", id="lstm"),
])
def test_fallbacks_train_in_lockstep(changes: dict, why: str, one_thread) -> None:
    cfgs, datas = replicas_of({**changes, "epochs": 1})
    assert why in (fallback_reason(cfgs, datas) or "")
    with pytest.raises(ValueError, match="cannot be batched"):
        next(train_replicas(cfgs, datas))
    config = {**SMALL, **changes, "epochs": 1}
    vm, ls = (list(lockstep(config, seeds=2, vary_data_seed=True, batching=b))
              for b in ("vmap", "lockstep"))
    assert vm[-1].outcome is ls[-1].outcome is Outcome.COMPLETED
    strip = {k: v for k, v in ls[-1].metrics.items() if M.SAMPLES_PER_S not in k}
    assert {k: v for k, v in vm[-1].metrics.items() if M.SAMPLES_PER_S not in k} == strip


def test_other_fallbacks() -> None:
    cfgs, datas = replicas_of({})
    assert "one replicate" in (fallback_reason(cfgs[:1], datas[:1]) or "")
    smaller = replace(datas[1], val=datas[1].val.subset(np.arange(10)))
    assert "val splits differ in shape" in (fallback_reason(cfgs, [datas[0], smaller]) or "")


def test_trial_threads_follow_the_trials_cpus() -> None:
    n = torch.get_num_threads()
    try:
        assert trial_threads(2.0) == 2 and torch.get_num_threads() == 2
        assert trial_threads(0.5) == 1 and torch.get_num_threads() == 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Ray: "meant to only be called inside ... Tuner"
            assert trial_threads(None) is None  # outside a Tune trial: unknown, left alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)


# --- the space key ----------------------------------------------------------------------------

SPACE = """
name: s
task: digits
params:
  lr: {type: float, low: 0.001, high: 0.01, log: true}
"""


def test_seed_batching_is_a_space_key_stored_with_the_sweep() -> None:
    default = parse_space(SPACE + "resources: {gpu: 0.5}\n", "s.yaml")
    assert default.seed_batching == "vmap"  # the default where trials have a GPU
    assert parse_space(SPACE, "s.yaml").seed_batching == "lockstep"  # CPU-only trials
    chosen = parse_space(SPACE + "seed_batching: lockstep\n", "s.yaml")
    assert chosen.seed_batching == "lockstep"
    assert SweepSpec.from_json(chosen.to_json()) == chosen
    assert SweepSpec.from_json(default.to_json()).seed_batching == "vmap"
    with pytest.raises(SpaceError, match="seed_batching: 'pmap'; valid: vmap, lockstep"):
        parse_space(SPACE + "seed_batching: pmap\n", "s.yaml")
    old = json.loads(default.to_json())
    del old["seed_batching"]  # a sweep recorded before the key existed trained in lockstep
    assert SweepSpec.from_json(json.dumps(old)).seed_batching == "lockstep"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("patch", [pytest.param(4, id="16_keys_sdpa"),
                                   pytest.param(8, id="8_keys_written_out")])
def test_batched_replicates_match_unbatched_trials_on_cuda(patch, monkeypatch) -> None:
    """On CUDA (bf16 autocast, SDPA's fused kernels; rows of fewer than SHORT_ROW keys written
    out) the replicates still train batched, with no per-replicate fallback loop (the module's
    warning filter), and land where the unbatched trials land: bf16 rounding differs between
    the two computations, so within a tolerance."""
    written = []

    def counted(*args, **kwargs):
        written.append(1)
        return attend_written_out(*args, **kwargs)

    monkeypatch.setattr("study.replicas.attend_written_out", counted)
    cfgs, datas = replicas_of({"device": "cuda", "patch_size": patch})
    assert fallback_reason(cfgs, datas) is None
    batched = list(train_replicas(cfgs, datas, vmap_eval=True))
    assert bool(written) == (datas[0].spec.max_len // patch < SHORT_ROW)
    alone = unbatched(cfgs, datas)
    final = batched[-1]
    for k, got in enumerate(final):
        want = alone[k][-1].metrics
        assert got.diverged is None
        for name in (M.TRAIN_LOSS, M.VAL_LOSS, M.TEST_LOSS):
            assert got.metrics[name] == pytest.approx(want[name], rel=0.1), (k, name)
        for name in (M.VAL_ACC, M.TEST_ACC):
            assert got.metrics[name] == pytest.approx(want[name], abs=0.05), (k, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("changes", [
    pytest.param({"attn_dropout": 0.2}, id="attn_dropout"),
    pytest.param({"attn_dropout": 0.1, "resid_dropout": 0.1, "drop_path": 0.1}, id="dropouts"),
    pytest.param({"attn_temperature": 0.3, "n_heads": 8}, id="temperature"),
    pytest.param({"init": "deepnorm", "norm": "post_ln"}, id="deepnorm_post_ln"),
    pytest.param({"init": "small_init", "attn_dropout": 0.25, "label_smoothing": 0.1,
                  "weight_decay": 0.2}, id="default_space_mix"),
])
def test_default_space_configs_train_batched_on_cuda(changes) -> None:
    """The default study's own model (MNIST-1D, 10-token rows) and choices, 2 replicates with
    their own data, as a sweep trains them on a GPU: no replicate diverges. SDPA with dropout
    under vmap once made every such trial diverge at its first step (no GPU test had
    dropout)."""
    from benchmarks.trials import DEFAULT_TRIAL

    cfg = make_config({**DEFAULT_TRIAL, **changes, "device": "cuda", "epochs": 2})
    cfgs = [replicate(cfg, k, True) for k in range(2)]
    datas = [get_task(c) for c in cfgs]
    assert fallback_reason(cfgs, datas) is None
    epochs = list(train_replicas(cfgs, datas))
    assert len(epochs) == 2
    for res in epochs[-1]:
        assert res.diverged is None, res.diverged
        assert res.metrics[M.VAL_ACC] > 0.15  # above chance (10 classes) after 2 epochs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_step_is_captured_on_cuda_and_matches_its_eager_step() -> None:
    """On CUDA the batched step is captured in CUDA graphs (one per batch shape, as a single
    trial's is) and computes what the eager batched step computes."""
    cfgs, datas = replicas_of({"device": "cuda"})
    reps = Replicas(cfgs, datas)
    reps.train_epoch()
    assert reps.mode == "graph" and reps.graphs, "the step fell back to eager"
    assert int(reps.step_t) == reps.step
    first, second = reps.epoch_values(), reps.epoch_values()  # eager, then captured
    assert reps._batched_values.graph is not None, "the evaluation fell back to eager"
    for a, b in zip(first, second):
        assert {n: float(v) for n, v in a.items()} == pytest.approx(
            {n: float(v) for n, v in b.items()}, rel=1e-5, abs=1e-6)
    # every epoch: the captured evaluation replays with the parameters of that epoch
    cfgs = [c.replace(epochs=3) for c in cfgs]
    graph = list(train_replicas(cfgs, datas))
    eager = list(train_replicas([c.replace(step_mode="eager") for c in cfgs], datas))
    assert len(graph) == len(eager) == 3
    for g_epoch, e_epoch in zip(graph, eager):
        for g, e in zip(g_epoch, e_epoch):
            for name in (M.TRAIN_LOSS, M.VAL_LOSS, M.TEST_LOSS, M.VAL_ACC, M.GRAD_NORM, M.ECE):
                assert g.metrics[name] == pytest.approx(e.metrics[name], rel=2e-2,
                                                        abs=2e-3), (g.epoch, name)


@pytest.mark.parametrize("changes,falls_back", [
    pytest.param({}, True, id="cuda_dropout_257_tokens"),
    pytest.param({"attn_dropout": 0.0}, False, id="no_dropout"),
    pytest.param({"device": "cpu"}, False, id="cpu"),
    pytest.param({"max_len": 16}, False, id="short_rows"),
    # token ids are one token a step, whatever patch_size says (it applies to signals)
    pytest.param({"patch_size": 4}, True, id="token_ids_ignore_patch_size"),
])
def test_long_rows_with_attention_dropout_train_in_lockstep_on_cuda(changes, falls_back) -> None:
    """Batched, attention with dropout is written out, which on long rows holds k x B x heads x
    T^2 probabilities for the backward: on CUDA those replicates train in lockstep (SDPA's
    fused dropout kernel). Decided from the config and the data shape: no GPU needed."""
    cfg = make_config({"task": "copy", "max_len": 128, "n_train": 256, "patch_size": 1,
                       "device": "cuda", "attn_dropout": 0.1, **changes})
    data = get_task(cfg)
    why = fallback_reason([replicate(cfg, k, False) for k in range(2)], [data, data])
    assert (why is not None) == falls_back, why
    if falls_back:
        assert "attn_dropout" in why and "tokens" in why


@pytest.mark.parametrize("device", [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")]),
])
def test_a_padded_task_trains_batched(device: str) -> None:
    """A task whose splits hold padding (sort, per-token): the key mask `(B, 1, 1, T)` full
    attention takes over padded inputs reaches the fold (and on CUDA SDPA's fused kernels,
    forward and backward); 2 replicates with their own data train batched, finitely."""
    import math

    cfg = make_config({"task": "sort", "n_train": 512, "epochs": 2, "device": device,
                       "d_model": 32, "n_heads": 2, "n_layers": 1})
    cfgs = [replicate(cfg, k, True) for k in range(2)]
    datas = [get_task(c) for c in cfgs]
    assert datas[0].spec.padded and fallback_reason(cfgs, datas) is None
    last = list(train_replicas(cfgs, datas))[-1]
    for res in last:
        assert res.diverged is None, res.diverged
        assert all(math.isfinite(v) for v in res.metrics.values())
