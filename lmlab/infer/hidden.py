"""The last-layer hidden states of a frozen model over token sequences: what its output head reads
(after the final norm), one teacher-forced forward pass per batch.

    from lmlab.infer.hidden import hidden_states
    states = hidden_states(model, [ids_a, ids_b], batch_size=16)   # [(len_a, D), (len_b, D)] float32

Rows are right-padded to the longest in their batch: under causal attention a real position
never sees the padding after it, so every state equals the sequence's own forward alone (the
padding's states are dropped, never returned). Sequences longer than the model's context are
a ValueError: the caller decides how to cut them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


@torch.no_grad()
def hidden_states(model, seqs: Sequence[Sequence[int]], batch_size: int = 16, device=None, pad_id: int = 0,
                  bar=None) -> list[torch.Tensor]:
    """`model.hidden` of each sequence, (len_i, D) float32 on the CPU; `bar` advances by tokens."""
    device = device or next(model.parameters()).device
    ctx: Optional[int] = getattr(model, "max_context", None)
    too_long = [i for i, s in enumerate(seqs) if ctx is not None and len(s) > ctx]
    if too_long:
        raise ValueError(f"sequence {too_long[0]} has {len(seqs[too_long[0]])} tokens, more than the model's "
                         f"{ctx}-token context")
    was_training = model.training
    model.eval()
    out: list[Optional[torch.Tensor]] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: little padding
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(seqs[i]) for i in rows)
            x = torch.full((len(rows), width), pad_id, dtype=torch.long)
            for r, i in enumerate(rows):
                x[r, :len(seqs[i])] = torch.as_tensor(list(seqs[i]), dtype=torch.long)
            h = model.hidden(x.to(device)).float().cpu()
            for r, i in enumerate(rows):
                out[i] = h[r, :len(seqs[i])].clone()
            if bar is not None:
                bar.update(sum(len(seqs[i]) for i in rows))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
