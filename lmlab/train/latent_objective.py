"""LLM-TRM phase 3's objectives in the shared trainer: the reasoner (lmlab/models/latent_reasoner.py)
is the trained model, the LLM a frozen model the loss runs through.

Both put the reasoner's k vectors into the LLM's prompt in place of the thinking
(lmlab.infer.latent) and score answer tokens by the frozen LLM's log-probabilities, gradients
flowing through the LLM into the projection, the SequenceTRM and the compressor:

- `SupervisedLatent` (method=supervised): the sum of -log p(reference answer tokens | prompt with
  the vectors), over the answer's tokens and its end-of-turn token, per token; problems in a
  seeded order per epoch.
- `GRPOLatent` (method=grpo): once per optimizer step (`before_step`), G answers sampled per
  problem with the current reasoner's vectors, reward 1 when the task's checker accepts the
  answer, group advantages (lmlab.train.grpo_losses, TRL's formulas), the frozen reference
  reasoner's log-probs for the k3 KL with weight beta; the loss is the GRPO surrogate (one
  iteration per generation, so the ratio is 1 and its gradient that of the log-probs),
  normalised per completion ("grpo"). With `curriculum`, the first epoch takes the problems from
  easy to hard (the task's `difficulty`, then the reference solution's length), later epochs in
  a seeded order. The rollout is the objective's state, so a checkpoint holds it and a resume
  is exact.

Evaluation (both): the answer NLL per token on the held-out problems, and their greedy exact
match with the vectors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from lmlab.models import unwrap
from lmlab.models.seqtrm import left_pad


@dataclass
class LatentProblem:
    prompt: object            # lmlab.infer.latent.LatentPrompt
    states: torch.Tensor      # (len(prompt.reads), D): the LLM's last-layer states over the prompt
    answer: list[int]         # the reference answer's tokens and the end-of-turn token
    problem: dict             # the record (question, answer, task, difficulty)


def completion_logps(llm, vectors: torch.Tensor, prompts, completions: list[list[int]], pad_id: int = 0):
    """(log p of each completion token (n,), its row (n,)): the frozen `llm` reads each prompt's
    ids with `vectors` (B, k, D) at its slots, then the completion, teacher-forced."""
    seqs = [p.ids + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    device = vectors.device
    idx = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    slots = torch.zeros(len(seqs), width, dtype=torch.bool)
    at = torch.zeros(len(seqs), width, dtype=torch.bool)   # positions whose logits predict a completion token
    targets, rows = [], []
    for r, (p, c, s) in enumerate(zip(prompts, completions, seqs)):
        idx[r, :len(s)] = torch.tensor(s)
        slots[r, p.slots] = True
        at[r, len(p.ids) - 1:len(p.ids) - 1 + len(c)] = True
        targets += c
        rows += [r] * len(c)
    logits, _ = llm(idx.to(device), logits_at=at.to(device),
                    vectors=(slots.to(device), vectors.reshape(-1, vectors.shape[-1])))
    logp = torch.log_softmax(logits.float(), dim=-1)
    t = torch.tensor(targets, device=device)
    return logp.gather(1, t[:, None])[:, 0], torch.tensor(rows, device=device)


def reasoner_vectors(model, items: list[LatentProblem], device) -> torch.Tensor:
    x, mask = left_pad([it.states for it in items], device)
    return model(x, mask)[0]


class _LatentBase:
    """The data, the held-out evaluation and the optimizer both objectives share."""

    progress_metrics = {"val_em": "em"}

    def __init__(self, cfg, llm, tokenizer, latent_prompts, items: list[LatentProblem], train_idx, val_idx):
        self.cfg, self.llm, self.tokenizer, self.lp = cfg, llm, tokenizer, latent_prompts
        self.items, self.train_idx, self.val_idx = items, np.asarray(train_idx), np.asarray(val_idx)
        self.frozen_models = [llm]
        t = cfg.train
        self.batch_size, self.grad_accum, self.seed = t.batch_size, t.grad_accum, t.seed
        self.pad_id = self.lp.placeholder

    def build_optimizer(self, model, t, device):
        """AdamW; the compressor's parameters at `compressor_lr_scale` times the scheduled LR."""
        from lmlab.train.optim import param_groups

        m = unwrap(model)
        comp = {id(p) for p in m.compressor.parameters()}
        groups = []
        for g in param_groups(m, t.weight_decay):
            for part, scale in ((True, self.cfg.compressor_lr_scale), (False, 1.0)):
                ps = [p for p in g["params"] if (id(p) in comp) == part]
                if ps and scale > 0:
                    groups.append({**g, "params": ps, "lr_scale": scale})
                elif ps:
                    for p in ps:
                        p.requires_grad_(False)
        kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), **kw)

    def evaluate(self, model, device) -> dict:
        from lmlab.infer.latent import answer_with_vectors
        from lmlab.infer.sampling import Sampling
        from lmlab.tasks.problems import checked_answer, problem_stops

        if not len(self.val_idx) or self.cfg.eval.batches == 0:
            return {}
        nll, count, right = 0.0, 0, 0
        stops = problem_stops(self.lp.template, self.tokenizer)
        for s in range(0, len(self.val_idx), self.batch_size):
            items = [self.items[i] for i in self.val_idx[s:s + self.batch_size]]
            vecs = reasoner_vectors(model, items, device)
            logp, _ = completion_logps(self.llm, vecs, [it.prompt for it in items], [it.answer for it in items],
                                       self.pad_id)
            nll -= float(logp.sum())
            count += logp.numel()
            outs = answer_with_vectors(self.llm, self.tokenizer, [it.prompt for it in items], vecs,
                                       Sampling(max_new_tokens=self.cfg.max_new_tokens), stops, len(items), device)
            right += sum(checked_answer(it.problem, o.text)[1] for it, o in zip(items, outs))
        return {"val_answer_nll": nll / max(count, 1), "val_em": right / len(self.val_idx)}


