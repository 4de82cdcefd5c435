"""Pretrain the LLaMA-style transformer on packed token shards (next-token prediction).

    lmlab pretrain --config configs/stages/pretrain.yaml
    lmlab pretrain data=runs/packed out=runs/pretrain model.preset=micro train.steps=200
    lmlab pretrain ... 'data=[{path: runs/web, weight: 3}, {path: runs/code, weight: 1}]'

The run directory (`out`) is a `model` artifact: `model.safetensors` + `model.json`,
`tokenizer/` (a copy of the tokenizer the data was packed with), `metrics.jsonl`,
`checkpoints/step_NNNNNN/` and, once training has finished, `manifest.json`. Ctrl-C or a
crash is safe: the same command continues from the newest good checkpoint, and on CPU the
result is bit for bit what an uninterrupted run gives. Re-running a finished run does
nothing. See docs/training.md for every option, the schedules and the guarantees.

The batch for optimizer step s is a pure function of (seed, s): a numpy generator seeded
with (seed, s, micro) picks, for each row, a dataset by weight and then a row uniformly
(sampling with replacement), so no data-loader state needs saving.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Union

import numpy as np
import torch
from pydantic import Field, field_validator

from lmlab import artifacts
from lmlab.config import Strict
from lmlab.errors import UserError
from lmlab.models.family import get_family
from lmlab.models.griffin.config import GriffinConfig
from lmlab.models.transformer import ModelConfig
from lmlab.runtime import seed_everything
from lmlab.train.batching import EvalShard
from lmlab.train.loop import EvalConfig, RunOptions, TrainConfig, as_data_specs, resolve_total_steps
from lmlab.train.stage import RESUMABLE_TRAIN_KEYS, TrainingRun, swap_in

KIND = "model"
POSITIONAL = ("--config", "pretrain config YAML (same as --config)")


class DataSource(Strict):
    path: str = Field(..., description="a packed artifact directory (from `lmlab pack`)")
    weight: float = Field(1.0, gt=0, description="sampling weight relative to the other sources")


class Config(RunOptions):
    data: list[DataSource] = Field(default_factory=list, description="packed datasets to train on: a path, or "
                                   "a list of {path, weight}; rows are drawn from each in proportion to weight. "
                                   "All must share one tokenizer")
    out: str = Field("runs/pretrain", description="run directory (model artifact, checkpoints, metrics)")
    model: Annotated[Union[ModelConfig, GriffinConfig], Field(discriminator="family")] = Field(
        default_factory=ModelConfig, description="model: a family (transformer or griffin), a preset and any "
        "overrides; vocab_size comes from the tokenizer")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimisation")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="validation loss / perplexity / bits per byte")

    @field_validator("data", mode="before")
    @classmethod
    def _paths_as_sources(cls, v):
        return as_data_specs(v)

    @field_validator("model", mode="before")
    @classmethod
    def _transformer_by_default(cls, v):
        if isinstance(v, dict) and "family" not in v:
            return {**v, "family": "transformer"}  # every config written before families
        return v


class PackedLM:
    """Next-token prediction over weighted packed datasets (the pretraining objective)."""

    def __init__(self, train_sets: list, weights: list[float], val_sets: list, batch_size: int, seq_len: int,
                 seed: int, eval_batches: int) -> None:
        self.train_sets, self.val_sets = train_sets, val_sets
        self.probs = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.batch_size, self.seq_len, self.seed, self.eval_batches = batch_size, seq_len, seed, eval_batches
        self.epoch_tokens = sum(len(d) for d in train_sets) * (seq_len - 1)

    def pick_rows(self, step: int, micro: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset index, row index) of each row of micro-batch `micro` of step `step`."""
        rng = np.random.default_rng([self.seed, step, micro])
        which = rng.choice(len(self.train_sets), size=self.batch_size, p=self.probs)
        u = rng.random(self.batch_size)  # row = floor(u * rows): one draw per row whatever the dataset
        sizes = np.array([len(d) for d in self.train_sets])
        return which, np.minimum((u * sizes[which]).astype(np.int64), sizes[which] - 1)

    def batch(self, step: int, micro: int, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        which, idx = self.pick_rows(step, micro)
        if rows is not None:  # this process's share of the micro-batch (lmlab.train.batching)
            which, idx = which[rows], idx[rows]
        rows = np.empty((len(which), self.seq_len), dtype=np.int64)
        for d in np.unique(which):
            sel = which == d
            rows[sel] = self.train_sets[d].rows(idx[sel])[:, :self.seq_len]
        rows_t = torch.from_numpy(rows)
        return rows_t[:, :-1], rows_t[:, 1:]

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        x, y = batch
        _, loss = model(x, y, return_logits=False)  # the mean over every position (none is ignored)
        return loss * y.numel(), y.numel()

    def evaluate(self, model, device, shard: EvalShard = EvalShard()) -> dict:
        """val_loss (nats/token), val_ppl and val_bpb over the first eval_batches batches of each
        val split (this process's share of them under DDP, summed over the processes)."""
        batches = []
        for ds in self.val_sets:
            n_rows = min(len(ds), self.eval_batches * self.batch_size)
            stats = ds.manifest.get("stats", {})
            bytes_per_token = stats.get("val_bytes", 0) / max(stats.get("val_tokens", 0), 1)
            batches += [(ds, start, n_rows, bytes_per_token) for start in range(0, n_rows, self.batch_size)]
        nats, tokens, nbytes = 0.0, 0, 0.0
        for ds, start, n_rows, bytes_per_token in shard.take(batches):
            rows = torch.from_numpy(ds.rows(np.arange(start, min(start + self.batch_size, n_rows)))
                                    [:, :self.seq_len].astype(np.int64)).to(device)
            _, loss = model(rows[:, :-1], rows[:, 1:], return_logits=False)
            n = rows[:, 1:].numel()
            nats += loss.float().item() * n
            tokens += n
            nbytes += n * bytes_per_token
        nats, tokens, nbytes = shard.total([nats, tokens, nbytes])
        if tokens == 0:
            return {}
        val_loss = nats / tokens
        out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 80.0))}
        if nbytes > 0:
            out["val_bpb"] = nats / math.log(2) / nbytes
        return out


