"""The outcome verifier: a language-model trunk with a scalar head trained to say whether a solution is correct.

    lmlab verifier init=runs/sft data=runs/samples synthetic=runs/tasks/dpo_train.jsonl out=runs/verifier
    lmlab verifier ... level=token balance=true train.epochs=2 val_fraction=0.1
    lmlab verifier ... lora.enabled=true lora.r=16 train.lr=5e-4

As in Cobbe et al. 2021 ("Training Verifiers to Solve Math Word Problems"): the trunk starts
from `init` (usually the SFT model whose samples are being judged, or a separate small model
run) and a zero-initialised scalar head (lmlab.models.scorer) is put on its final hidden
state. Training minimises binary cross-entropy on (problem, solution) -> correct?:

  level=outcome  one logit per pair, read at the solution's last token (its end-of-turn marker)
  level=token    a logit at every solution token, each trained towards the pair's label (Cobbe
                 et al. found this generalises better); the score is still read at the last token
  balance=true   weight each example so correct and wrong ones carry equal total weight

Data (lmlab.train.scorer_losses has the formulas; docs/verifier.md the whole story):
  data       samples from `lmlab samples`: a directory holding samples.jsonl, or such a .jsonl
             file; one record per sample with at least problem (int), question (str),
             completion (str: the model's solution), correct (bool) and k (int)
  synthetic  optional preference files (format preference, e.g. `lmlab tasks`' dpo_train.jsonl):
             chosen -> a correct example, rejected -> a wrong one ("synthetic wrong solutions")
Each source's share of the training examples is its `weight`, mixed exactly and resumably as
in sft/dpo (lmlab.train.finetune.Mixture). `val_fraction` of the problems (by question text,
over all sources) are held out: no problem is on both sides. Validation uses the model
samples; synthetic examples of a held-out problem are dropped from training.

How a pair becomes tokens, and where the score is read: lmlab.infer.scorer.encode_reply, the
same function the Python API (`Verifier.load(DIR).score(problem, answer)`) uses; an example
longer than max_len keeps bos and its end and loses the start of the prompt (one whose reply
leaves fewer than 16 prompt tokens is dropped; truncation=error stops instead).

Metrics: on every train line `accuracy` (at the last token, threshold 0.5, over the examples
since the previous line); on the eval lines val_loss, val_accuracy, val_auroc, val_ece and
val_brier over the first eval.batches x train.batch_size held-out samples (a fixed shuffle);
after training the same over all held-out samples, in the manifest with the reliability table
(lmlab.train.scorer_metrics has the definitions).

Outputs in `out` (kind 'verifier'): the scorer directory of lmlab.models.scorer (model.safetensors
+ model.json: the trunk, an ordinary model dir; head.safetensors; scorer.json; tokenizer/),
reliability.png (reliability diagram and confidence histogram), val_scores.jsonl (per held-out
sample: source, problem, k, task, score, correct), metrics.jsonl, checkpoints/, manifest.json.
Same trainer, checkpoints and exact resume as every training stage; re-running a finished
run is a no-op.

This module also holds what `lmlab reward` (lmlab.train.reward_model) shares with it: the
train/eval settings, loading and checking the init, building the scorer, tokenized
sequences, the mixture's batches, the run length, the up-to-date check and scorer.json's content.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field, field_validator

from lmlab import artifacts
from lmlab import dist as lmdist
from lmlab.config import Strict
from lmlab.data.formats import DataSpec
from lmlab.errors import UserError
from lmlab.models.lora import LoraConfig
from lmlab.runtime import progress, seed_everything
from lmlab.train.finetune import FinetuneTrainConfig, Mixture
from lmlab.train.loop import EvalConfig, RunOptions, as_data_specs
from lmlab.train.scorer_losses import outcome_bce, token_bce
from lmlab.train.scorer_metrics import DEFAULT_BINS, binary_metrics, reliability_table
from lmlab.train.stage import RESUMABLE_TRAIN_KEYS, TrainingRun

KIND = "verifier"
POSITIONAL = ("--config", "verifier config YAML (same as --config)")
SAMPLES_FILE = "samples.jsonl"
# the keys of a samples record the verifier reads (lmlab samples writes these and more)
SAMPLE_KEYS = ("problem", "question", "completion", "correct", "k")
MIN_PROMPT_TOKENS = 16  # as dpo: an example cut to fewer prompt tokens has lost its question
RELIABILITY_PNG = "reliability.png"
VAL_SCORES = "val_scores.jsonl"
VAL_METRICS = ("val_loss", "val_accuracy", "val_auroc", "val_ece", "val_brier")


# ----------------------------------------------------------------------------- settings (shared with reward)

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


class SamplesSpec(Strict):
    path: str = Field(..., description="a directory written by `lmlab samples` (holding samples.jsonl) or a samples "
                      ".jsonl file")
    weight: float = Field(1.0, gt=0, description="relative share of the training examples when sources are mixed")
    max_records: Optional[int] = Field(None, ge=1, description="use at most this many samples (the first ones)")

    def name(self) -> str:
        return self.path


class Config(RunOptions):
    init: str = Field("runs/sft", description="model whose trunk starts the verifier: a model run dir (usually the "
                      "SFT run whose samples are judged, or a separate small model run; its chat.json gives the "
                      "template unless `template` is set) or a Hugging Face Llama/Qwen3 directory")
    tokenizer: str | None = Field(None, description="HF init only: an lmlab tokenizer dir; unset = import the "
                                  "HF directory's tokenizer.json")
    out: str = Field("runs/verifier", description="run directory (verifier scorer, checkpoints, metrics, plots)")
    data: list[SamplesSpec] = Field(default_factory=list, description="labelled model samples: a path (a "
                                    "directory from `lmlab samples` or a samples .jsonl), or a list of "
                                    "{path, weight, max_records}")
    synthetic: list[DataSpec] = Field(default_factory=list, description="optional preference files (format "
                                      "preference, e.g. runs/tasks/dpo_train.jsonl): chosen -> correct, rejected "
                                      "-> wrong; a path or a list of data specs {path | hf, weight, max_records, "
                                      "invalid, ...}")
    level: Literal["outcome", "token"] = Field("outcome", description="outcome: one prediction per solution, at "
                                               "its last token; token: a prediction at every solution token, each "
                                               "trained towards the solution's label (Cobbe et al. 2021)")
    balance: bool = Field(False, description="weight the loss so that correct and wrong examples count equally "
                          "overall (each class's examples weigh 1/(2 x its share of the training mixture))")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of the problems held out for validation (by "
                                "question text over all sources: no problem on both sides)")
    template: str | None = Field(None, description="chat template (chatml, instruct, chat, alpaca); null = the "
                                 "init run's chat.json, else chatml")
    max_len: int | None = Field(None, ge=8, description="tokens per (problem, solution) sequence; null = the "
                                "model's max_seq_len. Longer ones lose the start of the prompt (see truncation)")
    truncation: Literal["left", "error"] = Field(
        "left", description="left: cut too-long prompts from the left (keeping bos and the end) and drop examples "
        "left with fewer than 16 prompt tokens; error: stop instead")
    bins: int = Field(DEFAULT_BINS, ge=2, le=100, description="equal-width confidence bins of the ECE and the "
                      "reliability diagram")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters on the trunk instead of full "
                             "finetuning (the head is always trained; the scorer stores the merged trunk)")
    train: ScorerTrainConfig = Field(default_factory=ScorerTrainConfig, description="optimisation; batch_size "
                                     "counts sequences")
    eval: ScorerEvalConfig = Field(default_factory=ScorerEvalConfig, description="validation metrics")

    @field_validator("data", mode="before")
    @classmethod
    def _paths_as_samples(cls, v):
        return as_data_specs(v)

    @field_validator("synthetic", mode="before")
    @classmethod
    def _paths_as_specs(cls, v):
        return as_data_specs(v, format="preference")


# ----------------------------------------------------------------------------- tokenized sequences (shared)

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
    training rule for too-long examples (see the module docstring)."""
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


