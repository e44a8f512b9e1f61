"""Attention temperature: entropy rises with tau, tiny tau is argmax, learned tau starts equal."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from study.config import TrialConfig
from study.model import Attention, AttnContext, ModelSpec, build_model, explicit_attention

SMALL = {"d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64}
SPEC = ModelSpec(n_classes=5, max_len=24, vocab_size=11)
TAUS = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]


def model_with(seed: int = 0, **changes):
    torch.manual_seed(seed)
    return build_model(TrialConfig(**{**SMALL, **changes}), SPEC).eval()


def fixed_input(lengths=(24, 24, 17, 9, 24, 5)):
    gen = torch.Generator().manual_seed(123)
    x = torch.randint(0, SPEC.vocab_size, (len(lengths), SPEC.max_len), generator=gen)
    mask = torch.arange(SPEC.max_len)[None, :] < torch.tensor(lengths)[:, None]
    return x, mask


def entropy(model, x, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(x, mask, stats=True)[1].entropy  # (B, L, nh)


def test_weights_do_not_depend_on_temperature():
    a, b = model_with(attn_temperature=0.25).state_dict(), model_with(attn_temperature=8.0)
    b = b.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_entropy_rises_strictly_with_temperature():
    x, mask = fixed_input()
    ents = [entropy(model_with(attn_temperature=tau), x, mask) for tau in TAUS]
    means = [e.mean().item() for e in ents]
    assert all(lo < hi for lo, hi in zip(means, means[1:], strict=False)), means
    # the first layer sees the same input at every tau, so every (example, head) rises strictly
    first = torch.stack([e[:, 0] for e in ents])  # (n_tau, B, nh)
    assert (first[1:] > first[:-1]).all()
    # and stays below the uniform entropy log(n real keys), which a large tau approaches
    log_n = torch.log(mask.sum(1).float())[:, None]
    assert (first <= log_n + 1e-5).all()
    assert (log_n - first[-1] < 0.05).all()


def test_lstm_attention_pooling_entropy_rises_with_temperature():
    x, mask = fixed_input()
    means = [entropy(model_with(arch="lstm_attention", attn_temperature=tau), x, mask).mean()
             for tau in TAUS]
    assert all(lo < hi for lo, hi in zip(means, means[1:], strict=False)), means


def test_tiny_temperature_attention_is_nearly_one_hot():
    x, mask = fixed_input()
    ent = entropy(model_with(attn_temperature=1e-3), x, mask)
    assert ent.mean() < 0.05
    assert entropy(model_with(attn_temperature=1.0), x, mask).mean() > 1.0  # the contrast


def test_explicit_attention_with_tiny_scale_adjusted_tau_is_argmax():
    """softmax(q k^T / (tau sqrt(d))) -> one-hot at argmax(q k^T) as tau -> 0."""
    gen = torch.Generator().manual_seed(0)
    B, nh, T, hs = 2, 3, 7, 8
    q, k = torch.randn(B, nh, T, hs, generator=gen), torch.randn(B, nh, T, hs, generator=gen)
    raw = q @ k.transpose(-2, -1)
    top2 = raw.topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]).min()
    assert gap > 1e-5  # no ties on this input
    # tiny tau, adjusted so the runner-up's logit trails by >= 30: its weight is < e^-30
    tau = gap.item() / (30 * math.sqrt(hs))
    eye = torch.eye(T).expand(B, nh, T, T)  # v = identity: the output is the attention matrix
    valid = torch.ones(B, T, dtype=torch.bool)
    p, info = explicit_attention(q, k, eye, None, 1.0 / (tau * math.sqrt(hs)), 0.0, valid)
    one_hot = F.one_hot(raw.argmax(-1), T).float()
    torch.testing.assert_close(p, one_hot, atol=1e-6, rtol=0)
    assert info.entropy.max() < 1e-4
    # at tau = 1 the same logits give a spread-out distribution
    p1, _ = explicit_attention(q, k, eye, None, 1.0 / math.sqrt(hs), 0.0, valid)
    assert (p1.amax(-1) < 0.999).any()


@pytest.mark.parametrize("stats", [False, True], ids=["sdpa", "explicit"])
def test_attention_layer_with_tiny_tau_picks_the_argmax_value(stats):
    """A whole `Attention` layer with tiny tau returns proj(v at argmax of q k^T) per query."""
    torch.manual_seed(0)
    cfg = TrialConfig(**SMALL, attn_temperature=1e-4)
    layer = Attention(cfg, max_tokens=10).eval()
    B, T, d = 2, 10, cfg.d_model
    x = torch.randn(B, T, d)
    valid = torch.ones(B, T, dtype=torch.bool)
    ctx = AttnContext(valid=valid, attn_mask=torch.ones(B, 1, T, T, dtype=torch.bool), rope=None)
    with torch.no_grad():
        y, _ = layer(x, ctx, stats=stats)
        q, k, v = (t.view(B, T, layer.nh, layer.hs).transpose(1, 2)
                   for t in layer.qkv(x).split(d, dim=2))
        idx = (q @ k.transpose(-2, -1)).argmax(-1)  # (B, nh, T)
        picked = torch.gather(v, 2, idx[..., None].expand(-1, -1, -1, layer.hs))
        expected = layer.proj(picked.transpose(1, 2).reshape(B, T, d))
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["transformer", "lstm_attention"])
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_learned_temperature_starts_at_the_fixed_one(arch, tau):
    x, mask = fixed_input()
    fixed = model_with(arch=arch, attn_temperature=tau)
    learned = model_with(arch=arch, attn_temperature=tau, learned_temperature=True)
    result = learned.load_state_dict(fixed.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.endswith("log_tau") for k in result.missing_keys)
    log_taus = [p for n, p in learned.named_parameters() if n.endswith("log_tau")]
    n_expected = SMALL["n_layers"] if arch == "transformer" else 1
    assert len(log_taus) == n_expected
    for p in log_taus:
        torch.testing.assert_close(p.exp(), torch.full_like(p, tau))
    with torch.no_grad():
        torch.testing.assert_close(learned(x, mask)[0], fixed(x, mask)[0], atol=1e-6, rtol=0)
        out_l, st_l = learned(x, mask, stats=True)
        out_f, st_f = fixed(x, mask, stats=True)
    torch.testing.assert_close(out_l, out_f, atol=1e-6, rtol=0)
    torch.testing.assert_close(st_l.entropy, st_f.entropy, atol=1e-6, rtol=0)
    # a different starting tau gives a different model: the comparison above can fail
    other = model_with(arch=arch, attn_temperature=tau * 2, learned_temperature=True)
    other.load_state_dict(fixed.state_dict(), strict=False)
    with torch.no_grad():
        assert not torch.allclose(other(x, mask)[0], fixed(x, mask)[0], atol=1e-4)


@pytest.mark.parametrize("arch", ["transformer", "lstm_attention"])
def test_learned_temperature_gets_a_gradient(arch):
    x, mask = fixed_input()
    model = model_with(arch=arch, learned_temperature=True).train()
    y = torch.arange(x.shape[0]) % SPEC.n_classes
    F.cross_entropy(model(x, mask)[0], y).backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("log_tau")]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
                         for g in grads)
