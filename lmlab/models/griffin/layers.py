"""Griffin's layers, as Google DeepMind's reference defines them (recurrentgemma, its torch
part), with the parameter names and shapes of transformers' RecurrentGemma so checkpoints
move between the two by renaming only.

- RMSNorm multiplies by (1 + weight): the weight starts at zero.
- The MLP is gated: gelu_tanh(gate_proj(x)) * up_proj(x) -> down_proj, all with biases.
- The recurrent block has two branches from the normalised input: gelu_tanh(linear_y(x)), and
  linear_x(x) -> a depthwise causal conv of width 4 that never reads across a document
  start -> the RG-LRU; their product goes through linear_out.
- The RG-LRU: block-diagonal input and recurrence gates (num_heads blocks), a = exp(-8 · r ·
  softplus(Λ)), the input scaled by sqrt(1 - a²) (1 at a document start, where the state
  resets), the square root's gradient bounded as the reference bounds it, the recurrence
  run by the chunked scan (lmlab.models.griffin.scan) with a float32 state.
- Local multi-query attention: num_heads query heads, one key/value head, RoPE on the first
  half of each head, a window of `attention_window_size` earlier tokens plus the token itself.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.models.griffin.config import GriffinConfig
from lmlab.models.griffin.scan import linear_scan

_MAX_SQRT_GRADIENT = 1000.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32, as transformers does; equal to the reference (which stays in x's dtype) in fp32.
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())
        return out.to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, cfg: GriffinConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_expanded_width)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_expanded_width)
        self.down_proj = nn.Linear(cfg.mlp_expanded_width, cfg.width)

    def forward(self, x):
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class _SqrtBoundDerivative(torch.autograd.Function):
    """sqrt(x) whose gradient is at most _MAX_SQRT_GRADIENT (the reference's guard against
    infinite gradients where a -> 1, which would turn bfloat16 training into NaNs)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / torch.sqrt(torch.clamp(4.0 * x, min=1.0 / _MAX_SQRT_GRADIENT ** 2))


class Conv1D(nn.Module):
    """Depthwise causal conv over time: out_t = b + sum_k weight[:, 0, k] x_{t-(W-1)+k}.

    `weight` has nn.Conv1d's depthwise shape (channels, 1, W) as in transformers. Inputs
    from before the current document's start are left out (the reference's document mask),
    so packed documents and left padding never leak into each other.
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, starts: torch.Tensor, state: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C); starts (B, T) document starts; state (B, W-1, C): the inputs before x
        (zeros before a sequence, and for left padding, which the caller zeroes).
        -> (out (B, T, C), the new state: the last W-1 inputs)."""
        B, T, C = x.shape
        W = self.width
        if state is None:
            state = x.new_zeros(B, W - 1, C)
        xs = torch.cat([state.to(x.dtype), x], 1)                                  # (B, W-1+T, C)
        w = self.weight[:, 0].to(x.dtype)                                           # (C, W)
        if T == 1:
            # one token (decoding): its window is the state, which holds only its document's
            # inputs (zeros before a sequence or after padding), so no mask; one fused product
            return (xs * w.t()).sum(1, keepdim=True) + self.bias.to(x.dtype), xs[:, 1:]
        out = x * w[:, W - 1] + self.bias.to(x.dtype)
        keep = torch.ones(B, T, dtype=torch.bool, device=x.device)
        for k in range(1, W):
            # input t-k is in token t's document when no document starts in (t-k, t]
            keep = keep & ~_shift(starts, k - 1)
            out = out + xs[:, W - 1 - k:W - 1 - k + T] * (keep[..., None].to(x.dtype) * w[:, W - 1 - k])
        return out, xs[:, xs.shape[1] - (W - 1):]


def _shift(starts: torch.Tensor, k: int) -> torch.Tensor:
    """starts shifted right by k along time (False where nothing precedes)."""
    if k == 0:
        return starts
    return F.pad(starts[:, :-k], (k, 0), value=False) if k < starts.shape[1] else torch.zeros_like(starts)


