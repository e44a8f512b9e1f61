"""The benchmarks' measuring code run small on the CPU: checks that it measures what it says
(its arithmetic, its processes and their clean-up), never of how fast anything is."""

from pathlib import Path

import pytest
import torch


def test_compute_use_relates_training_to_the_matmul_rate() -> None:
    from benchmarks.trials import compute_use, matmul_flops_per_s

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as make bench runs it on the CPU
    try:
        assert 1e8 < matmul_flops_per_s(torch.device("cpu"), n=256, reps=3) < 1e13
        out = compute_use(torch.device("cpu"), epochs=1)
    finally:
        torch.set_num_threads(threads)
    assert out["fraction"] == pytest.approx(out["train_flops_per_s"] / out["matmul_flops_per_s"])
    # training runs matmuls and more on the same core: under the matmul rate, never far above
    assert 0 < out["fraction"] < 1.5


def test_packing_times_warmed_actors_without_a_gpu() -> None:
    """The packing measurement's mechanics on the CPU (no GPU asked for): k actors, each
    warmed, timed alone and together."""
    from benchmarks.gpu import packing

    out = packing(epochs=1, k=2, gpu=False)
    assert out["distinct_processes"] == 2  # one process per trial
    assert len(out["packed_samples_per_s"]) == 2 and out["one_samples_per_s"] > 0
    # by the clock (k trials' work over the time they took together, against one alone), not
    # the sum of each trial's own rate, which counts trials that did not overlap as if they had
    assert out["value"] == pytest.approx(2 * out["one_wall_s"] / out["packed_wall_s"])
    assert out["sum_of_rates"] == pytest.approx(sum(out["packed_samples_per_s"])
                                                / out["one_samples_per_s"])


def test_packing_probe_reports_a_failed_child() -> None:
    """A child that fails (here: an unknown path) makes the row an error with its message,
    and no child is left running."""
    from benchmarks.packing_probe import run_packed

    row = run_packed("no_such_path", 2, epochs=1, trials=1, timeout_s=120)
    assert "KeyError" in row["error"] and "no_such_path" in row["error"]
    assert len(row["pids"]) == 2
    for pid in row["pids"]:  # waited for: gone, not a zombie
        assert not Path(f"/proc/{pid}").exists()
