"""GRPO's objective for the shared trainer: the rollout in `before_step`, the surrogate in `loss`.

    objective = GRPOObjective(cfg, tokenizer, template, prompts, problems, train_idx, val_idx, rewards,
                              device, amp, ref_model)
    lmlab.train.loop.train(model, objective, cfg, out, ...)

`cfg` is a `lmlab.train.grpo.Config`. Each optimizer step's rollout (the step's prompts G times,
sampled with the KV-cache engine, scored by the reward functions, with group advantages; the
old log-probs when μ > 1 and the reference log-probs when β > 0) is made in `before_step` and
kept as the objective's state, so checkpoints hold it and a resume inside a generation's μ
steps is exact. `batch` collates rows of it, `loss` returns (sum, count) under the configured
normalisation (lmlab.train.grpo_losses), `train_metrics` TRL's metric names, `evaluate` the
greedy rewards on the held-out problems. The formulas are in lmlab.train.grpo_losses; the
stage that builds this is lmlab.train.grpo.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lmlab import dist as lmdist
from lmlab.rewards.functions import Rewards
from lmlab.train.batching import EvalShard, rank_pieces
from lmlab.train.grpo_losses import clip_stats, group_advantages, normalise, token_terms
from lmlab.train.loop import connected_zero

COMPLETIONS_LOG = "completions.jsonl"
# per micro-batch loss metrics (TRL's names), averaged over the micro-batches since the last log line
LOSS_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max")
LOGGED_PROMPTS = 2  # prompts (each with its G completions) written to completions.jsonl per logged step


def problem_fields(problems: list[dict]) -> dict[str, list]:
    """Every field of the problems but the question, as lists (what reward functions receive)."""
    keys: list[str] = []
    for p in problems:
        keys += [k for k in p if k != "question" and k not in keys]
    return {k: [p.get(k) for p in problems] for k in keys}


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big")


# ----------------------------------------------------------------------------- the objective

class GRPOObjective:
    """Rollouts in `before_step`, the clipped surrogate in `loss`, TRL's metrics in `train_metrics`."""

    def __init__(self, cfg, tokenizer, template: str, prompts: list[list[int]], problems: list[dict],
                 train_idx: np.ndarray, val_idx: np.ndarray, rewards: Rewards, device: torch.device, amp,
                 ref_model=None) -> None:
        from lmlab.tasks.problems import problem_stops

        self.cfg, self.tokenizer, self.template = cfg, tokenizer, template
        self.prompts, self.problems = prompts, problems
        self.train_idx, self.val_idx = train_idx, val_idx
        self.rewards, self.device, self.amp = rewards, device, amp
        self.ref_model = ref_model
        self.frozen_models = [ref_model] if ref_model is not None else []
        self.stops = problem_stops(template, tokenizer)
        t = cfg.train
        self.G, self.mu = cfg.num_generations, cfg.num_iterations
        self.batch_size, self.grad_accum = t.batch_size, t.grad_accum
        self.rows_per_step = t.batch_size * t.grad_accum
        self.prompts_per_step = self.rows_per_step // self.G
        self.eps_low = cfg.epsilon
        self.eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0
        self.world, self.rank = lmdist.world(), lmdist.rank()
        pieces = rank_pieces(t.batch_size, t.grad_accum, self.world, self.rank, t.micro_batch)
        # the global rows (0 .. rows_per_step-1) this process computes, in the order it computes them
        self.my_rows = [m * t.batch_size + r for m, rows in pieces
                        for r in (range(t.batch_size)[rows] if rows is not None else range(t.batch_size))]
        self.epoch_len = len(train_idx)  # prompts per epoch
        self.rollout: Optional[dict] = None
        self._gen_metrics: list[dict] = []
        self._loss_metrics: list[torch.Tensor] = []  # per micro-batch: kl, entropy, clip_stats (LOSS_METRICS)
        self._log_started = False
        # seconds spent in the rollout's parts (this process): the manifest's time split, `lmlab bench grpo`
        self.timings = {"generate": 0.0, "score": 0.0, "reference": 0.0}

    # -- which prompts a step trains on: a fresh seeded order of the training prompts per epoch
    def prompt_of_slot(self, slot: int) -> int:
        epoch, k = divmod(slot, self.epoch_len)
        order = np.random.default_rng([self.cfg.train.seed, 7, epoch]).permutation(self.epoch_len)
        return int(self.train_idx[order[k]])

    def step_prompts(self, gen: int) -> list[int]:
        return [self.prompt_of_slot(gen * self.prompts_per_step + j) for j in range(self.prompts_per_step)]

    # -- the rollout
    def before_step(self, model, step: int) -> None:
        gen = step // self.mu
        if self.rollout is not None and self.rollout["gen"] == gen:
            return  # μ > 1: the same generation again (also right after resuming mid-way)
        with self._autocast():
            self.rollout = self._generate(model, gen, step)

    def _autocast(self):
        import contextlib

        return (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
                else contextlib.nullcontext())

    def _generate(self, model, gen: int, step: int) -> dict:
        from lmlab.infer.engine import complete_ids
        from lmlab.infer.sampling import Sampling

        cfg = self.cfg
        step_problems = self.step_prompts(gen)
        row_problem = [step_problems[r // self.G] for r in self.my_rows]
        sampling = Sampling(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, seed=_seed(cfg.train.seed, "grpo", gen, self.rank))
        t0 = time.perf_counter()
        outs = complete_ids(model, self.tokenizer, [self.prompts[i] for i in row_problem], sampling, self.stops,
                            batch_size=max(len(self.my_rows), 1), device=self.device)
        t1 = time.perf_counter()
        texts = [o.text for o in outs]
        questions = [self.problems[i]["question"] for i in row_problem]
        fields = problem_fields([self.problems[i] for i in row_problem])
        per_fn, _ = self.rewards.score(questions, texts, fields, self.cfg.reward_errors)
        self.timings["generate"] += t1 - t0
        self.timings["score"] += time.perf_counter() - t1
        lengths = [len(o.ids) for o in outs]
        finished = [o.finished for o in outs]
        # Every group's advantage needs its whole group: gather the rows' rewards over the processes.
        parts = lmdist.gather_objects((self.my_rows, per_fn, lengths, finished))
        n = self.rows_per_step
        all_per = np.full((n, len(self.rewards.keys)), np.nan)
        all_len, all_fin = np.zeros(n), np.zeros(n, dtype=bool)
        for rows, per, lens, fins in parts:
            all_per[rows], all_len[rows], all_fin[rows] = per, lens, fins
        total = torch.from_numpy(np.nansum(all_per * self.rewards.weights[None, :], axis=1))
        total[torch.from_numpy(np.isnan(all_per).all(axis=1))] = float("nan")  # unscorable: no signal (TRL)
        adv, std, zero = group_advantages(total, self.G, cfg.scale_rewards)
        self._gen_metrics.append(self._reward_metrics(all_per, total, std, zero, all_len, all_fin))

        comp = [torch.tensor(o.ids, dtype=torch.long) for o in outs]
        trained = [len(o.ids) if (o.finished or not cfg.mask_truncated_completions) else 0 for o in outs]
        rollout = {"gen": gen, "problem": torch.tensor(row_problem, dtype=torch.long),
                   "completion": comp, "trained": torch.tensor(trained, dtype=torch.long),
                   "advantage": adv[self.my_rows].float()}
        t2 = time.perf_counter()
        if self.mu > 1 or cfg.beta:
            batch = self._collate(rollout, range(len(self.my_rows)))
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            if self.mu > 1:  # the sampling policy's log-probs: the ratio's denominator for all μ steps
                rollout["old"] = self._token_logps(model, batch)[0].float().cpu()
            if cfg.beta:
                rollout["ref"] = self._reference_logps(model, batch).float().cpu()
        self.timings["reference"] += time.perf_counter() - t2
        self._log_completions(step, gen, row_problem, texts, per_fn, adv[self.my_rows], finished)
        return rollout

    def _reference_logps(self, model, batch: dict) -> torch.Tensor:
        from lmlab.models.lora import adapters_disabled

        if self.ref_model is not None:
            return self._token_logps(self.ref_model, batch)[0]
        with adapters_disabled(model) as base:
            return self._token_logps(base, batch)[0]

    def _reward_metrics(self, per: np.ndarray, total: torch.Tensor, std: torch.Tensor, zero: torch.Tensor,
                        lengths: np.ndarray, finished: np.ndarray) -> dict:
        """TRL's generation metrics of one rollout (all processes' completions)."""
        from lmlab.train.grpo_losses import nanstd

        m = {"reward": torch.nanmean(total).item(), "reward_std": nanstd(total).item(),
             "frac_reward_zero_std": zero.float().mean().item(),
             "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
             "completions/max_length": float(lengths.max()),
             "completions/clipped_ratio": float((~finished).mean())}
        term = lengths[finished]
        term = term if len(term) else np.zeros(1)  # TRL's edge case: no completion terminated
        m.update({"completions/mean_terminated_length": float(term.mean()),
                  "completions/min_terminated_length": float(term.min()),
                  "completions/max_terminated_length": float(term.max())})
        for j, key in enumerate(self.rewards.keys):
            col = per[:, j]
            ok = col[~np.isnan(col)]
            m[f"rewards/{key}/mean"] = float(ok.mean()) if len(ok) else None  # None: it gave no reward
            m[f"rewards/{key}/std"] = float(ok.std(ddof=1)) if len(ok) > 1 else None
        return m

    def _log_completions(self, step, gen, row_problem, texts, per_fn, adv, finished) -> None:
        every = self.cfg.log_completions_every
        if not every or not lmdist.is_main() or gen * self.mu % every:
            return
        path = Path(self.cfg.out) / COMPLETIONS_LOG
        if not self._log_started:  # a resumed run rewrites the lines from the steps it repeats
            self._log_started = True
            if path.is_file():
                kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= step]
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
                os.replace(tmp, path)
        shown = sorted(set(row_problem), key=row_problem.index)[:LOGGED_PROMPTS]
        with open(path, "a", encoding="utf-8") as f:
            for i, (p, text) in enumerate(zip(row_problem, texts)):
                if p not in shown:
                    continue
                rec = {"step": step + 1, "problem": p, "question": self.problems[p]["question"], "completion": text,
                       "finished": bool(finished[i]), "advantage": round(float(adv[i]), 4),
                       "rewards": {k: (None if np.isnan(v) else float(v)) for k, v in zip(self.rewards.keys, per_fn[i])}}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    # -- batches and the loss
    def _collate(self, rollout: dict, local_rows) -> dict:
        """Rows of the rollout -> right-padded x, targets on the trained completion tokens, flat extras."""
        seqs, starts, trained = [], [], []
        for j in local_rows:
            p = self.prompts[int(rollout["problem"][j])]
            c = rollout["completion"][j].tolist()
            seqs.append(p + c)
            starts.append(len(p))
            trained.append(int(rollout["trained"][j]))
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(seqs), T - 1), -100, dtype=torch.long)
        for r, (s, start, k) in enumerate(zip(seqs, starts, trained)):
            ids[r, :len(s)] = torch.tensor(s)
            if k:
                y[r, start - 1:start - 1 + k] = ids[r, start:start + k]
        local = list(local_rows)
        out = {"x": ids[:, :-1], "y": y, "advantage": rollout["advantage"][local],
               "n_tokens": int(sum(len(s) for s in seqs)), "n_rows": len(local)}
        offsets = np.concatenate([[0], np.cumsum([int(rollout["trained"][j]) for j in range(len(rollout["trained"]))])])
        for key in ("old", "ref"):
            if key in rollout:
                out[key] = torch.cat([rollout[key][offsets[j]:offsets[j] + int(rollout["trained"][j])] for j in local])
        return out

    def batch(self, step: int, micro: int, rows: Optional[slice] = None) -> dict:
        wanted = [micro * self.batch_size + r for r in
                  (range(self.batch_size)[rows] if rows is not None else range(self.batch_size))]
        where = {g: j for j, g in enumerate(self.my_rows)}
        return self._collate(self.rollout, [where[g] for g in wanted])

    def _token_logps(self, model, batch: dict, entropy: bool = False):
        """Flat per-token log p(y) of the trained completion tokens (logits / temperature), their rows, entropy."""
        y = batch["y"]
        valid = y != -100
        rows = valid.nonzero()[:, 0]
        if not valid.any():
            z = torch.zeros(0, device=y.device)
            return z, rows, (z if entropy else None)
        if hasattr(model, "_orig_mod"):  # compiled: a mask of varying size would recompile every batch
            logits = model(batch["x"])[0][valid]
        else:
            logits = model(batch["x"], logits_at=valid)[0]
        logits = logits.float() / self.cfg.temperature
        lse = torch.logsumexp(logits, dim=-1)
        logps = logits.gather(-1, y[valid].unsqueeze(-1)).squeeze(-1) - lse
        ent = None
        if entropy:
            with torch.no_grad():
                ent = lse - (logits.softmax(-1) * logits).sum(-1)
        return logps, rows, ent

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        logps, rows, ent = self._token_logps(model, batch, entropy=True)
        n_rows = batch["n_rows"]
        adv = batch["advantage"].to(logps.device)[rows]
        old = batch["old"].to(logps.device) if "old" in batch else None
        ref = batch["ref"].to(logps.device) if "ref" in batch else None
        terms = token_terms(logps, old, ref, adv, self.eps_low, self.eps_high, self.cfg.beta)
        total, count = normalise(terms.loss, rows, n_rows, self.cfg.loss_type, self.cfg.max_completion_length)
        n = logps.numel()
        if n:
            with torch.no_grad():  # per micro-batch, as TRL logs them; kept on the device until the log step
                kl = terms.kl.mean() if terms.kl is not None else logps.new_zeros(())
                self._loss_metrics.append(torch.cat([torch.stack([kl, ent.mean()]), clip_stats(terms, rows, n_rows)]))
        else:  # every completion of the piece masked (truncated): its rows still count, as in TRL
            return connected_zero(model), count
        return total, count

    def tokens(self, batch: dict) -> int:
        return batch["n_tokens"]

    progress_metrics = {"reward": "reward", "completions/mean_length": "len"}

    def train_metrics(self) -> dict:
        """Means since the previous log line: generation metrics per rollout, loss metrics per token."""
        out: dict = {}
        if self._gen_metrics:
            for k in self._gen_metrics[0]:
                vals = [m[k] for m in self._gen_metrics if m[k] is not None]
                out[k] = float(np.mean(vals)) if vals else None
            self._gen_metrics = []
        if self._loss_metrics:
            means = torch.stack(self._loss_metrics).double().mean(dim=0).tolist()
            self._loss_metrics = []
            out.update({k: v for k, v in zip(LOSS_METRICS, means) if k != "kl" or self.cfg.beta})
        return out

    # -- state carried across steps: the current rollout (so resuming inside μ iterations is exact)
    def state_dict(self) -> dict:
        return {"rollout": self.rollout}

    def load_state_dict(self, state: dict) -> None:
        self.rollout = state.get("rollout")

    # -- validation: greedy completions of the held-out problems, scored by the same rewards
    def evaluate(self, model, device, shard: EvalShard = EvalShard()) -> dict:
        from lmlab.infer.engine import complete
        from lmlab.infer.sampling import Sampling

        val = [int(i) for i in self.val_idx[:self.cfg.eval.batches * self.batch_size]]
        if not val:
            return {}
        sums = np.zeros(1 + len(self.rewards.keys))
        counts = np.zeros(1 + len(self.rewards.keys))
        sampling = Sampling(max_new_tokens=self.cfg.max_completion_length)
        for s in shard.take(range(0, len(val), self.batch_size)):
            idx = val[s:s + self.batch_size]
            texts = complete(model, self.tokenizer, [self.prompts[i] for i in idx], sampling, self.stops,
                             batch_size=self.batch_size, device=device)
            per, total = self.rewards.score([self.problems[i]["question"] for i in idx], texts,
                                            problem_fields([self.problems[i] for i in idx]), self.cfg.reward_errors)
            vals = np.concatenate([total[:, None], per], axis=1)
            sums += np.nansum(vals, axis=0)
            counts += (~np.isnan(vals)).sum(axis=0)
        totals = shard.total([*sums.tolist(), *counts.tolist()])
        k = len(sums)
        sums, counts = np.array(totals[:k]), np.array(totals[k:])
        out = {"val_reward": sums[0] / max(counts[0], 1)}
        for j, key in enumerate(self.rewards.keys):
            out[f"val_rewards/{key}/mean"] = sums[j + 1] / counts[j + 1] if counts[j + 1] else float("nan")
        return out
