"""`make bench`: attention-path throughput as ratios measured in one run.

Compares, on the same machine and inputs, the fused SDPA path against the explicit softmax path
(the oracle), and the attention kinds (full, local, low_rank) against full attention, for a
training step (`study.step.train_step`: forward, loss, backward, clip, AdamW and schedule step).
Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from study.config import TrialConfig
from study.model import ModelSpec, build_model
from study.step import TrainState, make_optimizer, train_step

OUT = Path(__file__).parent / "results"


def step_time(cfg: TrialConfig, spec: ModelSpec, device: torch.device, batch: int,
              explicit: bool, iters: int) -> float:
    torch.manual_seed(0)
    model = build_model(cfg, spec).to(device).train()
    warmup = 3
    opt, sched = make_optimizer(model, cfg, warmup + iters)
    state = TrainState(model, opt, sched, cfg, stats=explicit)
    x = torch.randint(1, spec.vocab_size, (batch, spec.max_len), device=device)
    mask = torch.ones_like(x, dtype=torch.bool)
    y = torch.randint(0, spec.n_classes, (batch,), device=device)

    for _ in range(warmup):
        train_step(state, x, y, mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        train_step(state, x, y, mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    T, batch, iters = (1024, 32, 20) if cuda else (256, 16, 5)
    spec = ModelSpec(n_classes=10, max_len=T, vocab_size=64)
    base = TrialConfig(d_model=256 if cuda else 64, n_heads=8 if cuda else 4, n_layers=4,
                       d_ff=1024 if cuda else 128, attn_window=32, attn_rank=64)
    full = step_time(base, spec, device, batch, False, iters)
    rows = {
        "sdpa_vs_explicit_speedup": step_time(base, spec, device, batch, True, iters) / full,
        "local_vs_full_speedup": full / step_time(base.replace(attn_kind="local"), spec, device,
                                                  batch, False, iters),
        "low_rank_vs_full_speedup": full / step_time(base.replace(attn_kind="low_rank"), spec,
                                                     device, batch, False, iters),
        "alibi_vs_sinusoidal_slowdown": step_time(base.replace(pos_encoding="alibi"), spec,
                                                  device, batch, False, iters) / full,
    }
    result = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "seq_len": T, "batch": batch,
              "d_model": base.d_model, "n_layers": base.n_layers,
              "full_step_ms": full * 1e3, "ratios": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"attention_{'cuda' if cuda else 'cpu'}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
