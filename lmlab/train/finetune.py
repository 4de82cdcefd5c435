"""What the post-training stages (sft, dpo; GRPO next) share: their train settings, loading the
model to start from, mixing data sources, data fingerprints, skipped-record reports and the
run directory they write.

    model, tokenizer, init_fp, fmt = load_init(cfg)     # a model run dir or an HF directory
    mix = Mixture(sizes, weights, seed); d, row = mix.locate(i)
    write_outputs(out, model, tokenizer, cfg, fmt)       # weights or adapter, tokenizer/, chat.json
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import Field, model_validator

from lmlab import artifacts
from lmlab.data.formats import DataSpec
from lmlab.errors import UserError
from lmlab.train.loop import TrainConfig


class FinetuneTrainConfig(TrainConfig):
    """The pretraining TrainConfig plus `epochs`; finetuning-friendly defaults (sft, dpo)."""

    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW); LoRA usually wants ~5-10x more")
    warmup_steps: int | float = Field(0.03, ge=0, description="linear warmup: a step count (int) or a "
                                      "fraction of the run (float < 1)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on linear-layer weight matrices")
    epochs: Optional[float] = Field(None, gt=0, description="run length in passes over the training rows (used "
                                    "when neither steps nor tokens is set; unset too = 1 epoch)")
    seq_len: Optional[int] = Field(None, ge=2, description="unused by sft and dpo: set the stage's own seq_len / max_len instead")

    @model_validator(mode="after")
    def _one_sft_length(self):
        if self.epochs is not None and (self.steps is not None or self.tokens is not None):
            raise ValueError("set only one of train.steps, train.tokens and train.epochs")
        return self


# ----------------------------------------------------------------------------- mixing

class Mixture:
    """Global row index -> (dataset, row), a pure function of (seed, index).

    Rows come in blocks of N (the number of training rows over all datasets). Each block
    holds exactly round(N * p_d) rows of dataset d, in an order shuffled per block. Within a
    dataset, rows are taken through a fresh permutation per pass, so every row is seen once
    before any is seen twice. With weights proportional to the datasets' sizes, one block is
    exactly one epoch of every dataset.
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        self.sizes, self.seed = list(sizes), seed
        p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.block = int(sum(sizes))
        raw = p * self.block
        counts = np.floor(raw).astype(np.int64)
        for d in np.argsort(-(raw - counts), kind="stable")[: self.block - int(counts.sum())]:
            counts[d] += 1  # largest remainders get the rows the floors left over
        counts = np.maximum(counts, 1)  # every dataset with a positive weight gets drawn from
        self.counts = counts
        self.block = int(counts.sum())

    @functools.lru_cache(maxsize=4)
    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(len(self.sizes)), self.counts)
        labels = np.random.default_rng([self.seed, 2, b]).permutation(labels)
        rank = np.empty(len(labels), dtype=np.int64)  # how many earlier rows of the block share the label
        for d in range(len(self.sizes)):
            where = np.flatnonzero(labels == d)
            rank[where] = np.arange(len(where))
        return labels, rank

    @functools.lru_cache(maxsize=16)
    def _pass(self, d: int, e: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 3, d, e]).permutation(self.sizes[d])

    def locate(self, i: int) -> tuple[int, int]:
        b, pos = divmod(int(i), self.block)
        labels, rank = self._block(b)
        d = int(labels[pos])
        k = b * int(self.counts[d]) + int(rank[pos])  # k-th row drawn from dataset d overall
        e, j = divmod(k, self.sizes[d])
        return d, int(self._pass(d, e)[j])


# ----------------------------------------------------------------------------- inputs

def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "model.json").is_file()