class RGLRU(nn.Module):
    """The Real-Gated Linear Recurrent Unit (Griffin paper, eq. 1-4; c = 8)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads, self.block_width = num_heads, width // num_heads
        self.recurrent_param = nn.Parameter(torch.empty(width))
        self.input_gate_weight = nn.Parameter(torch.empty(num_heads, self.block_width, self.block_width))
        self.input_gate_bias = nn.Parameter(torch.zeros(num_heads, self.block_width))
        self.recurrent_gate_weight = nn.Parameter(torch.empty(num_heads, self.block_width, self.block_width))
        self.recurrent_gate_bias = nn.Parameter(torch.zeros(num_heads, self.block_width))

    def _gate(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        xb = x.unflatten(-1, (self.num_heads, self.block_width))
        return torch.sigmoid((torch.einsum("bthi,hij->bthj", xb, w.to(x.dtype)) + b.to(x.dtype)).flatten(-2))

    def forward(self, x: torch.Tensor, starts: torch.Tensor, h0: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, L), starts (B, T) document starts (the state resets there), h0 (B, L) float32.
        -> (y (B, T, L) in x's dtype, last state (B, L) float32)."""
        gate_x = self._gate(x, self.input_gate_weight, self.input_gate_bias)
        gate_a = self._gate(x, self.recurrent_gate_weight, self.recurrent_gate_bias)
        # the recurrence in float32 whatever the activations: log a can be large and negative
        log_a = -8.0 * gate_a.float() * F.softplus(self.recurrent_param.float())
        a = torch.exp(log_a)
        reset = starts[..., None]
        root = (_SqrtBoundDerivative.apply if torch.is_grad_enabled() else torch.sqrt)(1.0 - torch.exp(2.0 * log_a))
        multiplier = torch.where(reset, torch.ones_like(a), root)
        normalized = (x * gate_x).float() * multiplier
        a = a * ~reset
        h, last = linear_scan(a, normalized, h0)
        return h.to(x.dtype), last


class RecurrentBlock(nn.Module):
    def __init__(self, cfg: GriffinConfig):
        super().__init__()
        self.linear_y = nn.Linear(cfg.width, cfg.lru_width)
        self.linear_x = nn.Linear(cfg.width, cfg.lru_width)
        self.linear_out = nn.Linear(cfg.lru_width, cfg.width)
        self.conv_1d = Conv1D(cfg.lru_width, cfg.conv1d_width)
        self.rg_lru = RGLRU(cfg.lru_width, cfg.num_heads)

    def forward(self, x, ctx, cache=None, layer: int = 0):
        y = gelu_tanh(self.linear_y(x))
        xb = self.linear_x(x)
        if ctx.valid is not None:  # left padding: zero, as if nothing came before the prompt
            xb = xb * ctx.valid[..., None].to(xb.dtype)
        if cache is None:
            xb, _ = self.conv_1d(xb, ctx.starts)
            xb, _ = self.rg_lru(xb, ctx.starts)
        else:
            xb, new_state = self.conv_1d(xb, ctx.starts, cache.conv[layer])
            xb, h = self.rg_lru(xb, ctx.starts, cache.rg_state[layer])
            cache.conv[layer], cache.rg_state[layer] = new_state, h
        return self.linear_out(xb * y)


class LocalAttention(nn.Module):
    def __init__(self, cfg: GriffinConfig):
        super().__init__()
        self.num_heads, self.head_dim, self.window = cfg.num_heads, cfg.head_dim, cfg.attention_window_size
        self.q_proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.width, cfg.width, bias=True)

    def forward(self, x, ctx, cache=None, layer: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, 1, self.head_dim)
        v = self.v_proj(x).view(B, T, 1, self.head_dim)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, H, T, hd), (B, 1, T, hd)
        mask = ctx.mask  # with a cache: over [ring slots, new tokens] (GriffinCache.step_mask)
        if cache is not None:
            k, v = cache.attend(layer, k, v, ctx.abs_pos)
        if T == 1 and cache is not None:
            y = _one_query(q, k, v, mask)
        else:  # scale 1/sqrt(head_dim) and a float32 softmax (SDPA accumulates in float32), as the reference
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


