"""The attention model: every design choice is a field of `TrialConfig`.

Two families share one input embedding and one output head:
- `transformer`: an encoder of `n_layers` blocks (attention + MLP) over tokens;
- `lstm_attention`: a bidirectional LSTM with additive attention pooling (Bahdanau et al. 2015).

Inputs are either token ids `(B, T)` (with `vocab_size`) or continuous signals `(B, T, C)` turned
into tokens by `embed`. `mask` is `(B, T)` bool, True on real positions; padded positions never
change any output at a real position. `forward` returns `(logits, stats)`: logits `(B, n_classes)`
or, for per-token tasks, `(B, T', n_classes)`, and `AttnStats` when asked for (else None).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from study.config import ConfigError, TrialConfig


@dataclass(frozen=True)
class ModelSpec:
    """What the task tells the model about its inputs and outputs."""

    n_classes: int
    max_len: int  # longest raw input length any split will present (OOD sets included)
    vocab_size: int = 0  # > 0: token ids; 0: continuous signal with `in_channels`
    in_channels: int = 1
    per_token: bool = False
    # some split holds padded positions; False (measured by `get_task` over every split): every
    # position is real, so attention needs no padding mask and SDPA may take its fastest kernel
    padded: bool = True


@dataclass(frozen=True)
class AttnStats:
    """Attention statistics from the explicit softmax path, over real query positions only.

    One attention layer reports L = 1; the model stacks its layers. The LSTM's attention pooling
    counts as one layer with one head.
    """

    entropy: torch.Tensor  # (B, L, nh) mean entropy (nats) per layer and head
    max_logit: torch.Tensor  # () largest attention logit

    @staticmethod
    def stack(layers: Sequence[AttnStats]) -> AttnStats:
        return AttnStats(entropy=torch.cat([s.entropy for s in layers], 1),
                         max_logit=torch.stack([s.max_logit for s in layers]).amax())


# What a Linear layer does, read by `init_weights` (set where the layer is built, so renaming or
# regrouping modules never changes how they are initialized): the fused q/k/v projection, an
# output projection back into the residual stream, the MLP's input projection.
InitRole = Literal["qkv", "resid_out", "mlp_in"]


def with_role(layer: nn.Linear, role: InitRole) -> nn.Linear:
    object.__setattr__(layer, "init_role", role)  # a plain attribute, not a submodule
    return layer


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(kind: str, d: int) -> nn.Module:
    if kind in ("pre_ln", "post_ln"):
        return nn.LayerNorm(d)
    if kind == "rmsnorm":
        return RMSNorm(d)
    return nn.Identity()


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : d // 2]
    return table


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Head slopes of ALiBi (Press et al. 2022): for n a power of two the geometric sequence
    2^(-8/n), 2^(-16/n), ...; otherwise, as the paper's reference code, the slopes of the
    closest power of two below n, then every other slope of twice that power."""

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    below = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = geometric(below) + geometric(2 * below)[0::2][:n_heads - below]
    return torch.tensor(slopes)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class AttnContext:
    """Per-forward tensors shared by every layer, built once from the mask."""

    valid: torch.Tensor  # (B, T) bool
    attn_mask: torch.Tensor | None  # (B|1, 1|nh, 1|T, T) bool (True = attend) or float bias
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin: (T, hs)