# ----------------------------------------------------------------------------- the stage's shared steps

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
    from lmlab.models.lora import check_targets
    from lmlab.train.finetune import load_init

    run = TrainingRun(cfg, verb, verb)  # the artifact kind is the verb: 'verifier' or 'reward'
    run.check_out(inputs={"init model": cfg.init})  # before the init model loads
    refuse_fsdp(run.cfg, verb)
    with run.timer("load"):
        trunk, tokenizer, init_fp, _ = load_init(run.cfg)
    template = resolve_template(run.cfg, verb)
    check_template(template, tokenizer)
    if run.cfg.lora.enabled:
        check_targets(trunk, run.cfg.lora.target_modules)
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


def mixture_indices(mix: Mixture, by_source: list[np.ndarray], batch_size: int, grad_accum: int, step: int,
                    micro: int, rows: slice | None) -> np.ndarray:
    """The examples of a micro-batch: slot g of the run is a pure function of (seed, g), so resume is exact."""
    g0 = (step * grad_accum + micro) * batch_size
    slots = range(g0, g0 + batch_size)
    picks = (mix.locate(g) for g in (slots[rows] if rows is not None else slots))
    return np.array([by_source[d][r] for d, r in picks], dtype=np.int64)


# ----------------------------------------------------------------------------- samples

