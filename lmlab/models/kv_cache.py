"""The transformer's KV cache: keys and values for incremental decoding, and its attention-sink
mode for streaming past the context.

Sinks (StreamingLLM, Xiao et al. 2023): a cache built with `sinks=k` never fills. When a
forward would pass `max_len`, it evicts the oldest keys after each row's first k real
tokens (the sinks, which soak up attention mass the model learned to put on the first
tokens) and keeps the most recent ones. Positions are those within the cache, as
StreamingLLM defines them, so every RoPE position stays one the model was trained on. The
keys stored were rotated at their old slots; `evict` re-rotates the kept window keys back by
the number of positions evicted before them. RoPE is relative, so R(p - e) = R(-e) R(p),
and a kept key then equals the key computed at its new position. Its content stays what it
was computed from (the context it had, evicted tokens included), as in StreamingLLM. In a
one-layer model that context does not enter the keys, so there each step equals the model run
from scratch on [sinks, most recent window] (tested). Eviction runs in float32. Caches in
bf16/fp16 evict `max_len // 16` positions at a time, so a key is rounded after at most 16
rotations. Keys of layers without the rotary embedding (NoPE, `nope_layers`) carry no position
and are kept as they are.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from lmlab.models.parts import left_pad_tensor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Keys/values for incremental decoding, shared by all layers.

    `k`, `v`: (n_layer, B, n_kv_head, capacity, head_dim), capacity <= max_len: the buffer
    grows (doubling) as positions fill, and `select`/`merge` re-lay rows out into a buffer
    sized to what they hold, so their copies cost what is cached, not max_len (the server
    changes its batch often). `pos` is how many positions are filled. `left_pad` (B,)
    optionally says how many leading slots of each row are padding (batched prompts of
    different lengths): those keys are masked out and the row's RoPE positions start after
    them, so a padded row computes exactly what it would alone.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 device, dtype, left_pad: Optional[Sequence[int]] = None, sinks: Optional[int] = None,
                 nope_layers: Sequence[int] = ()):
        shape = (n_layer, batch, n_kv_head, 0, head_dim)  # capacity grows with the first forward
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.left_pad: Optional[torch.Tensor] = left_pad_tensor(left_pad, batch, device)
        if sinks is not None and not 0 <= sinks < max_len:
            raise ValueError(f"sinks={sinks} must be in [0, max_len={max_len})")
        self.sinks = sinks  # None: a plain cache that refuses to overflow
        self.evicted = 0    # positions evicted so far (sink mode)
        self.nope_layers = list(nope_layers)  # layers whose keys are not rotated (never re-rotated)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def _capacity(self, need: int) -> int:
        return min(self.max_len, max(need, 2 * self.k.shape[3], 64))

    def _grow(self, need: int) -> None:
        k = self.k.new_zeros((*self.k.shape[:3], self._capacity(need), self.k.shape[4]))
        v = torch.zeros_like(k)
        k[:, :, :, :self.pos], v[:, :, :, :self.pos] = self.k[:, :, :, :self.pos], self.v[:, :, :, :self.pos]
        self.k, self.v = k, v

    def _pads(self) -> torch.Tensor:
        return self.left_pad if self.left_pad is not None else torch.zeros(self.batch, dtype=torch.long,
                                                                           device=self.k.device)

    def _packed(self, caches: Sequence["KVCache"], rows: Sequence[Optional[torch.Tensor]]) -> None:
        """Become `rows` of `caches` (None: all of a cache's rows), each row keeping its keys and
        RoPE positions, with every leading position that all of them pad dropped: the new
        `pos` is the longest row, so finished long rows never hold the cache's end back."""
        ks, vs, pads = [], [], []
        for c, sel in zip(caches, rows):
            pad = c._pads()
            k, v = c.k[:, :, :, :c.pos], c.v[:, :, :, :c.pos]
            if sel is not None:
                k, v, pad = k.index_select(1, sel), v.index_select(1, sel), pad.index_select(0, sel.to(pad.device))
            ks.append(k), vs.append(v), pads.append(pad)
        lengths = [c.pos - p.to(c.k.device) for c, p in zip(caches, pads)]
        pos = max((int(n.max()) for n in lengths if len(n)), default=0)
        batch = sum(k.shape[1] for k in ks)
        first = caches[0].k
        self.max_len = max(c.max_len for c in caches)
        cap = min(self.max_len, max(64, pos + pos // 2))  # headroom for the steps until the batch changes again
        self.k = first.new_zeros((first.shape[0], batch, first.shape[2], cap, first.shape[4]))
        self.v = torch.zeros_like(self.k)
        r = 0
        for c, k, v in zip(caches, ks, vs):
            w = min(pos, c.pos)  # the last w positions of this cache hold every kept row's content
            self.k[:, r:r + k.shape[1], :, pos - w:pos] = k[:, :, :, c.pos - w:]
            self.v[:, r:r + k.shape[1], :, pos - w:pos] = v[:, :, :, c.pos - w:]
            r += k.shape[1]
        pad = torch.cat([pos - n.to(first.device) for n in lengths]) if batch else torch.zeros(0, dtype=torch.long)
        self.pos = pos
        self.left_pad = pad if bool((pad > 0).any()) else None
        self.sinks = caches[0].sinks

    def select(self, rows: Sequence[int] | torch.Tensor) -> None:
        """Keep only batch rows `rows` (in that order), e.g. to drop finished sequences; the
        leading positions that every kept row pads are dropped with them."""
        self._packed([self], [torch.as_tensor(rows, dtype=torch.long, device=self.k.device)])

    def merge(self, other: "KVCache") -> None:
        """Append `other`'s rows (a cache of the same model, e.g. newly prefilled prompts): the
        shorter side is left-padded to the longer, so every row decodes on as it did alone."""
        self._packed([self, other], [None, None])

    def room(self, T: int, rope_tables) -> None:
        """Make room for T new positions. In sink mode evict what overflows; a plain cache that
        would overflow is an error. `rope_tables(n)` -> the model's (cos, sin) for positions < n."""
        over = self.pos + T - self.max_len
        if over <= 0:
            if self.pos + T > self.k.shape[3]:
                self._grow(self.pos + T)
            return
        if self.sinks is None:
            raise ValueError(f"KV cache full: {self.pos} + {T} > {self.max_len}")
        if T > self.max_len - self.sinks:
            raise ValueError(f"{T} new tokens do not fit beside {self.sinks} sinks in a {self.max_len}-slot cache; "
                             f"feed them in smaller chunks")
        if self.k.dtype in (torch.float16, torch.bfloat16):
            over = max(over, self.max_len // 16)
        self.evict(min(over, self.pos - self.sinks), rope_tables)
        if self.pos + T > self.k.shape[3]:
            self._grow(self.pos + T)

    def evict(self, e: int, rope_tables) -> None:
        """Drop e slots from the time axis: each row loses its padding first, then the oldest
        window keys after its sinks; kept window keys are re-rotated to their new positions."""
        if e <= 0:
            return
        cos_t, sin_t = rope_tables(self.max_len)
        pads = self._pads().tolist()
        k, v = torch.zeros_like(self.k), torch.zeros_like(self.v)
        for i, lp in enumerate(pads):
            if lp >= e:  # only padding goes: content and positions unchanged
                k[:, i, :, :self.pos - e] = self.k[:, i, :, e:self.pos]
                v[:, i, :, :self.pos - e] = self.v[:, i, :, e:self.pos]
                continue
            drop, s = e - lp, self.sinks
            start = lp + s + drop  # the first window slot kept
            k[:, i, :, :s] = self.k[:, i, :, lp:lp + s]
            v[:, i, :, :s] = self.v[:, i, :, lp:lp + s]
            win = self.k[:, i, :, start:self.pos].float()
            cos, sin = cos_t[drop].float(), -sin_t[drop].float()  # rotation by -drop positions
            k[:, i, :, s:self.pos - e] = (win * cos + rotate_half(win) * sin).to(k.dtype)
            if self.nope_layers:
                k[self.nope_layers, i, :, s:self.pos - e] = self.k[self.nope_layers, i, :, start:self.pos]
            v[:, i, :, s:self.pos - e] = self.v[:, i, :, start:self.pos]
        self.k, self.v = k, v
        left = torch.tensor([max(0, lp - e) for lp in pads], dtype=torch.long, device=self.k.device)
        self.left_pad = left if bool((left > 0).any()) else None
        self.pos -= e
        self.evicted += e