class Attention(nn.Module):
    """Multi-head self-attention with temperature, QK-norm, RoPE/ALiBi and local/low-rank kinds.

    The temperature tau divides the logits: SDPA's `scale` = 1 / (tau * sqrt(d_head)). A fixed tau
    is folded into `scale`; a learned per-head tau (or the QKNorm gain of Henry et al. 2020) is
    folded into q, so the fused SDPA kernel still runs. `low_rank` is Linformer (Wang et al. 2020):
    keys and values are projected along the sequence to `attn_rank` slots.

    `kernel` is the attention call, `attend` (`F.scaled_dot_product_attention`'s signature and
    result); `study.replicas` swaps in one that folds a vmapped replicate axis into the batch axis.
    """

    def __init__(self, cfg: TrialConfig, max_tokens: int) -> None:
        super().__init__()
        d, nh = cfg.d_model, cfg.n_heads
        self.nh, self.hs = nh, d // nh
        self.qkv = with_role(nn.Linear(d, 3 * d), "qkv")
        self.proj = with_role(nn.Linear(d, d), "resid_out")
        self.dropout = cfg.attn_dropout
        self.kernel: Callable[..., torch.Tensor] = attend
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "layernorm":
            self.q_ln, self.k_ln = nn.LayerNorm(self.hs), nn.LayerNorm(self.hs)
        if cfg.qk_norm == "l2":
            self.qk_gain = nn.Parameter(torch.tensor(float(cfg.qk_norm_gain)))
        self.tau = cfg.attn_temperature
        self.log_tau = (nn.Parameter(torch.full((nh,), math.log(cfg.attn_temperature)))
                        if cfg.learned_temperature else None)
        self.low_rank = cfg.attn_kind == "low_rank"
        if self.low_rank:
            self.proj_k = nn.Parameter(torch.randn(cfg.attn_rank, max_tokens) / cfg.attn_rank**0.5)
            self.proj_v = nn.Parameter(torch.randn(cfg.attn_rank, max_tokens) / cfg.attn_rank**0.5)

    def _q_multiplier(self) -> torch.Tensor | float:
        """Everything that scales the logits besides 1/sqrt(hs): gain and 1/tau."""
        mult: torch.Tensor | float = 1.0
        if self.qk_norm == "l2":
            mult = self.qk_gain
        if self.log_tau is not None:
            mult = mult * torch.exp(-self.log_tau).view(1, self.nh, 1, 1)
        else:
            mult = mult / self.tau
        return mult

    def forward(
        self, x: torch.Tensor, ctx: AttnContext, stats: bool = False
    ) -> tuple[torch.Tensor, AttnStats | None]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.nh, self.hs).transpose(1, 2)
        v = v.view(B, T, self.nh, self.hs).transpose(1, 2)
        base = 1.0 / math.sqrt(self.hs)
        if self.qk_norm == "layernorm":
            q, k = self.q_ln(q), self.k_ln(k)
        elif self.qk_norm == "l2":
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            base = 1.0
        if ctx.rope is not None:
            cos, sin = ctx.rope
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        mult = self._q_multiplier()
        if isinstance(mult, torch.Tensor):
            q, scale = q * mult.to(q.dtype), base
        else:
            scale = base * mult
        mask: torch.Tensor | None = ctx.attn_mask
        if self.low_rank:
            keep = ctx.valid[:, None, :, None].to(k.dtype)  # padded keys contribute nothing
            k = torch.einsum("rt,bhtd->bhrd", self.proj_k[:, :T].to(k.dtype), k * keep)
            v = torch.einsum("rt,bhtd->bhrd", self.proj_v[:, :T].to(v.dtype), v * keep)
            mask = None  # (B, nh, T, r): every projected slot is valid
        drop = self.dropout if self.training else 0.0
        info = None
        if stats:
            y, info = explicit_attention(q, k, v, mask, scale, drop, ctx.valid)
        else:
            y = self.kernel(q, k, v, attn_mask=mask, dropout_p=drop, scale=scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y), info


# The CPU's softmax kernels take a scalar path when a row is shorter than 16 floats (one AVX-512
# vector): at 11 keys ~10x the time per element of a 16-key row. SDPA's CPU kernels pay it too
# (the math path, which dropout takes) or pay per (batch, head) costs that dominate at such
# lengths (the flash kernel): measurements in benchmarks/results/HISTORY.md ("CPU attention").
CPU_ROW = 16


def row_softmax(x: torch.Tensor, log: bool = False) -> torch.Tensor:
    """`softmax` (or `log_softmax`) over the last dim; on the CPU a shorter row than `CPU_ROW`
    is padded with -inf to `CPU_ROW` first and cut back after (same values, faster)."""
    fn = torch.log_softmax if log else torch.softmax
    n = x.shape[-1]
    if x.device.type != "cpu" or n >= CPU_ROW:
        return fn(x, dim=-1)
    return fn(F.pad(x, (0, CPU_ROW - n), value=float("-inf")), dim=-1)[..., :n]


