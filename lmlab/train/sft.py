"""Supervised finetuning (SFT) on conversations or raw prompt/completion examples: full finetuning or LoRA (PEFT).

    lmlab sft --config configs/sft/alpaca_oasst1_lora_tiny.yaml
    lmlab sft init=runs/pretrain data=runs/tasks/sft_train.jsonl out=runs/sft train.epochs=2
    lmlab sft ... 'data=[{path: a.jsonl, weight: 0.7}, {path: b.jsonl, format: oasst1, weight: 0.3}]'
    lmlab sft ... lora.enabled=true lora.r=16 lora.merge=true
    lmlab sft init=runs/griffin 'data=[{path: herald.parquet, format: herald}]' out=runs/prover

Starts from a model run dir (`init`: pretrained, or an earlier SFT/DPO run) or a Hugging
Face Llama/Qwen3 directory, and writes a model run dir (kind `model`); trained on
conversations, it carries its chat template (`chat.json`), so generation and evaluation
format prompts the same way.

- Loss on assistant tokens only: each conversation is rendered by `lmlab.data.chat.render`,
  whose train mask is True on the assistant replies and their end-of-turn token; every
  other target is -100. Conversations longer than the context lose whole later exchanges
  first (chat.render's `turns` rule); the manifest counts them.
- Raw prompt/completion data (formats prompt_completion and herald, lmlab.data.formats) is
  no conversation and gets no chat template: `completion_ids` makes [bos] + tokens(prompt) +
  tokens(completion) + [eos], trained on the completion and eos only. An example longer than
  the context loses the end of its completion (and eos); one whose prompt alone leaves no
  completion token in the context is dropped; both are counted. Such a run is a base model
  trained to continue prompts: it writes no chat.json (eval and `lmlab generate` prompt it
  raw), and one run does not mix chat and raw data (refused with a message).
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
from typing import Literal, Optional

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
    data: list[DataSpec] = Field(default_factory=list, description="datasets: a path, or a list of "
                                 "{path | hf, format, weight, max_records, split, invalid}; rows are drawn in "
                                 "proportion to weight; invalid: skip skips malformed records (counted) instead "
                                 "of stopping. Conversations (messages, alpaca, oasst1, gsm8k, preference) or raw "
                                 "prompt/completion examples (prompt_completion, herald), not both in one run")
    out: str = Field("runs/sft", description="run directory (model artifact, checkpoints, metrics, samples)")
    template: str = Field("chatml", description="chat template of conversation data: chatml, instruct, chat, "
                          "alpaca, gemma (needs a Gemma tokenizer), qwen2, qwen2.5, smollm2 (ChatML without bos, with those "
                          "models' default system message); not used for raw prompt/completion data")
    seq_len: Optional[int] = Field(None, ge=8, description="positions per training row (an example of n "
                                   "tokens takes n-1); null = the model's max_seq_len. Longer conversations "
                                   "lose later exchanges (chat.render's 'turns' rule); longer raw examples the "
                                   "end of their completion, or all of it when the prompt alone fills the row "
                                   "(then they are dropped); both counted")

    packing: bool = Field(True, description="pack several conversations per row (attention kept apart by "
                          "doc_ids); false = one conversation per row")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of each dataset's conversations held out "
                                "for val_loss")
    sample_prompts: list[str] = Field(default_factory=list, description="user messages (raw data: prompts, "
                                      "continued after bos) answered (greedy) at every evaluation, logged to "
                                      "samples.jsonl")
    sample_max_new_tokens: int = Field(64, ge=1, description="token budget of each sample answer")
    train: FinetuneTrainConfig = Field(default_factory=FinetuneTrainConfig, description="optimisation")
    backend: Literal["torch", "jax"] = Field("torch", description="torch (the shared trainer) or jax (Griffin only: "
                                             "DeepMind's recurrentgemma.jax over a device mesh, parallel.mesh; "
                                             "for TPUs, docs/jax.md)")
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


def completion_ids(prompt: str, completion: str, tokenizer, max_len: Optional[int] = None,
                   stats: Optional[dict] = None) -> Optional[tuple[list[int], list[bool]]]:
    """(ids, train_mask) of a raw example: [bos] + encode(prompt) + encode(completion) + [eos], the
    mask True on the completion's tokens and eos only. The two texts are encoded apart, as a prompt
    is at inference (`lmlab generate`: bos + encode(prompt)), so the boundary is exact.

    With `max_len` (tokens) and a longer example: the completion is cut from the right (losing
    its end and eos) while at least one completion token fits; otherwise (the prompt alone fills
    max_len) the example is dropped: None. `stats`, when given, counts `truncated`, `cut_tokens`
    and `prompt_too_long`.
    """
    head = [tokenizer.bos_id] + tokenizer.encode(prompt)
    tail = tokenizer.encode(completion) + [tokenizer.eos_id]
    return _completion_ids(head, tail, max_len, stats)


def _completion_ids(head: list[int], tail: list[int], max_len: Optional[int],
                    stats: Optional[dict]) -> Optional[tuple[list[int], list[bool]]]:
    if max_len is not None and len(head) + len(tail) > max_len:
        st = stats if stats is not None else {}
        if len(head) >= max_len:  # no completion token would be a target
            st["prompt_too_long"] = st.get("prompt_too_long", 0) + 1
            return None
        st["truncated"] = st.get("truncated", 0) + 1
        st["cut_tokens"] = st.get("cut_tokens", 0) + len(head) + len(tail) - max_len
        tail = tail[:max_len - len(head)]
    return head + tail, [False] * len(head) + [True] * len(tail)


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


def raw_all(examples: list[tuple[str, str]], tokenizer, seq_len: int,
            stats: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """completion_ids of each raw example, cut to seq_len+1 tokens (dropped when the prompt fills them),
    as (x, y) positions; the texts are encoded in two batches (herald has ~40k examples)."""
    heads = tokenizer.encode_batch([p for p, _ in examples])
    tails = tokenizer.encode_batch([c for _, c in examples])
    out = []
    for head, tail in zip(heads, tails):
        got = _completion_ids([tokenizer.bos_id] + head, tail + [tokenizer.eos_id], seq_len + 1, stats)
        if got is not None:
            out.append(conversation_positions(*got))
    return out


def read_data(cfg: Config) -> tuple[str, list[tuple[list, list[str]]], list[dict]]:
    """Read every dataset: -> (kind "chat" | "raw", [(items, their locations)] per dataset, read stats
    per dataset). One run trains one kind: conversations in a chat template, or raw examples."""
    from lmlab.data.formats import read_sft_data

    if not cfg.data:
        raise UserError("no training data: set data=FILE.jsonl (messages, alpaca, oasst1, prompt_completion, ...) "
                        "or data=[{path: A, weight: 0.7}, {path: B, weight: 0.3}]")
    read_stats: list[dict] = [{} for _ in cfg.data]
    kinds, datasets = [], []
    for d, spec in enumerate(cfg.data):
        where: list[str] = []  # FILE:LINE of each item, for errors found after reading
        kind, items = read_sft_data(spec, stats=read_stats[d], locations=where)
        kinds.append(kind)
        datasets.append((items, where))
    if len(set(kinds)) > 1:
        def listed(k):
            return ", ".join(s.name() for s, kk in zip(cfg.data, kinds) if kk == k)
        raise UserError(f"sft: data mixes conversations ({listed('chat')}) with raw prompt/completion examples "
                        f"({listed('raw')}); a run trains one kind (conversations in a chat template, or raw text "
                        f"without one): train them in two runs, e.g. the raw data first, then the conversations with "
                        f"init= the first run")
    return kinds[0], datasets, read_stats


def build_rows(cfg: Config, tokenizer, seq_len: int):
    """Read, split, render and pack every dataset. -> (train Rows per dataset, val Rows|None, stats).

    Chat data is rendered in `cfg.template` (checked against the tokenizer first); raw data by
    `completion_ids`, with no template. stats["kind"] says which."""
    from lmlab.data.chat import check_template
    from lmlab.data.formats import herald_summary

    kind, datasets, read_stats = read_data(cfg)
    if kind == "chat":
        check_template(cfg.template, tokenizer)
    seed = cfg.train.seed
    train_rows, val_examples, per_dataset = [], [], []
    render_stats: dict = {}
    for d, (spec, (items, where)) in enumerate(zip(cfg.data, datasets)):
        name = spec.name()
        tr, va = split_val(len(items), cfg.val_fraction, seed, d)
        stats: dict = {}
        if kind == "chat":
            train_ex = render_all([items[i] for i in tr], cfg.template, tokenizer, seq_len, stats,
                                  [where[i] for i in tr])
            val_examples += render_all([items[i] for i in va], cfg.template, tokenizer, seq_len, {},
                                       [where[i] for i in va])
        else:
            train_ex = raw_all([items[i] for i in tr], tokenizer, seq_len, stats)
            val_examples += raw_all([items[i] for i in va], tokenizer, seq_len, {})
        if not train_ex:
            what = ("no conversation has an assistant token left to train on" if kind == "chat" else
                    "every prompt fills the context, leaving no completion token to train on")
            raise UserError(f"dataset {name}: {what} within seq_len={seq_len} ({stats}); check the data or raise "
                            f"seq_len")
        order = np.random.default_rng([seed, 4, d]).permutation(len(train_ex))  # mix lengths within rows
        rows = pack_rows([train_ex[i] for i in order], seq_len, tokenizer.pad_id, cfg.packing)
        train_rows.append(rows)
        for k, v in stats.items():
            render_stats[k] = render_stats.get(k, 0) + v
        entry = {"name": str(name), "weight": spec.weight}
        if kind == "chat":
            entry.update({"conversations": len(items), "train_conversations": len(train_ex),
                          "val_conversations": len(va), "truncated": stats.get("truncated", 0),
                          "no_target": stats.get("no_target", 0)})
        else:
            entry.update({"examples": len(items), "train_examples": len(train_ex), "val_examples": len(va),
                          "truncated_completions": stats.get("truncated", 0),
                          "dropped_long_prompts": stats.get("prompt_too_long", 0)})
        entry.update({"rows": len(rows), "positions": int(rows.used.sum()), "trained_tokens": int(rows.targets.sum()),
                      "invalid_skipped": read_stats[d].get("invalid_skipped", 0)})
        if kind == "chat":
            entry["identical_skipped"] = read_stats[d].get("identical_skipped", 0)
        if "herald" in read_stats[d]:
            entry["herald"] = read_stats[d]["herald"]
            print(f"sft: {herald_summary(read_stats[d], str(name))}", file=sys.stderr)
        per_dataset.append(entry)
    val_rows = pack_rows(val_examples, seq_len, tokenizer.pad_id, cfg.packing) if val_examples else None
    invalid = report_skipped(cfg.data, read_stats, "sft")  # warns on stderr
    return train_rows, val_rows, {"kind": kind, "datasets": per_dataset, "render": render_stats, "invalid": invalid}


def data_stats(kind: str, data: dict) -> dict:
    """The manifest's counts of examples, truncation and drops (summed over the datasets), by kind."""
    ds, render = data["datasets"], data["render"]
    if kind == "chat":
        return {"conversations": sum(d["conversations"] for d in ds),
                "train_conversations": sum(d["train_conversations"] for d in ds),
                "val_conversations": sum(d["val_conversations"] for d in ds),
                "truncated_conversations": render.get("truncated", 0),
                "dropped_no_target": render.get("no_target", 0)}
    out = {"examples": sum(d["examples"] for d in ds), "train_examples": sum(d["train_examples"] for d in ds),
           "val_examples": sum(d["val_examples"] for d in ds),
           "truncated_completions": render.get("truncated", 0), "cut_tokens": render.get("cut_tokens", 0),
           "dropped_long_prompts": render.get("prompt_too_long", 0)}
    heralds = [d["herald"] for d in ds if "herald" in d]
    if heralds:
        dropped: dict = {}
        for h in heralds:
            for reason, n in h["dropped"].items():
                dropped[reason] = dropped.get(reason, 0) + n
        out["herald_dropped"] = dropped
    return out


