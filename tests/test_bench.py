"""The benchmark's pure helpers (no timing, no sweeps: `make bench` runs those)."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks import diskio, run, sweeps
from benchmarks.attention import textbook_attention

STAT = ("1234 (ray::IDLE (x)) S 77 1234 1234 0 -1 4194560 100 0 0 0 3 1 0 0 20 0 4 0 "
        "98765 1000 200 18446744073709551615")


def test_parse_io_and_stat() -> None:
    io = diskio.parse_io("rchar: 10\nwchar: 20\nwrite_bytes: 4096\ncancelled_write_bytes: 0\n")
    assert io == {"rchar": 10, "wchar": 20, "write_bytes": 4096, "cancelled_write_bytes": 0}
    # the command name holds spaces and parentheses: fields count from its last ')'
    assert diskio.parse_stat(STAT) == (77, 98765)


def test_tree_follows_descendants_only() -> None:
    parents = {1: 0, 10: 1, 11: 10, 12: 11, 20: 1, 30: 99}
    assert diskio.tree(10, parents) == {10, 11, 12}
    assert diskio.tree(30, parents) == {30}


def test_disk_writes_sums_processes() -> None:
    d = diskio.DiskWrites(procs={
        (1, 5): {"comm": "python", "cmdline": "", "write_bytes": 100, "cancelled_write_bytes": 1},
        (2, 6): {"comm": "raylet", "cmdline": "", "write_bytes": 50, "cancelled_write_bytes": 0},
        (3, 7): {"comm": "python", "cmdline": "", "write_bytes": 25, "cancelled_write_bytes": 0}})
    assert d.write_bytes == 175 and d.cancelled_write_bytes == 1
    assert d.by_command() == {"python": 125, "raylet": 50}


def test_measure_times_the_command_to_its_exit_apart_from_what_it_leaves(tmp_path) -> None:
    """A command that leaves a process behind: `exit_s` ends at the command's own exit,
    `wall_s` once what it left has exited too (followed, its writes counted)."""
    import sys

    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(1.5)'], start_new_session=True); time.sleep(0.3)")
    res = diskio.measure([sys.executable, "-c", script], interval=0.05)
    assert res.returncode == 0
    assert 0 < res.exit_s < 1.2 and res.wall_s >= 1.4, (res.exit_s, res.wall_s)


def test_overhead_and_disk_per_trial() -> None:
    assert sweeps.overhead_frac(own_s=90.0, wall_s=50.0, concurrency=2) == pytest.approx(0.1)
    assert sweeps.overhead_frac(own_s=100.0, wall_s=50.0, concurrency=2) == pytest.approx(0.0)
    assert sweeps.mb_per_trial(3_000_000, 6) == pytest.approx(0.5)


def test_trial_spans_and_the_idle_tail() -> None:
    # (time, worker pid, trial, time_this_iter_s); slot "1" runs t1 then t3, slot "2" runs t2
    results = [(2.0, 1, "t1", 2.0), (4.0, 1, "t1", 2.0), (3.0, 2, "t2", 3.0),
               (9.0, 2, "t2", 6.0), (6.0, 1, "t3", 1.5), (12.0, 1, "t3", 6.0)]
    spans = sorted(sweeps.trial_spans(results), key=lambda s: s[1])
    assert spans == [("1", 0.0, 4.0), ("2", 0.0, 9.0), ("1", 4.5, 12.0)]
    # the last trial (t3) started at 4.5 and ends at 12; slot 2 idles from 9 to 12
    assert sweeps.tail_idle_s(spans, slots=2) == pytest.approx(3.0)
    # a slot that ended before the last start idles from that start only (the gap before it
    # is the harness's)
    assert sweeps.tail_idle_s([("a", 0.0, 2.0), ("b", 3.0, 10.0)], 2) == pytest.approx(7.0)
    assert sweeps.tail_idle_s([("a", 0.0, 10.0)], 1) == 0.0  # one slot: never idle
    assert sweeps.tail_idle_s([], 2) == 0.0
    # a trial retried on another worker: one span per attempt, the retry's own start counts;
    # the dead worker's pid is no extra slot (slots come from the sweep)
    retried = sweeps.trial_spans([(2.0, 1, "t1", 2.0), (8.0, 3, "t1", 3.0), (9.0, 3, "t1", 1.0),
                                  (9.5, 2, "t2", 9.5)])
    assert sorted(retried) == [("1", 0.0, 2.0), ("2", 0.0, 9.5), ("3", 5.0, 9.0)]
    assert sweeps.tail_idle_s(retried, slots=2) == pytest.approx(2 * 4.5 - (4.0 + 4.5))


def test_epochs_to_reach_counts_reports_in_time_order() -> None:
    pts = [(3.0, 0.5), (1.0, 0.2), (2.0, 0.6), (4.0, 0.9)]
    assert sweeps.epochs_to_reach(pts, 0.6) == (2, True)  # t=1 then t=2 reaches it
    assert sweeps.epochs_to_reach(pts, 0.9) == (4, True)
    assert sweeps.epochs_to_reach(pts, 0.95) == (4, False)


def _orders_mean(curves: list[list[float]], target: float) -> float:
    """Epochs to reach `target` averaged over every order of the trials, run one at a time."""
    counts = []
    for order in itertools.permutations(curves):
        flat = [a for c in order for a in c]
        counts.append(next(i for i, a in enumerate(flat, 1) if a >= target))
    return float(np.mean(counts))


@pytest.mark.parametrize("curves,target", [
    pytest.param([[0.1, 0.9], [0.2, 0.3, 0.4], [0.5], [0.95, 0.2]], 0.9, id="two_reach"),
    pytest.param([[0.1, 0.2], [0.3, 0.8, 0.9], [0.5], [0.6, 0.7]], 0.9, id="one_reaches"),
    pytest.param([[0.9], [0.9, 0.1], [0.95]], 0.9, id="all_reach"),
])
def test_random_order_epochs_is_the_mean_over_every_order(curves, target) -> None:
    exact = _orders_mean(curves, target)
    assert sweeps.random_order_epochs(curves, target) == pytest.approx(exact)
    # the simulation with one slot estimates the same mean
    sim = sweeps.simulated_order_epochs(curves, target, slots=1, draws=4000)
    assert sim == pytest.approx(exact, abs=0.1)


def _orders_mean_slots(curves: list[list[float]], target: float, slots: int) -> float:
    """`simulated_order_epochs`' model computed exactly: every order of the trials, each epoch
    one time unit, a trial on the first free slot, reports at the same time in random order
    (the first report reaching `target` within such a group of g, q of them reaching it, comes
    at position (g + 1) / (q + 1) on average)."""
    counts = []
    for order in itertools.permutations(range(len(curves))):
        free, events = [0] * slots, []
        for i in order:
            s = int(np.argmin(free))
            events += [(free[s] + e, a) for e, a in enumerate(curves[i], 1)]
            free[s] += len(curves[i])
        before = 0
        for t in sorted({t for t, _ in events}):
            group = [a for u, a in events if u == t]
            q = sum(a >= target for a in group)
            if q:
                counts.append(before + (len(group) + 1) / (q + 1))
                break
            before += len(group)
    return float(np.mean(counts))


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_simulated_order_epochs_is_the_mean_over_orders_with_slots(slots) -> None:
    curves = [[0.1, 0.5, 0.9], [0.2], [0.95, 0.3], [0.4, 0.6], [0.1, 0.2, 0.3, 0.4]]
    exact = _orders_mean_slots(curves, 0.9, slots)
    assert sweeps.simulated_order_epochs(curves, 0.9, slots, draws=6000) == pytest.approx(
        exact, rel=0.03)
    if slots == 1:
        assert sweeps.random_order_epochs(curves, 0.9) == pytest.approx(exact)


def test_simulated_order_counts_concurrent_epochs_in_time_order() -> None:
    # two slots, both trials start at once: both first epochs end together (2 reports), then
    # the target comes with trial a's second epoch, before or after trial b's (ties: random)
    a, b = [0.0, 1.0], [0.0, 0.0]
    assert sweeps.simulated_order_epochs([a, b], 1.0, slots=2, draws=4000) == pytest.approx(
        3.5, abs=0.05)
    # one slot: a first (2 epochs) or b first (2 + 2), each half the time
    assert sweeps.simulated_order_epochs([a, b], 1.0, slots=1, draws=4000) == pytest.approx(
        3.0, abs=0.1)
    for estimate in (sweeps.random_order_epochs,
                     lambda c, t: sweeps.simulated_order_epochs(c, t, slots=2, draws=5)):
        with pytest.raises(ValueError, match="no trial reaches"):
            estimate([a, b], 2.0)


def test_search_ratio_against_random_search_best() -> None:
    # random search: one trial reaches its best (0.8) at its 2nd epoch; one never does
    rand = [[(1.0, 0.3), (2.0, 0.8)], [(1.5, 0.5), (3.0, 0.6)]]
    fast = [(1.0, 0.85)]  # reaches it at once
    never = [(1.0, 0.1), (2.0, 0.2), (3.0, 0.3)]  # never: all 3 epochs count
    out = sweeps.search_ratio([(rand, fast), (rand, never)])
    expected = 2 / 2 + 2  # the other trial first half the time, then 2 epochs
    assert out["per_seed"][0]["random_epochs"] == pytest.approx(expected)  # one slot: exact
    assert out["per_seed"][0]["random_epochs_observed"] == 3  # 0.3, 0.5, then 0.8
    assert out["ratio"] == pytest.approx((1 + 3) / (2 * expected))
    assert out["ratio_observed_order"] == pytest.approx((1 + 3) / (3 + 3))
    assert out["not_reached"] == [1] and out["censored"] is True
    assert out["per_seed"][0]["target_val_acc"] == 0.8
    assert out["per_seed"][0]["random_trials_reaching"] == 1
    assert out["per_seed"][1]["tpe_asha_reached"] is False
    assert out["per_seed"][1]["ratio"] == pytest.approx(3 / expected)
    # rows and misses are labelled with the searcher seeds given
    labelled = sweeps.search_ratio([(rand, fast), (rand, never)], seeds=(10, 11))
    assert [r["seed"] for r in labelled["per_seed"]] == [10, 11]
    assert labelled["not_reached"] == [11] and labelled["ratio"] == out["ratio"]


def test_summary_has_exactly_the_goal_keys_and_nulls_when_missing() -> None:
    detail = {"small_trial": {"speedup": 1.01}, "seeds": {"seeds4": {"cost_ratio": 3.9}},
              "harness": {"overhead_frac": 0.2, "epochs": 2, "disk": {"mb_per_trial": 0.7}},
              "attention_textbook": {"speedup": 2.4, "peak_mem_ratio": 0.5},
              "packing": {"value": None}, "mfu": {"value": None}}
    s = run.summarize(detail, "cpu")
    assert tuple(s) == run.SUMMARY_KEYS
    assert s["device"] == "cpu" and s["seeds4_cost_ratio"] == 3.9
    assert s["seeds16_cost_ratio"] is None and s["packing_throughput_x8"] is None
    assert s["disk_mb_per_trial"] == 0.7
    text = run.table(s, detail)
    lines = text.splitlines()
    assert len(lines) == len(run.SUMMARY_KEYS)  # a header, one row per goal (device excluded)
    row = next(r for r in lines if r.startswith("attn_step_speedup_T1024"))
    assert ">= 1.5" in row and row.rstrip().endswith("yes")  # the CPU goal
    row = next(r for r in lines if r.startswith("disk_mb_per_trial"))
    assert "= 2" in row and row.rstrip().endswith("yes")  # 1 MB per epoch x 2 epochs
    row = next(r for r in lines if r.startswith("small_trial_speedup"))
    assert "(on a GPU)" in row and row.split()[-1] == "-"  # a GPU goal: not scored here


def test_goals_differ_by_device() -> None:
    cpu, gpu = run.goals("cpu", 2), run.goals("NVIDIA-H100", 2)
    assert set(cpu) == set(gpu) == set(run.SUMMARY_KEYS) - {"device"}
    assert cpu["study_speedup"][1](2.5) and not gpu["study_speedup"][1](2.5)
    assert gpu["attn_step_speedup_T1024"][0] == ">= 2.5"
    assert cpu["seeds4_cost_ratio"][1](1.0) is None  # a GPU goal is not scored on the CPU
    assert gpu["seeds4_cost_ratio"][1](1.0) is True
    assert run.device_name(False) == "cpu"


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_textbook_attention_matches_sdpa(mask_kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=g) for _ in range(3))
    mask: torch.Tensor | None = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 7, 7, generator=g) > 0.4
        mask[..., 0] = True  # no empty row
    elif mask_kind == "float":
        mask = -torch.rand(1, 3, 7, 7, generator=g)
    ours = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.7)
    book = textbook_attention(q, k, v, attn_mask=mask, scale=0.7)
    assert torch.allclose(ours, book, atol=1e-5)
    assert math.isclose(float(textbook_attention(q, k, v).sum()),
                        float(F.scaled_dot_product_attention(q, k, v).sum()), rel_tol=1e-4)


def test_mfu_formula_and_peaks() -> None:
    """6N + 12 L d T per token; a device reaching its peak with those FLOPs has MFU 1."""
    from benchmarks.gpu import GPT2_SMALL, flops_per_token, mfu, peak_flops

    g = GPT2_SMALL
    per_tok = flops_per_token(85e6, g["n_layers"], g["d_model"], g["seq_len"])
    assert per_tok == 6 * 85e6 + 12 * 12 * 768 * 1024
    assert mfu(989e12 / per_tok, 85e6, 12, 768, 1024, 989e12) == pytest.approx(1.0)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("Some CPU") is None


def test_mfu_takes_the_first_batch_that_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 32 first; an out-of-memory error, raw or wrapped by the compiler, moves on to the
    next size; any other error is raised."""
    from benchmarks import gpu

    class Wrapped(RuntimeError):  # as torch.compile wraps an error raised while compiling
        pass

    def fake(batch: int, pad_vocab: bool = True) -> dict:
        if batch == 32:
            try:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
            except torch.cuda.OutOfMemoryError as e:
                raise Wrapped("backend compiler failed") from e
        speed = 1.0 if pad_vocab else 0.8
        return {"value": batch / 100 * speed, "tokens_per_s": 1000.0 * speed,
                "config": {"batch": batch, "pad": pad_vocab}}

    monkeypatch.setattr(gpu, "mfu_at", fake)
    got = gpu.mfu_gpt2_small()
    assert got["value"] == 0.16 and list(got["by_batch"]) == [32, 16]
    assert got["by_batch"][32].startswith("out of memory")
    # the unpadded step at the batch that fitted, beside the padded one
    assert got["unpadded"]["config"] == {"batch": 16, "pad": False}
    assert got["unpadded"]["value"] == pytest.approx(0.128)
    assert got["pad_vocab_speedup"] == pytest.approx(1.25)

    def no_unpadded(batch: int, pad_vocab: bool = True) -> dict:
        if not pad_vocab:
            raise RuntimeError("compile failed\nmore")
        return {"value": 0.3, "tokens_per_s": 1.0}

    monkeypatch.setattr(gpu, "mfu_at", no_unpadded)
    got = gpu.mfu_gpt2_small()  # the headline stands without its comparison
    assert got["value"] == 0.3 and got["pad_vocab_speedup"] is None
    assert got["unpadded"] == {"error": "RuntimeError: compile failed"}

    def broken(batch: int, pad_vocab: bool = True) -> dict:
        raise ValueError("not a memory problem")

    monkeypatch.setattr(gpu, "mfu_at", broken)
    with pytest.raises(ValueError):
        gpu.mfu_gpt2_small()
    assert not gpu.out_of_memory(ValueError("x"))


