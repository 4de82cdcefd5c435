"""DPO loss formulas as pure functions of sequence log-probabilities (TRL's definitions).

    from lmlab.train.dpo_losses import dpo_loss, sequence_logps
    logps, n = sequence_logps(logits, targets)               # summed over targets != -100
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.1, loss="sigmoid")

Everything is a function of `x = (π_c − π_r) − (ref_c − ref_r)`, the policy's log-ratio of
chosen over rejected minus the reference's (TRL calls it `logits`):

    sigmoid  −(1−ε)·log σ(βx) − ε·log σ(−βx)          DPO (Rafailov et al. 2023); with
             label smoothing ε > 0 it is conservative DPO (cDPO, Mitchell 2023)
    robust   (−(1−ε)·log σ(βx) + ε·log σ(−βx)) / (1−2ε)  robust DPO (Chowdhury et al. 2024):
             an unbiased estimate of the clean-label loss when a fraction ε of the labels is
             flipped. Note the + sign: unlike cDPO it *rewards* a large σ(−βx) term, so it is
             not bounded below; ε must be < 0.5. With ε = 0 it equals sigmoid.
    hinge    relu(1 − βx)                              SLiC / RSO's hinge on the normalised
             likelihood
    ipo      (x − 1/(2β))²                             IPO (Azar et al. 2023, eq. 17, β = τ).
             TRL feeds IPO *length-averaged* log-probabilities (per-token means over the
             completion) instead of sums; `lmlab.train.dpo` does the same (see
             `AVERAGED_LOSSES`), so β means the same thing as in TRL.

Implicit rewards, as TRL logs them: `rewards/chosen = β·(π_c − ref_c)`, `rewards/rejected =
β·(π_r − ref_r)`, margins = chosen − rejected, accuracies = mean(chosen > rejected). For IPO
these use the averaged log-probabilities, as in TRL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "hinge", "robust")
# Losses that TRL computes on per-token mean log-probabilities instead of sums.
AVERAGED_LOSSES = ("ipo",)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(target) over positions whose target is not -100, per row.

    logits (B, T, V), targets (B, T) -> (logps (B,) float32, token counts (B,)). Only the
    completion tokens carry a target, so prompt and padding positions contribute nothing,
    whatever their logits are.
    """
    logits = logits.float()  # a bf16 log-sum-exp over the vocabulary loses too much
    valid = targets != -100
    safe = targets.clamp_min(0)
    token_logps = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * valid).sum(-1), valid.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards (chosen, rejected), each of shape (B,).

    Inputs are sequence log-probabilities (already length-averaged for IPO). The rewards are
    detached: they are metrics, not part of the gradient.
    """
    x = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    eps = label_smoothing
    if loss == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * x) - eps * F.logsigmoid(-beta * x)
    elif loss == "robust":
        if not 0 <= eps < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
        losses = (-(1 - eps) * F.logsigmoid(beta * x) + eps * F.logsigmoid(-beta * x)) / (1 - 2 * eps)
    elif loss == "hinge":
        losses = torch.relu(1 - beta * x)
    elif loss == "ipo":
        losses = (x - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}; valid: {', '.join(LOSSES)}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


def metric_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy_chosen: torch.Tensor,
                policy_rejected: torch.Tensor) -> torch.Tensor:
    """Sums over the pairs of TRL's metrics (in `METRICS` order), as one tensor on the batch's device.

    Sums, not means, so batches pool exactly; a tensor, not floats, so training never waits
    on the GPU for a metric (the caller divides by the pair count when it reports).
    """
    return torch.stack([
        chosen_rewards.sum(), rejected_rewards.sum(), (chosen_rewards - rejected_rewards).sum(),
        (chosen_rewards > rejected_rewards).float().sum(), policy_chosen.detach().sum(),
        policy_rejected.detach().sum(),
    ]).float()
