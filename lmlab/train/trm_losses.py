"""TRM's loss: stable-max (or softmax) cross-entropy on the cells plus the Q-halt BCE, as the official
ACTLossHead computes it, and the per-row statistics its metrics are made of.

    terms = act_loss(outputs, labels, halted, steps, loss_type="stablemax", halt_weight=0.5)
    terms.loss    lm_loss + halt_weight * (q_halt_loss + q_continue_loss), summed over the rows
    terms.stats   sums over the halted rows: count, accuracy, exact_accuracy, q_halt_accuracy, steps

Per row: lm_loss is the sum of the cells' cross-entropies divided by the row's scored cells
(so every puzzle weighs the same whatever its size); the Q-halt target is whether the whole
answer is right (argmax equals the label at every scored cell). The loss is a sum over rows:
the training loop divides by the rows of the optimizer step (the official code's
1 / global_batch_size). Labels equal to 0 are not scored (the puzzle sets' ignore_label_id).

Stable-max (Prieto et al. 2025, "Grokking at the edge of numerical stability", used by the TRM
paper): s(x) = x + 1 for x >= 0 and 1 / (1 - x) for x < 0 replaces exp, p_i = s(x_i) / sum_j s(x_j),
computed in float64 as the official code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = 0


def _s(x: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    return torch.where(x < 0, 1 / (1 - x + eps), x + 1)


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    sx = _s(x)
    return torch.log(sx / sx.sum(dim=dim, keepdim=True))


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-cell -log p_stablemax(label), 0 where not scored; float64."""
    logp = log_stablemax(logits.double(), dim=-1)
    picked = logp.gather(-1, torch.where(mask, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return -torch.where(mask, picked, 0)


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-cell softmax cross-entropy, 0 where not scored; float32."""
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), torch.where(mask, labels, -100).long().reshape(-1),
                           ignore_index=-100, reduction="none")
    return flat.view(labels.shape)


LOSSES = {"stablemax": stablemax_cross_entropy, "softmax": softmax_cross_entropy}


@dataclass
class ACTTerms:
    loss: torch.Tensor  # scalar, the sum over rows
    lm_loss: torch.Tensor
    q_halt_loss: torch.Tensor
    q_continue_loss: torch.Tensor
    stats: dict  # sums over halted rows (tensors): count, accuracy, exact_accuracy, q_halt_accuracy, steps
    seq_correct: torch.Tensor  # (B,) bool


def act_loss(outputs: dict, labels: torch.Tensor, halted: torch.Tensor, steps: torch.Tensor,
             loss_type: str = "stablemax", halt_weight: float = 0.5) -> ACTTerms:
    logits = outputs["logits"]
    mask = labels != IGNORE
    counts = mask.sum(-1)
    divisor = counts.clamp_min(1).unsqueeze(-1)
    with torch.no_grad():
        correct = mask & (logits.argmax(-1) == labels)
        seq_correct = correct.sum(-1) == counts
        valid = halted & (counts > 0)
        stats = {
            "count": valid.sum(),
            "accuracy": torch.where(valid, (correct.float() / divisor).sum(-1), 0).sum(),
            "exact_accuracy": (valid & seq_correct).sum(),
            "q_halt_accuracy": (valid & ((outputs["q_halt_logits"] >= 0) == seq_correct)).sum(),
            "steps": torch.where(valid, steps, 0).sum(),
        }
    lm_loss = (LOSSES[loss_type](logits, labels, mask) / divisor).sum()
    q_halt = outputs["q_halt_logits"]
    q_halt_loss = F.binary_cross_entropy_with_logits(q_halt, seq_correct.to(q_halt.dtype), reduction="sum")
    q_continue_loss = torch.zeros((), device=q_halt.device)
    if "target_q_continue" in outputs:
        q_continue_loss = F.binary_cross_entropy_with_logits(outputs["q_continue_logits"], outputs["target_q_continue"],
                                                             reduction="sum")
    loss = lm_loss + halt_weight * (q_halt_loss + q_continue_loss)
    return ACTTerms(loss, lm_loss.detach(), q_halt_loss.detach(), q_continue_loss.detach(), stats, seq_correct)