def _one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Decoding attention for one new token: q (B, H, 1, hd) against the one key/value head
    (B, 1, S, hd) as two small matmuls. SDPA's kernels cost more than the work at this size."""
    B, H, _, hd = q.shape
    scores = torch.matmul(q.reshape(B, 1, H, hd), k.transpose(-1, -2)).float() * hd ** -0.5   # (B, 1, H, S)
    scores = scores.masked_fill(~mask.reshape(mask.shape[0], 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, H, 1, hd)


def rope_inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    """The reference's RoPE frequencies on the first half of each head: 1 / theta^(2i / (head_dim/2))."""
    rot = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float32, device=device) / rot))


def rope_tables(positions: torch.Tensor, inv: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (B, T, 1, head_dim/2) at `positions` (B, T), each frequency used for a pair of dims."""
    ang = positions.float()[..., None] * inv                     # (B, T, rot/2)
    ang = torch.cat([ang, ang], -1)[:, :, None]                  # (B, T, 1, rot)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, hd): the first hd/2 dims rotated in halves (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    rot = cos.shape[-1]
    xr, rest = x[..., :rot], x[..., rot:]
    x1, x2 = xr.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], -1)
    return torch.cat([xr * cos + rotated * sin, rest], -1)


class ResidualBlock(nn.Module):
    def __init__(self, cfg: GriffinConfig, block_type: str):
        super().__init__()
        self.block_type = block_type
        self.temporal_pre_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.temporal_block = RecurrentBlock(cfg) if block_type == "recurrent" else LocalAttention(cfg)
        self.channel_pre_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.mlp_block = MLP(cfg)

    def forward(self, x, ctx, cache=None, layer: int = 0):
        x = x + self.temporal_block(self.temporal_pre_norm(x), ctx, cache, layer)
        return x + self.mlp_block(self.channel_pre_norm(x))


@torch.no_grad()
def init_weights(block: ResidualBlock, cfg: GriffinConfig) -> None:
    """The reference's initialisation (recurrentgemma torch modules' reset_parameters)."""
    final_scale = 2.0 / cfg.n_layer
    normal = lambda p, var: nn.init.normal_(p, 0.0, math.sqrt(var))  # noqa: E731
    block.temporal_pre_norm.weight.zero_()
    block.channel_pre_norm.weight.zero_()
    t = block.temporal_block
    if isinstance(t, RecurrentBlock):
        normal(t.linear_x.weight, 1.0 / cfg.width)
        normal(t.linear_y.weight, 1.0 / cfg.width)
        normal(t.linear_out.weight, final_scale / cfg.lru_width)
        for lin in (t.linear_x, t.linear_y, t.linear_out):
            lin.bias.zero_()
        normal(t.conv_1d.weight, 0.01 / cfg.conv1d_width)
        t.conv_1d.bias.zero_()
        g = t.rg_lru
        normal(g.input_gate_weight, 1.0 / g.block_width)
        normal(g.recurrent_gate_weight, 1.0 / g.block_width)
        g.input_gate_bias.zero_()
        g.recurrent_gate_bias.zero_()
        # a uniform on the ring [0.9, 0.999] in area, stored through softplus's inverse
        r = torch.empty_like(g.recurrent_param).uniform_(0.9 ** 2 + 1e-8, 0.999 ** 2 + 1e-8).log_().mul_(0.5)
        g.recurrent_param.copy_(r.neg_().exp_().sub_(1.0).log_())
    else:
        for lin in (t.q_proj, t.k_proj, t.v_proj):
            normal(lin.weight, 1.0 / cfg.width)
        normal(t.o_proj.weight, final_scale / cfg.width)
        t.o_proj.bias.zero_()
    m = block.mlp_block
    normal(m.gate_proj.weight, 1.0 / cfg.width)
    normal(m.up_proj.weight, 1.0 / cfg.width)
    normal(m.down_proj.weight, final_scale / cfg.mlp_expanded_width)
    for lin in (m.gate_proj, m.up_proj, m.down_proj):
        lin.bias.zero_()