def open_datasets(cfg: Config):
    """Open every packed source; check kinds, one shared tokenizer and seq_len. -> (train, val, manifests)."""
    from lmlab.data.loader import PackedDataset

    if not cfg.data:
        raise UserError("no training data: set data=PATH (a packed artifact from `lmlab pack`) or "
                        "data=[{path: A, weight: 1}, {path: B, weight: 2}]")
    train_sets, val_sets, manifests = [], [], []
    for src in cfg.data:
        m = artifacts.require_artifact(src.path, "packed", what="training data")
        train_sets.append(PackedDataset(src.path, split="train"))
        val = PackedDataset(src.path, split="val")
        if len(val):
            val_sets.append(val)
        manifests.append(m)
        first = cfg.data[0]
        if train_sets[-1].tokenizer_sha256 != train_sets[0].tokenizer_sha256:
            raise UserError(f"packed data {src.path} was made with tokenizer {train_sets[-1].tokenizer_sha256[:12]} but "
                            f"{first.path} with {train_sets[0].tokenizer_sha256[:12]}; re-pack them with one tokenizer")
        if len(train_sets[-1]) == 0:
            raise UserError(f"packed data {src.path} has no training rows; pack more text or lower seq_len")
    packed_len = min(d.seq_len for d in train_sets)
    seq_len = cfg.train.seq_len or packed_len
    if seq_len > packed_len:
        raise UserError(f"train.seq_len={seq_len} is longer than the packed rows ({packed_len} tokens); "
                        f"set train.seq_len<={packed_len} or re-pack with a longer seq_len")
    return train_sets, val_sets, manifests, seq_len


def _tokenizer_dir(manifest: dict, data_path: str) -> Path:
    tok = (manifest.get("inputs") or {}).get("tokenizer") or {}
    p = tok.get("path")
    if not p or not Path(p).is_dir():
        raise UserError(f"the tokenizer of packed data {data_path} ({p or 'not recorded in its manifest'}) "
                        f"is not found; run from the directory it was packed in, or re-run `lmlab pack`")
    return Path(p)


