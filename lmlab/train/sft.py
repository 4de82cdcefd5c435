"""Supervised finetuning (SFT) on conversations: full finetuning or LoRA (PEFT).

    lmlab sft --config configs/sft/alpaca_oasst1_lora_tiny.yaml
    lmlab sft init=runs/pretrain data=runs/tasks/sft_train.jsonl out=runs/sft train.epochs=2
    lmlab sft ... 'data=[{path: a.jsonl, weight: 0.7}, {path: b.jsonl, format: oasst1, weight: 0.3}]'
    lmlab sft ... lora.enabled=true lora.r=16 lora.merge=true

Starts from a model run dir (`init`: pretrained, or an earlier SFT/DPO run) or a Hugging
Face Llama/Qwen3 directory, and writes a model run dir (kind `model`) that carries its chat
template (`chat.json`), so generation and evaluation format prompts the same way.

- Loss on assistant tokens only: each conversation is rendered by `lmlab.data.chat.render`,
  whose train mask is True on the assistant replies and their end-of-turn token; every
  other target is -100. Conversations longer than the context lose whole later exchanges
  first (chat.render's `turns` rule); the manifest counts them.
- Packing: several conversations share one row of `seq_len` positions; `doc_ids` keep
  attention inside each conversation and restart its positions, so a packed conversation
  trains exactly as it would alone (tested).
- Mixing: rows are drawn from the datasets in proportion to `weight`, in blocks with exact
  proportions; the batch of a step is a pure function of (seed, step), so resume is exact.
- Fixed `sample_prompts` are answered (greedy) at every evaluation into `samples.jsonl`.
- The trainer, checkpoints, Ctrl-C and resume are `lmlab.train.loop`'s, as for pretraining.

See docs/sft.md for every option and the output layout.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from pydantic import Field, field_validator

from lmlab import dist as lmdist
from lmlab.data.formats import DataSpec
from lmlab.errors import UserError
from lmlab.models.lora import LoraConfig
from lmlab.runtime import seed_everything
from lmlab.train.batching import EvalShard
from lmlab.train.finetune import (FinetuneTrainConfig, Mixture, data_fingerprint, load_init, report_skipped,
                                  write_outputs)
from lmlab.train.loop import EvalConfig, RunOptions, as_data_specs
from lmlab.train.stage import RESUMABLE_TRAIN_KEYS, TrainingRun

KIND = "model"
POSITIONAL = ("--config", "sft config YAML (same as --config)")
SAMPLES = "samples.jsonl"


class Config(RunOptions):
    init: str = Field("", description="model to finetune: a model run dir (pretrain/sft/dpo) or a Hugging "
                      "Face Llama/Qwen3 directory (config.json + safetensors)")
    tokenizer: Optional[str] = Field(None, description="HF init only: an lmlab tokenizer dir; unset = import "
                                     "the HF directory's tokenizer.json")
    data: list[DataSpec] = Field(default_factory=list, description="conversation datasets: a path, or a list of "
                                 "{path | hf, format, weight, max_records, split, invalid}; rows are drawn in "
                                 "proportion to weight; invalid: skip skips malformed records (counted) instead "
                                 "of stopping")
    out: str = Field("runs/sft", description="run directory (model artifact, checkpoints, metrics, samples)")
    template: str = Field("chatml", description="chat template: chatml, instruct, chat, alpaca")
    seq_len: Optional[int] = Field(None, ge=8, description="positions per training row (a conversation of n "
                                   "tokens takes n-1); null = the model's max_seq_len. Longer conversations "
                                   "lose later exchanges (chat.render's 'turns' rule)")
    packing: bool = Field(True, description="pack several conversations per row (attention kept apart by "
                          "doc_ids); false = one conversation per row")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of each dataset's conversations held out "
                                "for val_loss")
    sample_prompts: list[str] = Field(default_factory=list, description="user messages answered (greedy) at "
                                      "every evaluation, logged to samples.jsonl")
    sample_max_new_tokens: int = Field(64, ge=1, description="token budget of each sample answer")
    train: FinetuneTrainConfig = Field(default_factory=FinetuneTrainConfig, description="optimisation")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters (PEFT)")
    eval: EvalConfig = Field(default_factory=EvalConfig,
                             description="validation loss and sample generations")

    @field_validator("data", mode="before")
    @classmethod
    def _paths_as_specs(cls, v):
        return as_data_specs(v)


# ----------------------------------------------------------------------------- rows

class Rows:
    """Packed training rows of one dataset: inputs, targets (-100 = not trained) and doc ids.

    Each conversation of n tokens gives n-1 (input, target) positions: x = ids[:-1],
    y[j] = ids[j+1] where mask[j+1] else -100. Padding (x = pad, y = -100) forms its own doc.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, doc: np.ndarray, used: np.ndarray, n_conversations: int):
        self.x, self.y, self.doc, self.used = x, y, doc, used
        self.n_conversations = n_conversations
        self.targets = (y != -100).sum(axis=1)  # trained tokens per row

    def __len__(self) -> int:
        return len(self.x)


