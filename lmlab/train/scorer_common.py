"""What both scorer-training stages use: `lmlab verifier` (verifier.py) and `lmlab reward` (reward_model.py).

Both train a trunk with a scalar head (lmlab.models.scorer) on (prompt, reply) sequences, and
differ only in their data, objective and stats. Here is the rest:

  settings   ScorerTrainConfig, ScorerEvalConfig (their `train` and `eval` sections)
  sequences  Sequences (tokenized (prompt, reply) sequences), encode_example (encode_reply plus the
             training rule for too-long examples), conversation_key (a prompt's identity, the
             validation split's unit), note_truncated
  batches    mix_sources (the training examples of each source, mixed by weight as in sft/dpo),
             mixture_indices (the examples of a micro-batch, a pure function of the slot: exact
             resume), to_device
  the run    ScorerRun: check `out`, load and check the init, resolve the template and max_len
             (load_trunk), the up-to-date check, the resume config, building the scorer
             (build_scorer), the plan line, training, writing the scorer directory and the final
             line; total_steps (the run length) and scorer_meta (scorer.json's content)

The layers point one way: the stage modules import this one, never each other.
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
from pydantic import Field

from lmlab import dist as lmdist
from lmlab.errors import UserError
from lmlab.runtime import seed_everything
from lmlab.train.finetune import FinetuneTrainConfig, Mixture
from lmlab.train.loop import EvalConfig
from lmlab.train.stage import RESUMABLE_TRAIN_KEYS, TrainingRun

MIN_PROMPT_TOKENS = 16  # as dpo: an example cut to fewer prompt tokens has lost its question


# ----------------------------------------------------------------------------- settings

class ScorerTrainConfig(FinetuneTrainConfig):
    """SFT's TrainConfig (with `epochs`), scorer defaults. batch_size counts sequences (verifier) or pairs (reward)."""

    # A new head on a trained trunk: more than DPO's 1e-5 (which only nudges a policy), less
    # than pretraining. TRL's reward default (1e-5) is for billion-parameter models.
    lr: float = Field(5e-5, gt=0, description="peak learning rate (AdamW); LoRA usually wants ~5-10x more")
    warmup_steps: int | float = Field(0.05, ge=0, description="linear warmup: a step count (int) or a "
                                      "fraction of the run (float < 1)")
    batch_size: int = Field(16, ge=1, description="micro-batch: (problem, solution) sequences for the verifier, "
                            "preference pairs (two sequences each) for the reward model")
    epochs: float | None = Field(None, gt=0, description="run length in passes over the training examples (used "
                                 "when train.steps is not set; unset too = 1 epoch)")
    seq_len: int | None = Field(None, ge=2, description="unused by verifier and reward: set the top-level max_len")
    tokens: int | Literal["chinchilla"] | None = Field(None, description="unused by verifier and reward (refused): "
                                                       "set train.steps or train.epochs")


class ScorerEvalConfig(EvalConfig):
    every: int = Field(50, ge=0, description="validation metrics every N steps (and always at the end; 0 = end "
                       "only); the train metrics are on every log.every line")
    batches: int = Field(20, ge=0, description="validation batches (of train.batch_size) per evaluation; 0 turns "
                         "the evaluations during training off (the verifier still scores every held-out sample "
                         "at the end)")


# ----------------------------------------------------------------------------- tokenized sequences

class Sequences:
    """Tokenized (prompt, reply) sequences: int32 id arrays and where each reply starts."""

    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []
        self.start: list[int] = []

    def add(self, encoded) -> int:
        self.ids.append(np.asarray(encoded.ids, dtype=np.int32))
        self.start.append(int(encoded.start))
        return len(self.ids) - 1

    def __len__(self) -> int:
        return len(self.ids)

    def tokens(self, i: int) -> int:
        return len(self.ids[i])

    def collate(self, idx, pad_id: int) -> dict:
        from lmlab.infer.scorer import collate_replies

        idx = [int(i) for i in idx]
        out = collate_replies([self.ids[i] for i in idx], [self.start[i] for i in idx], pad_id)
        out["n_tokens"] = int(sum(len(self.ids[i]) for i in idx))
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ids, start in zip(self.ids, self.start):
            h.update(len(ids).to_bytes(4, "little"))
            h.update(start.to_bytes(4, "little"))
            h.update(ids.tobytes())
        return h.hexdigest()


