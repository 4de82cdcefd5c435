"""Sampling settings and the sampling step: how the next token is drawn from the logits.

    from lmlab.infer.sampling import Sampling, sample_next
    s = Sampling(max_new_tokens=64, temperature=0.8, top_k=50, top_p=0.95, seed=0)
    s = Sampling.of(cfg)                      # the same fields of any verb's config
    s = Sampling.of(cfg, temperature=0.0)     # ... with some replaced (the greedy pass)
    nxt = sample_next(logits, s.temperature, s.top_k, s.top_p, generator)

Temperature 0 is greedy; otherwise logits/temperature, then top-k, then top-p (nucleus: the
smallest set of tokens whose probability reaches top_p), drawn with a `torch.Generator`
seeded by `seed`, so the same call gives the same text. Every verb that generates (`generate`,
`chat`, `eval`, `pairs`, SFT's samples) keeps these fields under the same names in its own
config, with its own defaults; `Sampling` is what the generation helpers take, validated
once here (and, later, what a server's request maps to).
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field

from lmlab.config import Strict


class Sampling(Strict):
    max_new_tokens: int = Field(64, ge=1, description="most new tokens per completion")
    temperature: float = Field(0.0, ge=0.0, description="sampling temperature; 0 = greedy")
    top_k: int = Field(0, ge=0, description="sample from the k most likely tokens only; 0 = all")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: smallest token set with this much "
                                                          "probability; 1 = off")
    seed: int = Field(0, description="sampling seed (same seed, same text)")

    @classmethod
    def of(cls, cfg, **overrides) -> "Sampling":
        """The settings a config holds (fields it lacks keep their defaults), with `overrides` on top."""
        values = {k: getattr(cfg, k) for k in cls.model_fields if getattr(cfg, k, None) is not None}
        return cls(**{**values, **overrides})


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits (B, V) -> next ids (B,)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