def test_todays_path_is_eager_and_lockstep(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from benchmarks.sweeps import DEFAULT_SPACE, todays_env, todays_path
    from study.ahead import ahead_enabled
    from study.device import keep_freed_enabled
    from study.spaces import parse_space

    for k, v in todays_env().items():  # its reports synchronous: no epoch computed ahead
        monkeypatch.setenv(k, v)
    assert not ahead_enabled() and not keep_freed_enabled()  # and malloc as glibc has it

    spec = parse_space(todays_path(DEFAULT_SPACE.read_text()), "today.yaml")
    assert spec.seed_batching == "lockstep" and spec.fixed["step_mode"] == "eager"
    base = yaml.safe_load(DEFAULT_SPACE.read_text())
    assert spec.params == parse_space(DEFAULT_SPACE.read_text(), "d.yaml").params
    assert base["fixed"].items() <= spec.fixed.items()


def test_packed_space_packs_either_way() -> None:
    """The GPU study's packing (`--gpu 0.125 --max-concurrent 8`) written into both ways'
    space files, everything else as it was."""
    from benchmarks.sweeps import DEFAULT_SPACE, packed_space, todays_path
    from study.spaces import parse_space

    text = DEFAULT_SPACE.read_text()
    base = parse_space(text, "d.yaml")
    assert packed_space(text, None) == text
    # seed_batching auto: lockstep on the CPU, batched once trials hold a GPU
    for body, batching in ((text, "vmap"), (todays_path(text), "lockstep")):
        spec = parse_space(packed_space(body, (0.125, 8)), "p.yaml")
        assert spec.gpu == 0.125 and spec.max_concurrent == 8
        assert spec.cpu == base.cpu and spec.params == base.params
        assert spec.seed_batching == batching


def test_timed_counts_the_patched_functions_and_restores_them() -> None:
    import time
    import types

    from benchmarks.trials import _timed

    ns = types.SimpleNamespace(slow=lambda: time.sleep(0.05) or 1, fast=lambda: 2)
    slow, fast = ns.slow, ns.fast
    with _timed({"slow": [(ns, "slow")], "fast": [(ns, "fast")]}) as spent:
        assert ns.slow() == 1 and ns.slow() == 1 and ns.fast() == 2
    assert spent["slow"] >= 0.1 and spent["fast"] < 0.05
    assert ns.slow is slow and ns.fast is fast


def test_dispatches_are_counted_by_phase() -> None:
    """A small trial's operations fall into training, per-epoch evaluation and robustness sets;
    one epoch more adds one more epoch's evaluation and no robustness sets."""
    from benchmarks.trials import dispatch_split
    from study import evaluation, train
    from study.config import TrialConfig

    small = dict(task="digits", d_model=16, d_ff=32, n_layers=1, n_heads=2, batch_size=256)
    one = dispatch_split(TrialConfig(epochs=1, **small), 1)
    two = dispatch_split(TrialConfig(epochs=2, **small), 1)
    assert set(one) == {"train_ops", "eval_ops", "robustness_ops"}
    assert all(n > 0 for n in one.values())
    assert two["eval_ops"] == 2 * one["eval_ops"]
    assert two["robustness_ops"] == one["robustness_ops"]
    assert two["train_ops"] > one["train_ops"]
    assert train.robustness_metrics is evaluation.robustness_metrics  # the patches are undone
    assert train.epoch_metrics is evaluation.epoch_metrics


def test_profile_of_a_trial_names_its_phases_and_operators() -> None:
    from benchmarks import profile_trial
    from study.config import TrialConfig

    small = TrialConfig(task="digits", d_model=16, d_ff=32, n_layers=1, n_heads=2)
    text = profile_trial.profile_trial(epochs=1, k=1, rows=5, cfg=small)
    assert "phase:eval: 1 calls" in text and "phase:robustness: 1 calls" in text
    table = text.split("phase:robustness: 1 calls")[1]
    assert table.count("aten::") >= 3 and "Self CPU time total" in table


def test_the_batched_step_launches_as_many_kernels_for_any_number_of_seeds() -> None:
    """One batched step of 2 or 8 replicates computes the same operations (no loop over
    replicates: the cost a launch-bound device pays per step does not grow with k); it has
    more than one seed's step (vmap's decompositions) and no view among them."""
    from benchmarks.trials import NO_KERNEL, step_kernels
    from study.config import TrialConfig
    from study.model import build_model
    from study.tasks import get_task

    cfg = TrialConfig(task="digits", d_model=16, d_ff=32, n_layers=1, n_heads=2, epochs=1)
    one, two, eight = (step_kernels(cfg, k) for k in (1, 2, 8))
    assert two == eight
    assert sum(two.values()) > sum(one.values()) > 20
    assert {"_fused_adamw_", "mm"} <= set(one) and "bmm" in two
    assert two["_fused_adamw_"] == one["_fused_adamw_"]  # fused as on CUDA, both sides
    assert not NO_KERNEL & (set(one) | set(two))
    # the per-replicate gradient norms are one norm over all gradients, not one per parameter,
    # and clipping multiplies each weight-decay group's gradients once, not each parameter's
    assert two["linalg_vector_norm"] == 1
    assert two["mul_"] == 2
    # each projection (every `nn.Linear`) as one batched product with its bias, as captured
    # steps run them
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in build_model(cfg, get_task(cfg).spec
                                                                       ).modules())
    assert two["baddbmm"] == n_linear

    # attention counted as CUDA runs it (one SDPA kernel), not as the CPU writes out attention
    # over fewer than 16 keys (MNIST-1D: 10 tokens)
    short = step_kernels(cfg.replace(task="mnist1d", patch_size=4), 1)
    assert not {"_softmax", "bmm"} & set(short)
    assert any("scaled_dot_product" in name for name in short)