def encode_example(template: str, messages: list[dict], reply: str, tokenizer, max_len: int, truncation: str):
    """-> (Encoded, "ok" | "truncated" | "dropped" | "too_long"): lmlab.infer.scorer.encode_reply plus the
    training rule for too-long examples: one longer than max_len keeps bos and its end and loses the
    start of the prompt; one whose reply leaves fewer than MIN_PROMPT_TOKENS prompt tokens is dropped;
    truncation=error reports it as too_long instead."""
    from lmlab.infer.scorer import encode_reply

    full = encode_reply(template, messages, reply, tokenizer, None)
    if len(full.ids) <= max_len:
        return full, "ok"
    if truncation == "error":
        return full, "too_long"
    enc = encode_reply(template, messages, reply, tokenizer, max_len)
    if enc.prompt_tokens < min(full.prompt_tokens, MIN_PROMPT_TOKENS) or enc.reply_tokens < full.reply_tokens:
        return enc, "dropped"
    return enc, "truncated"


def conversation_key(messages: list[dict]) -> str:
    """The identity of a prompt (the split's unit): its messages, whitespace-trimmed."""
    return "\x1e".join(f"{m['role']}\x1f{m['content'].strip()}" for m in messages)


def note_truncated(verb: str, counts: dict, unit: str, max_len: int, dropped_why: str) -> None:
    """Say on stderr how many of the `unit`s (counts' {unit}_read/_truncated/_dropped) were cut or dropped."""
    cut, dropped = counts[f"{unit}_truncated"], counts[f"{unit}_dropped"]
    if cut or dropped:
        print(f"{verb}: {cut} of {counts[f'{unit}_read']} {unit} had their prompts cut from the left to fit "
              f"max_len={max_len}; {dropped} dropped ({dropped_why})", file=sys.stderr)


# ----------------------------------------------------------------------------- batches

def mix_sources(source, train_idx: np.ndarray, weights: list[float], seed: int, tokens: Callable[[int], int],
                unit: str, add: str) -> tuple[list[np.ndarray], Mixture, int]:
    """-> (training indices of each source, their Mixture by `weights`, tokens in one epoch of the mixture).

    `source[i]` is example i's source, `tokens(i)` its length; a source left without training
    examples is refused (`unit`, `add`: the message's words for the examples and the remedy).
    """
    src = np.asarray(source)[train_idx]
    by_source = [train_idx[src == s] for s in range(len(weights))]
    empty = [s for s, ix in enumerate(by_source) if len(ix) == 0]
    if empty:
        raise UserError(f"data source {empty[0]} has no training {unit} left (after truncation and the "
                        f"validation split); remove it, {add} or raise max_len")
    mix = Mixture([len(ix) for ix in by_source], weights, seed)
    epoch_tokens = int(sum(c * np.mean([tokens(i) for i in ix]) for c, ix in zip(mix.counts, by_source)))
    return by_source, mix, epoch_tokens


def mixture_indices(mix: Mixture, by_source: list[np.ndarray], batch_size: int, grad_accum: int, step: int,
                    micro: int, rows: slice | None) -> np.ndarray:
    """The examples of a micro-batch: slot g of the run is a pure function of (seed, g), so resume is exact."""
    g0 = (step * grad_accum + micro) * batch_size
    slots = range(g0, g0 + batch_size)
    picks = (mix.locate(g) for g in (slots[rows] if rows is not None else slots))
    return np.array([by_source[d][r] for d, r in picks], dtype=np.int64)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- the run

