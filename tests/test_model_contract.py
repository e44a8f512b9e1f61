"""Model contract, checked for every value of every design switch on three kinds of input.

Each variant changes one switch from a small default model (a few switches only act together with
another one, e.g. `qk_norm_gain` needs `qk_norm=l2`). For each variant and each input spec:
output shapes, padding invariance, SDPA == explicit softmax oracle, finite training steps. Also:
initialization by module role gives the weights of the former rule by module name.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import study.model
from study.config import CHOICES, ConfigError, TrialConfig
from study.model import AttnStats, ModelSpec, build_model
from study.step import TrainState, make_optimizer, train_step
from study.tasks.base import IGNORE

SMALL = {"d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64}
MODEL_FIELDS = ("arch", "qk_norm", "init", "norm", "pos_encoding", "attn_kind",
                "channel_attention", "embed")
# switches that are not categorical: (id, changes from SMALL)
OTHER_SWITCHES: list[tuple[str, dict]] = [
    ("learned_temperature=True", {"learned_temperature": True}),
    ("learned_temperature=True,arch=lstm_attention",
     {"learned_temperature": True, "arch": "lstm_attention"}),
    ("attn_temperature=0.5", {"attn_temperature": 0.5}),
    ("attn_temperature=2.0", {"attn_temperature": 2.0}),
    ("attn_temperature=2.0,arch=lstm_attention",
     {"attn_temperature": 2.0, "arch": "lstm_attention"}),
    ("attn_dropout=0.1", {"attn_dropout": 0.1}),
    ("resid_dropout=0.1", {"resid_dropout": 0.1}),
    ("emb_dropout=0.1", {"emb_dropout": 0.1}),
    ("drop_path=0.1", {"drop_path": 0.1}),
    ("z_loss=0.001", {"z_loss": 1e-3}),
    ("attn_entropy_reg=0.01", {"attn_entropy_reg": 0.01}),
    ("attn_entropy_reg=0.01,arch=lstm_attention",
     {"attn_entropy_reg": 0.01, "arch": "lstm_attention"}),
    ("label_smoothing=0.1", {"label_smoothing": 0.1}),
    ("logit_adjust_tau=1.0", {"logit_adjust_tau": 1.0}),
    ("init_scale=0.5", {"init_scale": 0.5}),
    # the gain only exists with qk_norm=l2
    ("qk_norm_gain=5,qk_norm=l2", {"qk_norm_gain": 5.0, "qk_norm": "l2"}),
]


def _variants() -> list:
    out = []
    for name in MODEL_FIELDS:
        assert name in CHOICES, name
        for value in CHOICES[name]:
            out.append(pytest.param({name: value}, id=f"{name}={value}"))
    out += [pytest.param(changes, id=ident) for ident, changes in OTHER_SWITCHES]
    return out


VARIANTS = _variants()
SPECS = [
    pytest.param(ModelSpec(n_classes=5, max_len=24, vocab_size=11), id="tokens"),
    pytest.param(ModelSpec(n_classes=5, max_len=24, in_channels=2), id="signal"),
    pytest.param(ModelSpec(n_classes=5, max_len=24, vocab_size=11, per_token=True),
                 id="tokens_per_token"),
    pytest.param(ModelSpec(n_classes=5, max_len=24, in_channels=2, per_token=True),
                 id="signal_per_token"),
]
SHORT_T, LONG_T = 20, 24
# real lengths of the four rows (one row unpadded in the short batch, one of length 1)
LENGTHS = (20, 13, 7, 1)
# per-token outputs of a signal: multiples of the patch size (4), so that every token is wholly
# real or wholly padding and the outputs line up token by token
PATCH_LENGTHS = (20, 12, 4, 8)
B = len(LENGTHS)


def make_cfg(changes: dict) -> TrialConfig:
    return TrialConfig(**{**SMALL, **changes})


def make_model(changes: dict, spec: ModelSpec, seed: int = 0):
    torch.manual_seed(seed)
    cfg = make_cfg(changes)
    if spec.per_token and cfg.arch == "lstm_attention":
        # attention pooling yields one label per sequence: per-token tasks are refused
        with pytest.raises(ConfigError, match="per-token"):
            build_model(cfg, spec)
        pytest.skip("lstm_attention is refused for per-token outputs (checked)")
    return build_model(cfg, spec)


def n_tokens(spec: ModelSpec, cfg: TrialConfig, raw_len: int) -> int:
    p = 1 if spec.vocab_size else cfg.patch_size
    return -(-raw_len // p)


def random_inputs(spec: ModelSpec, T: int, gen: torch.Generator) -> torch.Tensor:
    if spec.vocab_size:
        return torch.randint(0, spec.vocab_size, (B, T), generator=gen)
    return torch.randn(B, T, spec.in_channels, generator=gen)


def lengths_for(spec: ModelSpec) -> tuple[int, ...]:
    return PATCH_LENGTHS if spec.per_token and not spec.vocab_size else LENGTHS


def prefix_mask(T: int, lengths=LENGTHS) -> torch.Tensor:
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


# categorical fields read by the tasks or the training loop, not by the model
NOT_MODEL_FIELDS = ("task", "length_mode", "tokenizer", "device", "step_mode")
FREE_TEXT_FIELDS = ("data_path", "text_column", "label_column")


def test_model_switches_are_every_categorical_field():
    """The switches above against the config's own declaration of its fields."""
    str_fields = {f.name for f in dataclasses.fields(TrialConfig) if f.type in ("str", str)}
    assert str_fields - set(FREE_TEXT_FIELDS) == set(CHOICES)
    assert set(CHOICES) == set(MODEL_FIELDS) | set(NOT_MODEL_FIELDS)
    assert len({p.id for p in VARIANTS}) == len(VARIANTS)  # ids are unique