def test_short_rows_compares_the_same_model_both_ways() -> None:
    """`attention.short_rows` times the default study's model with `attend` and with SDPA: the
    same model, batch and dropout draws both ways (first losses within float rounding), on
    MNIST-1D's 10 tokens, every timing measured."""
    from benchmarks.attention import short_rows

    out = short_rows(torch.device("cpu"), rounds=1, steps=2)
    assert out["tokens"] == 10 and out["config"]["attn_dropout"] == 0.1
    assert math.isclose(out["first_loss"]["attend"], out["first_loss"]["sdpa"], rel_tol=1e-5)
    assert all(out[k] > 0 for k in ("attend_step_ms", "sdpa_step_ms", "attend_eval_ms",
                                     "sdpa_eval_ms", "step_speedup", "eval_speedup"))


def _round(results: int, **outcomes: int) -> dict:
    return {"results": results, "outcomes": outcomes}


@pytest.mark.parametrize("runs,valid", [
    pytest.param({"lockstep": [_round(360, completed=36)], "default": [_round(360, completed=36)]},
                 True, id="same"),
    pytest.param({"lockstep": [_round(360, completed=35, diverged=1)],
                  "default": [_round(352, completed=35, diverged=1)]}, True, id="same_divergence"),
    pytest.param({"lockstep": [_round(360, completed=36)], "default": [_round(36, diverged=36)]},
                 False, id="new_path_diverged_at_once"),
    pytest.param({"lockstep": [_round(12, completed=4)], "default": [_round(12, completed=3,
                                                                              error=1)]},
                 False, id="an_error"),
    pytest.param({"lockstep": [_round(12, completed=4), _round(12, completed=4)],
                  "default": [_round(12, completed=4), _round(9, completed=3, diverged=1)]},
                 False, id="one_round_short"),
    pytest.param({"lockstep": [_round(360, completed=36)],
                  "default": [_round(360, completed=33, diverged=3)]},
                 False, id="diverged_at_the_last_epoch"),
    pytest.param({"lockstep": [_round(0)], "default": [_round(0)]}, False, id="no_results"),
])
def test_study_speedup_needs_the_same_study(runs, valid):
    why = sweeps.not_the_same_study(runs)
    assert (why is None) == valid, why