def conversation_positions(ids: list[int], mask: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one rendered conversation: inputs and next-token targets, -100 where not trained."""
    ids_a = np.asarray(ids, dtype=np.int64)
    y = np.where(np.asarray(mask[1:], dtype=bool), ids_a[1:], -100)
    return ids_a[:-1], y


def pack_rows(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, packing: bool) -> Rows:
    """Next-fit packing in the given order: a conversation goes into the current row if it fits,
    else it starts a new one (order kept, so the result is a pure function of the input)."""
    groups: list[list[int]] = []
    fill = seq_len + 1  # forces a first row
    for i, (x, _) in enumerate(examples):
        if not packing or fill + len(x) > seq_len:
            groups.append([])
            fill = 0
        groups[-1].append(i)
        fill += len(x)
    R = len(groups)
    X = np.full((R, seq_len), pad_id, dtype=np.int32)
    Y = np.full((R, seq_len), -100, dtype=np.int32)
    D = np.zeros((R, seq_len), dtype=np.int16)
    used = np.zeros(R, dtype=np.int32)
    for r, g in enumerate(groups):
        at = 0
        for k, i in enumerate(g):
            x, y = examples[i]
            X[r, at:at + len(x)], Y[r, at:at + len(x)], D[r, at:at + len(x)] = x, y, k
            at += len(x)
        D[r, at:] = len(g)  # padding: a document of its own, never attended to by real tokens
        used[r] = at
    return Rows(X, Y, D, used, len(examples))


# ----------------------------------------------------------------------------- the objective

class SFTObjective:
    """Masked next-token loss over packed conversation rows (the loop's objective protocol)."""

    def __init__(self, train_rows: list[Rows], weights: list[float], val_rows: Optional[Rows], batch_size: int,
                 grad_accum: int, seed: int, packing: bool, eval_batches: int, pad_id: int,
                 run_dir: Optional[Path] = None, sample_prompts: Optional[list[list[int]]] = None,
                 sample_texts: Optional[list[str]] = None, stop_ids: Optional[list[int]] = None,
                 tokenizer=None, sample_max_new_tokens: int = 64):
        self.train_rows, self.val_rows = train_rows, val_rows
        self.mix = Mixture([len(r) for r in train_rows], weights, seed)
        self.batch_size, self.grad_accum, self.packing = batch_size, grad_accum, packing
        self.eval_batches, self.pad_id = eval_batches, pad_id
        self.run_dir, self.tokenizer = run_dir, tokenizer
        self.sample_prompts, self.sample_texts = sample_prompts or [], sample_texts or []
        self.stop_ids, self.sample_max_new_tokens = stop_ids or [], sample_max_new_tokens
        self.epoch_rows = sum(len(r) for r in train_rows)
        self.epoch_tokens = int(sum(r.used.sum() for r in train_rows))
        self._last_step = -1

    def rows_of(self, step: int, micro: int, rows: slice | None = None) -> list[tuple[int, int]]:
        first = (step * self.grad_accum + micro) * self.batch_size
        slots = range(self.batch_size)[rows] if rows is not None else range(self.batch_size)
        return [self.mix.locate(first + b) for b in slots]

    def _assemble(self, picks: list[tuple[Rows, int]]) -> dict:
        width = max(1, max(int(rows.used[r]) for rows, r in picks))  # drop the all-padding tail columns
        x = torch.from_numpy(np.stack([rows.x[r, :width] for rows, r in picks]).astype(np.int64))
        y = torch.from_numpy(np.stack([rows.y[r, :width] for rows, r in picks]).astype(np.int64))
        doc = torch.from_numpy(np.stack([rows.doc[r, :width] for rows, r in picks]).astype(np.int64))
        return {"x": x, "y": y, "doc": doc, "positions": int(sum(int(rows.used[r]) for rows, r in picks)),
                "targets": int((y != -100).sum())}  # counted here, on the CPU: no device sync

    def batch(self, step: int, micro: int, rows: slice | None = None) -> dict:
        # The loop evaluates right after step `step` finishes; remembering the step here is how
        # the samples written during that evaluation get their step label.
        self._last_step = step
        return self._assemble([(self.train_rows[d], r) for d, r in self.rows_of(step, micro, rows)])

    def forward_loss(self, model, b: dict) -> torch.Tensor:
        # One conversation per row starts at position 0 and ends before the padding: the plain
        # causal mask is then exact, and cheaper than a materialised doc_ids mask.
        doc = b["doc"] if self.packing else None
        return model(b["x"], b["y"], doc_ids=doc, return_logits=False)[1]

    def loss(self, model, b: dict) -> tuple[torch.Tensor, int]:
        """(summed cross entropy over the trained tokens, their count): the loop divides by the
        step's total count, so a short reply's tokens weigh the same as a long one's."""
        n = b["targets"]
        # Always through the model, also without targets (0 then): under FSDP every rank's
        # forward takes part in gathering the parameters.
        return self.forward_loss(model, b) * n, n

    def tokens(self, b: dict) -> int:
        return b["positions"]

    def trained_tokens(self, total_steps: int) -> tuple[int, int]:
        """(positions, trained targets) over a run of `total_steps` (from the row tables, no model)."""
        pos = tgt = 0
        for step in range(total_steps):
            for micro in range(self.grad_accum):
                for d, r in self.rows_of(step, micro):
                    pos += int(self.train_rows[d].used[r])
                    tgt += int(self.train_rows[d].targets[r])
        return pos, tgt

    def evaluate(self, model, device, shard: EvalShard = EvalShard()) -> dict:
        out = {}
        if self.val_rows is not None and len(self.val_rows):
            nats, n = 0.0, 0
            stop = min(len(self.val_rows), self.eval_batches * self.batch_size)
            for s in shard.take(range(0, stop, self.batch_size)):
                b = self._assemble([(self.val_rows, r) for r in range(s, min(s + self.batch_size, stop))])
                k = int((b["y"] != -100).sum())
                if k == 0:
                    continue
                b = {key: (v.to(device) if isinstance(v, torch.Tensor) else v) for key, v in b.items()}
                nats += self.forward_loss(model, b).float().item() * k
                n += k
            nats, n = shard.total([nats, n])
            if n:
                out = {"val_loss": nats / n, "val_ppl": math.exp(min(nats / n, 80.0))}
        if self.sample_prompts and self.run_dir is not None and shard.writes:
            self.write_samples(model, device, self._last_step + 1)
        return out

    def write_samples(self, model, device, step: int) -> list[str]:
        from lmlab.infer.engine import complete
        from lmlab.infer.prompting import Stops
        from lmlab.infer.sampling import Sampling

        # Greedy, all prompts in one batch, ending at the template's end-of-turn ids.
        greedy = Sampling(max_new_tokens=self.sample_max_new_tokens)
        texts = complete(model, self.tokenizer, self.sample_prompts, greedy, Stops(ids=tuple(self.stop_ids)),
                         batch_size=max(1, len(self.sample_prompts)), device=device)
        if not lmdist.is_main():  # every rank generates (FSDP gathers collectively); rank 0 writes
            return texts
        with open(self.run_dir / SAMPLES, "a", encoding="utf-8") as f:
            for p, t in zip(self.sample_texts, texts):
                f.write(json.dumps({"step": step, "prompt": p, "completion": t}, ensure_ascii=False) + "\n")
        for p, t in zip(self.sample_texts, texts):
            print(f"  sample @{step}: {p!r} -> {t[:200]!r}", file=sys.stderr)
        return texts


# ----------------------------------------------------------------------------- inputs

def split_val(n: int, fraction: float, seed: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) of dataset d's n conversations: a seeded, fixed split."""
    n_val = int(round(n * fraction))
    if fraction > 0 and n_val == 0 and n >= 10:
        n_val = 1
    order = np.random.default_rng([seed, 1, d]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def render_all(convs: list, template: str, tokenizer, seq_len: int, stats: dict,
               where: Optional[list[str]] = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Render and cut each conversation to seq_len+1 tokens; drop those left with nothing to train.

    `where[i]`, when given, is the FILE:LINE of conversation i: an error rendering it names it.
    """
    from lmlab.data.chat import render

    out = []
    for i, messages in enumerate(convs):
        try:
            ids, mask = render(template, messages, tokenizer, max_len=seq_len + 1, stats=stats)
        except UserError as e:
            if where is None:
                raise
            raise UserError(f"{where[i]}: {e}") from None
        if len(ids) < 2 or not any(mask[1:]):
            continue  # counted by render as no_target
        out.append(conversation_positions(ids, mask))
    return out


def build_rows(cfg: Config, tokenizer, seq_len: int):
    """Read, split, render and pack every dataset. -> (train Rows per dataset, val Rows|None, stats)."""
    from lmlab.data.formats import read_conversations

    if not cfg.data:
        raise UserError("no training data: set data=FILE.jsonl (messages, alpaca, oasst1, ...) or "
                        "data=[{path: A, weight: 0.7}, {path: B, weight: 0.3}]")
    seed = cfg.train.seed
    train_rows, val_examples, per_dataset = [], [], []
    render_stats: dict = {}
    read_stats: list[dict] = [{} for _ in cfg.data]
    for d, spec in enumerate(cfg.data):
        where: list[str] = []  # FILE:LINE of each conversation, for errors found after reading
        convs = read_conversations(spec, stats=read_stats[d], locations=where)
        name = spec.name()
        if not convs:
            raise UserError(f"dataset {name} holds no conversations; check the file and its format")
        tr, va = split_val(len(convs), cfg.val_fraction, seed, d)
        stats: dict = {}
        train_ex = render_all([convs[i] for i in tr], cfg.template, tokenizer, seq_len, stats, [where[i] for i in tr])
        val_examples += render_all([convs[i] for i in va], cfg.template, tokenizer, seq_len, {},
                                   [where[i] for i in va])
        if not train_ex:
            raise UserError(f"dataset {name}: no conversation has an assistant token left to train on within "
                            f"seq_len={seq_len} ({stats}); check the data or raise seq_len")
        order = np.random.default_rng([seed, 4, d]).permutation(len(train_ex))  # mix lengths within rows
        rows = pack_rows([train_ex[i] for i in order], seq_len, tokenizer.pad_id, cfg.packing)
        train_rows.append(rows)
        for k, v in stats.items():
            render_stats[k] = render_stats.get(k, 0) + v
        per_dataset.append({"name": str(name), "weight": spec.weight, "conversations": len(convs),
                            "train_conversations": len(train_ex), "val_conversations": len(va),
                            "rows": len(rows), "positions": int(rows.used.sum()), "trained_tokens":
                            int(rows.targets.sum()), "truncated": stats.get("truncated", 0),
                            "no_target": stats.get("no_target", 0),
                            "invalid_skipped": read_stats[d].get("invalid_skipped", 0),
                            "identical_skipped": read_stats[d].get("identical_skipped", 0)})
    val_rows = pack_rows(val_examples, seq_len, tokenizer.pad_id, cfg.packing) if val_examples else None
    invalid = report_skipped(cfg.data, read_stats, "sft")  # warns on stderr
    return train_rows, val_rows, {"datasets": per_dataset, "render": render_stats, "invalid": invalid}


def resolve_steps(t: FinetuneTrainConfig, rows_per_step: int, epoch_rows: int, seq_len: int) -> int:
    if t.steps is not None:
        return t.steps
    if t.tokens is not None:
        if t.tokens == "chinchilla":
            raise UserError("train.tokens=chinchilla is a pretraining budget; give sft train.steps or train.epochs")
        return max(1, math.ceil(int(t.tokens) / (rows_per_step * seq_len)))
    return max(1, math.ceil((t.epochs or 1.0) * epoch_rows / rows_per_step))


# ----------------------------------------------------------------------------- the stage

def run(cfg: Config) -> Path:
    from lmlab.data.chat import check_template
    from lmlab.infer.prompting import chat_stops, question_prompt
    from lmlab.models.lora import apply_lora, check_targets, param_counts, targets_of

    run = TrainingRun(cfg, "sft", KIND)
    cfg, out, timer = run.cfg, run.out, run.timer
    run.check_out(inputs={"init model": cfg.init})  # before the init model loads
    with timer("load"):
        model, tokenizer, init_fp, init_format = load_init(cfg)
    check_template(cfg.template, tokenizer)
    if cfg.lora.enabled:
        check_targets(model, targets_of(model, cfg.lora))
    seq_len = cfg.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise UserError(f"seq_len={seq_len} is longer than the model's context ({model.cfg.max_seq_len}); "
                        f"set seq_len<={model.cfg.max_seq_len}")

    data_fps = [data_fingerprint(s) for s in cfg.data]
    inputs = {"init": {"path": cfg.init, "fingerprint": init_fp},
              **{f"data_{i}": {"path": s.name(), "fingerprint": f}
                 for i, (s, f) in enumerate(zip(cfg.data, data_fps))}}
    if run.up_to_date(inputs):
        return out

    with timer("data"):
        train_rows, val_rows, data_stats = build_rows(cfg, tokenizer, seq_len)
    t = cfg.train
    rows_per_step = t.batch_size * t.grad_accum
    epoch_rows = sum(len(r) for r in train_rows)
    total_steps = resolve_steps(t, rows_per_step, epoch_rows, seq_len)

    seed_everything(t.seed)  # the LoRA A init draws from it
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    trainable, total = param_counts(model)
    stop_ids = list(chat_stops(cfg.template, tokenizer).ids)
    prompts = [question_prompt(cfg.template, p, tokenizer,
                               max_len=max(1, model.cfg.max_seq_len - cfg.sample_max_new_tokens))
               for p in cfg.sample_prompts]
    objective = SFTObjective(train_rows, [s.weight for s in cfg.data], val_rows, t.batch_size, t.grad_accum, t.seed,
                             cfg.packing, cfg.eval.batches, tokenizer.pad_id, run_dir=out, sample_prompts=prompts,
                             sample_texts=list(cfg.sample_prompts), stop_ids=stop_ids, tokenizer=tokenizer,
                             sample_max_new_tokens=cfg.sample_max_new_tokens)
    # Anything that changes the trajectory of the weights must match to resume a checkpoint.
    resume_config = {"init": init_fp, "model": model.cfg.model_dump(mode="json"),
                     "train": t.model_dump(mode="json", exclude=RESUMABLE_TRAIN_KEYS), "total_steps": total_steps,
                     "data": [{"fingerprint": f, "spec": s.model_dump(mode="json")} for s, f in zip(cfg.data, data_fps)],
                     "template": cfg.template, "seq_len": seq_len, "packing": cfg.packing,
                     "val_fraction": cfg.val_fraction, "lora": cfg.lora.model_dump(mode="json", exclude={"merge"})}
    run.start(resume_config)
    if cfg.resume == "never" and lmdist.is_main():
        (out / SAMPLES).unlink(missing_ok=True)
    mode = f"LoRA r={cfg.lora.r}" if cfg.lora.enabled else "full"
    print(f"sft ({mode}): {trainable:,} trainable of {total:,} parameters; {epoch_rows:,} rows of {seq_len} "
          f"positions ({sum(d['train_conversations'] for d in data_stats['datasets']):,} conversations); "
          f"{total_steps} steps x {rows_per_step} rows"
          f"{f' (at most: time budget {t.time_budget:g} min)' if t.time_budget else ''} -> {out}", file=sys.stderr)
    summary = run.train(model, objective, total_steps=total_steps, resume_config=resume_config,
                        flops_per_token=None, desc="sft")
    total_steps = summary["steps"]  # with a time budget: the resolved length
    positions, targets = objective.trained_tokens(total_steps)
    final_eval = summary["final_eval"]
    stats = {
        "mode": "lora" if cfg.lora.enabled else "full",
        "trainable_params": trainable,
        "params": total,
        "lora": cfg.lora.model_dump(mode="json") if cfg.lora.enabled else None,
        "template": cfg.template,
        "seq_len": seq_len,
        "packing": cfg.packing,
        "conversations": sum(d["conversations"] for d in data_stats["datasets"]),
        "train_conversations": sum(d["train_conversations"] for d in data_stats["datasets"]),
        "val_conversations": sum(d["val_conversations"] for d in data_stats["datasets"]),
        "truncated_conversations": data_stats["render"].get("truncated", 0),
        "dropped_no_target": data_stats["render"].get("no_target", 0),
        **data_stats["invalid"],
        "datasets": data_stats["datasets"],
        "rows_per_epoch": epoch_rows,
        "steps": total_steps,
        "epochs": round(total_steps * rows_per_step / epoch_rows, 4),
        "tokens_trained": positions,
        "trained_on_tokens": targets,
        "trained_on_share": round(targets / positions, 4) if positions else None,
        "final_train_loss": summary["final_loss"],
        "final_val_loss": final_eval.get("val_loss"),
    }
    inputs["tokenizer"] = {"path": str(out / "tokenizer"), "fingerprint": tokenizer.sha256}
    run.finish(lambda m: write_outputs(out, m, tokenizer, cfg, init_format), stats, inputs, tokenizer.sha256, summary)
    val = f", val_loss {stats['final_val_loss']:.4f}" if stats["final_val_loss"] is not None else ""
    loss = f"{stats['final_train_loss']:.4f}" if stats["final_train_loss"] is not None else "n/a"
    print(f"sft: wrote {out} ({mode}, {total_steps} steps, train loss {loss}{val}, "
          f"{stats['trained_on_share']:.0%} of positions trained)")
    return out
