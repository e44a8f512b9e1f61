"""`run_trial`: determinism, lockstep replicates, learning, divergence, metric names, ECE."""

from __future__ import annotations

import math
import re

import pytest
import torch

from study import metrics as M
from study.config import TrialConfig
from study.tasks import get_task
from study.train import EpochResult, run_trial

SMALL = {"task": "digits", "epochs": 2, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64,
         "device": "cpu"}
# dropout everywhere, so that the trial's private RNG stream matters for its metrics
NOISY = {**SMALL, "attn_dropout": 0.1, "resid_dropout": 0.1, "emb_dropout": 0.1,
         "drop_path": 0.1}


def small(**changes) -> TrialConfig:
    return TrialConfig(**{**SMALL, **changes})


def without_speed(results: list[EpochResult]) -> list[dict[str, float]]:
    return [{k: v for k, v in r.metrics.items() if k != M.SAMPLES_PER_S} for r in results]


@pytest.fixture(scope="module")
def noisy_seed0() -> list[EpochResult]:
    return list(run_trial(TrialConfig(**NOISY, seed=0)))


@pytest.fixture(scope="module")
def noisy_seed1() -> list[EpochResult]:
    return list(run_trial(TrialConfig(**NOISY, seed=1)))


def test_epochs_are_reported_in_order_with_every_core_metric(noisy_seed0):
    assert [r.epoch for r in noisy_seed0] == [1, 2]
    assert [r.final for r in noisy_seed0] == [False, True]
    for r in noisy_seed0:
        assert r.diverged is None
        missing = set(M.CORE_METRICS) - set(r.metrics)
        assert not missing, missing
        assert all(math.isfinite(v) for v in r.metrics.values())
        assert r.metrics[M.EPOCH] == r.epoch
        for acc in (M.TRAIN_ACC, M.VAL_ACC, M.TEST_ACC):
            assert 0.0 <= r.metrics[acc] <= 1.0
        assert r.metrics[M.GEN_GAP_ACC] == pytest.approx(
            r.metrics[M.TRAIN_ACC] - r.metrics[M.TEST_ACC])
        assert r.metrics[M.GEN_GAP_LOSS] == pytest.approx(
            r.metrics[M.TEST_LOSS] - r.metrics[M.TRAIN_LOSS])
        assert 0.0 <= r.metrics[M.ECE] <= 1.0
        # digits: 64 samples in patches of 4 -> 16 keys, so entropy is within [0, log 16]
        assert 0.0 <= r.metrics[M.ATTN_ENTROPY_MIN] <= r.metrics[M.ATTN_ENTROPY]
        assert r.metrics[M.ATTN_ENTROPY] <= math.log(16) + 1e-5
        assert r.metrics[M.N_PARAMS] > 0 and r.metrics[M.SAMPLES_PER_S] > 0
    # two epochs of training lower the training loss
    assert noisy_seed0[1].metrics[M.TRAIN_LOSS] < noisy_seed0[0].metrics[M.TRAIN_LOSS]


def test_same_config_gives_identical_metrics(noisy_seed0):
    again = list(run_trial(TrialConfig(**NOISY, seed=0)))
    assert without_speed(again) == without_speed(noisy_seed0)


def test_different_seed_gives_different_metrics(noisy_seed0, noisy_seed1):
    for a, b in zip(without_speed(noisy_seed1), without_speed(noisy_seed0), strict=True):
        assert a[M.TRAIN_LOSS] != b[M.TRAIN_LOSS]
        assert a[M.PARAM_NORM] != b[M.PARAM_NORM]


def test_a_trial_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    state = torch.get_rng_state()
    list(run_trial(small(epochs=1)))
    assert torch.equal(torch.get_rng_state(), state)


def test_lockstep_replicates_match_trials_run_alone(noisy_seed0, noisy_seed1):
    gens = [run_trial(TrialConfig(**NOISY, seed=s)) for s in (0, 1)]
    interleaved: list[list[EpochResult]] = [[], []]
    for _ in range(NOISY["epochs"]):
        for i, gen in enumerate(gens):
            torch.manual_seed(1000 + i)  # whatever the global RNG holds must not matter
            torch.rand(5)
            interleaved[i].append(next(gen))
    for gen in gens:
        with pytest.raises(StopIteration):
            next(gen)
    assert without_speed(interleaved[0]) == without_speed(noisy_seed0)
    assert without_speed(interleaved[1]) == without_speed(noisy_seed1)
    assert without_speed(interleaved[0]) != without_speed(interleaved[1])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_small_transformer_learns_digits():
    """About 3 s on 2 CPU cores (10 epochs of the default model)."""
    results = list(run_trial(TrialConfig(task="digits", epochs=10, device="cpu")))
    last = results[-1]
    assert last.final and last.diverged is None
    assert last.metrics[M.TEST_ACC] >= 0.8, last.metrics
    assert last.metrics[M.TRAIN_LOSS] < results[0].metrics[M.TRAIN_LOSS]


@pytest.mark.parametrize("changes", [
    {"lr": 1e30, "grad_clip": 0.0},
    {"lr": 1e6, "grad_clip": 0.0, "init_scale": 50.0},
], ids=["lr=1e30", "lr=1e6,init_scale=50"])
def test_divergence_is_reported_not_raised(changes):
    results = list(run_trial(small(epochs=3, **changes)))
    assert len(results) == 1  # training stops at the first epoch that blew up
    r = results[0]
    assert r.final
    assert r.diverged is not None and re.fullmatch(r"diverged at step \d+", r.diverged)
    cfg = small()
    steps_per_epoch = math.ceil(len(get_task(cfg).train) / cfg.batch_size)
    assert 1 <= int(r.diverged.rsplit(" ", 1)[1]) <= steps_per_epoch
    assert r.metrics[M.EPOCH] == 1.0 and r.metrics[M.N_PARAMS] > 0