def test_patched_wraps_a_nested_call_of_its_group_once():
    from benchmarks.trials import patched

    class Owner:
        @staticmethod
        def outer():
            return Owner.inner() + 1

        @staticmethod
        def inner():
            return 1

    seen = []

    def wrap(name, fn):
        def call(*args, **kwargs):
            seen.append(name)
            return fn(*args, **kwargs)
        return call

    with patched({"eval": [(Owner, "outer"), (Owner, "inner")]}, wrap):
        assert Owner.outer() == 2  # inner runs inside outer: not wrapped again
        assert Owner.inner() == 1  # alone: wrapped
    assert seen == ["eval", "eval"]
    assert Owner.outer() == 2 and seen == ["eval", "eval"]  # restored afterwards


def test_packing_probe_rates_and_scaling() -> None:
    from benchmarks.packing_probe import rates, scaling

    # 4 processes, 2 trials each, the slowest done after 10 s: 8 trials in 10 s
    assert rates([8.0, 9.5, 10.0, 7.0], 2) == pytest.approx(0.8)
    rows = scaling([{"path": "new", "k": 1, "trials_per_s": 0.5},
                    {"path": "new", "k": 8, "trials_per_s": 1.0},
                    {"path": "today", "k": 8, "trials_per_s": 0.7},
                    {"path": "new", "k": 1, "mps": True, "trials_per_s": 0.25},
                    {"path": "new", "k": 8, "mps": True, "trials_per_s": 1.5}])
    assert rows[0]["scaling"] == pytest.approx(1.0) and rows[1]["scaling"] == pytest.approx(2.0)
    assert rows[2]["scaling"] is None  # no `today` row at k = 1 to divide by
    assert rows[4]["scaling"] == pytest.approx(6.0)  # against the MPS row at k = 1
    # a failed row (no rate) has no scaling and is no base for the others
    rows = scaling([{"path": "new", "k": 1, "error": "out of memory"},
                    {"path": "new", "k": 8, "trials_per_s": 1.0},
                    {"path": "today", "k": 1, "trials_per_s": 0.5},
                    {"path": "today", "k": 8, "error": "not done in 600 s"}])
    assert [r["scaling"] for r in rows] == [None, None, 1.0, None]


