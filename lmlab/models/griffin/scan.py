"""The RG-LRU's linear recurrence h_t = a_t * h_{t-1} + x_t, computed fast.

The reference (recurrentgemma's torch `rnn_scan`, transformers' `_rnn_scan`) runs it as a
Python loop over time: T small kernels forward and as many autograd nodes backward. Here it
is a two-level chunked scan: the sequence is cut into chunks of C steps; one loop of C steps
runs every chunk at once, a second loop of T/C steps carries the state from chunk to chunk,
and one multiply-add by the running product of `a` inside each chunk finishes it — about
2·sqrt(T) kernels instead of T, the same O(T·D) work, and exact (no logs, no divisions, so a
reset, where a = 0, is just a zero). The backward is a custom autograd Function: the gradient
of a linear recurrence is the same recurrence run backwards (g_t = dy_t + a_{t+1} g_{t+1};
dx_t = g_t; da_t = g_t h_{t-1}), so it reuses the same scan and keeps only `a` and `h`.

The state is always float32 (inputs are upcast), as in the reference, which accumulates in
float32 whatever the activation dtype.

    from lmlab.models.griffin.scan import linear_scan
    y, h_last = linear_scan(a, x, h0)        # a, x (B, T, D); h0 (B, D) or None; both float32 out
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from lmlab.runtime import eager_under_compile


def _chunk_size(t: int) -> int:
    # ~sqrt(T), a power of two: balances the two loops (C steps, then T/C steps).
    return max(8, 1 << round(math.log2(max(1.0, math.sqrt(t)))))


def _scan(a: torch.Tensor, x: torch.Tensor, h0: Optional[torch.Tensor]) -> torch.Tensor:
    """h (B, T, D) of h_t = a_t h_{t-1} + x_t with h_{-1} = h0 (zeros when None); float32 in."""
    B, T, D = x.shape
    C = _chunk_size(T)
    N = -(-T // C)
    pad = N * C - T
    if pad:  # a = 1, x = 0 after the end: the state is carried unchanged, earlier steps unaffected
        a = torch.cat([a, a.new_ones(B, pad, D)], 1)
        x = torch.cat([x, x.new_zeros(B, pad, D)], 1)
    # (C, B, N, D), contiguous: step i of every chunk is one dense slab
    at = a.view(B, N, C, D).permute(2, 0, 1, 3).contiguous()
    h = x.view(B, N, C, D).permute(2, 0, 1, 3).contiguous()
    for i in range(1, C):  # within each chunk, from a zero state
        h[i].addcmul_(at[i], h[i - 1])
    prod = torch.cumprod(at, dim=0)  # a_{chunk start..i}: how much of the entering state survives
    carry = h0 if h0 is not None else x.new_zeros(B, D)
    entering = torch.empty(B, N, D, dtype=x.dtype, device=x.device)
    last_h, last_p = h[C - 1], prod[C - 1]
    for n in range(N):
        entering[:, n] = carry
        carry = torch.addcmul(last_h[:, n], last_p[:, n], carry)
    h.addcmul_(prod, entering[None])
    return h.permute(1, 2, 0, 3).reshape(B, N * C, D)[:, :T]


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x, h0):
        h = _scan(a, x, h0)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, gy):
        a, h, h0 = ctx.saved_tensors
        gy = gy.contiguous()
        # g_t = gy_t + a_{t+1} g_{t+1}: the forward scan on the time-reversed sequence
        a_next = torch.cat([a[:, 1:], a.new_zeros(a.shape[0], 1, a.shape[2])], 1)
        g = _scan(a_next.flip(1), gy.flip(1), None).flip(1)
        h_prev = torch.cat([(h0 if h0 is not None else h.new_zeros(h.shape[0], h.shape[2]))[:, None], h[:, :-1]], 1)
        ga = g * h_prev
        gh0 = a[:, 0] * g[:, 0] if h0 is not None and ctx.needs_input_grad[2] else None
        return ga, g, gh0


@eager_under_compile  # two short Python loops: a graph break is cheaper than unrolling them
def linear_scan(a: torch.Tensor, x: torch.Tensor, h0: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (h (B, T, D) float32, h[:, -1] float32): h_t = a_t h_{t-1} + x_t, h_{-1} = h0 (or 0)."""
    a, x = a.float(), x.float()
    h0 = None if h0 is None else h0.float()
    if x.shape[1] == 1:  # decoding: one step, no scan
        h = x if h0 is None else torch.addcmul(x, a, h0[:, None])
        return h, h[:, -1]
    h = _LinearScan.apply(a, x, h0)
    return h, h[:, -1]


def loop_scan(a: torch.Tensor, x: torch.Tensor, h0: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's Python loop over time (the definition `linear_scan` is tested against)."""
    h_t = h0.float() if h0 is not None else x.new_zeros(x.shape[0], x.shape[2], dtype=torch.float32)
    ys = []
    for t in range(x.shape[1]):
        h_t = a[:, t].float() * h_t + x[:, t].float()
        ys.append(h_t)
    return torch.stack(ys, 1), h_t