def samples_path(spec: SamplesSpec) -> Path:
    p = Path(spec.path)
    if p.is_dir():
        if not (p / SAMPLES_FILE).is_file():
            raise UserError(f"{p} has no {SAMPLES_FILE}; give a directory written by `lmlab samples` or a samples "
                            f".jsonl file")
        return p / SAMPLES_FILE
    if not p.is_file():
        raise UserError(f"samples not found: {p} (run `lmlab samples` first, or fix the path)")
    return p


def read_samples(spec: SamplesSpec) -> list[tuple[str, dict]]:
    """(FILE:LINE, record) of every sample, checked: the keys the verifier reads, with their types."""
    from lmlab.data.formats import iter_jsonl

    path = samples_path(spec)
    out = []
    for n, rec in iter_jsonl(path):
        where = f"{path}:{n}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: a samples record must be a JSON object, got {type(rec).__name__}")
        missing = [k for k in SAMPLE_KEYS if k not in rec]
        if missing:
            raise UserError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                            f"a samples record has {', '.join(SAMPLE_KEYS)} (as `lmlab samples` writes them)")
        if not isinstance(rec["question"], str) or not rec["question"].strip():
            raise UserError(f"{where}: 'question' must be a non-empty string")
        if not isinstance(rec["completion"], str):
            raise UserError(f"{where}: 'completion' must be a string (the model's solution)")
        if not isinstance(rec["correct"], bool):
            raise UserError(f"{where}: 'correct' must be true or false, got {rec['correct']!r}")
        for key in ("problem", "k"):
            if not isinstance(rec[key], int) or isinstance(rec[key], bool):
                raise UserError(f"{where}: '{key}' must be an integer, got {rec[key]!r}")
        out.append((where, rec))
        if spec.max_records and len(out) >= spec.max_records:
            break
    if not out:
        raise UserError(f"{path} holds no samples; run `lmlab samples` to write some")
    return out


class Examples:
    """Labelled, tokenized verifier examples: sequences plus label, source, problem key and sample info."""

    def __init__(self) -> None:
        self.seqs = Sequences()
        self.label: list[int] = []
        self.source: list[int] = []
        self.key: list[str] = []
        self.info: list[Optional[dict]] = []  # samples: {"problem", "k", "task"}; synthetic: None

    def add(self, encoded, label: int, source: int, key: str, info: Optional[dict]) -> None:
        self.seqs.add(encoded)
        self.label.append(int(label))
        self.source.append(source)
        self.key.append(key)
        self.info.append(info)

    def __len__(self) -> int:
        return len(self.label)

    def fingerprint(self) -> str:
        return artifacts.fingerprint({"seqs": self.seqs.fingerprint(), "labels": self.label, "source": self.source})


