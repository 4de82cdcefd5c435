"""TRM's building blocks: truncated-normal LeCun init, RMSNorm without gain, RoPE, bidirectional
attention, SwiGLU and the post-norm block (the paper's and the official code's choices).

Initialisation follows the official code (itself JAX/Flax's defaults): weights are drawn from a
normal truncated at +-2 std whose std is corrected so that the truncated distribution really
has the requested std (`trunc_normal_`; torch.nn.init.trunc_normal_ does not correct it), with
std 1/sqrt(fan_in) for linear layers, zero biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.trm.config import swiglu_width


def trunc_normal_(t: torch.Tensor, std: float = 1.0, lower: float = -2.0, upper: float = 2.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill `t` from N(0, s^2) truncated to [lower*s, upper*s], with s chosen so the result's std is `std`."""
    with torch.no_grad():
        if std == 0:
            return t.zero_()
        a, b = math.erf(lower / math.sqrt(2)), math.erf(upper / math.sqrt(2))
        z = (b - a) / 2
        c = (2 * math.pi) ** -0.5
        pdf_lo, pdf_hi = c * math.exp(-0.5 * lower ** 2), c * math.exp(-0.5 * upper ** 2)
        # the std of a standard normal truncated to [lower, upper]
        trunc_std = math.sqrt(1 - (upper * pdf_hi - lower * pdf_lo) / z - ((pdf_hi - pdf_lo) / z) ** 2)
        s = std / trunc_std
        t.uniform_(a, b, generator=generator).erfinv_().mul_(math.sqrt(2) * s).clamp_(lower * s, upper * s)
    return t


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a gain, computed in float32 and returned in x's dtype."""
    dtype = x.dtype
    x = x.float()
    return (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)).to(dtype)


class Linear(nn.Module):
    """A linear layer with the truncated LeCun init; weights follow the input's dtype (autocast-safe)."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(trunc_normal_(torch.empty(d_out, d_in), std=d_in ** -0.5))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the inner width is round(expansion * d * 2/3) rounded up to 256."""

    def __init__(self, d: int, expansion: float) -> None:
        super().__init__()
        inner = swiglu_width(d, expansion)
        self.gate_up = Linear(d, 2 * inner)
        self.down = Linear(inner, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Rotary(nn.Module):
    """cos/sin tables for RoPE in the half-split layout (rotate_half), as the official code."""

    def __init__(self, head_dim: int, positions: int, theta: float) -> None:
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, Dh); cos/sin (T, Dh). Computed in the tables' float32, returned in x's dtype."""
    dtype = x.dtype
    xf = x.to(cos.dtype)
    return (xf * cos.unsqueeze(-2) + _rotate_half(xf) * sin.unsqueeze(-2)).to(dtype)


class Attention(nn.Module):
    """Bidirectional multi-head attention (puzzles are solved whole: no causal mask)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.qkv = Linear(d, 3 * d)
        self.o = Linear(d, d)

    def forward(self, x: torch.Tensor, rope: Rotary | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).unbind(2)
        if rope is not None:
            q, k = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    """Post-norm: x = norm(x + mix(x)); x = norm(x + mlp(x)). `mix` is attention, or (mlp_t) a
    SwiGLU across the positions of each channel."""

    def __init__(self, d: int, heads: int, expansion: float, positions: int, mlp_t: bool, eps: float) -> None:
        super().__init__()
        self.eps = eps
        if mlp_t:
            self.mlp_t = SwiGLU(positions, expansion)
        else:
            self.attn = Attention(d, heads)
        self.mlp = SwiGLU(d, expansion)

    def forward(self, x: torch.Tensor, rope: Rotary | None) -> torch.Tensor:
        if hasattr(self, "mlp_t"):
            xt = x.transpose(1, 2)
            x = rms_norm(xt + self.mlp_t(xt), self.eps).transpose(1, 2)
        else:
            x = rms_norm(x + self.attn(x, rope), self.eps)
        return rms_norm(x + self.mlp(x), self.eps)
