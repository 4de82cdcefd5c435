"""TRM's optimizer: AdamATan2 (or AdamW) for the network, sign-SGD for the puzzle embeddings, in one
torch Optimizer so the training loop schedules, steps and checkpoints it like any other.

    opt = TRMOptimizer(model, kind="adam_atan2", lr=1e-4, betas=(0.9, 0.95), weight_decay=1.0,
                       emb_lr=1e-4, emb_weight_decay=1.0)

Param groups: the network's trainable parameters (every one decayed, as the official code
passes `model.parameters()` to one AdamATan2), and the puzzle-embedding table (`lr_scale` =
emb_lr / lr, so the loop's schedule, warmup included, drives both as the official code's
per-optimizer base LRs do).

AdamATan2 (Everett et al. 2024, "Scaling exponents across parameterizations and optimizers"):
Adam without epsilon, the division replaced by atan2. We implement the update of the `adam-atan2`
CUDA kernel the official TRM code uses:

    p <- p * (1 - lr * wd);  m <- lerp(m, g, 1 - b1);  v <- lerp(v, g^2, 1 - b2)
    p <- p - (lr / (1 - b1^t)) * atan2(m, sqrt(v) / sqrt(1 - b2^t))

Why our own: that package is a CUDA-only extension compiled at install time (no CPU, no wheel),
and `adam-atan2-pytorch` computes another update (a * atan2(m_hat, b * sqrt(v_hat)) with
a = 1.27: bias correction inside atan2 and a 1.27x larger step), which would not reproduce the
paper's runs. tests/test_trm_train.py pins the formula.

Sign-SGD on the embeddings (the official CastedSparseEmbeddingSignSGD_Distributed): the rows
looked up in this step's forwards (lmlab.models.trm.embedding, all micro-batches, gathered
from every process) get their gradients summed per identifier, then
w <- w * (1 - lr * wd) - lr * sign(g); rows not looked up are untouched (no decay either).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as tdist

from lmlab import dist as lmdist


class TRMOptimizer(torch.optim.Optimizer):
    def __init__(self, model: torch.nn.Module, kind: str, lr: float, betas: tuple[float, float],
                 weight_decay: float, emb_lr: float, emb_weight_decay: float, eps: float = 1e-8) -> None:
        if kind not in ("adam_atan2", "adamw"):
            raise ValueError(f"unknown TRM optimizer {kind!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": params, "kind": kind, "weight_decay": weight_decay, "betas": tuple(betas), "eps": eps}]
        self._table = getattr(model, "puzzle_emb", None)
        if self._table is not None:
            groups.append({"params": [self._table.weight], "kind": "sign_sgd", "weight_decay": emb_weight_decay,
                           "lr": emb_lr, "lr_scale": emb_lr / lr})
        super().__init__(groups, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["kind"] == "sign_sgd":
                self._sign_sgd(group)
            else:
                self._adam(group)
        return None

    def _adam(self, group: dict) -> None:
        lr, wd, (b1, b2) = group["lr"], group["weight_decay"], group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = float(state["step"])
            m, v = state["exp_avg"], state["exp_avg_sq"]
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            p.mul_(1 - lr * wd)
            m.lerp_(g, 1 - b1)
            v.lerp_(g * g, 1 - b2)
            if group["kind"] == "adam_atan2":
                p.sub_(torch.atan2(m, v.sqrt() / math.sqrt(bc2)) * (lr / bc1))
            else:  # AdamW, as torch.optim.AdamW computes it
                p.addcdiv_(m, (v.sqrt() / math.sqrt(bc2)).add_(group["eps"]), value=-lr / bc1)

    def _sign_sgd(self, group: dict) -> None:
        table = self._table
        pending, table.pending = table.pending, []
        weight = group["params"][0]
        ids = torch.cat([i for i, _ in pending]) if pending else torch.zeros(0, dtype=torch.long, device=weight.device)
        grads = torch.cat([leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for _, leaf in pending]) \
            if pending else torch.zeros(0, weight.shape[1], device=weight.device)
        if lmdist.world() > 1:
            ids, grads = _all_gather_rows(ids, grads)
        if not ids.numel():
            return
        unique, inverse = ids.unique(return_inverse=True)
        total = torch.zeros(len(unique), weight.shape[1], dtype=grads.dtype, device=grads.device)
        total.index_add_(0, inverse, grads)
        rows = weight[unique]
        rows.mul_(1.0 - group["lr"] * group["weight_decay"]).add_(torch.sign(total).to(rows.dtype), alpha=-group["lr"])
        weight[unique] = rows


def _all_gather_rows(ids: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's (ids, gradient rows), concatenated in rank order (ranks may hold different counts)."""
    world = lmdist.world()
    n = torch.tensor([ids.numel()], device=ids.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    tdist.all_gather(counts, n)
    most = int(max(c.item() for c in counts))
    pad = most - ids.numel()
    ids_p = torch.cat([ids, ids.new_zeros(pad)])
    grads_p = torch.cat([grads, grads.new_zeros(pad, grads.shape[1])])
    all_ids = [torch.empty_like(ids_p) for _ in range(world)]
    all_grads = [torch.empty_like(grads_p) for _ in range(world)]
    tdist.all_gather(all_ids, ids_p)
    tdist.all_gather(all_grads, grads_p)
    keep = [slice(0, int(c.item())) for c in counts]
    return (torch.cat([a[k] for a, k in zip(all_ids, keep)]), torch.cat([g[k] for g, k in zip(all_grads, keep)]))