def test_mps_daemon_says_why_it_did_not_start(tmp_path, monkeypatch) -> None:
    from benchmarks import mps as mps_module

    monkeypatch.setattr(mps_module.shutil, "which", lambda name: None)
    with mps_module.MPSDaemon(tmp_path) as mps:
        assert mps.why_not == "nvidia-cuda-mps-control is not on this machine"
        assert mps.env["CUDA_MPS_PIPE_DIRECTORY"].startswith(str(tmp_path))
        assert mps.served() == (False, None)
    assert not (tmp_path / "pipe").exists()  # nothing made for a daemon that never ran


def _timed(wall: float, results: int = 360, diverged: int = 0) -> dict:
    """A `_timed_sweep` result with only what the study comparisons read."""
    return {"process_wall_s": wall, "results": results,
            "outcomes": {"completed": 36 - diverged, "diverged": diverged}}


def _study(lockstep: float, default: float) -> dict:
    return {"lockstep": {"wall_s": lockstep, "rounds": [_timed(lockstep)]},
            "default": {"wall_s": default, "rounds": [_timed(default)]}}


@pytest.mark.parametrize("study,run,mps,want", [
    pytest.param(_study(80.0, 54.0), _timed(40.0), {"served": True},
                 {"speedup_mps": 2.0, "speedup_vs_no_mps": 1.35}, id="valid"),
    pytest.param(_study(80.0, 54.0), None, {"why_not": "nvidia-cuda-mps-control is not here"},
                 {"speedup_mps": None, "reason": "no MPS daemon: nvidia-cuda-mps-control is "
                                                 "not here"}, id="no-daemon"),
    pytest.param(None, _timed(40.0), {"served": True},
                 {"speedup_mps": None}, id="no-study-section"),
    pytest.param(_study(80.0, 54.0), _timed(40.0), {"served": False},
                 {"speedup_mps": None, "speedup_mps_if_valid": 2.0}, id="no-server-listed"),
    pytest.param(_study(80.0, 54.0), _timed(8.0, results=36, diverged=36), {"served": True},
                 {"speedup_mps": None, "speedup_mps_if_valid": 10.0}, id="diverged"),
])
def test_mps_study_is_compared_only_with_the_same_study(study, run, mps, want) -> None:
    from benchmarks.sweeps import mps_speedups

    got = mps_speedups(study, run, mps)
    for key, value in want.items():
        assert got[key] == (pytest.approx(value) if isinstance(value, float) else value)
    assert (got["speedup_mps"] is None) == ("reason" in got)


