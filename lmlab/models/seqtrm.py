"""SequenceTRM: a tiny recursive reasoner over a frozen LLM's compressed hidden states (LLM-TRM's
phase 2; docs/llm_trm.md). It reads the compressed states of a prompt and predicts the compressed
state the LLM reaches after thinking (at `</think>`).

    from lmlab.models.seqtrm import SequenceTRM, SeqTRMConfig
    m = SequenceTRM(SeqTRMConfig(d=64))
    y, z = m.initial_state(x, mask)                 # x (B, L, d) compressed context, mask (B, L) True = real
    (y, z), pred, q = m.supervision_step(x, mask, y, z)   # one deep recursion: pred (B, d), q (B,)

The recursion is TRM's (Jolicoeur-Martineau 2025) over sequences of vectors instead of tokens:
- a learned reasoning token is appended to the context; the prediction is read out at it;
- one shared network `f` updates the latent z with the context, `z <- f(z + y + x)` `n` times,
  then the answer `y <- f(y + z)`; that is one latent recursion;
- a deep recursion is `T` latent recursions, of which only the last keeps gradients (the others
  run under no_grad); it returns (y, z) detached, the prediction and the halting value `q`
  (a head on the reasoning token's y);
- training runs up to `n_sup` deep recursions per example, each its own optimizer step, the
  state carried from one to the next (lmlab/train's objective does that).

Two block variants: `trm`, the paper's (post-norm RMSNorm without gain, RoPE, SwiGLU, learned
initial y and z), and `prototype`, the public LLM-TRM prototype's (pre-norm RMSNorm, GELU MLP, no
positions, dropout, zero initial states). Both attend bidirectionally over the real positions
only: padding is masked as a key, and each row's RoPE positions start at its first real
position, so a row computes the same whatever it is batched with.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from lmlab.config import Strict
from lmlab.models.trm.layers import Linear, SwiGLU, rms_norm, trunc_normal_


class SeqTRMConfig(Strict):
    d: int = Field(64, ge=8, description="width: the compressor's D'")
    block: Literal["trm", "prototype"] = Field("trm", description="trm: the paper's post-norm RMSNorm, RoPE, "
                                               "SwiGLU, learned initial states; prototype: pre-norm, GELU, no "
                                               "positions, dropout, zero initial states")
    layers: int = Field(2, ge=1, description="blocks in the shared network")
    heads: int = Field(4, ge=1, description="attention heads (must divide d)")
    expansion: float = Field(4.0, gt=0, description="MLP width / d")
    n: int = Field(6, ge=1, description="latent steps per recursion (z updates before each y update)")
    T: int = Field(3, ge=1, description="latent recursions per deep recursion (the last one keeps gradients)")
    n_sup: int = Field(16, ge=1, description="deep recursions (supervision steps) per example at most")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in the prototype block")
    max_len: int = Field(1024, ge=2, description="longest context + 1 (the RoPE tables)")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, H, hd); cos/sin (B, L, hd) per row's positions."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos[:, :, None] + rot * sin[:, :, None]).to(x.dtype)


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if d % heads or (d // heads) % 2:
            raise ValueError(f"heads={heads} must divide d={d} into an even head size")
        self.heads, self.hd, self.dropout = heads, d // heads, dropout
        self.qkv = Linear(d, 3 * d)
        self.o = Linear(d, d)

    def forward(self, x, keys: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]]):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.hd).unbind(2)
        if rope is not None:
            q, k = _rope(q, *rope), _rope(k, *rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=keys[:, None, None, :],
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class _TRMBlock(nn.Module):
    """The paper's: x = norm(x + attn(x)); x = norm(x + swiglu(x)), RMSNorm without gain."""

    def __init__(self, cfg: SeqTRMConfig):
        super().__init__()
        self.eps = cfg.eps
        self.attn = _Attention(cfg.d, cfg.heads)
        self.mlp = SwiGLU(cfg.d, cfg.expansion)

    def forward(self, x, keys, rope):
        x = rms_norm(x + self.attn(x, keys, rope), self.eps)
        return rms_norm(x + self.mlp(x), self.eps)


class _PrototypeBlock(nn.Module):
    """The prototype's: x = x + attn(norm(x)); x = x + mlp(norm(x)), a GELU MLP, dropout, no positions."""

    def __init__(self, cfg: SeqTRMConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d, eps=cfg.eps), nn.RMSNorm(cfg.d, eps=cfg.eps)
        self.attn = _Attention(cfg.d, cfg.heads, cfg.dropout)
        inner = int(cfg.d * cfg.expansion)
        self.mlp = nn.Sequential(Linear(cfg.d, inner), nn.GELU(), nn.Dropout(cfg.dropout), Linear(inner, cfg.d),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x, keys, rope):
        x = x + self.attn(self.norm1(x), keys, None)
        return x + self.mlp(self.norm2(x))


