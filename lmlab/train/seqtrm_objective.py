"""The SequenceTRM's objective in the shared trainer (lmlab/train/loop.py): deep supervision with
the state carried across optimizer steps, as TRM's (lmlab/train/trm_objective.py).

Each optimizer step is one supervision step. Micro-batch `micro` of step `s` brings the examples
of canonical batch b = s * grad_accum + micro (a seeded permutation per epoch: a pure function of
b). The rows that halted at the previous step take them, starting from the initial state; the
others go on from their carried (y, z). A row halts after `n_sup` steps, or when its halting head
says so. The carry is checkpointed, so a resumed run goes on exactly.

Loss per row: MSE (or 1 - cosine) between the prediction and the compressed `hidden_post`, plus
`halt_loss_weight` times the halting loss:
- `mse_cosine`: the head regresses the prediction's (detached) cosine, and a row halts when
  that estimate reaches the threshold;
- `bce_threshold`: binary cross-entropy against "cosine > threshold", halting at q > 0.

The threshold is 0.7 in the first epoch, then 0.95 x the mean cosine at halting of the epoch
before (adaptive). The evaluation runs every validation example through all `n_sup` steps (with
the EMA weights when train.ema is set): cosine after each step, at the step the head would halt,
and the steps used.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lmlab import dist as lmdist
from lmlab.models import unwrap
from lmlab.models.seqtrm import halting, left_pad  # noqa: F401 (used here and re-exported)

FIRST_THRESHOLD, THRESHOLD_SHARE = 0.7, 0.95


class SeqTRMObjective:
    progress_metrics = {"cosine": "cos", "steps": "sup"}

    def __init__(self, cfg, contexts: list[torch.Tensor], targets: torch.Tensor, val_contexts: list[torch.Tensor],
                 val_targets: torch.Tensor) -> None:
        t = cfg.train
        self.cfg, self.grad_accum, self.seed, self.batch_size = cfg, t.grad_accum, t.seed, t.batch_size
        self.contexts, self.targets = contexts, targets
        self.val_contexts, self.val_targets = val_contexts, val_targets
        self.n_sup = cfg.model.n_sup
        self.carries: dict[str, dict] = {}
        self.threshold = FIRST_THRESHOLD
        self.epoch_sum, self.epoch_count, self.examples = 0.0, 0, 0
        self._sums: dict[str, float] = {}

    # ------------------------------------------------------------------ data

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 7, epoch]).permutation(len(self.contexts))

    def batch(self, step: int, micro: int, rows: slice | None = None) -> dict:
        b = step * self.grad_accum + micro
        n, bs = len(self.contexts), self.batch_size
        pos = np.arange(b * bs, (b + 1) * bs)
        idx = np.array([self._order(int(p // n))[p % n] for p in pos])
        sel = slice(None) if rows is None else rows
        return {"fresh": torch.from_numpy(idx[sel]),
                "slot": f"{micro}:{0 if rows is None else rows.start}:{bs if rows is None else rows.stop}"}

    def tokens(self, batch: dict) -> int:
        return int(batch["fresh"].shape[0])

    # ------------------------------------------------------------------ loss

    def _rows(self, idx: torch.Tensor, device):
        x, mask = left_pad([self.contexts[i] for i in idx.tolist()], device)
        return x, mask, self.targets[idx].to(device)

    def loss(self, model, batch: dict):
        slot = batch.pop("slot")
        m = unwrap(model)
        fresh = batch["fresh"].cpu()
        rows = len(fresh)
        carry = self.carries.get(slot)
        if carry is None:
            carry = {"idx": fresh.clone(), "steps": torch.zeros(rows, dtype=torch.long),
                     "halted": torch.ones(rows, dtype=torch.bool), "y": None, "z": None}
        new = carry["halted"]
        idx = torch.where(new, fresh, carry["idx"])
        x, mask, target = self._rows(idx, next(m.parameters()).device)
        y, z = m.initial_state(x, mask)
        if carry["y"] is not None:  # the rows that go on: their carried state, re-laid to this batch's width
            for r in torch.nonzero(~new).flatten().tolist():
                n = int(mask[r].sum()) + 1
                y[r, -n:], z[r, -n:] = carry["y"][r][-n:].to(y), carry["z"][r][-n:].to(z)
        steps = torch.where(new, torch.zeros_like(carry["steps"]), carry["steps"]) + 1
        (y, z), pred, q = model(x, mask, y, z)  # the forward is the supervision step (DDP's hooks see it)
        cos = F.cosine_similarity(pred.float(), target, dim=-1)
        recon = (pred.float() - target).pow(2).mean(-1) if self.cfg.loss == "mse" else 1.0 - cos
        c = cos.detach()
        if self.cfg.halt == "mse_cosine":
            halt_loss = (q.float() - c).pow(2)
        else:
            halt_loss = F.binary_cross_entropy_with_logits(q.float(), (c > self.threshold).float(), reduction="none")
        done = (steps >= self.n_sup) | halting(q.detach().float().cpu(), self.cfg.halt, self.threshold)
        self.carries[slot] = {"idx": idx, "steps": steps, "halted": done, "y": y.cpu(), "z": z.cpu()}
        self._epoch_update(int(new.sum()), c.cpu()[done])
        for key, v in (("recon", recon.detach().sum()), ("cosine", c.sum()), ("halt_loss", halt_loss.detach().sum()),
                       ("rows", rows), ("halted", int(done.sum())), ("steps_at_halt", float(steps[done].sum()))):
            self._sums[key] = self._sums.get(key, 0.0) + float(v)
        return (recon + self.cfg.halt_loss_weight * halt_loss).sum(), rows

    def _epoch_update(self, started: int, halted_cos: torch.Tensor) -> None:
        """Count the examples started; at each epoch's end the threshold becomes 0.95 x its mean cosine.
        Under several processes each takes an equal share of every batch (lmlab.train.batching), so
        the examples started everywhere are this process's times the world size; the mean cosine
        is this process's own."""
        self.epoch_sum += float(halted_cos.sum())
        self.epoch_count += len(halted_cos)
        before = self.examples // len(self.contexts)
        self.examples += started * lmdist.world()
        if self.examples // len(self.contexts) > before and self.epoch_count:
            self.threshold = THRESHOLD_SHARE * self.epoch_sum / self.epoch_count
            self.epoch_sum, self.epoch_count = 0.0, 0

    def train_metrics(self) -> dict:
        s, self._sums = self._sums, {}
        if not s:
            return {}
        rows, halted = max(s["rows"], 1.0), max(s["halted"], 1.0)
        return {"recon_loss": s["recon"] / rows, "cosine": s["cosine"] / rows, "halt_loss": s["halt_loss"] / rows,
                "halted": s["halted"] / rows, "steps": s["steps_at_halt"] / halted, "threshold": self.threshold}

    # ------------------------------------------------------------------ state and evaluation

    def state_dict(self) -> dict:
        return {"carries": self.carries, "threshold": self.threshold, "epoch_sum": self.epoch_sum,
                "epoch_count": self.epoch_count, "examples": self.examples}

    def load_state_dict(self, state: dict) -> None:
        self.carries = dict(state.get("carries", {}))
        self.threshold = float(state.get("threshold", FIRST_THRESHOLD))
        self.epoch_sum, self.epoch_count = float(state.get("epoch_sum", 0.0)), int(state.get("epoch_count", 0))
        self.examples = int(state.get("examples", 0))

    def evaluate(self, model, device) -> dict:
        if not self.val_contexts or self.cfg.eval.batches == 0:
            return {}
        res = evaluate_steps(unwrap(model), self.val_contexts, self.val_targets, self.batch_size, device,
                             self.cfg.halt, self.threshold)
        return {"val_cosine": res["cosine_by_step"][-1], "val_cosine_at_halt": res["cosine_at_halt"],
                "val_halt_step": res["mean_halt_step"], "val_mse": res["mse"]}