def test_study_mps_without_a_daemon_runs_no_sweep(tmp_path, monkeypatch) -> None:
    from benchmarks import mps as mps_module
    from benchmarks.sweeps import study_mps

    monkeypatch.setattr(mps_module.shutil, "which", lambda name: None)
    out = study_mps(tmp_path, _study(80.0, 54.0), trials=36, epochs=10, packed=(0.125, 8))
    assert out["mps"]["started"] is False and "default_mps" not in out
    assert out["speedup_mps"] is None and "not on this machine" in out["reason"]
    assert not (tmp_path / "default_mps").exists()


@pytest.mark.parametrize(("name", "kind"), [
    pytest.param("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_cublas", "matmul",
                 id="cublas_xmma"),
    pytest.param("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul", id="nvjet"),
    pytest.param("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x5_tn", "matmul",
                 id="ampere_gemm"),
    pytest.param("aten::addmm", "matmul", id="cpu_addmm"),
    pytest.param("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>",
                 "attention", id="flash"),
    pytest.param("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention", id="mem_efficient"),
    pytest.param("aten::_scaled_dot_product_flash_attention_for_cpu", "attention", id="cpu_sdpa"),
    pytest.param("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<"
                 "FusedAdamMathFunctor>", "optimizer", id="fused_adamw"),
    pytest.param("triton_per_fused__to_copy_add_native_layer_norm_0", "fused (triton)",
                 id="inductor"),
    pytest.param("Memcpy DtoD (Device -> Device)", "copy/fill", id="memcpy"),
    pytest.param("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add>",
                 "elementwise/reduce", id="eager_add"),
    pytest.param("aten::view", "other", id="other"),
])
def test_kernel_kinds(name: str, kind: str) -> None:
    from benchmarks.gpu import kernel_kind

    assert kernel_kind(name) == kind