class SequenceTRM(nn.Module):
    def __init__(self, cfg: SeqTRMConfig | dict):
        super().__init__()
        cfg = cfg if isinstance(cfg, SeqTRMConfig) else SeqTRMConfig(**cfg)
        self.cfg = cfg
        block = _TRMBlock if cfg.block == "trm" else _PrototypeBlock
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.layers))
        self.reason = nn.Parameter(trunc_normal_(torch.empty(cfg.d), std=1.0))  # the reasoning token
        learned = cfg.block == "trm"
        self.y_init = nn.Parameter(trunc_normal_(torch.empty(cfg.d), std=1.0), requires_grad=learned)
        self.z_init = nn.Parameter(trunc_normal_(torch.empty(cfg.d), std=1.0), requires_grad=learned)
        if not learned:
            with torch.no_grad():
                self.y_init.zero_(), self.z_init.zero_()
        self.readout = Linear(cfg.d, cfg.d)
        self.q_head = Linear(cfg.d, 1, bias=True)
        with torch.no_grad():  # halting starts undecided
            self.q_head.weight.zero_()
        hd = cfg.d // cfg.heads
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        freqs = torch.outer(torch.arange(cfg.max_len, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ inputs

    def inputs(self, x: torch.Tensor, mask: torch.Tensor):
        """(context + reasoning token (B, L+1, d), key mask (B, L+1), RoPE tables or None). `x` is
        left-padded (`mask` True at real positions, each row's last one real), so the reasoning
        token, appended as the last slot, follows every row's context directly."""
        if not bool(mask[:, -1].all()):
            raise ValueError("contexts must be left-padded: every row's last position real")
        b, length, _ = x.shape
        if length + 1 > self.cfg.max_len:
            raise ValueError(f"a context of {length} positions does not fit max_len={self.cfg.max_len}")
        xs = torch.cat([x, self.reason.to(x.dtype).expand(b, 1, -1)], dim=1)
        keys = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        rope = None
        if self.cfg.block == "trm":
            pad = (~keys).sum(1, keepdim=True)
            pos = (torch.arange(length + 1, device=x.device)[None] - pad).clamp_min(0)
            rope = (self.cos[pos], self.sin[pos])
        return xs, keys, rope

    def initial_state(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, length, d = x.shape
        shape = (b, length + 1, d)
        return self.y_init.to(x.dtype).expand(shape).clone(), self.z_init.to(x.dtype).expand(shape).clone()

    # ------------------------------------------------------------------ recursion

    def net(self, h, keys, rope):
        for blk in self.blocks:
            h = blk(h, keys, rope)
        return h

    def latent_recursion(self, xs, y, z, keys, rope):
        for _ in range(self.cfg.n):
            z = self.net(z + y + xs, keys, rope)
        return self.net(y + z, keys, rope), z

    def supervision_step(self, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, z: torch.Tensor):
        """One deep recursion from the carried (y, z): ((y, z) detached, prediction (B, d), q (B,))."""
        xs, keys, rope = self.inputs(x, mask)
        with torch.no_grad():
            for _ in range(self.cfg.T - 1):
                y, z = self.latent_recursion(xs, y, z, keys, rope)
        y, z = self.latent_recursion(xs, y, z, keys, rope)
        top = y[:, -1]
        return (y.detach(), z.detach()), self.readout(top), self.q_head(top).squeeze(-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, z: torch.Tensor):
        """The supervision step (what a DDP wrapper calls)."""
        return self.supervision_step(x, mask, y, z)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, mask: torch.Tensor, steps: Optional[int] = None) -> list[tuple]:
        """All `steps` (default n_sup) supervision steps from the initial state: [(prediction, q)] per step."""
        y, z = self.initial_state(x, mask)
        out = []
        for _ in range(steps or self.cfg.n_sup):
            (y, z), pred, q = self.supervision_step(x, mask, y, z)
            out.append((pred, q))
        return out


def left_pad(seqs: list[torch.Tensor], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (B, W, d), mask (B, W)) of sequences (len_i, d), right-aligned."""
    width = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), width, seqs[0].shape[-1])
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, width - len(s):] = s
        mask[i, width - len(s):] = True
    return x.to(device), mask.to(device)


def halting(q: torch.Tensor, mode: str, threshold: float) -> torch.Tensor:
    """Whether the halting head says stop: an estimated cosine at the threshold, or a positive logit."""
    return q >= threshold if mode == "mse_cosine" else q > 0
