"""TRM's objective in the shared trainer: deep supervision with the ACT carry across optimizer steps.

Each optimizer step is one supervision step (the official training loop): micro-batch `micro`
of step `s` brings canonical batch b = s * grad_accum + micro of fresh examples
(lmlab.data.puzzles.sampler, a pure function of b); the rows that halted at the previous step
take them, the others continue their puzzle from the carried (y, z). So the carry is state
across steps, one per (micro-batch, row slice) this process computes, saved in every
checkpoint (`state_dict`): a resumed run continues every row exactly where it was.

The exploration draws of each row (lmlab.models.trm.model) come with the batch, from a
generator seeded by (seed, b): the same whether the rows are computed by 1 or 8 processes or
in smaller forward passes (train.micro_batch). The loss is lmlab.train.trm_losses.act_loss
summed over rows; the loop divides by the step's rows. The optimizer is
lmlab.train.trm_optim.TRMOptimizer. Evaluation runs the test split through all supervision
steps (lmlab.infer.puzzles), with the EMA weights when train.ema is set.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from lmlab import dist as lmdist
from lmlab.data.puzzles.format import PuzzleSplit
from lmlab.data.puzzles.sampler import PuzzleBatches, owners
from lmlab.infer.puzzles import solve, summary
from lmlab.models import unwrap
from lmlab.models.trm.model import Carry
from lmlab.train.trm_losses import act_loss
from lmlab.train.trm_optim import TRMOptimizer

STAT_KEYS = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps")


def train_metrics_of(sums: dict, rows: int, seconds: float) -> dict:
    """The official train metrics from summed statistics (STAT_KEYS, lm_loss, q_halt_loss, rows):
    accuracies and steps over the rows that halted, losses per row, examples (`rows`, of every
    process) per second. Shared by the torch and the JAX trainers."""
    count, n = max(sums["count"], 1.0), max(sums["rows"], 1.0)
    out = {k: sums[k] / count for k in ("accuracy", "exact_accuracy", "q_halt_accuracy", "steps")}
    out.update(lm_loss=sums["lm_loss"] / n, q_halt_loss=sums["q_halt_loss"] / n, halted=sums["count"] / n,
               examples_per_s=round(rows / max(seconds, 1e-9), 1))
    return out


class TRMObjective:
    progress_metrics = {"exact_accuracy": "exact", "steps": "sup"}

    def __init__(self, cfg, train: PuzzleSplit, test: PuzzleSplit | None, halt_max_steps: int,
                 total_len: int) -> None:
        t = cfg.train
        self.cfg, self.test = cfg, test
        self.grad_accum, self.seed = t.grad_accum, t.seed
        self.batches = PuzzleBatches(train, t.batch_size, t.seed)
        self.halt_max_steps, self.total_len = halt_max_steps, total_len
        self.carries: dict[str, Carry | dict] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._rows, self._t0 = 0, time.perf_counter()

    # ------------------------------------------------------------------ data

    def batch(self, step: int, micro: int, rows: slice | None = None) -> dict:
        b = step * self.grad_accum + micro
        batch = self.batches.batch(b, rows)
        n = self.batches.batch_size
        g = np.random.default_rng([self.seed, 2 << 20, b])  # the exploration draws of every row of batch b
        rand, low = g.random(n), g.integers(2, self.halt_max_steps + 1, size=n)
        sel = slice(None) if rows is None else rows
        batch["halt_rand"] = torch.from_numpy(rand[sel].astype(np.float32))
        batch["halt_min"] = torch.from_numpy(low[sel].astype(np.int32))
        batch["slot"] = f"{micro}:{0 if rows is None else rows.start}:{n if rows is None else rows.stop}"
        return batch

    def tokens(self, batch: dict) -> int:
        """Positions processed (the loop's MFU counts them as tokens): rows x (prefix + cells)."""
        return int(batch["inputs"].shape[0]) * self.total_len

    # ------------------------------------------------------------------ loss

    def loss(self, model, batch: dict):
        slot = batch.pop("slot")
        rows = int(batch["inputs"].shape[0])
        device = batch["inputs"].device
        carry = self.carries.get(slot)
        if isinstance(carry, dict):  # restored from a checkpoint: move it to the device once
            carry = Carry.from_state(carry, device)
        if carry is None:
            carry = unwrap(model).initial_carry(rows, device=device)
        carry, out = model(carry, batch)
        self.carries[slot] = carry
        terms = act_loss(out, carry.labels.long(), carry.halted, carry.steps, self.cfg.loss, self.cfg.halt_loss_weight)
        for k in STAT_KEYS:
            self._add(k, terms.stats[k])
        self._add("lm_loss", terms.lm_loss)
        self._add("q_halt_loss", terms.q_halt_loss)
        self._add("rows", torch.tensor(float(rows)))
        self._rows += rows
        return terms.loss, rows

    def _add(self, key: str, value: torch.Tensor) -> None:
        v = value.detach().double()
        self._sums[key] = self._sums[key] + v if key in self._sums else v

    def train_metrics(self) -> dict:
        """The official train metrics since the previous call: accuracies and steps over the rows
        that halted, losses per row; and examples (rows) per second."""
        if not self._sums:
            return {}
        keys = sorted(self._sums)
        vals = torch.stack([self._sums[k].to(torch.float64).reshape(()).cpu() for k in keys])
        if lmdist.world() > 1:
            device = next(iter(self._sums.values())).device
            vals = lmdist.all_reduce_(vals.to(device)).cpu()
        now = time.perf_counter()
        out = train_metrics_of(dict(zip(keys, vals.tolist())), self._rows * lmdist.world(), now - self._t0)
        self._sums, self._rows, self._t0 = {}, 0, now
        return out

    # ------------------------------------------------------------------ state, optimizer, evaluation

    def state_dict(self) -> dict:
        return {"carries": {k: (c.state_dict() if isinstance(c, Carry) else c) for k, c in self.carries.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.carries = dict(state.get("carries", {}))

    def build_optimizer(self, model, train, device):
        c = self.cfg
        return TRMOptimizer(model, c.optimizer, train.lr, train.betas, train.weight_decay,
                            c.puzzle_emb_lr, c.puzzle_emb_weight_decay)

    def evaluate(self, model, device) -> dict:
        if self.test is None:
            return {}
        limit = self.cfg.eval.batches * self.cfg.train.batch_size
        solved = solve(model, self.test, self.cfg.eval.batch_size or self.cfg.train.batch_size, device, limit=limit)
        m = summary(solved, self.test.ratings, owners(self.test))
        return {"val_exact_accuracy": m["exact_accuracy"], "val_token_accuracy": m["token_accuracy"],
                "val_q_halt_accuracy": m["q_halt_accuracy"], "val_steps_used": m["steps_used_mean"],
                "val_exact_at_halt": m["exact_accuracy_at_halt"], "val_examples": m["examples"]}