def test_kernel_shares_sum_to_one_and_keep_every_kind() -> None:
    from benchmarks.gpu import KERNEL_KINDS, kernel_shares

    got = kernel_shares({"nvjet_tst_128": 3.0, "flash_fwd_kernel": 1.0, "aten::view": 0.0,
                         "triton_poi_fused_gelu_1": 4.0})
    assert list(got) == [k for k, _ in KERNEL_KINDS] + ["other"]
    assert got["matmul"] == 3 / 8 and got["attention"] == 1 / 8
    assert got["fused (triton)"] == 0.5 and sum(got.values()) == pytest.approx(1.0)
    assert kernel_shares({"aten::mm": 0.0}) == {}


@pytest.mark.parametrize("pad", [pytest.param(True, id="padded"),
                                 pytest.param(False, id="unpadded")])
def test_mfu_step_pads_the_vocabulary_without_crediting_it(pad: bool) -> None:
    """The MFU step's embedding and head have the vocabulary rounded up to 64 rows (or not);
    tokens and targets stay below the real vocabulary and N counts only its rows, so a padded
    and an unpadded step are credited with the same FLOPs a token."""
    from benchmarks.gpu import gpt2_step, padded_vocab

    assert padded_vocab(50257) == 50304 and padded_vocab(64) == 64 and padded_vocab(65) == 128
    dims = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "seq_len": 16, "vocab": 500}
    state, (x, y, mask), n_matmul, why = gpt2_step(2, 3, dims, "cpu", "eager", pad_vocab=pad)
    model = state.model
    rows = 512 if pad else 500
    assert model.head.out_features == rows and model.embed.emb.num_embeddings == rows
    assert int(x.max()) < 500 and int(y.max()) < 500 and bool(mask.all())
    d, ff, L = 32, 64, 2
    # per layer qkv, proj, two MLP matmuls; then the head's 500 real rows
    assert n_matmul == L * (3 * d * d + d * d + 2 * d * ff) + 500 * d
    assert why is None


