"""An exponential moving average of a model's weights (`train.ema`), for evaluation and the saved model.

    ema = EMA(model, decay=0.999)
    ema.update(model)              # after every optimizer step: shadow = d * shadow + (1 - d) * w
    with ema.applied(model): ...   # evaluate with the averaged weights, then the trained ones again
    ema.copy_to(model)             # at the end: the model saved is the average

The shadow is float32 whatever the parameters are (bf16 weights would round the small
(1 - d) updates away). Tied parameters are averaged once (named_parameters yields them once).
TRM (Jolicoeur-Martineau 2025) evaluates and saves an EMA of 0.999; the loop checkpoints the
shadow (`ema.pt`) so a resumed run averages exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from lmlab.dist import is_dtensor


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def _params(self, model: torch.nn.Module):
        return ((n, p) for n, p in model.named_parameters() if n in self.shadow)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in self._params(model):
            self.shadow[n].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for n, p in self._params(model):
            p.copy_(self.shadow[n].to(p.dtype))

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """The averaged weights inside the block; the trained ones restored after it."""
        saved = {n: p.detach().clone() for n, p in self._params(model)}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self._params(model):
                    p.copy_(saved[n])

    def state_dict(self) -> dict:
        # FSDP's sharded shadows stay DTensors: the checkpoint writes them with the model's shards (DCP)
        return {"decay": self.decay, "shadow": {n: t if is_dtensor(t) else t.cpu()
                                                for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"the EMA state lacks {sorted(missing)[:3]}")
        for n, t in self.shadow.items():
            src = state["shadow"][n]
            if is_dtensor(t) and not is_dtensor(src):
                raise ValueError("the EMA state was saved by an unsharded run and this run is sharded (fsdp)")
            t.copy_(src)
