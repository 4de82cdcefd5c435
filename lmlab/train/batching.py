"""Which rows of an optimizer step each process computes, and in how many forward passes.

The global batch of a step is `grad_accum` canonical micro-batches of `batch_size` rows
(`objective.batch(step, micro)`), whatever the number of processes, so the data order and
the loss curve do not depend on it. With W processes, W = a·b where a = gcd(W, grad_accum)
groups of processes take contiguous blocks of grad_accum/a micro-batches and, inside a
group, b processes take equal row slices (batch_size/b rows) of each of them. Every process
then runs the same number of forward passes (FSDP needs that: each pass gathers
parameters collectively), and `train.micro_batch` cuts each piece further into passes of at
most that many rows without changing the sum of the losses.
"""

from __future__ import annotations

import math

from lmlab.errors import UserError


def valid_world_sizes(batch_size: int, grad_accum: int, limit: int = 64) -> list[int]:
    """The world sizes (up to `limit`) that this split accepts for a global batch."""
    return [w for w in range(1, limit + 1) if batch_size % (w // math.gcd(w, grad_accum)) == 0]


def rank_pieces(batch_size: int, grad_accum: int, world: int, rank: int,
                micro_batch: int | None = None) -> list[tuple[int, slice | None]]:
    """[(canonical micro-batch index, row slice or None for all rows)] this rank computes, in order."""
    a = math.gcd(world, grad_accum)
    b = world // a
    if batch_size % b:
        sizes = ", ".join(map(str, valid_world_sizes(batch_size, grad_accum, limit=max(16, world))))
        raise UserError(f"{world} processes cannot share a global batch of train.batch_size={batch_size} x "
                        f"train.grad_accum={grad_accum} rows in equal parts; world sizes that can: {sizes} "
                        f"(or change batch_size/grad_accum so that {world} divides them)")
    group, member = divmod(rank, b)
    per_group = grad_accum // a
    rows = batch_size // b
    lo = member * rows
    step = min(rows, micro_batch or rows)
    pieces = []
    for micro in range(group * per_group, (group + 1) * per_group):
        for start in range(lo, lo + rows, step):
            stop = min(start + step, lo + rows)
            pieces.append((micro, None if (start, stop) == (0, batch_size) else slice(start, stop)))
    return pieces


class EvalShard:
    """Which evaluation batches this process computes, and the totals over processes.

    Under DDP the evaluation runs on the plain model (no collectives in its forward), so the
    processes take every world-th batch and add their sums (`total`, an all-reduce in
    float64). Under FSDP every forward gathers parameters collectively, so every process
    runs every batch (`active` False) and the totals are its own. On one process: the same.
    """

    def __init__(self, rank: int = 0, world: int = 1, active: bool = False, device=None) -> None:
        self.rank, self.world = rank, world
        self.active = active and world > 1
        self.device = device

    def take(self, items) -> list:
        items = list(items)
        return items[self.rank::self.world] if self.active else items

    def total(self, values: list[float]) -> list[float]:
        if not self.active:
            return list(values)
        import torch

        from lmlab import dist as lmdist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return lmdist.all_reduce_(t).tolist()

    @property
    def writes(self) -> bool:
        """Whether this process must produce output that only rank 0 keeps (e.g. sample
        generations): always under FSDP (collective forwards), rank 0 alone otherwise."""
        return not self.active or self.rank == 0
