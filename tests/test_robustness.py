"""Training stressors and robustness metrics: formulas, presence rules, length modes."""

import math

import numpy as np
import pytest

from study.config import ConfigError, TrialConfig
from study.metrics import CORE_METRICS
from study.robustness import corruption_metrics, length_metrics, long_tail_metrics
from study.tasks import TASKS, get_task
from study.tasks.stressors import flip_labels, long_tail_counts
from study.train import run_trial

LT = ("balanced_acc", "macro_f1", "many_shot_acc", "medium_shot_acc", "few_shot_acc")


def test_long_tail_counts_follow_the_exponential_profile() -> None:
    counts = long_tail_counts(500, 10, 100.0)
    expected = [max(1, math.floor(500 * 100.0 ** (-c / 9))) for c in range(10)]
    assert counts.tolist() == expected and counts[0] == 500 and counts[-1] == 5


@pytest.mark.parametrize("rho", [10.0, 100.0])
def test_digits_training_split_is_long_tailed(rho: float) -> None:
    data = get_task(TrialConfig(task="digits", imbalance=rho))
    clean = get_task(TrialConfig(task="digits"))
    n_max = int(np.bincount(clean.train.y.numpy()).min())
    assert data.train_counts.tolist() == long_tail_counts(n_max, 10, rho).tolist()
    assert np.bincount(data.train.y.numpy(), minlength=10).tolist() == data.train_counts.tolist()
    assert len(data.test) == len(clean.test)  # evaluation splits stay balanced
    assert np.array_equal(data.test.y.numpy(), clean.test.y.numpy())


def test_label_noise_flips_exactly_the_fraction_to_other_classes() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, size=1000)
    noisy = flip_labels(y, 7, 0.3, np.random.default_rng(1))
    assert (noisy != y).sum() == 300 and noisy.min() >= 0 and noisy.max() < 7
    data = get_task(TrialConfig(task="digits", label_noise=0.2))
    clean = get_task(TrialConfig(task="digits"))
    changed = (data.train.y != clean.train.y).float().mean().item()
    assert changed == pytest.approx(0.2, abs=0.002)


def test_train_fraction_shrinks_only_the_training_split() -> None:
    data = get_task(TrialConfig(task="digits", train_fraction=0.25))
    clean = get_task(TrialConfig(task="digits"))
    assert len(data.train) == round(0.25 * len(clean.train))
    assert len(data.val) == len(clean.val) and len(data.test) == len(clean.test)


def test_length_metrics() -> None:
    out = length_metrics({4: 1.0, 8: 0.8, 16: 0.4, 32: 0.2}, (4, 8))
    assert out["id_len_acc"] == pytest.approx(0.9) and out["ood_len_acc"] == pytest.approx(0.3)
    assert out["len_gen_ratio"] == pytest.approx(0.3 / 0.9)
    assert length_metrics({4: 1.0}, (4, 8)) == {"id_len_acc": 1.0}


def test_long_tail_metrics_by_hand() -> None:
    target = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 0, 0, 0])
    out, table = long_tail_metrics(pred, target, np.array([200, 50, 5]), 100, 20)
    assert out["balanced_acc"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert out["many_shot_acc"] == 1.0 and out["medium_shot_acc"] == 0.5
    assert out["few_shot_acc"] == 0.0
    assert [r["train_count"] for r in table] == [200, 50, 5]
    none_few, _ = long_tail_metrics(pred, target, np.array([200, 50, 30]), 100, 20)
    assert "few_shot_acc" not in none_few  # a group with no class is absent, not NaN


def test_corruption_metrics() -> None:
    out = corruption_metrics({("a", 1): 0.8, ("a", 2): 0.6, ("b", 1): 0.4}, 0.8)
    assert out["corrupt_acc"] == pytest.approx(0.6) and out["corrupt_rel"] == pytest.approx(0.75)


def test_long_tail_metrics_present_only_with_imbalance() -> None:
    cfg = TrialConfig(task="digits", epochs=1, d_model=32, d_ff=64)
    *_, plain = run_trial(cfg)
    *_, tail = run_trial(cfg.replace(imbalance=10.0))
    assert not set(LT) & set(plain.metrics)
    assert set(LT[:2]) <= set(tail.metrics)
    assert all(math.isfinite(v) for v in tail.metrics.values())
    assert {r["train_count"] for r in tail.artifacts["per_class"]} == set(
        get_task(cfg.replace(imbalance=10.0)).train_counts.tolist())


@pytest.mark.parametrize("task", [pytest.param(t, id=t) for t in TASKS])
def test_tasks_refuse_stressors_they_cannot_take_before_any_data(task: str) -> None:
    """Per-token tasks refuse long tail and label noise; tasks whose label needs the end of
    the input (and per-token ones) refuse truncation: when the config is made, from the task
    table, so a space asking for it is refused before a sweep starts."""
    entry = TASKS[task]
    extra = {"text_file": {"data_path": "x.csv"}, "associative_recall": {"vocab_size": 64}
             }.get(task, {})
    for changes, refused, match in (
            ({"imbalance": 10.0}, entry.per_token, "per-token"),
            ({"label_noise": 0.1}, entry.per_token, "per-token"),
            ({"length_mode": "truncate"}, entry.per_token or not entry.truncatable,
             "truncate")):
        if refused:
            with pytest.raises(ConfigError, match=match):
                TrialConfig(task=task, **extra, **changes)
        else:
            assert TrialConfig(task=task, **extra, **changes).task == task
    assert [t for t, e in TASKS.items() if not e.truncatable] == ["associative_recall",
                                                                   "listops"]


@pytest.mark.slow
def test_pad_bucket_truncate_identical_when_no_sequence_needs_them() -> None:
    base = TrialConfig(task="many_class", n_classes=10, min_len=12, max_len=12, n_train=600,
                       epochs=2, d_model=32, d_ff=64, vocab_size=12)
    results = {m: run_trial(base.replace(length_mode=m)) for m in ("pad", "bucket", "truncate")}
    finals = {m: list(r)[-1].metrics for m, r in results.items()}
    for name in CORE_METRICS:
        if name in ("samples_per_s", "train_loss", "val_loss", "test_loss"):
            continue
        vals = {m: f[name] for m, f in finals.items()}
        assert vals["pad"] == pytest.approx(vals["bucket"], abs=1e-6), name
        assert vals["pad"] == pytest.approx(vals["truncate"], abs=1e-6), name
    for name in ("train_loss", "val_loss", "test_loss"):
        assert finals["pad"][name] == pytest.approx(finals["bucket"][name], rel=1e-5)
        assert finals["pad"][name] == pytest.approx(finals["truncate"][name], rel=1e-5)


@pytest.mark.parametrize("task", ["listops", "associative_recall"])
def test_truncation_refused_where_the_label_needs_the_end(task: str) -> None:
    with pytest.raises(ConfigError, match="truncate"):
        get_task(TrialConfig(task=task, length_mode="truncate", vocab_size=64))
