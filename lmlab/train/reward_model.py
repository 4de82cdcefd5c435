"""A Bradley-Terry reward model trained on preference pairs (TRL's RewardTrainer loss).

    lmlab reward init=runs/sft data=runs/tasks/dpo_train.jsonl out=runs/reward train.epochs=1
    lmlab reward ... data=[{hf: Anthropic/hh-rlhf, split: train}] center_rewards_coefficient=0.01
    lmlab reward ... lora.enabled=true train.lr=5e-4

The trunk starts from `init` (a model run, usually the SFT run) and gets the verifier's
zero-initialised scalar head (lmlab.models.scorer); the reward r of a (prompt, reply) is the
head's output at the reply's last token (its end-of-turn marker). The loss of a pair is

    −log σ(r_chosen − r_rejected − margin)  +  c · (r_chosen + r_rejected)²

as TRL's RewardTrainer computes it (lmlab.train.scorer_losses.bradley_terry): `margin` is an
optional per-pair field "margin" of the data (0 when absent), c is `center_rewards_coefficient`
(null/0 = off; Eisenstein et al. 2023 use 0.01 to keep rewards centred on zero).

Data: the same specs and readers as `lmlab dpo` (lmlab.data.formats.read_preferences, format
preference): prompt/chosen/rejected text pairs (ours, `lmlab tasks`' dpo_train.jsonl, `lmlab pairs`),
hh-rlhf transcripts, UltraFeedback-binarized message lists, local files or `hf:` datasets,
mixed by weight as in sft/dpo. Each reply is rendered after its prompt with the chat template
by lmlab.infer.scorer.encode_reply, exactly as `RewardModel.load(DIR).score(prompt, reply)`
renders it; too-long sequences lose the start of the prompt (bos kept), and a pair either of
whose replies leaves fewer than 16 prompt tokens is dropped (truncation=error stops instead).
`val_fraction` of each source's prompts is held out, all pairs of a prompt on one side (dpo's
split_val).

Metrics, named as TRL names them: `accuracy` (fraction of pairs with r_chosen > r_rejected),
`margin` (mean r_chosen − r_rejected), `mean_reward`, `min_reward`, `max_reward` on every train
line of metrics.jsonl (over the pairs since the previous line) and with a `val_` prefix on the
eval lines (over the first eval.batches x train.batch_size held-out pairs), next to val_loss.

Outputs in `out` (kind 'reward'): the scorer directory of lmlab.models.scorer (model.safetensors
+ model.json: the trunk; head.safetensors; scorer.json with kind "reward"; tokenizer/),
metrics.jsonl, checkpoints/, manifest.json. Same trainer, checkpoints and exact resume as every
training stage; re-running a finished run is a no-op. See docs/verifier.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field, field_validator

from lmlab import artifacts
from lmlab.data.formats import DataSpec
from lmlab.errors import UserError
from lmlab.models.lora import LoraConfig
from lmlab.runtime import progress
from lmlab.train.loop import RunOptions, as_data_specs
from lmlab.train.scorer_common import (MIN_PROMPT_TOKENS, ScorerEvalConfig, ScorerRun, ScorerTrainConfig, Sequences,
                                       conversation_key, encode_example, mix_sources, mixture_indices,
                                       note_truncated, to_device, total_steps)
from lmlab.train.scorer_losses import REWARD_METRICS, bradley_terry, reward_metric_sums

KIND = "reward"
POSITIONAL = ("--config", "reward config YAML (same as --config)")
METRICS = (*REWARD_METRICS, "min_reward", "max_reward")  # TRL's RewardTrainer metric names


class Config(RunOptions):
    init: str = Field("runs/sft", description="model whose trunk starts the reward model: a model run dir (usually "
                      "the SFT run; its chat.json gives the template unless `template` is set) or a Hugging Face "
                      "Llama/Qwen3 directory")
    tokenizer: str | None = Field(None, description="HF init only: an lmlab tokenizer dir; unset = import the "
                                  "HF directory's tokenizer.json")
    out: str = Field("runs/reward", description="run directory (reward scorer, checkpoints, metrics)")
    data: list[DataSpec] = Field(default_factory=list, description="preference pairs, as for dpo: a path, or a list "
                                 "of data specs {path | hf, format, weight, max_records, split, invalid, "
                                 "identical_pairs}; a record's optional 'margin' (a number) is the pair's margin")
    template: str | None = Field(None, description="chat template (chatml, instruct, chat, alpaca); null = the "
                                 "init run's chat.json, else chatml")
    center_rewards_coefficient: Optional[float] = Field(None, ge=0, description="c in + c·(r_chosen + r_rejected)² "
                                                        "(TRL's reward centring; null or 0 = off, 0.01 is usual)")
    max_len: int | None = Field(None, ge=8, description="tokens per (prompt, reply) sequence; null = the model's "
                                "max_seq_len. Longer ones lose the start of the prompt (see truncation)")
    truncation: Literal["left", "error"] = Field(
        "left", description="left: cut too-long prompts from the left (keeping bos and the end) and drop pairs "
        "left with fewer than 16 prompt tokens; error: stop instead")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of each dataset's prompts held out for "
                                "validation (all pairs of one prompt go to the same side)")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters on the trunk instead of full "
                             "finetuning (the head is always trained; the scorer stores the merged trunk)")
    train: ScorerTrainConfig = Field(default_factory=ScorerTrainConfig, description="optimisation; batch_size "
                                     "counts pairs (each pair is two sequences)")
    eval: ScorerEvalConfig = Field(default_factory=ScorerEvalConfig, description="validation metrics")

    @field_validator("data", mode="before")
    @classmethod
    def _paths_as_specs(cls, v):
        return as_data_specs(v, format="preference")


# ----------------------------------------------------------------------------- tokenized pairs

class RewardPairs:
    """Tokenized pairs: sequence 2i is pair i's prompt + chosen reply, 2i+1 its prompt + rejected reply.

    `source[i]`, `prompt_key[i]` (the split's unit, as dpo's Pairs) and `margin[i]` per pair.
    """

    def __init__(self) -> None:
        self.seqs = Sequences()
        self.source: list[int] = []
        self.prompt_key: list[str] = []
        self.margin: list[float] = []

    def add(self, chosen, rejected, source: int, key: str, margin: float) -> None:
        self.seqs.add(chosen)
        self.seqs.add(rejected)
        self.source.append(source)
        self.prompt_key.append(key)
        self.margin.append(float(margin))

    def __len__(self) -> int:
        return len(self.source)

    def tokens(self, i: int) -> int:
        return self.seqs.tokens(2 * i) + self.seqs.tokens(2 * i + 1)

    def fingerprint(self) -> str:
        return artifacts.fingerprint({"seqs": self.seqs.fingerprint(), "source": self.source,
                                      "margin": self.margin})

    def collate(self, idx, pad_id: int) -> dict:
        """Rows 0..B-1 the chosen sequences, B..2B-1 the rejected ones (as dpo collates), plus margins (B,)."""
        idx = np.asarray(idx, dtype=np.int64)
        batch = self.seqs.collate(np.concatenate([2 * idx, 2 * idx + 1]), pad_id)
        batch["margin"] = torch.tensor([self.margin[i] for i in idx.tolist()], dtype=torch.float32)
        return batch


def read_margins(spec: DataSpec, locations: list[str]) -> list[float]:
    """The 'margin' field of each pair's record (by its location), 0 where a record has none.

    read_preferences returns the pairs without it, so the records are read once more
    (locations are the readers' `file:line` / `hf:...:row N`).
    """
    from lmlab.data.records import iter_records

    wanted = set(locations)
    found: dict[str, float] = {}
    seen = 0
    for where, rec in iter_records(spec, on_bad=lambda *_: None):
        if seen == len(wanted):  # past the last pair read (max_records)
            break
        if where not in wanted:
            continue
        seen += 1
        if not isinstance(rec, dict) or rec.get("margin") is None:
            continue
        m = rec["margin"]
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise UserError(f"{where}: 'margin' must be a finite number (the pair's reward margin), got {m!r}")
        found[where] = float(m)
    return [found.get(w, 0.0) for w in locations]


def tokenize_pairs(records_by_source: list[list[dict]], where: list[list[str]], margins: list[list[float]],
                   template: str, tokenizer, max_len: int, truncation: str) -> tuple[RewardPairs, dict]:
    """Render both replies of every pair after its prompt (encode_reply), cut or drop too-long ones."""
    pairs = RewardPairs()
    counts = {"pairs_read": 0, "pairs_truncated": 0, "pairs_dropped": 0, "pairs_with_margin": 0}
    too_long: list[tuple[str, int]] = []
    bar = progress(total=sum(len(r) for r in records_by_source), desc="reward: tokenize", unit="pair")
    for s, (records, wheres, ms) in enumerate(zip(records_by_source, where, margins)):
        for rec, w, m in zip(records, wheres, ms):
            counts["pairs_read"] += 1
            bar.update(1)
            c, c_status = encode_example(template, rec["prompt"], rec["chosen"], tokenizer, max_len, truncation)
            r, r_status = encode_example(template, rec["prompt"], rec["rejected"], tokenizer, max_len, truncation)
            statuses = (c_status, r_status)
            if "too_long" in statuses:
                too_long.append((w, max(len(c.ids), len(r.ids))))
                continue
            if "dropped" in statuses:
                counts["pairs_dropped"] += 1
                continue
            counts["pairs_truncated"] += "truncated" in statuses
            counts["pairs_with_margin"] += m != 0
            pairs.add(c, r, s, conversation_key(rec["prompt"]), m)
    bar.close()
    if too_long:
        w, length = too_long[0]
        raise UserError(f"{len(too_long)} preference pair(s) are longer than max_len={max_len} tokens, first: {w} "
                        f"({length} tokens); raise max_len (up to the model's max_seq_len), shorten them, or set "
                        f"truncation=left to cut the prompts from the left")
    return pairs, counts


# ----------------------------------------------------------------------------- the objective

class RewardObjective:
    """The Bradley-Terry loss over weighted sources of tokenized pairs; TRL's metrics."""

    progress_metrics = {"accuracy": "acc", "margin": "margin"}

    def __init__(self, pairs: RewardPairs, train_idx: np.ndarray, val_idx: np.ndarray, weights: list[float],
                 cfg: Config, pad_id: int) -> None:
        self.pairs, self.train_idx, self.val_idx = pairs, train_idx, val_idx
        self.coef = cfg.center_rewards_coefficient or 0.0
        self.batch_size, self.grad_accum = cfg.train.batch_size, cfg.train.grad_accum
        self.eval_pairs = cfg.eval.batches * cfg.train.batch_size
        self.pad_id = pad_id
        self.by_source, self.mix, self.epoch_tokens = mix_sources(pairs.source, train_idx, weights, cfg.train.seed,
                                                                  pairs.tokens, "pairs", "add pairs")
        self.epoch_len = self.mix.block
        self._reset()

    def _reset(self) -> None:
        self._sums: Optional[torch.Tensor] = None
        self._min: Optional[torch.Tensor] = None
        self._max: Optional[torch.Tensor] = None
        self._pairs = 0

    def batch(self, step: int, micro: int, rows: slice | None = None) -> dict:
        # rows: a slice of the micro-batch's pairs (each pair is a chosen and a rejected row)
        idx = mixture_indices(self.mix, self.by_source, self.batch_size, self.grad_accum, step, micro, rows)
        return self.pairs.collate(idx, self.pad_id)

    def tokens(self, batch: dict) -> int:
        return batch["n_tokens"]

    def rewards(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen, r_rejected), each (B,), at the replies' last tokens."""
        from lmlab.infer.scorer import read_scores

        r = read_scores(model(batch["x"]), batch["last"]).float()
        half = r.shape[0] // 2
        return r[:half], r[half:]

    def _losses(self, model, batch: dict):
        rc, rr = self.rewards(model, batch)
        return bradley_terry(rc, rr, batch["margin"], self.coef), rc, rr

    def loss(self, model, batch: dict):
        losses, rc, rr = self._losses(model, batch)
        # running sums since the last log line, on the device: train_metrics() syncs once
        sums = reward_metric_sums(rc, rr)
        both = torch.cat([rc, rr]).detach()
        lo, hi = both.min(), both.max()
        self._sums = sums if self._sums is None else self._sums + sums
        self._min = lo if self._min is None else torch.minimum(self._min, lo)
        self._max = hi if self._max is None else torch.maximum(self._max, hi)
        self._pairs += losses.shape[0]
        return losses.sum(), losses.shape[0]  # the loop divides by the step's pairs

    def train_metrics(self) -> dict:
        """TRL's metrics over the pairs trained since the last call (min/max: over those pairs' rewards)."""
        if not self._pairs:
            return {}
        means = (self._sums / self._pairs).tolist()
        out = {**dict(zip(REWARD_METRICS, means)), "min_reward": self._min.item(), "max_reward": self._max.item()}
        self._reset()
        return out

    def evaluate(self, model, device) -> dict:
        """val_loss and val_ + TRL's metric names over the first eval.batches batches of held-out pairs.

        Every process evaluates them all (min/max do not add up over processes), so the metrics agree.
        """
        val = self.val_idx[:self.eval_pairs]
        if not len(val):
            return {}
        loss_sum, sums = 0.0, torch.zeros(len(REWARD_METRICS), device=device)
        lo, hi = math.inf, -math.inf
        for s in range(0, len(val), self.batch_size):
            batch = self.pairs.collate(val[s:s + self.batch_size], self.pad_id)
            batch = to_device(batch, device)
            losses, rc, rr = self._losses(model, batch)
            loss_sum += losses.sum().item()
            sums += reward_metric_sums(rc, rr)
            both = torch.cat([rc, rr])
            lo, hi = min(lo, both.min().item()), max(hi, both.max().item())
        out = {"val_loss": loss_sum / len(val)}
        out.update({f"val_{k}": v / len(val) for k, v in zip(REWARD_METRICS, sums.tolist())})
        out.update({"val_min_reward": lo, "val_max_reward": hi})
        return out


# ----------------------------------------------------------------------------- the stage

def run(cfg: Config) -> Path:
    from lmlab.data.formats import read_preferences
    from lmlab.infer.scorer import pad_id_of
    from lmlab.train.dpo import split_val
    from lmlab.train.finetune import data_fingerprint, final_line, pair_run_stats, report_skipped

    if not cfg.data:
        raise UserError("no preference data: set data=PATH (jsonl with prompt/chosen/rejected, e.g. "
                        "runs/tasks/dpo_train.jsonl) or data=[{hf: Anthropic/hh-rlhf, split: train}]")
    sr = ScorerRun(cfg, "reward")
    cfg, out, timer, max_len = sr.cfg, sr.out, sr.timer, sr.max_len
    if sr.up_to_date({f"data_{i}": {"path": s.name(), "fingerprint": data_fingerprint(s)}
                      for i, s in enumerate(cfg.data)}):
        return out

    with timer("data"):
        read_stats: list[dict] = [{} for _ in cfg.data]
        where: list[list[str]] = [[] for _ in cfg.data]
        records = [read_preferences(spec, stats=st, locations=w) for spec, st, w in zip(cfg.data, read_stats, where)]
        margins = [read_margins(spec, w) for spec, w in zip(cfg.data, where)]
        invalid = report_skipped(cfg.data, read_stats, "reward")
        pairs, counts = tokenize_pairs(records, where, margins, sr.template, sr.tokenizer, max_len, cfg.truncation)
        del records, where, margins
        counts["pairs_identical_skipped"] = sum(st.get("identical_skipped", 0) for st in read_stats)
        counts["pairs_invalid_skipped"] = invalid.pop("invalid_skipped")
    if len(pairs) == 0:
        raise UserError(f"no usable preference pairs: {counts['pairs_read']} read, {counts['pairs_dropped']} dropped "
                        f"because their replies leave fewer than {MIN_PROMPT_TOKENS} prompt tokens within "
                        f"max_len={max_len}; raise max_len or shorten the replies")
    note_truncated("reward", counts, "pairs", max_len, "reply too long")
    t = cfg.train
    weights = [s.weight for s in cfg.data]
    train_idx, val_idx = split_val(pairs, len(cfg.data), cfg.val_fraction, t.seed)
    objective = RewardObjective(pairs, train_idx, val_idx, weights, cfg, pad_id_of(sr.tokenizer))
    steps = total_steps(t, objective.epoch_len, "reward")
    resume_config = sr.resume_config({"pairs": pairs.fingerprint()}, weights, steps,
                                     center_rewards_coefficient=cfg.center_rewards_coefficient)
    summary = sr.train(objective, resume_config, steps, sizes=f"{len(train_idx)} train / {len(val_idx)} val pairs",
                       unit="pairs")

    stats = pair_run_stats(summary, cfg, objective, {**counts, **invalid}, len(train_idx), len(val_idx), max_len,
                           METRICS, (sr.trainable, sr.total), sr.template,
                           center_rewards_coefficient=cfg.center_rewards_coefficient)
    sr.finish(summary, stats, "outcome",
              final_line(stats, [("accuracy", "accuracy", ".2f"), ("margin", "margin", ".4f")]))
    return out