def load_init(cfg):
    """-> (model, tokenizer, init fingerprint, format) for `cfg.init` (a model run dir or an HF
    directory) and `cfg.tokenizer` (for an HF init)."""
    from lmlab.data.tokenizer import Tokenizer

    if not cfg.init:
        raise UserError("no model to finetune: set init=RUN_DIR (a pretrained or sft model run) or an HF model dir")
    d = Path(cfg.init)
    if not d.is_dir():
        raise UserError(f"init model not found: {d} (run `lmlab pretrain` first, or fix the path)")
    if is_hf_dir(d):
        from lmlab.models.hf import import_hf
        model, _ = import_hf(d)
        tokenizer = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else _import_hf_tokenizer(d)
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens (with lmlab's chat specials added) but "
                            f"{d} has an embedding table of {model.cfg.vocab_size}; give a tokenizer that fits "
                            f"(tokenizer=DIR) or a model with room for the added tokens")
        fp = artifacts.stat_fingerprint(d)
        return model, tokenizer, fp, "hf"
    if cfg.tokenizer:
        raise UserError("tokenizer= is only for an HF init; a model run dir brings its own tokenizer/")
    from lmlab.models import load_weights_or_adapter
    m = artifacts.read_manifest(d)
    if m is not None and m.get("kind") != "model":
        raise UserError(f"init {d} is a '{m.get('kind')}' artifact, expected a model run dir")
    if m is None and not (d / "model.json").is_file():
        raise UserError(f"init {d} is neither an lmlab model run dir (model.json) nor an HF model dir (config.json)")
    if m is not None and not m.get("complete", True):
        raise UserError(f"init {d} is an unfinished run; finish it first (re-run its command)")
    model = load_weights_or_adapter(d, "cpu", merge=True)
    tok_dir = d / "tokenizer"
    if not tok_dir.is_dir():
        raise UserError(f"{tok_dir} is missing; a model run dir must hold a copy of its tokenizer")
    fp = m["fingerprint"] if m else artifacts.sha256_file(d / "model.safetensors")
    return model, Tokenizer.load(tok_dir), fp, "lmlab"


def _import_hf_tokenizer(d: Path):
    from lmlab.data import tokenizer as tk

    # tokenizer.model first: a SentencePiece model imports as it is (Gemma's 256k pieces fill the
    # embedding table exactly), while a tokenizer.json gets lmlab's special tokens added
    src = next((f for f in (d / "tokenizer.model", d / "tokenizer.json") if f.is_file()), None)
    if src is None:
        raise UserError(f"{d} has no tokenizer.model or tokenizer.json; pass tokenizer=DIR (an lmlab tokenizer, "
                        f"e.g. from `lmlab tokenizer from_file=...`)")
    return tk.import_tokenizer(src)


def data_fingerprint(spec) -> str:
    """sha256 of a local data file (or of a directory's files); the spec itself for hub data."""
    path = getattr(spec, "path", None)
    if path:
        p = Path(path)
        if p.is_file():
            return artifacts.sha256_file(p)
        if p.is_dir():
            return artifacts.fingerprint(sorted((str(f.relative_to(p)), artifacts.sha256_file(f))
                                                for f in p.rglob("*") if f.is_file()))
    return artifacts.fingerprint(spec.model_dump(mode="json"))


def report_skipped(specs: list[DataSpec], read_stats: list[dict], verb: str) -> dict:
    """One stderr warning per dataset whose malformed records were skipped (invalid=skip).

    -> the manifest stats: `invalid_skipped` (total), `invalid_by_reason` ({reason: count}) and
    `invalid_first` (the first 3 skipped records, `FILE:LINE: message`).
    """
    from lmlab.data.formats import SKIP_EXAMPLES, skipped_summary

    out: dict = {"invalid_skipped": 0, "invalid_by_reason": {}, "invalid_first": []}
    for spec, st in zip(specs, read_stats):
        line = skipped_summary(st, spec.name())
        if line:
            print(f"{verb}: warning: {line}", file=sys.stderr)
        out["invalid_skipped"] += st.get("invalid_skipped", 0)
        for reason, n in st.get("invalid_by_reason", {}).items():
            out["invalid_by_reason"][reason] = out["invalid_by_reason"].get(reason, 0) + n
        out["invalid_first"] += st.get("invalid_first", [])[:SKIP_EXAMPLES - len(out["invalid_first"])]
    return out