def tokenize_examples(samples: list[list[tuple[str, dict]]], synthetic: list[list[dict]],
                      synthetic_where: list[list[str]], template: str, tokenizer, max_len: int,
                      truncation: str) -> tuple[Examples, dict]:
    """Samples sources first (source s), then synthetic ones (source len(samples) + j) -> (Examples, counts)."""
    ex = Examples()
    counts = {"examples_read": 0, "examples_truncated": 0, "examples_dropped": 0}
    too_long: list[tuple[str, int]] = []
    total = sum(len(s) for s in samples) + 2 * sum(len(p) for p in synthetic)
    bar = progress(total=total, desc="verifier: tokenize", unit="example")

    def add(where, messages, reply, label, source, info):
        counts["examples_read"] += 1
        bar.update(1)
        enc, status = encode_example(template, messages, reply, tokenizer, max_len, truncation)
        if status == "too_long":
            too_long.append((where, len(enc.ids)))
            return
        if status == "dropped":
            counts["examples_dropped"] += 1
            return
        counts["examples_truncated"] += status == "truncated"
        ex.add(enc, label, source, conversation_key(messages), info)

    for s, records in enumerate(samples):
        for where, rec in records:
            messages = [{"role": "user", "content": rec["question"]}]
            add(where, messages, rec["completion"], rec["correct"], s,
                {"problem": rec["problem"], "k": rec["k"], "task": rec.get("task")})
    for j, (pairs, wheres) in enumerate(zip(synthetic, synthetic_where)):
        for pair, where in zip(pairs, wheres):
            add(where, pair["prompt"], pair["chosen"], 1, len(samples) + j, None)
            add(where, pair["prompt"], pair["rejected"], 0, len(samples) + j, None)
    bar.close()
    if too_long:
        where, length = too_long[0]
        raise UserError(f"{len(too_long)} example(s) are longer than max_len={max_len} tokens, first: {where} "
                        f"({length} tokens); raise max_len (up to the model's max_seq_len), or set truncation=left "
                        f"to cut the prompts from the left")
    return ex, counts


