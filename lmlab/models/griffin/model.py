"""The `griffin` family (lmlab.models.family): Griffin / RecurrentGemma as a language model.

Residual blocks in the pattern (recurrent, recurrent, attention), embeddings scaled by
sqrt(width) rounded to bfloat16 (as both references do), a final RMSNorm, the output head
tied to the embedding and soft-capped: logits = 30 · tanh(logits / 30). Layers and the cache
are in layers.py and cache.py.

    from lmlab.models.griffin import Griffin, resolve_griffin_config
    model = Griffin(resolve_griffin_config({"preset": "tiny"}, vocab_size=32768))
    logits, _ = model(idx)                                   # (B, T, V)
    _, loss = model(x, y, return_logits=False)               # fused, soft-capped cross entropy
    _, loss = model(x, y, doc_ids=doc_ids)                   # packed documents: state resets,
                                                             # conv and attention stay inside
    cache = model.new_cache(B, max_len)                      # O(1) state + a ring of 2048 keys
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.models.fused_ce import lm_outputs
from lmlab.models.griffin.cache import GriffinCache
from lmlab.models.griffin.config import GriffinConfig, resolve_griffin_config
from lmlab.models.griffin.layers import RGLRU, RMSNorm, ResidualBlock, init_weights, rope_inv_freq, rope_tables


@dataclass
class _Step:
    """What every block of one forward needs, computed once."""

    starts: torch.Tensor            # (B, T) document starts (state resets)
    valid: Optional[torch.Tensor]   # (B, T) False on left padding (cache with left_pad), else None
    cos: torch.Tensor
    sin: torch.Tensor
    mask: Optional[torch.Tensor]    # attention mask, None = plain causal
    abs_pos: Optional[torch.Tensor] = None  # (T,) absolute positions, with a cache


def _segment_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token inside its document (0 at each document's first token)."""
    T = doc_ids.shape[1]
    ar = torch.arange(T, device=doc_ids.device)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, ar[None, :], torch.zeros_like(ar)[None, :]).cummax(dim=1).values
    return ar[None, :] - first