# ----------------------------------------------------------------------------- stats

def pair_run_stats(summary: dict, cfg, objective, counts: dict, n_train: int, n_val: int, max_len: int,
                   metrics, params: tuple[int, int], template: str, **extra) -> dict:
    """The manifest stats of a stage trained on preference pairs (dpo, reward), in one layout:
    sizes, lengths, the final losses and the final train/val metrics (`metrics`: their names)."""
    final, steps = summary["final_eval"], summary["steps"]
    pairs_trained = steps * cfg.train.batch_size * cfg.train.grad_accum
    trainable, total = params
    return {
        "mode": "lora" if cfg.lora.enabled else "full", "params": total, "trainable_params": trainable,
        "template": template, **extra, **counts, "pairs_train": int(n_train), "pairs_val": int(n_val),
        "max_len": max_len, "steps": steps, "pairs_trained": pairs_trained, "tokens_trained": summary["tokens"],
        "epochs": round(pairs_trained / objective.epoch_len, 4), "final_train_loss": summary["final_loss"],
        "final_val_loss": final.get("val_loss"),
        "final_train_metrics": {k: summary["final_train"][k] for k in metrics if k in summary["final_train"]},
        "final_val_metrics": {k: final[f"val_{k}"] for k in metrics if f"val_{k}" in final},
        "pairs_per_s": round(pairs_trained / summary["train_time_s"], 2) if summary["train_time_s"] else None,
    }


def final_line(stats: dict, shown_keys: list[tuple[str, str, str]]) -> str:
    """', margin 0.1234, accuracy 0.75 (val)' from the final val (else train) metrics; '' without them."""
    shown = stats["final_val_metrics"] or stats["final_train_metrics"]
    if not shown:
        return ""
    parts = ", ".join(f"{label} {shown[key]:{fmt}}" for key, label, fmt in shown_keys if key in shown)
    return f", {parts} ({'val' if stats['final_val_metrics'] else 'train'})"


# ----------------------------------------------------------------------------- outputs

def write_outputs(out: Path, model, tokenizer, cfg, init_format: str) -> None:
    """Weights (full, merged or adapter + base pointer), tokenizer/ and chat.json, each swapped in whole.

    `cfg` has `init`, `lora.merge` and `template` (an sft or dpo config)."""
    from lmlab.data.chat import save_chat_template
    from lmlab.models import BASE_POINTER, CONFIG, WEIGHTS, write_base_pointer
    from lmlab.models.lora import ADAPTER_DIR, is_lora, merge_lora, save_adapter
    from lmlab.train.pretrain import write_final

    try:
        if is_lora(model):
            tmp = out / f".{ADAPTER_DIR}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            save_adapter(model, tmp)
            old = out / f".{ADAPTER_DIR}.old-{os.getpid()}"
            if (out / ADAPTER_DIR).exists():
                os.replace(out / ADAPTER_DIR, old)
            os.replace(tmp, out / ADAPTER_DIR)
            shutil.rmtree(old, ignore_errors=True)
            write_base_pointer(out, cfg.init, init_format)
            if cfg.lora.merge:
                write_final(out, merge_lora(model), tokenizer)
            else:  # stale full weights from an earlier run in `out` would shadow the adapter
                for name in (WEIGHTS, CONFIG):
                    (out / name).unlink(missing_ok=True)
                tok_tmp = out / f".tokenizer.tmp-{os.getpid()}"
                shutil.rmtree(tok_tmp, ignore_errors=True)
                tokenizer.copy_to(tok_tmp)
                shutil.rmtree(out / "tokenizer", ignore_errors=True)
                os.replace(tok_tmp, out / "tokenizer")
        else:
            write_final(out, model, tokenizer)
            shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)
            (out / BASE_POINTER).unlink(missing_ok=True)
        save_chat_template(out, cfg.template)
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