def test_mfu_profile_of_a_small_step_on_the_cpu(tmp_path: Path) -> None:
    """The MFU step's profile, on a small model on the CPU (on a GPU: GPT-2 small, compiled):
    every operator's time by kind, the matmuls among them, and both files written."""
    from benchmarks.gpu import mfu_profile
    from benchmarks.profile_trial import write_mfu_profile

    dims = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "seq_len": 32,
            "vocab": 500}
    prof = mfu_profile(batch=4, warmup=1, steps=2, dims=dims, device="cpu", step_mode="eager")
    assert prof["config"]["step_mode"] == "eager" and prof["steps"] == 2
    assert sum(prof["shares"].values()) == pytest.approx(1.0)
    assert prof["shares"]["matmul"] > 0 and prof["shares"]["attention"] > 0
    assert prof["shares"]["optimizer"] > 0  # AdamW's step is inside the profiled steps
    assert prof["busy_frac"] is None and prof["matmul_peak_frac"] is None  # no device here
    assert 0 < prof["busy_s"] and prof["names"] > 10 and "aten::mm" in prof["table"]
    path = write_mfu_profile(prof, tmp_path, "cpu")
    text = path.read_text()
    assert text.startswith("## MFU step, batch 4, mode eager") and "matmul: " in text
    saved = json.loads((tmp_path / "profile-mfu-cpu.json").read_text())
    assert saved["shares"] == prof["shares"] and "table" not in saved


@pytest.mark.parametrize(("ratio", "met"), [pytest.param(0.31, "unknown", id="below_goal"),
                                            pytest.param(0.93, "no", id="above_goal")])
def test_a_censored_search_ratio_is_shown_as_a_lower_bound(ratio: float, met: str) -> None:
    """A TPE + ASHA run that never reached the target counts all its epochs: the ratio is a
    lower bound, so below the goal it cannot be scored met (a censored 0.31 read "yes")."""
    detail = {"search": {"ratio": ratio, "censored": True}}
    row = next(r for r in run.table(run.summarize(detail, "cpu"), detail).splitlines()
               if r.startswith("search_epochs_ratio"))
    assert f">= {ratio:.3g} (censored)" in row and row.split()[-1] == met