def resolve_template(cfg, verb: str) -> str:
    from lmlab.data.chat import DEFAULT_TEMPLATE, load_chat_template

    if cfg.template:
        return cfg.template
    name = load_chat_template(cfg.init)
    if name is None:
        print(f"{verb}: {cfg.init} has no chat.json (not a chat model); using the {DEFAULT_TEMPLATE} template",
              file=sys.stderr)
        return DEFAULT_TEMPLATE
    return name


def refuse_fsdp(cfg, verb: str) -> None:
    """The loop gathers an FSDP model into a fresh model of its family; a scorer is not one."""
    from lmlab.train.parallelize import resolve_strategy

    if resolve_strategy(cfg.parallel, lmdist.read_env()) == "fsdp":
        raise UserError(f"`lmlab {verb}` does not support parallel.strategy=fsdp (the scorer's head is not part of "
                        f"the model family the final gather rebuilds); use parallel.strategy=ddp")


def load_trunk(cfg, verb: str):
    """Check `out`, load the init, resolve and check the template and max_len, before anything is written.

    -> (run, trunk, tokenizer, init_fp, template, max_len).
    """
    from lmlab.data.chat import check_template
    from lmlab.models.lora import check_targets, targets_of
    from lmlab.train.finetune import load_init

    run = TrainingRun(cfg, verb, verb)  # the artifact kind is the verb: 'verifier' or 'reward'
    run.check_out(inputs={"init model": cfg.init})  # before the init model loads
    refuse_fsdp(run.cfg, verb)
    with run.timer("load"):
        trunk, tokenizer, init_fp, _ = load_init(run.cfg)
    template = resolve_template(run.cfg, verb)
    check_template(template, tokenizer)
    if run.cfg.lora.enabled:
        check_targets(trunk, targets_of(trunk, run.cfg.lora))
    max_seq = trunk.max_context
    max_len = run.cfg.max_len or max_seq
    if max_len is None:
        raise UserError(f"{cfg.init} has an unbounded context; set max_len=N")
    if max_seq is not None and max_len > max_seq:
        raise UserError(f"max_len={max_len} is longer than the model's context (max_seq_len={max_seq}); "
                        f"set max_len<={max_seq}")
    run.config = {**run.config, "template": template}
    return run, trunk, tokenizer, init_fp, template, max_len


def build_scorer(trunk, cfg):
    """The ScorerModel to train: LoRA on the trunk (when enabled), unused trunk weights frozen."""
    from lmlab.models.lora import apply_lora
    from lmlab.models.scorer import ScorerModel

    seed_everything(cfg.train.seed)  # the LoRA A init draws from it
    d_model = getattr(trunk.cfg, "d_model", None)
    if cfg.lora.enabled:
        trunk = apply_lora(trunk, cfg.lora)
    model = ScorerModel(trunk, d_model=d_model)
    model.freeze_unused()
    return model


def total_steps(t: ScorerTrainConfig, epoch_len: int, verb: str) -> int:
    if t.tokens is not None:
        raise UserError(f"train.tokens is not used by {verb}; set the length with train.steps=N or train.epochs=N")
    if t.steps is not None:
        return t.steps
    return max(1, math.ceil((t.epochs or 1.0) * epoch_len / (t.batch_size * t.grad_accum)))


def scorer_meta(kind: str, template: str, level: str, tokenizer, max_len: int, init: str) -> dict:
    return {"kind": kind, "template": template, "level": level, "tokenizer_sha256": tokenizer.sha256,
            "max_len": int(max_len), "init": init}