class Griffin(nn.Module):
    family = "griffin"
    # LoRA's default targets (lmlab.models.lora): every linear layer, under transformers' names
    lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "linear_x", "linear_y", "linear_out",
                    "gate_proj", "up_proj", "down_proj"]
    # never weight-decayed (lmlab.train.optim), as the reference's finetuning: the RG-LRU's
    # parameters (besides embeddings, biases and norm scales, which no family decays)
    no_decay_patterns = (".rg_lru.",)

    def __init__(self, cfg: GriffinConfig | dict):
        super().__init__()
        cfg = resolve_griffin_config(cfg)
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.blocks = nn.ModuleList(ResidualBlock(cfg, kind) for kind in cfg.block_types)
        self.final_norm = RMSNorm(cfg.width, cfg.norm_eps)
        # sqrt(width) rounded to bfloat16, as recurrentgemma (a bf16 constant) and transformers
        # (a bf16 `normalizer` buffer) both do: 50.5 rather than 50.596 for the 2B model.
        self.embed_scale = (float(torch.tensor(math.sqrt(cfg.width), device="cpu").to(torch.bfloat16).float())
                            if cfg.embeddings_scale_by_sqrt_dim else 1.0)
        self._inv_freq: dict = {}  # device -> RoPE frequencies (not a buffer: model.to(bf16) must not round them)
        self.reset_parameters()

    def _rope(self, positions: torch.Tensor, dtype):
        inv = self._inv_freq.get(positions.device)
        if inv is None:
            with torch.inference_mode(False):  # usable by a later training forward (GRPO generates, then trains)
                inv = self._inv_freq[positions.device] = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta,
                                                                       positions.device)
        return rope_tables(positions, inv, dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.embed_tokens.weight, 0.0, math.sqrt(1.0 / self.cfg.width))
        for block in self.blocks:
            init_weights(block, self.cfg)
        self.final_norm.weight.zero_()

    # --- sizes

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 × (weights in matmuls: linears, the RG-LRU's block-diagonal
        gates and the tied head) + attention's QK^T and AV over the window (12 · width · keys)."""
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        n_matmul += sum(g.input_gate_weight.numel() + g.recurrent_gate_weight.numel()
                        for g in self.modules() if isinstance(g, RGLRU))
        n_matmul += self.embed_tokens.weight.numel()
        n_attn = sum(1 for k in self.cfg.block_types if k == "attention")
        keys = min(seq_len, self.cfg.attention_window_size + 1)
        return 6.0 * n_matmul + 12.0 * n_attn * self.cfg.width * keys

    @property
    def max_context(self) -> None:
        """None: a recurrence and a local window, not bounded by a context length."""
        return None

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None,
                  left_pad: Optional[Sequence[int]] = None) -> GriffinCache:
        p = self.embed_tokens.weight
        return GriffinCache(self.cfg, batch, max_len, device or p.device, dtype or p.dtype, left_pad=left_pad)

    # --- forward

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied, soft-capped output head: cap · tanh((h @ E^T) / cap)."""
        return self._logits(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        # forward calls the private bodies of `hidden` and `logits`: FSDP2 hooks each public
        # entry point (register_fsdp_forward_method), and its hooks must not nest
        z = F.linear(h, self.embed_tokens.weight)
        c = self.cfg.logits_soft_cap
        return torch.tanh(z / c) * c if c else z

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                doc_ids: Optional[torch.Tensor] = None, cache: Optional[GriffinCache] = None,
                return_logits: bool = True, last_only: bool = False,
                logits_at: Optional[torch.Tensor] = None):
        """As Transformer.forward (lmlab.models.family): (logits or None, loss or None)."""
        x = self._hidden(idx, doc_ids=doc_ids, cache=cache)
        return lm_outputs(x, targets, head=self._logits, weight=self.embed_tokens.weight,
                          softcap=self.cfg.logits_soft_cap, return_logits=return_logits, last_only=last_only,
                          logits_at=logits_at)

    def hidden(self, idx: torch.Tensor, *, doc_ids: Optional[torch.Tensor] = None,
               cache: Optional[GriffinCache] = None) -> torch.Tensor:
        """idx (B, T) -> final hidden states (B, T, width), after the final norm."""
        return self._hidden(idx, doc_ids=doc_ids, cache=cache)

    def _step(self, B: int, T: int, device, dtype, doc_ids, cache) -> _Step:
        c = self.cfg
        if cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids and cache cannot be combined")
            if cache.pos + T > cache.max_len:
                raise ValueError(f"cache full: {cache.pos} + {T} > {cache.max_len}")
            abs_pos = torch.arange(cache.pos, cache.pos + T, device=device)
            seg = abs_pos[None].expand(B, T)
            valid = None
            if cache.left_pad is not None:
                seg = seg - cache.left_pad.to(device)[:, None]
                valid = seg >= 0
            cos, sin = self._rope(seg.clamp_min(0), dtype)
            return _Step(seg == 0, valid, cos, sin, cache.step_mask(abs_pos), abs_pos)
        ar = torch.arange(T, device=device)
        if doc_ids is not None:
            seg = _segment_positions(doc_ids)
            same = doc_ids[:, :, None] == doc_ids[:, None, :]
            near = (ar[None, :] <= ar[:, None]) & (ar[:, None] - ar[None, :] <= c.attention_window_size)
            mask = (same & near[None])[:, None]
        else:
            seg = ar[None].expand(B, T)
            mask = None
            if T > c.attention_window_size + 1:  # a band: each token sees the window before it
                mask = ((ar[None, :] <= ar[:, None]) & (ar[:, None] - ar[None, :] <= c.attention_window_size))
        cos, sin = self._rope(seg, dtype)
        return _Step(seg == 0, None, cos, sin, mask)

    def _hidden(self, idx, *, doc_ids=None, cache=None) -> torch.Tensor:
        B, T = idx.shape
        x = self.embed_tokens(idx)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        device = idx.device
        dtype = x.dtype if not torch.is_autocast_enabled(device.type) else torch.get_autocast_dtype(device.type)
        step = self._step(B, T, device, dtype, doc_ids, cache)
        for i, block in enumerate(self.blocks):
            x = block(x, step, cache, i)
        if cache is not None:
            cache.advance(step.abs_pos)
        return self.final_norm(x)