def split_by_problem(ex: Examples, eligible: np.ndarray, val_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(train, val, dropped): ceil(f x problems) of the eligible examples' problems (seeded hash) are held out.

    Every example of a held-out problem leaves training; the eligible ones (the model samples,
    or everything when there are none) form the validation set, the others are dropped.
    At least one problem stays in training.
    """
    n = len(ex)
    if val_fraction <= 0:
        return np.arange(n), np.zeros(0, np.int64), 0
    keys = sorted({ex.key[i] for i in np.flatnonzero(eligible)},
                  key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    all_keys = set(ex.key)
    n_val = min(math.ceil(val_fraction * len(keys)), len(keys) - (1 if set(keys) == all_keys else 0))
    held = set(keys[:n_val])
    is_held = np.array([k in held for k in ex.key], dtype=bool)
    val = np.flatnonzero(is_held & eligible)
    dropped = int((is_held & ~eligible).sum())
    return np.flatnonzero(~is_held), val, dropped


# ----------------------------------------------------------------------------- the objective

class VerifierObjective:
    """Binary cross-entropy of the verifier over weighted sources of labelled examples (see scorer_losses)."""

    progress_metrics = {"accuracy": "acc"}

    def __init__(self, ex: Examples, train_idx: np.ndarray, val_idx: np.ndarray, weights: list[float],
                 cfg: Config, pad_id: int) -> None:
        self.ex, self.train_idx, self.val_idx = ex, train_idx, val_idx
        self.level = cfg.level
        self.bins = cfg.bins
        self.batch_size, self.grad_accum = cfg.train.batch_size, cfg.train.grad_accum
        self.pad_id = pad_id
        self.labels = np.asarray(ex.label, dtype=np.float32)
        src = np.asarray(ex.source)[train_idx]
        self.by_source = [train_idx[src == s] for s in range(len(weights))]
        empty = [s for s, ix in enumerate(self.by_source) if len(ix) == 0]
        if empty:
            raise UserError(f"data source {empty[0]} has no training examples left (after truncation and the "
                            f"validation split); remove it, add data or raise max_len")
        self.mix = Mixture([len(ix) for ix in self.by_source], weights, cfg.train.seed)
        self.epoch_len = self.mix.block
        self.epoch_tokens = int(sum(c * np.mean([ex.seqs.tokens(i) for i in ix])
                                    for c, ix in zip(self.mix.counts, self.by_source)))
        # The mixture's share of correct examples: each source's share of a block times its own rate.
        shares = np.asarray(self.mix.counts, dtype=np.float64) / self.mix.block
        self.positive_share = float(sum(w * self.labels[ix].mean() for w, ix in zip(shares, self.by_source)))
        self.class_weights = ((0.5 / (1 - self.positive_share), 0.5 / self.positive_share)
                              if cfg.balance and 0 < self.positive_share < 1 else (1.0, 1.0))
        # evaluate() scores a fixed shuffle of the held-out samples, so a capped subset mixes problems
        order = np.random.default_rng([cfg.train.seed, 7]).permutation(len(val_idx))
        self.eval_idx = val_idx[order][:cfg.eval.batches * cfg.train.batch_size]
        self._correct = None
        self._seen = 0

    def indices(self, step: int, micro: int, rows: slice | None = None) -> np.ndarray:
        return mixture_indices(self.mix, self.by_source, self.batch_size, self.grad_accum, step, micro, rows)

    def collate(self, idx) -> dict:
        batch = self.ex.seqs.collate(idx, self.pad_id)
        labels = self.labels[np.asarray(idx, dtype=np.int64)]
        batch["labels"] = torch.from_numpy(labels)
        w0, w1 = self.class_weights
        batch["weights"] = torch.from_numpy(np.where(labels > 0.5, w1, w0).astype(np.float32))
        return batch

    def batch(self, step: int, micro: int, rows: slice | None = None) -> dict:
        return self.collate(self.indices(step, micro, rows))

    def tokens(self, batch: dict) -> int:
        return batch["n_tokens"]

    def _losses(self, model, batch: dict):
        """-> (loss sum, number of terms, logits at the last token)."""
        from lmlab.infer.scorer import read_scores

        scores = model(batch["x"])
        last = read_scores(scores, batch["last"]).float()
        if self.level == "token":
            losses = token_bce(scores, batch["labels"], batch["mask"], batch["weights"])
            return losses.sum(), int(batch["mask"].sum()), last
        losses = outcome_bce(last, batch["labels"], batch["weights"])
        return losses.sum(), losses.shape[0], last

    def loss(self, model, batch: dict):
        total, n, last = self._losses(model, batch)
        correct = ((last >= 0) == (batch["labels"] > 0.5)).float().sum().detach()  # σ(z) >= 0.5 iff z >= 0
        self._correct = correct if self._correct is None else self._correct + correct
        self._seen += last.shape[0]
        return total, n

    def train_metrics(self) -> dict:
        """`accuracy` over the examples trained since the last call (the loop calls it at log steps)."""
        if not self._seen:
            return {}
        acc = self._correct.item() / self._seen
        self._correct, self._seen = None, 0
        return {"accuracy": acc}

    def score(self, model, device, idx) -> tuple[np.ndarray, float, int]:
        """(P(correct) at the last token, loss sum, terms) of examples `idx`, longest first in batches."""
        idx = np.asarray(idx, dtype=np.int64)
        order = idx[np.argsort([-self.ex.seqs.tokens(i) for i in idx], kind="stable")]
        probs = {}
        loss_sum, terms = 0.0, 0
        for s in range(0, len(order), self.batch_size):
            part = order[s:s + self.batch_size]
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.collate(part).items()}
            batch["weights"] = torch.ones_like(batch["weights"])  # validation: the plain (unweighted) loss
            total, n, last = self._losses(model, batch)
            loss_sum += float(total)
            terms += n
            for i, p in zip(part.tolist(), torch.sigmoid(last).cpu().tolist()):
                probs[i] = p
        return np.array([probs[i] for i in idx.tolist()], dtype=np.float64), loss_sum, terms

    def metrics(self, model, device, idx) -> tuple[dict, np.ndarray]:
        probs, loss_sum, terms = self.score(model, device, idx)
        m = binary_metrics(probs, self.labels[idx], self.bins)
        out = {"val_loss": loss_sum / max(terms, 1), "val_accuracy": m["accuracy"], "val_auroc": m["auroc"],
               "val_ece": m["ece"], "val_brier": m["brier"]}
        return {k: v for k, v in out.items() if v is not None}, probs

    def evaluate(self, model, device) -> dict:
        """val_loss, val_accuracy, val_auroc, val_ece, val_brier on the first eval.batches batches of held-out
        samples. Every process scores them all (AUROC needs every score), so the metrics agree."""
        if not len(self.eval_idx):
            return {}
        return self.metrics(model, device, self.eval_idx)[0]


# ----------------------------------------------------------------------------- outputs

def reliability_plot(table: list[dict], probs: np.ndarray, path: Path, title: str) -> Path:
    """The reliability diagram (accuracy per confidence bin against the diagonal) over a histogram of confidences."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: runs are written on headless machines
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.6, 6.2), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    lo = [r["lo"] for r in table]
    width = [r["hi"] - r["lo"] for r in table]
    filled = [r for r in table if r["count"]]
    top.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
    top.bar([r["lo"] for r in filled], [r["accuracy"] for r in filled], width=[r["hi"] - r["lo"] for r in filled],
            align="edge", color="#4c72b0", edgecolor="white", alpha=0.85, label="fraction correct")
    top.plot([r["confidence"] for r in filled], [r["accuracy"] for r in filled], "o", color="#dd8452",
             markersize=4, label="(mean confidence, fraction correct)")
    top.set_xlim(0, 1)
    top.set_ylim(-0.02, 1.02)  # points at 0 and 1 stay visible
    top.set_ylabel("fraction correct")
    top.set_title(title, fontsize=10)
    top.grid(alpha=0.3)
    top.legend(fontsize=7, loc="upper left")
    bottom.bar(lo, [r["count"] for r in table], width=width, align="edge", color="#55a868", edgecolor="white")
    bottom.set_xlabel("verifier confidence: predicted P(correct)")
    bottom.set_ylabel("samples")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_val_scores(path: Path, ex: Examples, idx: np.ndarray, probs: np.ndarray, names: list[str]) -> None:
    rows = []
    for i, p in zip(idx.tolist(), probs.tolist()):
        info = ex.info[i] or {}
        rows.append({"source": names[ex.source[i]], "problem": info.get("problem"), "k": info.get("k"),
                     "task": info.get("task"), "score": round(float(p), 6), "correct": bool(ex.label[i])})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