class ScorerRun:
    """One verifier or reward run, around the stage's own data, objective and stats:

        sr = ScorerRun(cfg, "reward")                        # load_trunk: nothing written yet
        if sr.up_to_date({"data_0": {...}}): return sr.out
        ... read and tokenize the data, split it, build the objective ...
        rc = sr.resume_config({"pairs": fp}, weights, steps, center_rewards_coefficient=c)
        summary = sr.train(objective, rc, steps, sizes="9 train / 1 val pairs", unit="pairs")
        sr.finish(stats, level="outcome", shown=", accuracy 0.75 (val)")
    """

    def __init__(self, cfg, verb: str) -> None:
        self.verb = verb
        self.run, self.trunk, self.tokenizer, self.init_fp, self.template, self.max_len = load_trunk(cfg, verb)
        self.cfg, self.out, self.timer = self.run.cfg, self.run.out, self.run.timer
        self.mode = f"LoRA r={self.cfg.lora.r}" if self.cfg.lora.enabled else "full"
        # in the plan and final lines; a stage may say more ("full, token level") from self.cfg
        self.label = self.mode
        self.inputs: dict = {}
        self.trainable = self.total = 0

    def up_to_date(self, data_inputs: dict) -> bool:
        """Fingerprint the run from the init and `data_inputs` ({name: {"path", "fingerprint"}})."""
        self.inputs = {"init": {"path": self.cfg.init, "fingerprint": self.init_fp}, **data_inputs}
        return self.run.up_to_date(self.inputs)

    def resume_config(self, data: dict, weights: list[float], steps: int, **specific) -> dict:
        """What a checkpoint must match to be resumed: the init, template, data (`data`: its fingerprint
        under the stage's key), mixture, lengths, the stage's `specific` settings, lora, train, steps."""
        cfg = self.cfg
        return {"init": self.init_fp, "model": self.trunk.cfg.model_dump(mode="json"), "template": self.template,
                **data, "weights": weights, "val_fraction": cfg.val_fraction, "max_len": self.max_len,
                "truncation": cfg.truncation, **specific, "lora": cfg.lora.model_dump(mode="json", exclude={"merge"}),
                "train": cfg.train.model_dump(mode="json", exclude=RESUMABLE_TRAIN_KEYS), "total_steps": steps}

    def train(self, objective, resume_config: dict, steps: int, sizes: str, unit: str) -> dict:
        """Mark `out`, build the scorer, print the plan line (`sizes`: the data's; `unit`: what a batch
        counts), train -> the loop's summary (its "model": the trained scorer, on the rank that writes)."""
        from lmlab.models.lora import param_counts

        t = self.cfg.train
        self.run.start(resume_config)
        model = build_scorer(self.trunk, self.cfg)
        self.trainable, self.total = param_counts(model)
        print(f"{self.verb} ({self.label}): {self.trainable:,} trainable of {self.total:,} parameters; {sizes}; "
              f"{steps} steps x {t.batch_size * t.grad_accum} {unit}"
              f"{f' (at most: time budget {t.time_budget:g} min)' if t.time_budget else ''} -> {self.out}",
              file=sys.stderr)
        return self.run.train(model, objective, total_steps=steps, resume_config=resume_config, desc=self.verb)

    def finish(self, summary: dict, stats: dict, level: str, shown: str = "",
               write_more: Optional[Callable[[Path], None]] = None) -> bool:
        """Rank 0 writes the scorer directory (then `write_more(out)`) and the manifest, and prints the
        final line (`shown`: the metrics it ends with). True on the rank that wrote."""
        from lmlab.models.scorer import save_scorer

        meta = scorer_meta(self.verb, self.template, level, self.tokenizer, self.max_len, self.cfg.init)

        def write(m) -> None:
            save_scorer(m, self.out, meta, self.tokenizer)
            if write_more is not None:
                write_more(self.out)

        self.inputs["tokenizer"] = {"path": str(self.out / "tokenizer"), "fingerprint": self.tokenizer.sha256}
        wrote = self.run.finish(write, stats, self.inputs, self.tokenizer.sha256, summary)
        if wrote:
            loss = f"{stats['final_train_loss']:.4f}" if stats["final_train_loss"] is not None else "n/a"
            print(f"{self.verb}: wrote {self.out} ({self.label}, {stats['steps']} steps, train loss {loss}{shown})")
        return wrote