def write_final(out: Path, model, tokenizer) -> None:
    """model.safetensors + model.json + tokenizer/, each swapped in only when complete."""
    from lmlab.models import save_model

    def write(tmp: Path) -> None:
        save_model(model, tmp)
        tokenizer.copy_to(tmp / "tokenizer")

    swap_in(out, write, ["model.safetensors", "model.json", "tokenizer"])


def run(cfg: Config) -> Path:
    from lmlab.data.tokenizer import Tokenizer

    run = TrainingRun(cfg, "pretrain", KIND)
    cfg, out = run.cfg, run.out
    run.check_out(inputs={f"training data {s.path}": s.path for s in cfg.data})
    train_sets, val_sets, manifests, seq_len = open_datasets(cfg)
    tok_dir = _tokenizer_dir(manifests[0], cfg.data[0].path)
    tokenizer = Tokenizer.load(tok_dir)
    family = get_family(cfg.model.family)
    model_cfg = family.config(cfg.model, vocab_size=tokenizer.vocab_size)
    if model_cfg.max_seq_len < seq_len - 1:
        raise UserError(f"model.max_seq_len={model_cfg.max_seq_len} is shorter than the training context "
                        f"(train.seq_len-1 = {seq_len - 1}); set model.max_seq_len={seq_len} or lower train.seq_len")

    inputs = {f"data_{i}": {"path": s.path, "fingerprint": m["fingerprint"]} for i, (s, m) in enumerate(zip(cfg.data, manifests))}
    if run.up_to_date(inputs):
        return out

    seed_everything(cfg.train.seed)
    model = family.build(model_cfg)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * (seq_len - 1)
    total_steps = resolve_total_steps(cfg.train, tokens_per_step, model.num_params())
    objective = PackedLM(train_sets, [s.weight for s in cfg.data], val_sets, cfg.train.batch_size, seq_len,
                         cfg.train.seed, cfg.eval.batches)
    # Anything that changes the trajectory of the weights must match to resume a checkpoint.
    t = cfg.train.model_dump(mode="json", exclude=RESUMABLE_TRAIN_KEYS)
    resume_config = {"model": model_cfg.model_dump(mode="json"), "train": {**t, "seq_len": seq_len},
                     "total_steps": total_steps,
                     "data": [{"fingerprint": m["fingerprint"], "weight": s.weight} for s, m in zip(cfg.data, manifests)]}
    run.start(resume_config)
    flops_per_token = model.flops_per_token(seq_len - 1)
    budget = f" (at most: time budget {cfg.train.time_budget:g} min)" if cfg.train.time_budget else ""
    print(f"pretrain: {model.num_params():,} parameters ({model_cfg.preset}), {total_steps} steps x "
          f"{tokens_per_step:,} tokens = {total_steps * tokens_per_step:,} tokens{budget} -> {out}", file=sys.stderr)
    summary = run.train(model, objective, total_steps=total_steps, resume_config=resume_config,
                        flops_per_token=flops_per_token, desc="pretrain")
    final_eval = summary["final_eval"]
    total_steps = summary["steps"]  # with a time budget: the resolved length
    stats = {
        "params": model.num_params(),
        "non_embedding_params": model.num_params(non_embedding=True),
        "flops_per_token": flops_per_token,
        "seq_len": seq_len,
        "tokens_per_step": tokens_per_step,
        "steps": total_steps,
        "tokens_trained": summary["tokens"],
        "epochs": round(summary["tokens"] / objective.epoch_tokens, 4),
        "final_train_loss": summary["final_loss"],
        "final_val_loss": final_eval.get("val_loss"),
        "final_val_ppl": final_eval.get("val_ppl"),
        "final_val_bpb": final_eval.get("val_bpb"),
    }
    inputs["tokenizer"] = {"path": str(tok_dir), "fingerprint": tokenizer.sha256}
    run.finish(lambda m: write_final(out, m, tokenizer), stats, inputs, tokenizer.sha256, summary)
    val = f", val_loss {stats['final_val_loss']:.4f}" if stats["final_val_loss"] is not None else ""
    bpb = f", val_bpb {stats['final_val_bpb']:.4f}" if stats["final_val_bpb"] is not None else ""
    loss = f"{stats['final_train_loss']:.4f}" if stats["final_train_loss"] is not None else "n/a"
    print(f"pretrain: wrote {out} ({total_steps} steps, train loss {loss}{val}{bpb})")
    return out
