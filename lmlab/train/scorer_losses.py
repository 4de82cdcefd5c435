"""Loss functions of the scorers (outcome verifier, Bradley-Terry reward model), pure functions of scores.

    from lmlab.train.scorer_losses import outcome_bce, token_bce, bradley_terry
    losses = outcome_bce(logits, labels)                  # (B,): one logit per sequence
    losses = token_bce(scores, labels, mask)              # (B, T): a logit at every solution token
    losses = bradley_terry(r_chosen, r_rejected, margin, center_rewards_coefficient=0.01)  # (B,)

Every function returns per-term losses (per sequence, per token, per pair) so that the
training loop can sum them and divide by the total number of terms of the step (the
objective contract in lmlab.train.loop); the mean over a batch is the usual batch loss.

Verifier (binary cross-entropy on "is this solution correct?", label y ∈ {0, 1}, logit z):

    bce(z, y) = −y·log σ(z) − (1 − y)·log(1 − σ(z))   (computed stably from z)
    outcome   one logit per (problem, solution): the score at the solution's last token
              (its end-of-turn token); loss_i = w_i · bce(z_i, y_i)
    token     a logit at every solution token t (the score of the prefix ending at t), each
              trained towards the sequence's label (Cobbe et al. 2021, "Training Verifiers
              to Solve Math Word Problems": the token-level verifier generalised better);
              loss_{i,t} = w_i · bce(z_{i,t}, y_i) on the solution's tokens, 0 elsewhere, and
              the batch loss is the mean over the solution tokens of the batch.
    w_i       an optional per-sequence weight (class balancing); 1 without it.

Reward model (TRL's RewardTrainer.compute_loss, Bradley-Terry with an optional margin):

    loss_i = −log σ(r_c,i − r_r,i − m_i)  +  c · (r_c,i + r_r,i)²

m_i is the pair's margin (0 without one) and c the `center_rewards_coefficient` (Eisenstein
et al. 2023: keeps the rewards centred on zero). TRL adds `c · mean((r_c + r_r)²)` to the
batch mean of the first term; the mean of these per-pair losses is exactly that.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def outcome_bce(logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,) logits and 0/1 labels -> (B,) binary cross-entropy per sequence (times `weights`)."""
    z = logits.float()
    losses = F.binary_cross_entropy_with_logits(z, labels.to(z), reduction="none")
    return losses * weights.to(z) if weights is not None else losses


def token_bce(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
              weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T) logits, (B,) labels, (B, T) bool mask of the solution tokens -> (B, T) losses, 0 off the mask.

    Every masked position is trained towards its row's label; the batch loss is
    `losses.sum() / mask.sum()` (the mean over solution tokens).
    """
    z = scores.float()
    y = labels.to(z)[:, None].expand_as(z)
    losses = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    if weights is not None:
        losses = losses * weights.to(z)[:, None]
    return torch.where(mask, losses, torch.zeros_like(losses))


def bradley_terry(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor,
                  margin: Optional[torch.Tensor] = None,
                  center_rewards_coefficient: Optional[float] = None) -> torch.Tensor:
    """(B,) per-pair losses −log σ(r_c − r_r − m) [+ c·(r_c + r_r)²], TRL's RewardTrainer loss."""
    rc, rr = rewards_chosen.float(), rewards_rejected.float()
    diff = rc - rr
    if margin is not None:
        diff = diff - margin.to(diff)
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (rc + rr) ** 2
    return losses


REWARD_METRICS = ("accuracy", "margin", "mean_reward")


def reward_metric_sums(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> torch.Tensor:
    """Sums over the batch's pairs of TRL's reward metrics, in REWARD_METRICS order (detached).

    accuracy: 1[r_c > r_r] (a tie counts as wrong, as in TRL); margin: r_c − r_r;
    mean_reward: the mean of the pair's two rewards (TRL's mean over all rewards).
    """
    rc, rr = rewards_chosen.detach().float(), rewards_rejected.detach().float()
    return torch.stack([(rc > rr).float().sum(), (rc - rr).sum(), ((rc + rr) / 2).sum()])