class SupervisedLatent(_LatentBase):
    """-log p(reference answer | prompt + vectors), summed over answer tokens."""

    def batch(self, step: int, micro: int) -> dict:
        b = step * self.grad_accum + micro
        n = len(self.train_idx)
        pos = np.arange(b * self.batch_size, (b + 1) * self.batch_size)
        order = {}
        idx = []
        for p in pos:
            e = int(p // n)
            if e not in order:
                order[e] = np.random.default_rng([self.seed, 11, e]).permutation(n)
            idx.append(int(self.train_idx[order[e][p % n]]))
        return {"problems": torch.tensor(idx)}

    def tokens(self, batch: dict) -> int:
        return sum(len(self.items[i].answer) for i in batch["problems"].tolist())

    def loss(self, model, batch: dict):
        items = [self.items[i] for i in batch["problems"].tolist()]
        device = next(unwrap(model).parameters()).device
        vecs = reasoner_vectors(model, items, device)
        logp, _ = completion_logps(self.llm, vecs, [it.prompt for it in items], [it.answer for it in items],
                                   self.pad_id)
        return -logp.sum(), logp.numel()


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big")


def difficulty_order(items: list[LatentProblem], idx: np.ndarray) -> np.ndarray:
    """`idx` from easy to hard: the task's difficulty level, then the reference solution's length."""
    def key(i):
        p = items[i].problem
        return (p.get("difficulty") or 0, len(p["answer"]), i)
    return np.array(sorted(idx.tolist(), key=key))


class GRPOLatent(_LatentBase):
    """G sampled answers per problem with the reasoner's vectors, GRPO's surrogate and k3 KL."""

    progress_metrics = {"reward": "reward", "val_em": "em"}

    def __init__(self, cfg, llm, tokenizer, latent_prompts, items, train_idx, val_idx, reference) -> None:
        super().__init__(cfg, llm, tokenizer, latent_prompts, items, train_idx, val_idx)
        g = cfg.grpo
        self.G, self.beta = g.num_generations, g.beta
        self.reference = reference
        self.frozen_models = [llm, reference]
        rows = self.batch_size * self.grad_accum
        if rows % self.G:
            raise ValueError(f"train.batch_size x train.grad_accum = {rows} rows must be a multiple of "
                             f"grpo.num_generations = {self.G}")
        self.per_step = rows // self.G
        self.curriculum = difficulty_order(items, self.train_idx) if g.curriculum else None
        self.rollout: dict | None = None
        self._metrics: list[dict] = []

    def step_problems(self, step: int) -> list[int]:
        n, out = len(self.train_idx), []
        for j in range(step * self.per_step, (step + 1) * self.per_step):
            e, k = divmod(j, n)
            if e == 0 and self.curriculum is not None:
                out.append(int(self.curriculum[k]))
            else:
                out.append(int(self.train_idx[np.random.default_rng([self.seed, 13, e]).permutation(n)[k]]))
        return out

    def before_step(self, model, step: int) -> None:
        from lmlab.infer.latent import answer_with_vectors
        from lmlab.infer.sampling import Sampling
        from lmlab.tasks.problems import checked_answer, problem_stops
        from lmlab.train.grpo_losses import group_advantages

        if self.rollout is not None and self.rollout["step"] == step:
            return  # resumed right after this step's rollout was saved
        device = next(unwrap(model).parameters()).device
        probs = self.step_problems(step)
        rows = [p for p in probs for _ in range(self.G)]
        items = [self.items[i] for i in probs]
        vecs = reasoner_vectors(model, items, device).repeat_interleave(self.G, 0)
        g = self.cfg.grpo
        sampling = Sampling(max_new_tokens=self.cfg.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                            seed=_seed(self.seed, "latent-grpo", step))
        outs = answer_with_vectors(self.llm, self.tokenizer, [self.items[i].prompt for i in rows], vecs, sampling,
                                   problem_stops(self.lp.template, self.tokenizer), len(rows), device)
        r = torch.tensor([float(checked_answer(self.items[i].problem, o.text)[1]) for i, o in zip(rows, outs)])
        adv, _, zero = group_advantages(r, self.G, "group")
        completions = [list(o.ids) if o.ids else [self.lp.placeholder] for o in outs]
        ref_logps = None
        if self.beta:
            ref_vecs = reasoner_vectors(self.reference, items, device).repeat_interleave(self.G, 0)
            ref_logps, _ = completion_logps(self.llm, ref_vecs, [self.items[i].prompt for i in rows], completions,
                                            self.pad_id)
            ref_logps = ref_logps.float().cpu()
        self.rollout = {"step": step, "rows": rows, "completions": completions, "advantage": adv.float(),
                        "ref": ref_logps}
        self._metrics.append({"reward": float(r.mean()), "frac_reward_zero_std": float(zero.float().mean()),
                              "completion_length": float(np.mean([len(c) for c in completions]))})

    def batch(self, step: int, micro: int) -> dict:
        return {"rows": torch.arange(micro * self.batch_size, (micro + 1) * self.batch_size)}

    def tokens(self, batch: dict) -> int:
        return sum(len(self.rollout["completions"][j]) for j in batch["rows"].tolist())

    def loss(self, model, batch: dict):
        from lmlab.train.grpo_losses import normalise, token_terms

        ro, sel = self.rollout, batch["rows"].tolist()
        device = next(unwrap(model).parameters()).device
        items = [self.items[ro["rows"][j]] for j in sel]
        vecs = reasoner_vectors(model, items, device)
        comps = [ro["completions"][j] for j in sel]
        logp, rows = completion_logps(self.llm, vecs, [it.prompt for it in items], comps, self.pad_id)
        adv = ro["advantage"][sel].to(device)[rows]
        ref = None
        if ro["ref"] is not None:
            offsets = np.concatenate([[0], np.cumsum([len(c) for c in ro["completions"]])])
            ref = torch.cat([ro["ref"][offsets[j]:offsets[j + 1]] for j in sel]).to(device)
        terms = token_terms(logp, None, ref, adv, 0.2, 0.2, self.beta)
        if terms.kl is not None:
            self._metrics.append({"kl": float(terms.kl.detach().mean())})
        return normalise(terms.loss, rows, len(sel), "grpo", self.cfg.max_new_tokens)

    def train_metrics(self) -> dict:
        ms, self._metrics = self._metrics, []
        keys = {k for m in ms for k in m}
        return {k: float(np.mean([m[k] for m in ms if k in m])) for k in keys}

    def state_dict(self) -> dict:
        return {"rollout": self.rollout}

    def load_state_dict(self, state: dict) -> None:
        self.rollout = state.get("rollout")