def resolve_steps(t: FinetuneTrainConfig, rows_per_step: int, epoch_rows: int, seq_len: int) -> int:
    if t.steps is not None:
        return t.steps
    if t.tokens is not None:
        if t.tokens == "chinchilla":
            raise UserError("train.tokens=chinchilla is a pretraining budget; give sft train.steps or train.epochs")
        return max(1, math.ceil(int(t.tokens) / (rows_per_step * seq_len)))
    return max(1, math.ceil((t.epochs or 1.0) * epoch_rows / rows_per_step))


# ----------------------------------------------------------------------------- the stage

def raw_prompt(tokenizer, text: str, max_len: int) -> list[int]:
    """A raw sample prompt as training saw prompts: [bos] + encode(text); when longer than
    `max_len`, bos is kept and the start of the text goes (the end is what gets continued)."""
    from lmlab.infer.engine import encode_prompt

    ids = encode_prompt(tokenizer, text)
    return ids if len(ids) <= max_len else ids[:1] + ids[len(ids) - max(0, max_len - 1):]


def run(cfg: Config) -> Path:
    from lmlab.data.chat import required_tokens
    from lmlab.infer.prompting import chat_stops, question_prompt
    from lmlab.models.lora import apply_lora, check_targets, param_counts, targets_of

    if cfg.backend == "jax":
        from lmlab.jax_backend import init_distributed
        from lmlab.jax_backend.griffin.model import require_recurrentgemma

        require_recurrentgemma()
        init_distributed()  # several hosts: before anything touches JAX (or the torch group waits)
    run = TrainingRun(cfg, "sft", KIND)
    cfg, out, timer = run.cfg, run.out, run.timer
    run.check_out(inputs={"init model": cfg.init})  # before the init model loads
    required_tokens(cfg.template)  # an unknown name fails now; its tokens are checked once the data is known to be chat
    with timer("load"):
        model, tokenizer, init_fp, init_format = load_init(cfg)
    if cfg.backend == "jax":
        from lmlab.train.sft_jax import check_supported

        check_supported(cfg, model)
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
        train_rows, val_rows, data = build_rows(cfg, tokenizer, seq_len)
    raw = data["kind"] == "raw"
    template = None if raw else cfg.template  # raw prompt/completion data is trained without one
    if raw and "template" in cfg.model_fields_set:
        print(f"sft: note: template={cfg.template} is not used: raw prompt/completion data is trained as "
              f"bos + prompt + completion + eos, without a chat template, and the run writes no chat.json",
              file=sys.stderr)
    t = cfg.train
    rows_per_step = t.batch_size * t.grad_accum
    epoch_rows = sum(len(r) for r in train_rows)
    total_steps = resolve_steps(t, rows_per_step, epoch_rows, seq_len)

    seed_everything(t.seed)  # the LoRA A init draws from it
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    trainable, total = param_counts(model)
    room = max(1, model.cfg.max_seq_len - cfg.sample_max_new_tokens)
    if raw:  # prompted as training prompts were, continued until eos
        stop_ids = [tokenizer.eos_id]
        prompts = [raw_prompt(tokenizer, p, room) for p in cfg.sample_prompts]
    else:
        stop_ids = list(chat_stops(template, tokenizer).ids)
        prompts = [question_prompt(template, p, tokenizer, max_len=room) for p in cfg.sample_prompts]
    objective = SFTObjective(train_rows, [s.weight for s in cfg.data], val_rows, t.batch_size, t.grad_accum, t.seed,
                             cfg.packing, cfg.eval.batches, tokenizer.pad_id, run_dir=out, sample_prompts=prompts,
                             sample_texts=list(cfg.sample_prompts), stop_ids=stop_ids, tokenizer=tokenizer,
                             sample_max_new_tokens=cfg.sample_max_new_tokens)
    # Anything that changes the trajectory of the weights must match to resume a checkpoint.
    resume_config = {"init": init_fp, "model": model.cfg.model_dump(mode="json"),
                     "train": t.model_dump(mode="json", exclude=RESUMABLE_TRAIN_KEYS), "total_steps": total_steps,
                     "data": [{"fingerprint": f, "spec": s.model_dump(mode="json")} for s, f in zip(cfg.data, data_fps)],
                     "template": template, "seq_len": seq_len, "packing": cfg.packing,
                     "val_fraction": cfg.val_fraction, "lora": cfg.lora.model_dump(mode="json", exclude={"merge"})}
    run.start(resume_config)
    if cfg.resume == "never" and lmdist.is_main():
        (out / SAMPLES).unlink(missing_ok=True)
    mode = f"LoRA r={cfg.lora.r}" if cfg.lora.enabled else "full"
    counts = data_stats(data["kind"], data)
    if raw:
        what = (f"{counts['train_examples']:,} prompt/completion examples, no chat template; "
                f"{counts['truncated_completions']:,} with the completion cut to fit, "
                f"{counts['dropped_long_prompts']:,} dropped: the prompt alone fills the context")
    else:
        what = f"{counts['train_conversations']:,} conversations"
    print(f"sft ({mode}): {trainable:,} trainable of {total:,} parameters; {epoch_rows:,} rows of {seq_len} "
          f"positions ({what}); {total_steps} steps x {rows_per_step} rows"
          f"{f' (at most: time budget {t.time_budget:g} min)' if t.time_budget else ''} -> {out}", file=sys.stderr)
    if cfg.backend == "jax":
        from lmlab.train.jax_checkpoint import refuse_torch_checkpoints
        from lmlab.train.sft_jax import train as train_jax

        refuse_torch_checkpoints(out, cfg.resume)
        with timer("train"):
            summary = train_jax(cfg, out, model, objective, total_steps, resume_config, seq_len, tokenizer.pad_id)
    else:
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
        "template": template,
        "data_kind": data["kind"],
        "seq_len": seq_len,
        "packing": cfg.packing,
        **counts,
        **data["invalid"],
        "datasets": data["datasets"],
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
    # template None: write_outputs writes no chat.json (and removes a stale one): a raw run is no chat model.
    out_cfg = cfg.model_copy(update={"template": template})
    run.finish(lambda m: write_outputs(out, m, tokenizer, out_cfg, init_format), stats, inputs, tokenizer.sha256,
               summary)

    val = f", val_loss {stats['final_val_loss']:.4f}" if stats["final_val_loss"] is not None else ""
    loss = f"{stats['final_train_loss']:.4f}" if stats["final_train_loss"] is not None else "n/a"
    print(f"sft: wrote {out} ({mode}, {total_steps} steps, train loss {loss}{val}, "
          f"{stats['trained_on_share']:.0%} of positions trained)")
    return out
