"""Griffin's decoding state, built by the model for the shared engine (lmlab.infer.engine).

Per recurrent layer a constant-size state: the RG-LRU's hidden state (B, lru_width) in
float32 and the conv's last W-1 inputs (B, W-1, lru_width). Per attention layer a ring
buffer of the last R = min(attention_window_size, max_len) keys and values (one head each):
the window is all a token attends to, so memory stays flat however long decoding runs. The
ring is unordered; `slot_pos` holds each slot's absolute position (-1 = empty), and the
attention mask is built from positions, never from slot order.

`left_pad[i]` leading positions of row i are padding (left-padded prompts of different
lengths): the recurrent branch's input is zeroed there and the state resets at the row's
first real token, padding keys are masked, and RoPE positions start after the padding, so a
padded row computes what it would alone.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from lmlab.models.parts import left_pad_tensor


class GriffinCache:
    def __init__(self, cfg, batch: int, max_len: int, device, dtype, left_pad: Optional[Sequence[int]] = None):
        self.max_len, self.pos = max_len, 0
        self.window = cfg.attention_window_size
        self.ring = max(1, min(self.window, max_len))
        L, hd, W = cfg.lru_width, cfg.head_dim, cfg.conv1d_width
        self.conv: dict[int, torch.Tensor] = {}
        self.rg_state: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for i, kind in enumerate(cfg.block_types):
            if kind == "recurrent":
                self.conv[i] = torch.zeros(batch, W - 1, L, device=device, dtype=dtype)
                self.rg_state[i] = torch.zeros(batch, L, device=device, dtype=torch.float32)
            else:
                self.k[i] = torch.zeros(batch, 1, self.ring, hd, device=device, dtype=dtype)
                self.v[i] = torch.zeros(batch, 1, self.ring, hd, device=device, dtype=dtype)
        self.slot_pos = torch.full((self.ring,), -1, dtype=torch.long, device=device)
        self._batch = batch
        self.left_pad: Optional[torch.Tensor] = left_pad_tensor(left_pad, batch, device)

    @property
    def batch(self) -> int:
        return self._batch

    def _pads(self) -> torch.Tensor:
        return self.left_pad if self.left_pad is not None else torch.zeros(self._batch, dtype=torch.long,
                                                                           device=self.slot_pos.device)

    def _shift(self, d: int) -> None:
        """Renumber every position by +d (d < 0 drops leading positions all rows pad). Only
        differences of positions and position - left_pad (RoPE, the reset) enter the maths, so
        rows compute the same; a ring slot follows its position (slot = position mod ring)."""
        if d == 0:
            return
        self.pos += d
        pads = self._pads() + d
        self.left_pad = pads if bool((pads > 0).any()) else None
        moved = torch.where(self.slot_pos >= 0, self.slot_pos + d, self.slot_pos)
        self.slot_pos = torch.roll(torch.where(moved >= 0, moved, -1), d)
        for d_ in (self.k, self.v):
            for i in d_:
                d_[i] = torch.roll(d_[i], d, dims=2)

    def _compact(self) -> None:
        if self._batch and self.left_pad is not None:
            self._shift(-int(self.left_pad.min()))

    def select(self, rows: Sequence[int] | torch.Tensor) -> None:
        """Keep only batch rows `rows` (in that order), e.g. to drop finished sequences."""
        sel = torch.as_tensor(rows, dtype=torch.long, device=self.slot_pos.device)
        for d in (self.conv, self.rg_state, self.k, self.v):
            for i in d:
                d[i] = d[i].index_select(0, sel)
        if self.left_pad is not None:
            self.left_pad = self.left_pad.index_select(0, sel)
        self._batch = len(sel)
        self._compact()

    def merge(self, other: "GriffinCache") -> None:
        """Append `other`'s rows (a cache of the same model and ring size, e.g. newly prefilled
        prompts): the side with fewer positions is renumbered to end where the other ends (its
        rows gain left padding), so every row decodes on as it did alone."""
        if other.ring != self.ring:
            raise ValueError(f"cannot merge Griffin caches with rings of {self.ring} and {other.ring} slots "
                             f"(build both with the same max_len)")
        self._compact(), other._compact()
        end = max(self.pos, other.pos)
        self._shift(end - self.pos), other._shift(end - other.pos)
        pads = torch.cat([self._pads(), other._pads()])
        for mine, theirs in ((self.conv, other.conv), (self.rg_state, other.rg_state), (self.k, other.k),
                             (self.v, other.v)):
            for i in mine:
                mine[i] = torch.cat([mine[i], theirs[i]])
        # a slot holds the same position in both (or is empty on one side, where that position
        # is padding for that side's rows)
        self.slot_pos = torch.maximum(self.slot_pos, other.slot_pos)
        self._batch += other._batch
        self.max_len = max(self.max_len, other.max_len)
        self.left_pad = pads if bool((pads > 0).any()) else None

    # --- used by the model during one forward over T new tokens

    def step_mask(self, abs_pos: torch.Tensor) -> torch.Tensor:
        """(B or 1, 1, T, R+T) bool: which of [ring slots, new tokens] each new token attends to."""
        key_pos = torch.cat([self.slot_pos, abs_pos])                               # (R+T,)
        q = abs_pos[:, None]
        ok = (key_pos[None] >= 0) & (key_pos[None] <= q) & (q - key_pos[None] <= self.window)  # (T, R+T)
        if self.left_pad is not None:
            ok = ok[None] & (key_pos[None, None] >= self.left_pad[:, None, None])             # (B, T, R+T)
            # a padding token sees only itself, so its (unused) output stays finite
            itself = torch.zeros_like(ok[0])
            itself[:, self.ring:] = torch.eye(len(abs_pos), dtype=torch.bool, device=ok.device)
            ok = ok | itself[None]
        else:
            ok = ok[None]
        return ok[:, None]

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor, abs_pos: torch.Tensor):
        """-> (keys, values) for attention over the ring plus the new (B, 1, T, hd) k/v (in the
        order `step_mask` describes), then store the newest keys in the ring."""
        keys = torch.cat([self.k[layer], k.to(self.k[layer].dtype)], 2)
        values = torch.cat([self.v[layer], v.to(self.v[layer].dtype)], 2)
        n = min(k.shape[2], self.ring)
        slots = abs_pos[-n:] % self.ring
        self.k[layer][:, :, slots] = k[:, :, -n:].to(self.k[layer].dtype)
        self.v[layer][:, :, slots] = v[:, :, -n:].to(self.v[layer].dtype)
        return keys.to(k.dtype), values.to(v.dtype)

    def advance(self, abs_pos: torch.Tensor) -> None:
        n = min(len(abs_pos), self.ring)
        self.slot_pos[abs_pos[-n:] % self.ring] = abs_pos[-n:]
        self.pos += len(abs_pos)