def attention_logits(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """`(q @ k^T) * scale` `(B, nh, T, S)` with `mask` applied: a bool mask (True = attend)
    sets the blocked logits to -inf, a float mask is added (a positional bias)."""
    logits = (q @ k.transpose(-2, -1)) * scale
    if mask is None:
        return logits
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask


def written_out(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> bool:
    """Whether `attend` writes attention out (else it calls SDPA): on the CPU, with dropout or
    fewer than `CPU_ROW` keys."""
    return q.device.type == "cpu" and (dropout_p > 0.0 or k.shape[-2] < CPU_ROW)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, scale: float | None = None,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` (no causal flag), written out on the CPU where that is
    faster: with dropout (SDPA's own path there is this computation with the slow short-row
    softmax) or with fewer than `CPU_ROW` keys (its flash kernel is slower at such lengths).
    As SDPA does, a query row whose keys are all masked attends to nothing (zeros)."""
    if not written_out(q, k, dropout_p):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              scale=scale)
    return attend_written_out(q, k, v, attn_mask, dropout_p, scale)


def attend_written_out(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, scale: float | None = None,
) -> torch.Tensor:
    """`attend`'s written-out attention: `softmax(q k^T * scale + mask) v`, in plain operations
    (which `torch.vmap` batches)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = attention_logits(q, k, attn_mask, scale)  # (B, nh, T, S)
    if attn_mask is None:
        p = row_softmax(logits)
    else:  # a row with no key gets zeros, its softmax taken over zeros so no NaN reaches the
        # gradients (a float mask's -inf rows would pass it back through the addition)
        blocked = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask == float("-inf")
        dead = blocked.all(-1, keepdim=True)  # (B|1, 1|nh, T, 1)
        p = row_softmax(logits.masked_fill(dead, 0.0)).masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return p @ v  # (B, nh, T, hs)


def softmax_entropy(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of `p = softmax(logits)` over the last dim, with a finite gradient.

    `xlogy(p, p)` has derivative log(p) + 1 = -inf where p = 0 (masked keys), and the softmax
    backward turns 0 * inf into NaN; here entries with p = 0 add 0 to the value and the gradient.
    """
    logp = row_softmax(logits, log=True)
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    scale: float, dropout_p: float, valid: torch.Tensor,
) -> tuple[torch.Tensor, AttnStats]:
    """The softmax path written out: the oracle for SDPA and the source of attention statistics.

    Returns the output and this layer's `AttnStats`: over real query positions, the per-head mean
    entropy `(B, 1, nh)` in nats and the largest logit.
    """
    logits = attention_logits(q, k, mask, scale)  # (B, nh, T, S)
    p = row_softmax(logits.float())
    ent = softmax_entropy(logits.float(), p)  # (B, nh, T)
    qv = valid[:, None, :].to(ent.dtype)  # (B, 1, T)
    entropy = (ent * qv).sum(-1) / qv.sum(-1).clamp_min(1.0)  # (B, nh)
    finite = torch.where(torch.isfinite(logits), logits, torch.full_like(logits, -1e30))
    max_logit = (finite.float().amax(-1) + (qv - 1.0) * 1e30).amax()
    pd = F.dropout(p, dropout_p) if dropout_p > 0 else p
    return pd.to(v.dtype) @ v, AttnStats(entropy=entropy[:, None], max_logit=max_logit)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): drop a residual branch per sample."""
    if p == 0.0 or not training:
        return x
    # `empty_like` of a slice of x (not `torch.empty`), so under `torch.vmap` each replicate
    # draws its own mask; the same float32 draws as `torch.empty(B, 1, ...)` otherwise
    keep = torch.empty_like(x.flatten(1)[:, :1], dtype=torch.float32).bernoulli_(1 - p)
    return x * keep.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) / (1 - p)


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    w = valid.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class SqueezeExcite(nn.Module):
    """Channel attention (Hu et al. 2018): gate feature channels by a pooled summary."""

    def __init__(self, d: int, reduction: int = 4) -> None:
        super().__init__()
        h = max(d // reduction, 4)
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(masked_mean(x, valid)))))  # (B, C)
        return x * s[:, None, :]


class Block(nn.Module):
    def __init__(self, cfg: TrialConfig, max_tokens: int, drop_p: float) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm_kind = cfg.norm
        self.norm1, self.norm2 = make_norm(cfg.norm, d), make_norm(cfg.norm, d)
        self.attn = Attention(cfg, max_tokens)
        self.mlp = nn.Sequential(with_role(nn.Linear(d, cfg.d_ff), "mlp_in"), nn.GELU(),
                                 with_role(nn.Linear(cfg.d_ff, d), "resid_out"))
        self.se = SqueezeExcite(d) if cfg.channel_attention == "se" else None
        self.resid_drop = nn.Dropout(cfg.resid_dropout)
        self.drop_p = drop_p
        # DeepNet (Wang et al. 2022) up-weights the residual stream in post-LN: alpha = (2N)^(1/4)
        self.alpha = (2 * cfg.n_layers) ** 0.25 if cfg.init == "deepnorm" else 1.0

    def _branch_mlp(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = self.mlp(h)
        if self.se is not None:
            h = self.se(h, valid)
        return drop_path(self.resid_drop(h), self.drop_p, self.training)

    def forward(
        self, x: torch.Tensor, ctx: AttnContext, stats: bool = False
    ) -> tuple[torch.Tensor, AttnStats | None]:
        if self.norm_kind == "post_ln":
            a, info = self.attn(x, ctx, stats)
            x = self.norm1(self.alpha * x + drop_path(self.resid_drop(a), self.drop_p,
                                                      self.training))
            x = self.norm2(self.alpha * x + self._branch_mlp(x, ctx.valid))
            return x, info
        a, info = self.attn(self.norm1(x), ctx, stats)
        x = x + drop_path(self.resid_drop(a), self.drop_p, self.training)
        x = x + self._branch_mlp(self.norm2(x), ctx.valid)
        return x, info


def steps_per_token(cfg: TrialConfig, spec: ModelSpec) -> int:
    """Raw input steps per token: one for token ids, `patch_size` for a continuous signal."""
    return 1 if spec.vocab_size > 0 else cfg.patch_size


class InputEmbedding(nn.Module):
    """Token ids -> embeddings, or a continuous signal -> tokens by `embed` (patch or conv)."""

    def __init__(self, cfg: TrialConfig, spec: ModelSpec) -> None:
        super().__init__()
        d, p = cfg.d_model, cfg.patch_size
        self.tokens = spec.vocab_size > 0
        self.p = steps_per_token(cfg, spec)
        self.kind = cfg.embed
        self.emb: nn.Module
        if self.tokens:
            self.emb = nn.Embedding(spec.vocab_size, d)
        elif cfg.embed == "patch":
            self.emb = nn.Linear(p * spec.in_channels, d)
        else:
            self.conv1 = nn.Conv1d(spec.in_channels, d // 2, kernel_size=3, padding=1)
            self.conv2 = nn.Conv1d(d // 2, d, kernel_size=p, stride=p)

    def n_tokens(self, raw_len: int) -> int:
        return -(-raw_len // self.p)

    def pads(self, raw_len: int) -> bool:
        """Whether inputs `raw_len` long end in a padded token (the last patch is partial)."""
        return raw_len % self.p != 0

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokens:
            return self.emb(x), mask
        B, T, C = x.shape
        pad = self.n_tokens(T) * self.p - T
        x = x * mask[..., None].to(x.dtype)  # padded samples are zeros whatever they held
        if pad:
            x, mask = F.pad(x, (0, 0, 0, pad)), F.pad(mask, (0, pad))
        valid = mask.view(B, -1, self.p).any(-1)  # (B, T')
        if self.kind == "patch":
            return self.emb(x.reshape(B, -1, self.p * C)), valid
        h = F.gelu(self.conv1(x.transpose(1, 2)))  # (B, d/2, T)
        h = h * mask[:, None, :].to(h.dtype)
        return self.conv2(h).transpose(1, 2), valid  # (B, T', d)


class AttentionModel(nn.Module):
    """The whole model; `forward(x, mask)` returns `(logits, None)` through the fused SDPA kernel,
    `forward(..., stats=True)` returns `(logits, AttnStats)` from the explicit softmax path."""

    # buffers, by positional encoding
    pos_table: torch.Tensor  # (n, d) sinusoidal
    rope_cos: torch.Tensor  # (n, hs)
    rope_sin: torch.Tensor
    slopes: torch.Tensor  # (nh,) alibi

    def __init__(self, cfg: TrialConfig, spec: ModelSpec) -> None:
        super().__init__()
        self.cfg, self.spec = cfg, spec
        d = cfg.d_model
        self.embed = InputEmbedding(cfg, spec)
        self.max_tokens = self.embed.n_tokens(spec.max_len)
        self.emb_drop = nn.Dropout(cfg.emb_dropout)
        n = self.max_tokens
        if cfg.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(n, d), persistent=False)
        elif cfg.pos_encoding == "learned":
            self.pos_emb = nn.Embedding(n, d)
        elif cfg.pos_encoding == "rope":
            hs = d // cfg.n_heads
            inv = 1.0 / (10000 ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
            ang = torch.outer(torch.arange(n, dtype=torch.float32), inv)  # (n, hs/2)
            ang = torch.cat((ang, ang), dim=-1)
            self.register_buffer("rope_cos", ang.cos(), persistent=False)
            self.register_buffer("rope_sin", ang.sin(), persistent=False)
        elif cfg.pos_encoding == "alibi":
            self.register_buffer("slopes", alibi_slopes(cfg.n_heads), persistent=False)
        if cfg.arch == "transformer":
            rates = [cfg.drop_path * i / max(cfg.n_layers - 1, 1) for i in range(cfg.n_layers)]
            self.blocks = nn.ModuleList(Block(cfg, n, r) for r in rates)
            self.norm_f = make_norm(cfg.norm, d) if cfg.norm in ("pre_ln", "rmsnorm") else None
        else:
            self.lstm_f = nn.ModuleList(nn.LSTM(d, d // 2, batch_first=True)
                                        for _ in range(cfg.n_layers))
            self.lstm_b = nn.ModuleList(nn.LSTM(d, d // 2, batch_first=True)
                                        for _ in range(cfg.n_layers))
            self.lstm_in = nn.ModuleList(nn.Linear(2 * (d // 2), d) if 2 * (d // 2) != d
                                         else nn.Identity() for _ in range(cfg.n_layers))
            self.resid_drop = nn.Dropout(cfg.resid_dropout)
            self.att_w = nn.Linear(d, d)
            self.att_v = nn.Linear(d, 1, bias=False)
            self.log_tau = (nn.Parameter(torch.tensor(math.log(cfg.attn_temperature)))
                            if cfg.learned_temperature else None)
            self.se = SqueezeExcite(d) if cfg.channel_attention == "se" else None
        self.head = nn.Linear(d, spec.n_classes)
        init_weights(self, cfg)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _context(self, valid: torch.Tensor, padded: bool) -> AttnContext:
        """`padded`: some position may be padding; else `valid` is all True and only the
        attention kind and positional bias shape the mask (None for plain full attention)."""
        cfg = self.cfg
        T = valid.shape[1]
        idx = torch.arange(T, device=valid.device)
        dist = (idx[None, :] - idx[:, None]).abs()  # (T, T)
        mask: torch.Tensor | None = None  # (B|1, 1, 1|T, T) bool, True = attend
        if cfg.attn_kind == "local":
            mask = (dist <= cfg.attn_window)[None, None]  # (1, 1, T, T)
            if padded:  # real queries see real keys only; padded queries see everything, so
                # that no query's window is all padding (a row of no keys)
                mask = mask & (valid[:, None, None, :] | ~valid[:, None, :, None])
        elif padded:  # every query sees the real keys only: one key mask, never (B, T, T) (the
            # fused kernels read less; padded queries' outputs are never used); a sample with
            # no real position (none is built so) would see everything, never a row of no keys
            mask = valid[:, None, None, :] | ~valid.any(1)[:, None, None, None]  # (B, 1, 1, T)
        if cfg.pos_encoding == "alibi":
            bias = -self.slopes[:, None, None] * dist[None].float()  # (nh, T, T)
            mask = bias[None] if mask is None else bias[None].masked_fill(~mask, float("-inf"))
        rope = None
        if cfg.pos_encoding == "rope":
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        return AttnContext(valid=valid, attn_mask=mask, rope=rope)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, stats: bool = False
    ) -> tuple[torch.Tensor, AttnStats | None]:
        padded = self.spec.padded or self.embed.pads(x.shape[1])
        h, valid = self.embed(x, mask)  # (B, T, d), (B, T)
        T = h.shape[1]
        if T > self.max_tokens:
            raise ValueError(
                f"sequence of {T} tokens exceeds the model's max of {self.max_tokens}")
        if self.cfg.pos_encoding == "sinusoidal":
            h = h + self.pos_table[:T]
        elif self.cfg.pos_encoding == "learned":
            h = h + self.pos_emb.weight[:T]
        h = self.emb_drop(h)
        infos: list[AttnStats] = []
        if self.cfg.arch == "transformer":
            ctx = self._context(valid, padded)
            for block in self.blocks:
                h, info = block(h, ctx, stats)
                if info is not None:
                    infos.append(info)
            if self.norm_f is not None:
                h = self.norm_f(h)
            pooled = None if self.spec.per_token else masked_mean(h, valid)
        else:
            h, pooled, info = self._lstm_attention(h, valid, stats)
            if info is not None:
                infos.append(info)
        logits = self.head(h if self.spec.per_token else pooled)
        return logits, AttnStats.stack(infos) if stats else None

    def _lstm_attention(
        self, h: torch.Tensor, valid: torch.Tensor, stats: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, AttnStats | None]:
        T = h.shape[1]
        lengths = valid.sum(1, keepdim=True)  # (B, 1); real tokens form a prefix
        t = torch.arange(T, device=h.device)[None, :]
        rev = torch.where(t < lengths, lengths - 1 - t, t)  # reverse each sequence in place
        for f, b, proj in zip(self.lstm_f, self.lstm_b, self.lstm_in):
            fwd, _ = f(h)
            hb = torch.gather(h, 1, rev[..., None].expand_as(h))
            bwd, _ = b(hb)
            bwd = torch.gather(bwd, 1, rev[..., None].expand_as(bwd))
            h = self.resid_drop(proj(torch.cat((fwd, bwd), dim=-1)))
        if self.se is not None:
            h = self.se(h, valid)
        if self.spec.per_token:
            return h, None, None
        # additive attention pooling: e_t = v^T tanh(W h_t) / tau
        tau = torch.exp(self.log_tau) if self.log_tau is not None else self.cfg.attn_temperature
        logits = self.att_v(torch.tanh(self.att_w(h))).squeeze(-1) / tau  # (B, T)
        # a sample with no real position (none is built so) pools over all, as the
        # transformer's padding mask lets it see everything, never a softmax of no positions
        seen = valid | ~valid.any(1, keepdim=True)
        logits = logits.masked_fill(~seen, float("-inf"))
        p = torch.softmax(logits.float(), dim=-1)
        pd = F.dropout(p, self.cfg.attn_dropout, self.training)
        pooled = (pd.to(h.dtype)[..., None] * h).sum(1)  # (B, d)
        info = None
        if stats:
            ent = softmax_entropy(logits.float(), p)  # (B,)
            info = AttnStats(entropy=ent[:, None, None],  # (B, 1, 1): one layer, one head
                             max_logit=logits.masked_fill(~seen, -1e30).amax().float())
        return h, pooled, info


def init_weights(model: AttentionModel, cfg: TrialConfig) -> None:
    """Initialize Linear/Embedding weights by `cfg.init`, scaled by `cfg.init_scale`.

    - xavier_uniform: Glorot & Bengio 2010.
    - normal_002: N(0, 0.02) as in GPT-2, residual output projections scaled by 1/sqrt(2L).
    - small_init: N(0, sqrt(2 / (5 d))) (Nguyen & Salazar 2019, "Transformers without Tears").
    - deepnorm: Xavier with gain beta = (8L)^(-1/4) on value, output and MLP weights
      (Wang et al. 2022, DeepNet); the matching residual alpha lives in `Block`.
    A Linear's `init_role` (see `InitRole`) picks its gain; biases start at zero. LSTM weights
    keep PyTorch's default initialization; low-rank attention's sequence projections keep
    their N(0, 1/rank) draw (Linformer's random projection), times `init_scale` too.
    """
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
    for mod in model.modules():
        if isinstance(mod, Attention) and mod.low_rank:
            with torch.no_grad():  # scaled in place: the draw (and every later one) is kept
                mod.proj_k.mul_(s)
                mod.proj_v.mul_(s)
        elif isinstance(mod, nn.Embedding):
            fill(mod.weight)
        elif isinstance(mod, nn.Linear):
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
            role: InitRole | None = getattr(mod, "init_role", None)
            if role == "qkv":
                for i, g in enumerate((1.0, 1.0, deep)):  # q, k, v: init each slice alone
                    fill(mod.weight[i * d:(i + 1) * d], g)
            elif role == "resid_out":
                fill(mod.weight, deep * resid_gain)
            elif role == "mlp_in":
                fill(mod.weight, deep)
            else:
                fill(mod.weight)


def build_model(cfg: TrialConfig, spec: ModelSpec) -> AttentionModel:
    """Build the model, refusing choices the task's inputs or outputs make impossible."""
    if spec.per_token and cfg.arch == "lstm_attention":
        raise ConfigError("arch: lstm_attention pools a sequence into one label, but task "
                          f"{cfg.task} needs per-token outputs; use arch=transformer")
    if spec.vocab_size == 0 and spec.max_len < cfg.patch_size:
        raise ConfigError(f"patch_size: {cfg.patch_size} exceeds the input length {spec.max_len}")
    return AttentionModel(cfg, spec)