def test_normal_lr_does_not_diverge():
    results = list(run_trial(small(epochs=1, grad_clip=0.0)))
    assert results[-1].diverged is None


@pytest.mark.parametrize("changes", [
    {"attn_entropy_reg": 0.01, "attn_kind": "local"},
    {"attn_entropy_reg": 0.01, "attn_kind": "local", "pos_encoding": "alibi"},
], ids=["entropy_reg+local", "entropy_reg+local+alibi"])
def test_entropy_regularizer_trains_with_masked_attention(changes):
    """Masked keys (p = 0) must not turn the entropy regularizer's gradient into NaN."""
    results = list(run_trial(small(epochs=1, train_fraction=0.3, **changes)))
    assert results[-1].diverged is None
    assert math.isfinite(results[-1].metrics[M.TRAIN_LOSS])


# --- expected calibration error -------------------------------------------------------------

def test_ece_of_perfect_calibration_is_zero():
    # bin of 0.7: 7 of 10 right; bin of 0.2: 1 of 5 right
    conf = torch.tensor([0.7] * 10 + [0.2] * 5)
    correct = torch.tensor([1] * 7 + [0] * 3 + [1] + [0] * 4, dtype=torch.bool)
    assert M.expected_calibration_error(conf, correct).item() == pytest.approx(0.0, abs=1e-6)


def test_ece_of_overconfidence():
    conf = torch.ones(10)
    correct = torch.tensor([1, 0] * 5, dtype=torch.bool)
    assert M.expected_calibration_error(conf, correct).item() == pytest.approx(0.5)
    assert M.expected_calibration_error(conf, torch.zeros(10)).item() == pytest.approx(1.0)
    assert M.expected_calibration_error(conf, torch.ones(10)).item() == pytest.approx(0.0)


def test_ece_weights_bins_by_size():
    # bin 0.9: acc 0.5 (gap 0.4, 2 of 4 samples); bin 0.6: acc 1.0 (gap 0.4, 2 of 4)
    conf = torch.tensor([0.9, 0.9, 0.6, 0.6])
    correct = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert M.expected_calibration_error(conf, correct).item() == pytest.approx(0.4)
    # 3 samples at 0.95 all right (gap 0.05), 1 at 0.55 wrong (gap 0.55): (3*0.05 + 0.55) / 4
    conf = torch.tensor([0.95, 0.95, 0.95, 0.55])
    correct = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert M.expected_calibration_error(conf, correct).item() == pytest.approx(0.175)


def test_ece_gaps_of_opposite_sign_in_one_bin_cancel_but_not_across_bins():
    # same bin (0.5 and 0.52 -> bin 7 of 15): gaps +0.5 and -0.52 partly cancel
    same = M.expected_calibration_error(torch.tensor([0.5, 0.52]), torch.tensor([1.0, 0.0]))
    assert same.item() == pytest.approx(abs(1.0 - 1.02) / 2)
    # different bins: |1 - 0.5| and |0 - 0.9| add up
    diff = M.expected_calibration_error(torch.tensor([0.5, 0.9]), torch.tensor([1.0, 0.0]))
    assert diff.item() == pytest.approx((0.5 + 0.9) / 2)


def test_ece_bin_edges_and_count():
    # bins are (b/n, (b+1)/n]: with 4 bins, 0.25 (exact in binary) shares the first bin with 0.1
    ece = M.expected_calibration_error(torch.tensor([0.25, 0.1]), torch.tensor([1.0, 0.0]),
                                       n_bins=4)
    assert ece.item() == pytest.approx(abs(0.5 - 0.175))
    # a confidence of 0 still lands in the first bin
    zero = M.expected_calibration_error(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert zero.item() == pytest.approx(0.5)
    conf = torch.tensor([0.3, 0.9])
    one_bin = M.expected_calibration_error(conf, torch.tensor([1.0, 1.0]), n_bins=1)
    assert one_bin.item() == pytest.approx(1.0 - 0.6)


@pytest.mark.parametrize(("total", "frac", "want"), [
    pytest.param(10, 0.2, [1 / 3, 2 / 3, 1.0], id="warmup_2_of_10"),
    pytest.param(10, 0.1, [0.5, 1.0], id="warmup_1_of_10"),
    pytest.param(10, 0.0, [1.0], id="no_warmup"),
    pytest.param(2, 0.5, [0.5, 1.0], id="two_steps")])
def test_lr_schedule_warms_up_below_the_peak_and_decays_from_it_once(total, frac, want):
    """Linear warmup below the peak, the peak on exactly one step, then cosine decay to 0
    (the peak fell on two steps, and a one-step warmup, any run of 14 steps or fewer at the
    default 0.1, ran at the peak)."""
    import math

    from study.step import lr_lambda

    f = lr_lambda(total, frac)
    rates = [f(s) for s in range(total)]
    assert rates[:len(want)] == pytest.approx(want)
    assert rates.count(1.0) == 1
    assert all(a > b for a, b in zip(rates[len(want) - 1:], rates[len(want):]))  # decays
    warm = len(want) - 1
    assert f(total) == pytest.approx(0.0, abs=1e-12) or total - warm == 1
    if total - warm > 1:
        mid = warm + (total - warm) // 2
        assert f(mid) == pytest.approx(0.5 * (1 + math.cos(math.pi * (mid - warm)
                                                           / (total - warm))))
