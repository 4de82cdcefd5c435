"""GRPO's formulas as pure functions: group advantages, the clipped surrogate, k3 KL, the loss
normalisations and the clip metrics, term for term as TRL's GRPOTrainer defines them.

    adv, std, zero = group_advantages(rewards, G, "group")
    terms = token_terms(logps, old_logps, ref_logps, adv_per_token, eps_low=0.2, eps_high=0.28, beta=0.0)
    loss_sum, count = normalise(terms.loss, rows, n_rows, "dapo", max_completion_length)

Token quantities are flat (n_tokens,) tensors in row-major order of the completion tokens
(what the model returns for `logits_at=mask`), with `rows[i]` the completion a token belongs
to: padding never appears, so nothing needs a mask.

Advantages (TRL `_generate_and_score_completions`): with r the total reward of each completion
and groups of G consecutive completions of one prompt, A = r − mean_group(r); `scale_rewards`
"group" divides by the group's std + 1e-4, "batch" by the std of the whole batch + 1e-4,
"none" not at all (Dr. GRPO). std is Bessel-corrected and ignores NaN rewards (completions no
reward function scored: they also get advantage 0). A group whose std is ~0 (every
completion scored alike: no signal) is counted in `frac_reward_zero_std`.

Per token (TRL `_compute_loss`, token-level importance sampling): ρ = exp(logp − logp_old),
loss_t = −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) + β·KL_t with the k3 estimator
KL_t = exp(ref − logp) − (ref − logp) − 1. With one iteration per generation logp_old is
logp detached (ρ = 1, its gradient that of logp).

Normalisations, for a global batch of N completions (TRL divides per micro-batch and again by
the accumulation steps; lmlab's loop divides the step's summed terms by their total count, so
each becomes a (sum, count) whose ratio over the whole step is TRL's number):
  grpo     mean over completions of (Σ_t loss_t / |o_i|)           -> (Σ_i mean_i, n_rows)
  bnpo     per micro-batch Σ loss_t / its tokens, averaged          -> (Σ/tokens of the piece, 1)
  dr_grpo  Σ loss_t / (N · max_completion_length)                   -> (Σ / L, n_rows)
  dapo     Σ loss_t / tokens of the whole step (num_items_in_batch) -> (Σ, n_tokens)
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import torch

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


def nanstd(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs (NaN where fewer than two values), as TRL's `nanstd`."""
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    var = torch.nanmean((x - mean) ** 2, dim=dim) if dim is not None else torch.nanmean((x - mean) ** 2)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    corr = torch.where(count > 1, count / (count - 1).clamp_min(1), torch.full_like(var, float("nan")))
    return torch.sqrt(var * corr)


def group_advantages(rewards: torch.Tensor, group: int, scale: ScaleRewards = "group"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, std per completion, is_std_zero per completion) of rewards (N,) in groups of `group`.

    A NaN reward (a completion no reward function scored) is left out of its group's mean and
    std and gets advantage 0, as in TRL.
    """
    if rewards.numel() % group:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group}")
    r = rewards.double()
    mean = torch.nanmean(r.view(-1, group), dim=1).repeat_interleave(group)
    if scale == "batch":
        std = nanstd(r).expand_as(r) if r.numel() > 1 else torch.zeros_like(r)
    else:  # "group", and "none" (which only reports it)
        std = nanstd(r.view(-1, group), dim=1).repeat_interleave(group) if group > 1 else torch.zeros_like(r)
    adv = r - mean
    if scale != "none":
        adv = adv / (std + STD_EPS)
    zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(adv, nan=0.0).to(rewards.dtype), std.to(rewards.dtype), zero


class TokenTerms(NamedTuple):
    loss: torch.Tensor          # (n,) per-token loss, KL included
    ratio: torch.Tensor         # (n,) ρ = exp(logp − old)
    kl: Optional[torch.Tensor]  # (n,) k3 KL to the reference (None when β = 0)
    low_clipped: torch.Tensor   # (n,) bool: ρ < 1 − ε_low where A < 0
    high_clipped: torch.Tensor  # (n,) bool: ρ > 1 + ε_high where A > 0


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """exp(ref − logp) − (ref − logp) − 1: Schulman's unbiased, always non-negative KL estimator."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def token_terms(logps: torch.Tensor, old_logps: Optional[torch.Tensor], ref_logps: Optional[torch.Tensor],
                advantages: torch.Tensor, eps_low: float, eps_high: float, beta: float,
                delta: Optional[float] = None) -> TokenTerms:
    """The clipped surrogate per token (advantages already expanded to tokens). `delta`: TRL's
    two-sided clipping bound on ρ in the unclipped term (INTELLECT-2), None = off."""
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    unclipped = torch.clamp(ratio, max=delta) if delta is not None else ratio
    loss = -torch.min(unclipped * advantages, clipped * advantages)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs the reference log-probs")
        kl = k3_kl(logps, ref_logps)
        loss = loss + beta * kl
    low = (ratio < 1 - eps_low) & (advantages < 0)
    high = (ratio > 1 + eps_high) & (advantages > 0)
    return TokenTerms(loss, ratio, kl, low, high)


def row_sums(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Σ over each completion's tokens: (n,) -> (n_rows,)."""
    return torch.zeros(n_rows, device=values.device, dtype=values.dtype).index_add(0, rows, values)


def normalise(per_token: torch.Tensor, rows: torch.Tensor, n_rows: int, loss_type: LossType,
              max_completion_length: int) -> tuple[torch.Tensor, int]:
    """(sum, count) of one micro-batch under `loss_type` (see the module docstring)."""
    n_tokens = per_token.numel()
    total = per_token.sum()
    if loss_type == "grpo":
        lengths = row_sums(torch.ones_like(per_token), rows, n_rows).clamp_min(1.0)
        return (row_sums(per_token, rows, n_rows) / lengths).sum(), n_rows
    if loss_type == "bnpo":
        return total / max(n_tokens, 1), 1
    if loss_type == "dr_grpo":
        return total / max_completion_length, n_rows
    if loss_type == "dapo":
        return total, n_tokens
    raise ValueError(f"unknown loss_type {loss_type!r}")


def trl_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: LossType, max_completion_length: int,
             num_items_in_batch: Optional[float] = None) -> torch.Tensor:
    """TRL's formula on one padded (B, L) batch with its completion mask, for tests and the bench's parity check."""
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * m).sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (per_token.size(0) * max_completion_length)
    if loss_type == "dapo":
        return (per_token * m).sum() / (num_items_in_batch if num_items_in_batch is not None else m.sum())
    raise ValueError(f"unknown loss_type {loss_type!r}")


def row_means(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per completion: the mean of its tokens' values (NaN for a completion without tokens)."""
    counts = row_sums(torch.ones_like(values), rows, n_rows)
    return row_sums(values, rows, n_rows) / counts.where(counts > 0, torch.full_like(counts, float("nan")))


def clip_stats(terms: TokenTerms, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """TRL's clip metrics of one micro-batch, as a tensor (no device sync): low_mean, high_mean,
    region_mean (token means), low_min (the smallest per-completion share clipped low), high_max."""
    low, high = terms.low_clipped.float(), terms.high_clipped.float()
    region = (terms.low_clipped | terms.high_clipped).float()
    n = max(low.numel(), 1)
    per_low, per_high = row_means(low, rows, n_rows), row_means(high, rows, n_rows)
    return torch.stack([low.sum() / n, high.sum() / n, region.sum() / n,
                        torch.nan_to_num(per_low, nan=math.inf).min(), torch.nan_to_num(per_high, nan=-math.inf).max()])