# ----------------------------------------------------------------------------- the stage

def run(cfg: Config) -> Path:
    from lmlab.data.formats import read_preferences
    from lmlab.infer.scorer import pad_id_of
    from lmlab.models.lora import param_counts
    from lmlab.models.scorer import save_scorer
    from lmlab.train.finetune import data_fingerprint, report_skipped

    if not cfg.data and not cfg.synthetic:
        raise UserError("no verifier data: set data=DIR (a directory from `lmlab samples`, or its samples.jsonl) "
                        "and optionally synthetic=runs/tasks/dpo_train.jsonl (synthetic wrong solutions)")
    run, trunk, tokenizer, init_fp, template, max_len = load_trunk(cfg, "verifier")
    cfg, out, timer = run.cfg, run.out, run.timer
    names = [s.name() for s in cfg.data] + [s.name() for s in cfg.synthetic]
    inputs = {"init": {"path": cfg.init, "fingerprint": init_fp},
              **{f"data_{i}": {"path": s.path, "fingerprint": artifacts.sha256_file(samples_path(s))}
                 for i, s in enumerate(cfg.data)},
              **{f"synthetic_{i}": {"path": s.name(), "fingerprint": data_fingerprint(s)}
                 for i, s in enumerate(cfg.synthetic)}}
    if run.up_to_date(inputs):
        return out

    with timer("data"):
        samples = [read_samples(s) for s in cfg.data]
        read_stats: list[dict] = [{} for _ in cfg.synthetic]
        where: list[list[str]] = [[] for _ in cfg.synthetic]
        synthetic = [read_preferences(s, stats=st, locations=w) for s, st, w in zip(cfg.synthetic, read_stats, where)]
        invalid = report_skipped(cfg.synthetic, read_stats, "verifier")
        ex, counts = tokenize_examples(samples, synthetic, where, template, tokenizer, max_len, cfg.truncation)
        counts["samples_read"] = sum(len(s) for s in samples)
        counts["synthetic_pairs_read"] = sum(len(p) for p in synthetic)
        del samples, synthetic, where
    if len(ex) == 0:
        raise UserError(f"no usable examples: {counts['examples_read']} read, {counts['examples_dropped']} dropped "
                        f"because their solutions leave fewer than {MIN_PROMPT_TOKENS} prompt tokens within "
                        f"max_len={max_len}; raise max_len")
    labels = np.asarray(ex.label)
    if labels.min() == labels.max():
        which = "correct" if labels[0] else "wrong"
        raise UserError(f"all {len(ex)} examples are {which}: the verifier needs both correct and wrong samples; "
                        f"add synthetic wrong solutions (synthetic=runs/tasks/dpo_train.jsonl) or sample more "
                        f"(more samples per problem, a higher temperature, harder problems)")
    if counts["examples_truncated"] or counts["examples_dropped"]:
        print(f"verifier: {counts['examples_truncated']} of {counts['examples_read']} examples had their prompts cut "
              f"from the left to fit max_len={max_len}; {counts['examples_dropped']} dropped (solution too long)",
              file=sys.stderr)
    t = cfg.train
    n_samples_src = len(cfg.data)
    source = np.asarray(ex.source)
    eligible = source < n_samples_src if (source < n_samples_src).any() else np.ones(len(ex), dtype=bool)
    train_idx, val_idx, dropped_val = split_by_problem(ex, eligible, cfg.val_fraction, t.seed)
    if labels[train_idx].min() == labels[train_idx].max():
        raise UserError(f"the training examples (after holding out val_fraction={cfg.val_fraction} of the problems) "
                        f"are all {'correct' if labels[train_idx][0] else 'wrong'}: the verifier needs both correct "
                        f"and wrong samples; add synthetic wrong solutions or more samples, or lower val_fraction")
    if len(val_idx) and labels[val_idx].min() == labels[val_idx].max():
        print(f"verifier: warning: the {len(val_idx)} held-out samples are all "
              f"{'correct' if labels[val_idx][0] else 'wrong'}, so val_auroc is undefined; add samples or raise "
              f"val_fraction", file=sys.stderr)
    weights = [s.weight for s in cfg.data] + [s.weight for s in cfg.synthetic]
    pad_id = pad_id_of(tokenizer)
    objective = VerifierObjective(ex, train_idx, val_idx, weights, cfg, pad_id)
    steps = total_steps(t, objective.epoch_len, "verifier")
    resume_config = {"init": init_fp, "model": trunk.cfg.model_dump(mode="json"), "template": template,
                     "examples": ex.fingerprint(), "weights": weights, "val_fraction": cfg.val_fraction,
                     "max_len": max_len, "truncation": cfg.truncation, "level": cfg.level, "balance": cfg.balance,
                     "lora": cfg.lora.model_dump(mode="json", exclude={"merge"}),
                     "train": t.model_dump(mode="json", exclude=RESUMABLE_TRAIN_KEYS), "total_steps": steps}
    run.start(resume_config)

    model = build_scorer(trunk, cfg)
    trainable, total = param_counts(model)
    mode = f"LoRA r={cfg.lora.r}" if cfg.lora.enabled else "full"
    print(f"verifier ({mode}, {cfg.level} level): {trainable:,} trainable of {total:,} parameters; "
          f"{len(train_idx)} train / {len(val_idx)} val examples, {objective.positive_share:.1%} of the training "
          f"mixture correct; {steps} steps x {t.batch_size * t.grad_accum} examples"
          f"{f' (at most: time budget {t.time_budget:g} min)' if t.time_budget else ''} -> {out}", file=sys.stderr)
    summary = run.train(model, objective, total_steps=steps, resume_config=resume_config, desc="verifier")
    trained = summary.get("model")

    steps = summary["steps"]
    examples_trained = steps * t.batch_size * t.grad_accum
    val_keys = {ex.key[i] for i in val_idx.tolist()}
    stats = {
        "mode": "lora" if cfg.lora.enabled else "full",
        "params": total,
        "trainable_params": trainable,
        "template": template,
        "level": cfg.level,
        "balance": cfg.balance,
        "class_weights": {"wrong": objective.class_weights[0], "correct": objective.class_weights[1]},
        **counts,
        **invalid,
        "examples_train": int(len(train_idx)),
        "examples_val": int(len(val_idx)),
        "synthetic_dropped_val_problems": dropped_val,
        "problems_train": len({ex.key[i] for i in train_idx.tolist()}),
        "problems_val": len(val_keys),
        "train_positive_share": round(objective.positive_share, 6),
        "max_len": max_len,
        "steps": steps,
        "examples_trained": examples_trained,
        "tokens_trained": summary["tokens"],
        "epochs": round(examples_trained / objective.epoch_len, 4),
        "final_train_loss": summary["final_loss"],
        "final_train_accuracy": summary["final_train"].get("accuracy"),
    }
    val_probs = None
    if lmdist.is_main() and trained is not None and len(val_idx):
        # Every held-out sample, scored by the final model in float32 (as the Python API scores).
        device = next(trained.parameters()).device
        trained.eval()
        with timer("final_eval"), torch.no_grad():
            final, val_probs = objective.metrics(trained, device, val_idx)
        stats["final_val_metrics"] = {**final, "n": int(len(val_idx)),
                                      "base_rate": float(labels[val_idx].mean())}
        stats["reliability"] = reliability_table(val_probs, labels[val_idx], cfg.bins)
    meta = scorer_meta("verifier", template, cfg.level, tokenizer, max_len, cfg.init)

    def write(m) -> None:
        save_scorer(m, out, meta, tokenizer)
        if val_probs is None:
            return
        fm = stats["final_val_metrics"]
        auroc = f"AUROC {fm['val_auroc']:.3f}, " if "val_auroc" in fm else ""
        try:
            write_val_scores(out / VAL_SCORES, ex, val_idx, val_probs, names)
            reliability_plot(stats["reliability"], val_probs, out / RELIABILITY_PNG,
                             f"verifier reliability: {len(val_idx)} held-out samples ({auroc}ECE {fm['val_ece']:.3f})")
        except OSError as e:
            raise artifacts.disk_error(e, out) from None

    inputs["tokenizer"] = {"path": str(out / "tokenizer"), "fingerprint": tokenizer.sha256}
    run.finish(write, stats, inputs, tokenizer.sha256, summary)
    fm = stats.get("final_val_metrics")
    shown = (f", held-out accuracy {fm['val_accuracy']:.3f}" + (f", AUROC {fm['val_auroc']:.3f}" if "val_auroc" in fm
                                                                else "") + f", ECE {fm['val_ece']:.3f}") if fm else ""
    loss = f"{stats['final_train_loss']:.4f}" if stats["final_train_loss"] is not None else "n/a"
    if lmdist.is_main():
        print(f"verifier: wrote {out} ({mode}, {cfg.level} level, {steps} steps, train loss {loss}{shown})")
    return out
