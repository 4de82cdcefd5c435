"""The optimizer and learning-rate schedules shared by every training objective.

    opt = build_optimizer(model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), device=dev)
    lr_at = Schedule("cosine", lr=3e-4, total_steps=1000, warmup_steps=50, min_lr_ratio=0.1)
    for step in range(1000): set_lr(opt, lr_at(step)); ...

Schedules are pure functions of the (0-based) optimizer step, so a resumed run needs no
scheduler state beyond the step itself:

- warmup: `lr * (step + 1) / warmup_steps` for `step < warmup_steps` (linear, the first step
  already moves the weights).
- cosine: from `lr` at `step == warmup_steps` down to `lr * min_lr_ratio` at the last step
  (`total_steps - 1`), along half a cosine.
- wsd (warmup-stable-decay): `lr` until the last `decay_frac * total_steps` steps, then a
  linear decay that reaches `lr * min_lr_ratio` on the last step. The stable phase makes
  it cheap to branch off a decayed checkpoint at any point of a long run.

Weight decay: applied to the weight matrices of linear layers only; norms (gains), biases
and token embeddings (and so a lm_head tied to them) are not decayed. Decaying embeddings
pulls rare tokens' rows towards zero for no benefit, and decaying norm gains fights the
scale they exist to learn (the usual choice since GPT-3 / LLaMA recipes).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (linear weights) and the rest.

    A family can keep more out of decay with `no_decay_patterns` (substrings of parameter
    names): Griffin's RG-LRU parameters, as the reference's finetuning does.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    patterns = tuple(getattr(_family_model(model), "no_decay_patterns", ()))
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if p.dim() >= 2 and id(p) not in embedding_params and not any(s in "." + name for s in patterns):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _family_model(model: nn.Module) -> nn.Module:
    """The family's model behind compile / DDP / PEFT wrappers."""
    from lmlab.models import unwrap
    model = unwrap(model)
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device: torch.device, eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW: the fused kernel on CUDA (one launch for all parameters), foreach elsewhere."""
    kw: dict = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, **kw)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled LR on every param group, times the group's `lr_scale` (default 1)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


class Schedule:
    """Learning rate as a function of the 0-based optimizer step (see the module docstring)."""

    def __init__(self, kind: str, lr: float, total_steps: int, warmup_steps: int,
                 min_lr_ratio: float = 0.1, decay_frac: float = 0.2) -> None:
        if kind not in ("cosine", "wsd", "constant"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.kind, self.lr, self.total = kind, lr, max(1, total_steps)
        self.warmup = max(0, min(warmup_steps, self.total))
        self.min_lr = lr * min_lr_ratio
        # At least one decay step for wsd, so the last step always lands on min_lr.
        self.decay_steps = max(1, round(decay_frac * self.total)) if kind == "wsd" else 0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.lr
        last = self.total - 1
        if self.kind == "cosine":
            span = last - self.warmup
            progress = 1.0 if span <= 0 else min(1.0, (step - self.warmup) / span)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
        decay_start = self.total - self.decay_steps  # first step of the decay phase (wsd)
        if step < decay_start:
            return self.lr
        progress = min(1.0, (step - decay_start + 1) / self.decay_steps)
        return self.lr + (self.min_lr - self.lr) * progress


def resolve_warmup(warmup: int | float, total_steps: int) -> int:
    """`warmup_steps` given as a fraction in [0, 1) is a share of the run; an int is a count."""
    if isinstance(warmup, float) and not float(warmup).is_integer():
        return int(round(warmup * total_steps))
    if isinstance(warmup, float) and warmup < 1.0:  # 0.0
        return 0
    return int(warmup)
