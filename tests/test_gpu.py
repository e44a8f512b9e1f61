"""GPU checks (skipped without CUDA): bf16 autocast training and the fused kernel on device."""

import math

import pytest
import torch

from study.config import TrialConfig
from study.model import ModelSpec, build_model
from study.train import run_trial

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_trial_trains_on_cuda_with_bf16() -> None:
    *_, last = run_trial(TrialConfig(task="digits", epochs=4, device="cuda"))
    assert last.diverged is None
    assert last.metrics["test_acc"] > 0.6
    assert all(math.isfinite(v) for v in last.metrics.values())


@pytest.mark.parametrize("pos", ["sinusoidal", "rope", "alibi"])
def test_fused_attention_matches_oracle_on_cuda(pos: str) -> None:
    torch.manual_seed(0)
    cfg = TrialConfig(pos_encoding=pos, d_model=64, n_heads=4)
    model = build_model(cfg, ModelSpec(n_classes=5, max_len=64, vocab_size=20)).cuda().eval()
    x = torch.randint(0, 20, (8, 64), device="cuda")
    mask = torch.arange(64, device="cuda")[None, :] < torch.randint(8, 65, (8, 1), device="cuda")
    with torch.no_grad():
        fused, _ = model(x, mask)
        explicit, _ = model(x, mask, stats=True)
    torch.testing.assert_close(fused, explicit, atol=1e-4, rtol=1e-4)