@torch.no_grad()
def evaluate_steps(model, contexts, targets, batch_size: int, device, mode: str, threshold: float) -> dict:
    """Every example through all n_sup steps: cosine after each step, at the first step the head
    halts (the last step when it never does), the halting steps, and the final MSE."""
    n_sup = model.cfg.n_sup
    cos_steps = torch.zeros(n_sup)
    at_halt, halt_steps, mse, per_example = [], [], 0.0, []
    for start in range(0, len(contexts), batch_size):
        x, mask = left_pad(contexts[start:start + batch_size], device)
        t = targets[start:start + batch_size].to(device)
        steps = model.predict(x, mask)
        cos = torch.stack([F.cosine_similarity(p.float(), t, dim=-1) for p, _ in steps])   # (n_sup, b)
        stop = torch.stack([halting(q.float(), mode, threshold) for _, q in steps])         # (n_sup, b)
        first = torch.where(stop.any(0), stop.float().argmax(0), torch.full_like(stop[0], n_sup - 1, dtype=torch.long))
        cos_steps += cos.sum(1).cpu()
        at_halt += cos.gather(0, first[None])[0].cpu().tolist()
        halt_steps += (first + 1).cpu().tolist()
        mse += float((steps[-1][0].float() - t).pow(2).mean(-1).sum())
        per_example += cos[-1].cpu().tolist()
    n = max(len(contexts), 1)
    return {"cosine_by_step": (cos_steps / n).tolist(), "cosine_at_halt": float(np.mean(at_halt)),
            "mean_halt_step": float(np.mean(halt_steps)), "halt_steps": halt_steps, "mse": mse / n,
            "final_cosine": per_example}