def _behaviour(changes: dict, spec: ModelSpec) -> tuple:
    """What a model does: its parameter shapes and its outputs on fixed inputs."""
    torch.manual_seed(0)
    model = build_model(make_cfg(changes), spec).eval()
    gen = torch.Generator().manual_seed(1)
    x = random_inputs(spec, SHORT_T, gen)
    with torch.no_grad():
        out, _ = model(x, prefix_mask(SHORT_T))
    shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    return shapes, tuple(out.flatten().round(decimals=5).tolist())


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in MODEL_FIELDS])
def test_every_value_of_a_model_switch_changes_the_model(name):
    """Each listed value is read by the model: no two values build the same model."""
    specs = [ModelSpec(n_classes=5, max_len=24, vocab_size=11),
             ModelSpec(n_classes=5, max_len=24, in_channels=2)]
    seen = [tuple(_behaviour({name: v}, s) for s in specs) for v in CHOICES[name]]
    assert len(set(seen)) == len(CHOICES[name]), name


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("changes", VARIANTS)
def test_output_shapes(changes, spec):
    cfg = make_cfg(changes)
    model = make_model(changes, spec).eval()
    gen = torch.Generator().manual_seed(1)
    for T in (SHORT_T, LONG_T, 3):
        x, mask = random_inputs(spec, T, gen), prefix_mask(T, [min(n, T) for n in LENGTHS])
        with torch.no_grad():
            out, st = model(x, mask)
        assert st is None  # statistics only when asked for
        if spec.per_token:
            assert out.shape == (B, n_tokens(spec, cfg, T), spec.n_classes)
        else:
            assert out.shape == (B, spec.n_classes)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("changes", VARIANTS)
def test_stats_shapes(changes, spec):
    cfg = make_cfg(changes)
    model = make_model(changes, spec).eval()
    gen = torch.Generator().manual_seed(1)
    x, mask = random_inputs(spec, LONG_T, gen), prefix_mask(LONG_T)
    with torch.no_grad():
        out, st = model(x, mask, stats=True)
    assert out.shape == model(x, mask)[0].shape
    assert isinstance(st, AttnStats)
    n_layers, n_heads = (cfg.n_layers, cfg.n_heads) if cfg.arch == "transformer" else (1, 1)
    assert st.entropy.shape == (B, n_layers, n_heads)
    assert st.max_logit.dim() == 0
    # entropy is in nats, between 0 and log(number of keys a query may attend to)
    assert (st.entropy >= -1e-6).all()
    assert (st.entropy <= torch.log(torch.tensor(float(LONG_T))) + 1e-5).all()
    assert torch.isfinite(st.max_logit)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("changes", VARIANTS)
def test_padding_invariance(changes, spec):
    """Garbage in padded positions and extra padding columns never change a real output."""
    cfg = make_cfg(changes)
    model = make_model(changes, spec).eval()
    gen = torch.Generator().manual_seed(2)
    x_long = random_inputs(spec, LONG_T, gen)
    x_short = random_inputs(spec, SHORT_T, gen)  # different garbage everywhere ...
    lengths = lengths_for(spec)
    m_long, m_short = prefix_mask(LONG_T, lengths), prefix_mask(SHORT_T, lengths)
    x_short[m_short] = x_long[:, :SHORT_T][m_short]  # ... except at the real positions
    assert not torch.equal(x_short[~m_short], x_long[:, :SHORT_T][~m_short])
    with torch.no_grad():
        out_long, out_short = model(x_long, m_long)[0], model(x_short, m_short)[0]
    if not spec.per_token:
        torch.testing.assert_close(out_short, out_long, atol=1e-5, rtol=0)
        return
    for row, n in enumerate(lengths):
        k = n_tokens(spec, cfg, n)
        torch.testing.assert_close(out_short[row, :k], out_long[row, :k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("changes", VARIANTS)
def test_padded_batches_train_finitely_even_with_a_sample_of_no_real_position(changes):
    """Padded queries and keys never turn into NaN (a row of attention with no key), neither
    in the outputs nor in the gradients, with a sample of no real position in the batch (no
    task builds one; the mask must still not break on it)."""
    spec = ModelSpec(n_classes=5, max_len=24, vocab_size=11)
    model = make_model(changes, spec).train()
    x = random_inputs(spec, LONG_T, torch.Generator().manual_seed(5))
    mask = prefix_mask(LONG_T, (20, 13, 7, 0))
    out, _ = model(x, mask)
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("changes", VARIANTS)
@pytest.mark.parametrize("T", [LONG_T, LONG_T - 1], ids=["whole_patches", "partial_patch"])
def test_unpadded_spec_gives_the_padded_models_outputs(changes, spec, T):
    """`ModelSpec.padded=False` (no split holds padding) leaves the padding mask out of
    attention; on inputs with every position real (a partial last patch still pads its token)
    the outputs and statistics are those of the same weights with the mask."""
    padded = make_model(changes, spec).eval()
    unpadded = build_model(make_cfg(changes), dataclasses.replace(spec, padded=False)).eval()
    unpadded.load_state_dict(padded.state_dict())
    x = random_inputs(spec, T, torch.Generator().manual_seed(4))
    full = torch.ones(B, T, dtype=torch.bool)
    with torch.no_grad():
        for stats in (False, True):
            (a, sa), (b, sb) = padded(x, full, stats=stats), unpadded(x, full, stats=stats)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
            if stats:
                torch.testing.assert_close(sb.entropy, sa.entropy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("changes", VARIANTS)
def test_sdpa_matches_explicit_oracle(changes, spec):
    model = make_model(changes, spec).eval()
    gen = torch.Generator().manual_seed(3)
    x, mask = random_inputs(spec, LONG_T, gen), prefix_mask(LONG_T)
    with torch.no_grad():
        fused, _ = model(x, mask)
        explicit, st = model(x, mask, stats=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)
    assert torch.isfinite(st.entropy).all()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("changes", VARIANTS)
def test_training_steps_stay_finite(changes, spec):
    """Five steps of `study.step.train_step` (the step of `run_trial`), with a uniform class prior
    for logit adjustment and no gradient clipping, so the raw gradients must stay finite."""
    cfg = make_cfg(changes).replace(grad_clip=0.0)
    model = make_model(changes, spec).train()
    before = [p.detach().clone() for p in model.parameters()]
    opt, sched = make_optimizer(model, cfg, total_steps=5)
    n = spec.n_classes
    state = TrainState(model, opt, sched, cfg,
                       adjust=cfg.logit_adjust_tau * torch.full((n,), 1.0 / n).log())
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        x, mask = random_inputs(spec, LONG_T, gen), prefix_mask(LONG_T)
        if spec.per_token:  # padded tokens carry no label, as in the tasks (IGNORE = -100)
            n_tok = [n_tokens(spec, cfg, n) for n in LENGTHS]
            y = torch.randint(0, spec.n_classes, (B, n_tokens(spec, cfg, LONG_T)), generator=gen)
            y[~prefix_mask(y.shape[1], n_tok)] = IGNORE
        else:
            y = torch.randint(0, spec.n_classes, (B,), generator=gen)
        loss = train_step(state, x, y, mask)
        assert torch.isfinite(loss)
        for name, p in model.named_parameters():  # the gradients this step applied
            assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert state.step == 5 and state.first_bad.item() == -1  # no step flagged as diverged
    for p in model.parameters():
        assert torch.isfinite(p).all()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x, mask)[0]).all()


def test_n_heads_must_divide_d_model():
    with pytest.raises(ConfigError, match=r"^n_heads: 5 does not divide d_model=32"):
        TrialConfig(d_model=32, n_heads=5)


def test_alibi_with_low_rank_is_rejected():
    with pytest.raises(ConfigError, match="alibi"):
        make_cfg({"pos_encoding": "alibi", "attn_kind": "low_rank"})




def _press_reference_slopes(n: int) -> list[float]:
    """`get_slopes` of Press et al.'s reference code (ofirpress/attention_with_linear_biases,
    fairseq/models/transformer.py), as written there."""
    def get_slopes_power_of_2(n: int) -> list[float]:
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (get_slopes_power_of_2(closest_power_of_2)
            + _press_reference_slopes(2 * closest_power_of_2)[0::2][:n - closest_power_of_2])


@pytest.mark.parametrize("n", [pytest.param(n, id=f"heads{n}") for n in range(1, 17)])
def test_alibi_slopes_are_the_papers(n):
    got = study.model.alibi_slopes(n).tolist()
    assert got == pytest.approx(_press_reference_slopes(n), rel=1e-6)
    assert len(set(got)) == n  # every head its own slope


def test_drop_path_that_would_do_nothing_is_refused():
    """The rate rises from 0 at the first block: with one layer drop_path would change nothing
    (found: a 1-layer digits trial gave the same losses at 0 and 0.3)."""
    with pytest.raises(ConfigError, match=r"^drop_path: 0.3 does nothing with n_layers=1"):
        make_cfg({"n_layers": 1, "drop_path": 0.3})
    spec = SPECS[0].values[0]
    model = make_model({"drop_path": 0.5}, spec).train()  # 2 layers: the last block drops
    x, mask = random_inputs(spec, SHORT_T, torch.Generator().manual_seed(0)), prefix_mask(SHORT_T)
    outs = {tuple(model(x, mask)[0].flatten()[:8].tolist()) for _ in range(6)}
    assert len(outs) > 1

@pytest.mark.parametrize("changes", [
    {"pos_encoding": "rope"}, {"pos_encoding": "alibi"}, {"qk_norm": "l2"},
    {"qk_norm": "layernorm"}, {"attn_kind": "local"}, {"attn_kind": "low_rank"},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_lstm_attention_rejects_transformer_only_switches(changes):
    name = next(iter(changes))
    with pytest.raises(ConfigError, match=rf"^{name}: .*lstm_attention"):
        make_cfg({"arch": "lstm_attention", **changes})


def test_rope_needs_even_head_size():
    with pytest.raises(ConfigError, match="rope"):
        TrialConfig(d_model=12, n_heads=4, pos_encoding="rope")
    TrialConfig(d_model=16, n_heads=4, pos_encoding="rope")  # head size 4 is fine


def test_sequence_longer_than_max_len_is_rejected():
    model = make_model({}, ModelSpec(n_classes=5, max_len=24, vocab_size=11)).eval()
    x = torch.zeros(2, 25, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds"):
        model(x, torch.ones(2, 25, dtype=torch.bool))


def test_patch_larger_than_input_is_rejected():
    with pytest.raises(ConfigError, match="patch_size"):
        build_model(make_cfg({"patch_size": 8}), ModelSpec(n_classes=5, max_len=4))


# --- initialization by module role ----------------------------------------------------------

def init_weights_by_name(model, cfg: TrialConfig) -> None:
    """The former `study.model.init_weights`, which matched module names: the oracle."""
    s, d, L = cfg.init_scale, cfg.d_model, cfg.n_layers
    beta = (8 * L) ** -0.25

    def fill(w: torch.Tensor, gain: float = 1.0) -> None:
        if cfg.init in ("xavier_uniform", "deepnorm"):
            nn.init.xavier_uniform_(w, gain=gain * s)
        elif cfg.init == "normal_002":
            nn.init.normal_(w, 0.0, 0.02 * gain * s)
        else:
            nn.init.normal_(w, 0.0, math.sqrt(2.0 / (5 * d)) * gain * s)

    resid_gain = 1.0 / math.sqrt(2 * L) if cfg.init == "normal_002" else 1.0
    deep = beta if cfg.init == "deepnorm" else 1.0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            fill(mod.weight)
        elif isinstance(mod, nn.Linear):
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
            if name.endswith("attn.qkv"):
                for i, g in enumerate((1.0, 1.0, deep)):
                    fill(mod.weight[i * d:(i + 1) * d], g)
            elif name.endswith("attn.proj") or name.endswith("mlp.2"):
                fill(mod.weight, deep * resid_gain)
            elif name.endswith("mlp.0"):
                fill(mod.weight, deep)
            else:
                fill(mod.weight)


@pytest.mark.parametrize("spec", SPECS[:2])
@pytest.mark.parametrize("arch", CHOICES["arch"])
@pytest.mark.parametrize("init", CHOICES["init"])
def test_init_by_role_gives_the_weights_of_the_name_rule(init, arch, spec, monkeypatch):
    cfg = make_cfg({"init": init, "arch": arch, "n_layers": 3, "init_scale": 0.7,
                    "channel_attention": "se", "learned_temperature": True})
    torch.manual_seed(5)
    by_role = build_model(cfg, spec).state_dict()
    monkeypatch.setattr(study.model, "init_weights", init_weights_by_name)
    torch.manual_seed(5)
    by_name = build_model(cfg, spec).state_dict()
    assert by_role.keys() == by_name.keys()
    for k in by_role:
        assert torch.equal(by_role[k], by_name[k]), k


def test_init_roles_are_declared_where_the_layers_are_built():
    model = make_model({}, SPECS[0].values[0])
    roles = {n: getattr(m, "init_role", None) for n, m in model.named_modules()
             if isinstance(m, nn.Linear)}
    assert {n: r for n, r in roles.items() if r is not None} == {
        f"blocks.{i}.{n}": r for i in range(SMALL["n_layers"])
        for n, r in (("attn.qkv", "qkv"), ("attn.proj", "resid_out"), ("mlp.0", "mlp_in"),
                     ("mlp.2", "resid_out"))}


def test_init_statistics_per_role():
    spec = SPECS[0].values[0]
    L, d = 4, 128
    # GPT-2: residual output projections get std 0.02 / sqrt(2L)
    model = make_model({"init": "normal_002", "n_layers": L, "d_model": d, "d_ff": 4 * d}, spec)
    for block in model.blocks:
        for w in (block.attn.proj.weight, block.mlp[2].weight):
            assert w.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.05)
        for w in (block.attn.qkv.weight, block.mlp[0].weight):
            assert w.std().item() == pytest.approx(0.02, rel=0.05)
    # DeepNet: the value slice (not q or k) is scaled by beta = (8L)^(-1/4)
    model = make_model({"init": "deepnorm", "n_layers": L, "d_model": d, "d_ff": 4 * d}, spec)
    beta = (8 * L) ** -0.25
    for block in model.blocks:
        q, k, v = block.attn.qkv.weight.split(d)
        assert v.std().item() / q.std().item() == pytest.approx(beta, rel=0.05)
        assert k.std().item() / q.std().item() == pytest.approx(1.0, rel=0.05)


def test_init_scale_reaches_low_rank_projections():
    """`init_scale` multiplies every initial weight, the low-rank sequence projections too
    (they kept their N(0, 1/rank) draw whatever `init_scale`); the draw itself is unchanged."""
    spec = SPECS[0].values[0]
    stds = {}
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        model = make_model({"attn_kind": "low_rank", "init_scale": scale}, spec)
        stds[scale] = [(b.attn.proj_k.std().item(), b.attn.proj_v.std().item(),
                        b.attn.qkv.weight.std().item()) for b in model.blocks]
    for big, small in zip(stds[1.0], stds[0.1], strict=True):
        assert small == pytest.approx(tuple(0.1 * v for v in big), rel=1e-5)


def _masks(B: int, nh: int, T: int) -> list:
    """The masks `Attention` passes: none, padding (bool), a row with no key at all, local
    attention with an ALiBi bias (float, -inf where blocked), and an ALiBi bias with a row
    with no key (float)."""
    lengths = torch.tensor([T, max(1, T // 2)])[:B]
    valid = torch.arange(T)[None] < lengths[:, None]  # (B, T)
    pad = (valid[:, None, :] | ~valid[:, :, None])[:, None]  # (B, 1, T, T)
    dead = pad.clone()
    dead[0, 0, 0] = False
    dist = (torch.arange(T)[None] - torch.arange(T)[:, None]).abs().float()
    alibi = (-0.5 * dist).masked_fill(dist > 3, float("-inf")).expand(1, nh, T, T)
    return [None, pad, dead, alibi, (-0.5 * dist).masked_fill(~dead, float("-inf"))]


@pytest.mark.parametrize("T", [1, 5, 11, 15, 16, 40])
@pytest.mark.parametrize("mask_kind", range(5),
                         ids=["none", "padding", "dead_row", "alibi", "alibi_dead_row"])
@pytest.mark.parametrize("forced", [False, True], ids=["as_dispatched", "written_out"])
def test_attend_matches_sdpa(T, mask_kind, forced, monkeypatch):
    """`study.model.attend` (written out on the CPU below 16 keys or with dropout) computes
    what `F.scaled_dot_product_attention` computes, values and gradients, a query with no key
    left included (zeros, as SDPA gives); `written_out`: the written-out path at every length."""
    if forced:
        monkeypatch.setattr(study.model, "written_out", lambda *a: True)
    gen = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 8, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    mask = _masks(2, 3, T)[mask_kind]
    mask = mask.double() if mask is not None and mask.is_floating_point() else mask
    for scale in (None, 0.3):
        ours = study.model.attend(q, k, v, attn_mask=mask, scale=scale)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                scale=scale)
        torch.testing.assert_close(ours, want, atol=1e-10, rtol=1e-8)
        g = torch.randn(ours.shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(torch.autograd.grad(ours, (q, k, v), g),
                                   torch.autograd.grad(want, (q, k, v), g),
                                   atol=1e-10, rtol=1e-8)
    if mask_kind in (2, 4):
        assert (ours[0, :, 0] == 0).all()


@pytest.mark.parametrize("n", [1, 2, 7, 11, 15, 16, 17, 33])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_row_softmax_matches_torch(n, log):
    """The short-row padding of `row_softmax` changes neither values nor gradients, -inf
    entries (masked keys) included."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(4, 3, n, generator=gen, dtype=torch.float64)
    x[0, 0, : n // 2] = float("-inf")
    x.requires_grad_()
    ours = study.model.row_softmax(x, log=log)
    want = (torch.log_softmax if log else torch.softmax)(x, dim=-1)
    torch.testing.assert_close(ours, want, atol=1e-12, rtol=0)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    if log:  # -inf outputs: only their (zero) cotangent is meaningful
        g = g.masked_fill(~torch.isfinite(want), 0.0)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0],
                               torch.autograd.grad(want, x, g)[0], atol=1e-12, rtol=0)


def test_attend_dropout_keeps_the_expectation():
    """With dropout `attend` drops attention weights at rate p and rescales the rest: over many
    draws the mean output is the output without dropout (within 5 standard errors), and a
    single draw differs from it."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 11, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    exact = study.model.attend(q, k, v, scale=0.5)
    torch.manual_seed(0)
    draws = torch.stack([study.model.attend(q, k, v, dropout_p=0.3, scale=0.5)
                         for _ in range(4000)])
    assert not torch.allclose(draws[0], exact)
    se = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - exact).abs() <= 5 * se + 1e-12).all()
