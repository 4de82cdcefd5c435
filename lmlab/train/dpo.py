"""Direct preference optimisation (DPO) of a chat model on chosen/rejected pairs.

    lmlab dpo init=runs/sft data=runs/tasks/dpo_train.jsonl out=runs/dpo train.steps=200
    lmlab dpo --config configs/dpo/hh_rlhf_tiny.yaml
    lmlab dpo ... loss=ipo beta=0.5          # or hinge, robust (label_smoothing=0.1)
    lmlab dpo ... lora.enabled=true lora.merge=true

Starts from a model run (`init`, usually the SFT run) and trains it to prefer each pair's
chosen reply over the rejected one, relative to a frozen reference: the `init` model itself
(with LoRA: the same model with its adapters disabled). The losses are TRL's, in
`lmlab.train.dpo_losses`; the metrics are named as TRL names them (`rewards/chosen`,
`rewards/rejected`, `rewards/margins`, `rewards/accuracies`, `logps/chosen`, `logps/rejected`):
on every train line of metrics.jsonl (`log.every`) as means over the pairs trained since the
previous line, and with a `val_` prefix on the eval lines (`eval.every`).

How a pair becomes tokens: prompt + [assistant: reply] is rendered with the chat template
(`lmlab.data.chat.render`), exactly as SFT trains it; the completion is the last assistant
span of the train mask (the reply and its end-of-turn marker) and everything before it is
the prompt. A sequence log-probability is the sum of log p(token) over the completion only
(IPO: the mean, as TRL does). Pairs longer than `max_len` keep their whole completions and
lose the start of the prompt (the first token, bos, is kept; the end, with the last user
turn and the assistant header, is kept); a pair whose completion leaves room for fewer than
`MIN_PROMPT_TOKENS` prompt tokens is dropped. Both are counted and reported
(`truncation=error` stops instead).

The reference log-probabilities of every pair are computed once, before training, and
cached in `out/ref_logps.npy` with a fingerprint of the reference weights, the tokenized
pairs and the dtype (`ref_logps.json`): a re-run with other DPO settings reuses them, a
changed reference or data recomputes them. No second model is held during training.

The output is a model run dir laid out as SFT's: model.safetensors (merged when LoRA with
`lora.merge`), model.json, tokenizer/, chat.json, adapter/ + base.json (LoRA), metrics.jsonl,
checkpoints/, manifest.json. Same trainer, checkpoints and exact resume as pretraining;
re-running a finished run is a no-op. See docs/dpo.md.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from lmlab import artifacts
from lmlab.data.formats import DataSpec
from lmlab.errors import UserError
from lmlab.models.lora import LoraConfig
from lmlab.runtime import pick_device, progress, seed_everything
from lmlab.train.batching import EvalShard
from lmlab.train.dpo_losses import AVERAGED_LOSSES, METRICS, dpo_loss, metric_sums, sequence_logps
from lmlab.train.loop import EvalConfig, RunOptions, as_data_specs, autocast_dtype
from lmlab.train.stage import RESUMABLE_TRAIN_KEYS, TrainingRun, first_on_main
from lmlab.train.finetune import FinetuneTrainConfig, Mixture

KIND = "model"
POSITIONAL = ("--config", "dpo config YAML (same as --config)")
MIN_PROMPT_TOKENS = 16  # a pair cut to fewer prompt tokens than this has lost its question: dropped
REF_CACHE = "ref_logps.npy"
REF_CACHE_META = "ref_logps.json"


class DPOTrainConfig(FinetuneTrainConfig):
    """SFT's TrainConfig (with `epochs`), DPO defaults. batch_size counts pairs (two sequences each)."""

    # DPO moves a trained model a little: TRL's default lr is 1e-6 for billion-parameter models;
    # small models need more. No weight decay, a short warmup.
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW); LoRA usually wants ~5-10x more")
    warmup_steps: int | float = Field(0.1, ge=0, description="linear warmup: a step count (int) or a "
                                      "fraction of the run (float < 1)")
    batch_size: int = Field(8, ge=1, description="micro-batch in preference pairs (each pair is two sequences)")
    epochs: float | None = Field(None, gt=0, description="run length in passes over the training pairs (used "
                                 "when train.steps is not set; unset too = 1 epoch)")
    seq_len: int | None = Field(None, ge=2, description="unused by dpo: set the top-level max_len instead")
    tokens: int | Literal["chinchilla"] | None = Field(None, description="unused by dpo (refused): set "
                                                       "train.steps or train.epochs")


class DPOEvalConfig(EvalConfig):
    every: int = Field(50, ge=0, description="validation metrics (val_loss, val_rewards/...) every N steps (and "
                       "always at the end; 0 = end only); the train metrics are on every log.every line")
    batches: int = Field(8, ge=0, description="validation batches (of train.batch_size pairs) per evaluation; "
                         "0 turns evaluation off")


class Config(RunOptions):
    init: str = Field("runs/sft", description="model to start from and to use as the reference: a model run "
                      "dir (usually the SFT run; its chat.json gives the template unless `template` is set) or a "
                      "Hugging Face Llama/Qwen3 directory")
    tokenizer: str | None = Field(None, description="HF init only: an lmlab tokenizer dir; unset = import the "
                                  "HF directory's tokenizer.json")
    out: str = Field("runs/dpo", description="run directory (model artifact, checkpoints, metrics, reference cache)")
    data: list[DataSpec] = Field(default_factory=list, description="preference pairs: a path, or a list of data "
                                 "specs {path | hf, format, weight, max_records, split, invalid, "
                                 "identical_pairs} (format preference: prompt/chosen/rejected); pairs are drawn "
                                 "in proportion to weight, as in sft; invalid: skip skips malformed records "
                                 "(counted) instead of stopping")
    template: str | None = Field(None, description="chat template (chatml, instruct, chat, alpaca); null = the "
                                 "init run's chat.json, else chatml")
    beta: float = Field(0.1, gt=0, description="β: strength of the pull towards the reference (higher = stay closer)")
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="sigmoid: DPO −log σ(βx) (cDPO with label_smoothing); ipo: (x − 1/(2β))² on "
        "per-token mean log-probs; hinge: relu(1 − βx); robust: robust DPO with label_smoothing as the "
        "label-noise rate. x = (π_c − π_r) − (ref_c − ref_r)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε: assumed fraction of flipped labels "
                                   "(sigmoid: conservative DPO; robust: robust DPO; ignored by ipo and hinge)")
    rpo_alpha: float = Field(0.0, ge=0, description="RPO: add rpo_alpha x the mean negative log-likelihood of "
                             "the chosen replies' tokens to the loss (TRL's rpo_alpha; 0 = off). Keeps chosen "
                             "replies from losing probability, e.g. correct task solutions")
    max_len: int | None = Field(None, ge=8, description="tokens per sequence (prompt + completion); null = the "
                                "model's max_seq_len. Longer pairs lose the start of the prompt (see truncation)")
    truncation: Literal["left", "error"] = Field(
        "left", description="left: cut too-long prompts from the left (keeping bos and the end of the prompt) so "
        "the whole completion fits, and drop pairs left with fewer than 16 prompt tokens; error: stop instead")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of each dataset's prompts held out for "
                                "validation (all pairs of one prompt go to the same side)")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters (PEFT) instead of full finetuning")
    train: DPOTrainConfig = Field(default_factory=DPOTrainConfig, description="optimisation; batch_size counts "
                                  "pairs (each pair is two sequences)")
    eval: DPOEvalConfig = Field(default_factory=DPOEvalConfig, description="validation and reward metrics")

    @field_validator("data", mode="before")
    @classmethod
    def _paths_as_specs(cls, v):
        return as_data_specs(v, format="preference")


# ----------------------------------------------------------------------------- tokenized pairs

class Pairs:
    """Tokenized preference pairs: a shared prompt and two completions per pair, flat int32 arrays.

    `prompt(i)`, `chosen(i)`, `rejected(i)` are token id arrays; `source[i]` is the index of
    the data spec the pair came from; `prompt_key[i]` identifies the prompt (for the split).
    """

    def __init__(self) -> None:
        self._tokens: list[np.ndarray] = []  # 3 per pair: prompt, chosen, rejected
        self.source: list[int] = []
        self.prompt_key: list[str] = []

    def add(self, prompt, chosen, rejected, source: int, key: str) -> None:
        self._tokens += [np.asarray(prompt, np.int32), np.asarray(chosen, np.int32), np.asarray(rejected, np.int32)]
        self.source.append(source)
        self.prompt_key.append(key)

    def __len__(self) -> int:
        return len(self.source)

    def prompt(self, i: int) -> np.ndarray:
        return self._tokens[3 * i]

    def chosen(self, i: int) -> np.ndarray:
        return self._tokens[3 * i + 1]

    def rejected(self, i: int) -> np.ndarray:
        return self._tokens[3 * i + 2]

    def tokens(self, i: int) -> int:
        """Tokens the model reads for pair i: the prompt twice plus both completions."""
        p = len(self.prompt(i))
        return 2 * p + len(self.chosen(i)) + len(self.rejected(i))

    def fingerprint(self) -> str:
        import hashlib
        h = hashlib.sha256()
        for t in self._tokens:
            h.update(len(t).to_bytes(4, "little"))
            h.update(t.tobytes())
        return h.hexdigest()


def split_completion(ids: list[int], mask: list[bool]) -> tuple[list[int], list[int]]:
    """(prompt, completion): the completion is the last contiguous run of trained tokens.

    For prompt + [assistant reply] that run is the reply and its end-of-turn marker; earlier
    assistant turns of a multi-turn prompt belong to the prompt. Tokens after the run (e.g. a
    newline after the end-of-turn marker) are not scored and are dropped.
    """
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    if end == 0:
        raise UserError("the chat template marked no assistant tokens to train on; check the template")
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return list(ids[:start]), list(ids[start:end])


def tokenize_pairs(records_by_source: list[list[dict]], sources: list[str], template: str, tokenizer,
                   max_len: int, truncation: str, locate=None) -> tuple[Pairs, dict]:
    """Render every pair with the chat template, cut too-long prompts, -> (Pairs, counts).

    `locate(source, n)`, when given, names where the n-th pair of a source is, for errors.
    """
    from lmlab.data.chat import render

    def where(s: int, n: int) -> str:
        return locate(s, n) if locate is not None else f"{sources[s]}: pair {n}"

    pairs = Pairs()
    counts = {"pairs_read": 0, "pairs_truncated": 0, "pairs_dropped": 0}
    too_long: list[str] = []
    total = sum(len(r) for r in records_by_source)
    bar = progress(total=total, desc="dpo: tokenize", unit="pair")
    for s, records in enumerate(records_by_source):
        for n, rec in enumerate(records, start=1):
            counts["pairs_read"] += 1
            bar.update(1)
            prompt_msgs = rec["prompt"]
            ids_c, mask_c = render(template, prompt_msgs + [{"role": "assistant", "content": rec["chosen"]}],
                                   tokenizer)
            ids_r, mask_r = render(template, prompt_msgs + [{"role": "assistant", "content": rec["rejected"]}],
                                   tokenizer)
            prompt, chosen = split_completion(ids_c, mask_c)
            prompt_r, rejected = split_completion(ids_r, mask_r)
            if prompt_r != prompt:
                # Cannot happen with a prefix-stable template; scoring two different prompts would be wrong.
                raise UserError(f"{where(s, n)}: the chat template renders the prompt differently before the chosen "
                                f"and the rejected reply; use another template")
            longest = max(len(chosen), len(rejected))
            if len(prompt) + longest > max_len:
                if truncation == "error":
                    too_long.append((s, n, len(prompt) + longest))
                    continue
                keep = max_len - longest
                if keep < min(len(prompt), MIN_PROMPT_TOKENS):
                    counts["pairs_dropped"] += 1
                    continue
                head = 1 if prompt and prompt[0] == tokenizer.bos_id else 0
                prompt = prompt[:head] + prompt[len(prompt) - (keep - head):]
                counts["pairs_truncated"] += 1
            key = "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in prompt_msgs)
            pairs.add(prompt, chosen, rejected, s, key)
    bar.close()
    if too_long:
        s, n, length = too_long[0]
        raise UserError(f"{len(too_long)} preference pair(s) are longer than max_len={max_len} tokens, first: "
                        f"{where(s, n)} ({length} tokens); raise max_len (up to the model's max_seq_len), "
                        f"shorten them, or set "
                        f"truncation=left to cut the prompts from the left")
    return pairs, counts


def split_val(pairs: Pairs, n_sources: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) pair indices: per source, ceil(f × prompts) whole prompts (by a seeded hash) go to val.

    Splitting by prompt keeps a prompt's pairs on one side; at least one prompt of every
    source stays in training.
    """
    import hashlib

    if val_fraction <= 0:
        return np.arange(len(pairs)), np.zeros(0, np.int64)
    source = np.asarray(pairs.source)
    val_keys: set[tuple[int, str]] = set()
    for s in range(n_sources):
        keys = sorted({pairs.prompt_key[i] for i in np.flatnonzero(source == s)},
                      key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
        n_val = min(math.ceil(val_fraction * len(keys)), len(keys) - 1)
        val_keys.update((s, k) for k in keys[:n_val])
    is_val = np.array([(s, k) in val_keys for s, k in zip(pairs.source, pairs.prompt_key)], dtype=bool)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def collate(pairs: Pairs, idx, pad_id: int, ref: np.ndarray | None = None) -> dict:
    """Pairs `idx` -> rows 0..B-1 chosen, B..2B-1 rejected, right-padded; targets -100 off the completion.

    x = seq[:-1], y = seq[1:]: position t predicts token t+1, so y[t] is a target exactly when
    token t+1 is a completion token. Right padding needs no attention mask: causal attention
    never lets a real token see the padding after it.
    """
    seqs, starts = [], []
    for part in ("chosen", "rejected"):
        for i in idx:
            p = pairs.prompt(i)
            seqs.append(np.concatenate([p, getattr(pairs, part)(i)]))
            starts.append(len(p))
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    targets = np.full((len(seqs), T - 1), -100, dtype=np.int64)
    for r, (s, start) in enumerate(zip(seqs, starts)):
        ids[r, :len(s)] = s
        targets[r, start - 1:len(s) - 1] = s[start:]
    out = {"x": torch.from_numpy(ids[:, :-1]), "y": torch.from_numpy(targets),
           "n_tokens": int(sum(len(s) for s in seqs))}
    if ref is not None:
        out["ref"] = torch.from_numpy(ref[np.asarray(idx)].astype(np.float32))
    return out


# ----------------------------------------------------------------------------- the reference

def completion_logps(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed log p(y) over targets != -100, and their count; logits only where needed.

    Prompt and padding positions need no logits. Completions are ~40% of the positions of a
    typical batch, and the output layer is a third of a small model's FLOPs (vocabulary 8192,
    width 256) and its largest activation, so the model is asked for logits at the target
    positions only (`logits_at`, part of the model contract, so it goes through a PEFT or
    DDP wrapper's forward): (n_targets, V), in row-major order like y[y != -100]. Same numbers
    as `sequence_logps` on the full logits (tested). Under torch.compile, where a mask of
    varying size would recompile every batch, the full logits are computed instead.
    """
    if hasattr(model, "_orig_mod"):
        logits, _ = model(x)
        return sequence_logps(logits, y)
    valid = y != -100
    logits, _ = model(x, logits_at=valid)
    logits = logits.float()
    token_logps = logits.gather(-1, y[valid].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    rows = valid.nonzero()[:, 0]
    sums = torch.zeros(y.shape[0], device=token_logps.device, dtype=token_logps.dtype).index_add(0, rows, token_logps)
    return sums, valid.sum(-1)


def policy_logps(model, batch: dict, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probabilities of a collated batch; per-token means if `average`."""
    logps, counts = completion_logps(model, batch["x"], batch["y"])
    if average:
        logps = logps / counts.clamp_min(1)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


@torch.no_grad()
def compute_reference(model, pairs: Pairs, batch_size: int, device: torch.device, amp) -> np.ndarray:
    """(N, 4) float64: summed completion log-probs (chosen, rejected) and completion lengths.

    Sums and lengths (not means) so one cache serves every loss: IPO divides at use time.
    Pairs are processed longest first so batches pad little.
    """
    from lmlab.models.lora import adapters_disabled

    out = np.zeros((len(pairs), 4), dtype=np.float64)
    order = sorted(range(len(pairs)), key=lambda i: -pairs.tokens(i))
    was_training = model.training
    model.to(device).eval()
    bar = progress(total=len(pairs), desc="dpo: reference log-probs", unit="pair")
    with adapters_disabled(model):
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = collate(pairs, idx, 0)
            x, y = batch["x"].to(device), batch["y"].to(device)
            ctx = (torch.autocast(device.type, dtype=amp) if amp is not None
                   else torch.autocast(device.type, enabled=False))
            with ctx:
                logps, counts = completion_logps(model, x, y)
            b = len(idx)
            out[idx, 0] = logps[:b].double().cpu().numpy()
            out[idx, 1] = logps[b:].double().cpu().numpy()
            out[idx, 2] = counts[:b].cpu().numpy()
            out[idx, 3] = counts[b:].cpu().numpy()
            bar.update(b)
    bar.close()
    model.train(was_training)
    return out


def load_or_compute_reference(out: Path, model, pairs: Pairs, ref_fp: str, batch_size: int,
                              device: torch.device, amp) -> tuple[np.ndarray, bool]:
    """The cached reference log-probs when their fingerprint matches, else computed and cached. -> (ref, reused)"""
    import json

    meta_path, cache_path = out / REF_CACHE_META, out / REF_CACHE
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == ref_fp:
            ref = np.load(cache_path)
            if ref.shape == (len(pairs), 4):
                return ref, True
    except (OSError, ValueError):
        pass
    ref = compute_reference(model, pairs, batch_size, device, amp)
    tmp = out / f".{REF_CACHE}.tmp-{os.getpid()}.npy"
    try:
        np.save(tmp, ref)
        os.replace(tmp, cache_path)
    except OSError as e:
        raise artifacts.disk_error(e, cache_path) from None
    finally:
        tmp.unlink(missing_ok=True)
    # The meta file is written after the array: a crash between the two leaves a stale meta,
    # whose fingerprint check (with the shape check) only ever causes a recompute.
    artifacts.write_json_atomic(meta_path, {"fingerprint": ref_fp, "pairs": len(pairs)})
    return ref, False


# ----------------------------------------------------------------------------- the objective

class PreferenceObjective:
    """DPO over weighted sources of tokenized pairs, with precomputed reference log-probs.

    Pairs are drawn from the sources as SFT draws rows (`lmlab.train.finetune.Mixture`): in blocks
    of as many pairs as there are training pairs, exact proportions by weight, every pair of
    a source seen once before any is seen twice. Pair slot g of the run is a pure function of
    (seed, g), so the batch of a step is a pure function of the step and resume is exact.
    """

    def __init__(self, pairs: Pairs, train_idx: np.ndarray, val_idx: np.ndarray, ref: np.ndarray,
                 weights: list[float], cfg: Config, pad_id: int) -> None:
        self.pairs, self.train_idx, self.val_idx = pairs, train_idx, val_idx
        self.average = cfg.loss in AVERAGED_LOSSES
        # ref columns: summed logps (chosen, rejected), completion lengths; IPO uses the means.
        self.ref = ref[:, :2] / np.maximum(ref[:, 2:], 1) if self.average else ref[:, :2]
        self.beta, self.loss_type, self.eps, self.rpo_alpha = cfg.beta, cfg.loss, cfg.label_smoothing, cfg.rpo_alpha
        self.batch_size, self.grad_accum = cfg.train.batch_size, cfg.train.grad_accum
        self.eval_pairs = cfg.eval.batches * cfg.train.batch_size
        self.pad_id = pad_id
        src = np.asarray(pairs.source)[train_idx]
        self.by_source = [train_idx[src == s] for s in range(len(weights))]
        empty = [s for s, ix in enumerate(self.by_source) if len(ix) == 0]
        if empty:
            raise UserError(f"data source {empty[0]} has no training pairs left (after truncation and the "
                            f"validation split); remove it, add pairs or raise max_len")
        self.mix = Mixture([len(ix) for ix in self.by_source], weights, cfg.train.seed)
        self.epoch_len = self.mix.block
        # tokens of one block (the loop's `epochs` column): each source's mean pair size x its share
        self.epoch_tokens = int(sum(c * np.mean([pairs.tokens(i) for i in ix])
                                    for c, ix in zip(self.mix.counts, self.by_source)))
        self._train_sums: torch.Tensor | None = None
        self._train_pairs = 0

    def pair_indices(self, step: int, micro: int, rows: slice | None = None) -> np.ndarray:
        g0 = (step * self.grad_accum + micro) * self.batch_size
        slots = range(g0, g0 + self.batch_size)
        picks = (self.mix.locate(g) for g in (slots[rows] if rows is not None else slots))
        return np.array([self.by_source[d][r] for d, r in picks])

    def batch(self, step: int, micro: int, rows: slice | None = None) -> dict:
        # rows: a slice of the micro-batch's pairs (each pair is a chosen and a rejected row)
        return collate(self.pairs, self.pair_indices(step, micro, rows), self.pad_id, self.ref)

    def _losses(self, model, batch: dict):
        sums, counts = completion_logps(model, batch["x"], batch["y"])
        logps = sums / counts.clamp_min(1) if self.average else sums
        half = logps.shape[0] // 2
        pc, pr = logps[:half], logps[half:]
        ref = batch["ref"].to(pc.device)
        losses, rc, rr = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], self.beta, self.loss_type, self.eps)
        if self.rpo_alpha:
            # RPO (TRL's rpo_alpha): plus alpha x the mean NLL of the chosen completions' tokens,
            # which keeps the chosen replies likely while the margin grows.
            losses = losses - self.rpo_alpha * sums[:half].sum() / counts[:half].sum().clamp_min(1)
        return losses, metric_sums(rc, rr, pc, pr)

    # the loop shows these of train_metrics() on the progress bar
    progress_metrics = {"rewards/margins": "margin", "rewards/accuracies": "acc"}

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        losses, sums = self._losses(model, batch)
        # Running sums of the train metrics since the last log step, kept on the device so a
        # step never waits for them; train_metrics() reports their means.
        self._train_sums = sums if self._train_sums is None else self._train_sums + sums
        self._train_pairs += losses.shape[0]
        return losses.sum(), losses.shape[0]  # the loop divides by the step's pairs

    def tokens(self, batch: dict) -> int:
        return batch["n_tokens"]

    def train_metrics(self) -> dict:
        """The train metrics (TRL names) as means over the pairs trained since the last call; then reset.

        The loop calls it at every log step: the one device sync of the metrics (`.tolist()`).
        """
        if not self._train_pairs:
            return {}
        means = (self._train_sums / self._train_pairs).tolist()
        self._train_sums, self._train_pairs = None, 0
        return dict(zip(METRICS, means))

    def evaluate(self, model, device, shard: EvalShard = EvalShard()) -> dict:
        """The metrics on the first eval.batches batches of val pairs: val_loss and val_ + the TRL names.

        The train metrics are not repeated here: they are on every train line (train_metrics).
        """
        out: dict = {}
        val = self.val_idx[:self.eval_pairs]
        if len(val):
            loss_sum, sums = 0.0, torch.zeros(len(METRICS), device=device)
            for s in shard.take(range(0, len(val), self.batch_size)):
                batch = collate(self.pairs, val[s:s + self.batch_size], self.pad_id, self.ref)
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                losses, m = self._losses(model, batch)
                loss_sum += losses.float().sum().item()
                sums += m
            loss_sum, *totals = shard.total([loss_sum, *sums.tolist()])
            out["val_loss"] = loss_sum / len(val)
            out.update({f"val_{name}": v / len(val) for name, v in zip(METRICS, totals)})
        return out


# ----------------------------------------------------------------------------- the stage

def _resolve_template(cfg: Config) -> str:
    from lmlab.data.chat import DEFAULT_TEMPLATE, load_chat_template

    if cfg.template:
        return cfg.template
    name = load_chat_template(cfg.init)
    if name is None:
        print(f"dpo: {cfg.init} has no chat.json (not a chat model); using the {DEFAULT_TEMPLATE} template",
              file=sys.stderr)
        return DEFAULT_TEMPLATE
    return name


def _total_steps(t: DPOTrainConfig, epoch_len: int) -> int:
    if t.tokens is not None:
        raise UserError("train.tokens is not used by dpo; set the length with train.steps=N or train.epochs=N")
    if t.steps is not None:
        return t.steps
    return max(1, math.ceil((t.epochs or 1.0) * epoch_len / (t.batch_size * t.grad_accum)))


def _weights_fingerprint(init: str) -> str:
    """sha256 of the init's weight files (model, adapter): the reference cache's key to the weights.

    A manifest fingerprint says which config made a model, not which bytes it holds (an
    edited or re-trained model directory keeps it); the weights themselves are decisive.
    """
    d = Path(init)
    files = sorted([*d.glob("*.safetensors"), *d.glob("*.bin"), *(d / "adapter").glob("*.safetensors")])
    return artifacts.fingerprint({str(f.relative_to(d)): artifacts.sha256_file(f) for f in files})


def run(cfg: Config) -> Path:
    from lmlab.data.chat import check_template
    from lmlab.data.formats import read_preferences
    from lmlab.models.lora import apply_lora, check_targets, param_counts, targets_of
    from lmlab.train.finetune import (data_fingerprint, final_line, load_init, pair_run_stats, report_skipped,
                                      write_outputs)

    run = TrainingRun(cfg, "dpo", KIND)
    cfg, out, timer = run.cfg, run.out, run.timer
    if not cfg.data:
        raise UserError("no preference data: set data=PATH (jsonl with prompt/chosen/rejected, e.g. "
                        "runs/tasks/dpo_train.jsonl) or data=[{hf: Anthropic/hh-rlhf, split: train}]")
    run.check_out(inputs={"init model": cfg.init})  # before the init model loads
    # Everything the user can get wrong is checked before `out` is touched.
    with timer("load"):
        model, tokenizer, init_fp, init_format = load_init(cfg)
    template = _resolve_template(cfg)
    check_template(template, tokenizer)
    if cfg.lora.enabled:
        check_targets(model, targets_of(model, cfg.lora))
    max_seq = model.cfg.max_seq_len
    max_len = cfg.max_len or max_seq
    if max_len > max_seq:
        raise UserError(f"max_len={max_len} is longer than the model's context (max_seq_len={max_seq}); "
                        f"set max_len<={max_seq}")

    run.config = {**run.config, "template": template}
    inputs = {"init": {"path": cfg.init, "fingerprint": init_fp},
              **{f"data_{i}": {"path": s.name(), "fingerprint": data_fingerprint(s)} for i, s in enumerate(cfg.data)}}
    if run.up_to_date(inputs):
        return out

    with timer("data"):
        read_stats: list[dict] = [{} for _ in cfg.data]
        # where[s][n - 1]: FILE:LINE of the n-th pair of source s, for errors found after tokenizing
        where: list[list[str]] = [[] for _ in cfg.data]
        records = [read_preferences(spec, stats=st, locations=w) for spec, st, w in zip(cfg.data, read_stats, where)]
        invalid = report_skipped(cfg.data, read_stats, "dpo")  # warns on stderr; -> manifest stats
        pairs, counts = tokenize_pairs(records, [s.name() for s in cfg.data], template, tokenizer, max_len,
                                       cfg.truncation, locate=lambda s, n: where[s][n - 1])
        del records, where
        counts["pairs_identical_skipped"] = sum(st.get("identical_skipped", 0) for st in read_stats)
        counts["pairs_invalid_skipped"] = invalid.pop("invalid_skipped")
    if len(pairs) == 0:
        raise UserError(f"no usable preference pairs: {counts['pairs_read']} read, {counts['pairs_dropped']} "
                        f"dropped because their completions leave fewer than {MIN_PROMPT_TOKENS} prompt tokens "
                        f"within max_len={max_len}; raise max_len or shorten the replies")
    if counts["pairs_truncated"] or counts["pairs_dropped"]:
        print(f"dpo: {counts['pairs_truncated']} of {counts['pairs_read']} pairs had their prompts cut from the left "
              f"to fit max_len={max_len}; {counts['pairs_dropped']} dropped (completion too long)", file=sys.stderr)
    t = cfg.train
    weights = [s.weight for s in cfg.data]
    train_idx, val_idx = split_val(pairs, len(cfg.data), cfg.val_fraction, t.seed)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0
    device = pick_device(t.device)
    amp = autocast_dtype(t.dtype, device)

    # The reference is the init model (LoRA: the same model, adapters disabled): its key is the
    # init's weights, the tokenized pairs and the numerics (autocast dtype, device type).
    ref_fp = artifacts.fingerprint({"init": init_fp, "weights": _weights_fingerprint(cfg.init),
                                    "pairs": pairs.fingerprint(), "amp": str(amp), "device": device.type})
    # A placeholder reference lets the objective check the data and size the run before `out` is touched.
    objective = PreferenceObjective(pairs, train_idx, val_idx, np.zeros((len(pairs), 4)), weights, cfg, pad_id)
    total_steps = _total_steps(t, objective.epoch_len)
    resume_config = {"init": init_fp, "model": model.cfg.model_dump(mode="json"), "template": template,
                     "pairs": pairs.fingerprint(), "weights": weights, "val_fraction": cfg.val_fraction,
                     "max_len": max_len, "truncation": cfg.truncation, "beta": cfg.beta, "loss": cfg.loss,
                     "label_smoothing": cfg.label_smoothing, "rpo_alpha": cfg.rpo_alpha,
                     "lora": cfg.lora.model_dump(mode="json", exclude={"merge"}),
                     "train": t.model_dump(mode="json", exclude=RESUMABLE_TRAIN_KEYS), "total_steps": total_steps}
    run.start(resume_config)

    seed_everything(t.seed)  # the LoRA A init draws from it
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    with timer("reference"):
        # rank 0 computes and caches the reference; the other processes then read the cache
        ref, reused = first_on_main(lambda: load_or_compute_reference(out, model, pairs, ref_fp, 2 * t.batch_size,
                                                                      device, amp))
    print(f"dpo: reference log-probs {'reused from' if reused else 'computed and cached in'} {out / REF_CACHE}",
          file=sys.stderr)
    objective = PreferenceObjective(pairs, train_idx, val_idx, ref, weights, cfg, pad_id)

    trainable, total = param_counts(model)
    mode = f"LoRA r={cfg.lora.r}" if cfg.lora.enabled else "full"
    print(f"dpo ({mode}): {trainable:,} trainable of {total:,} parameters; {len(train_idx)} train / {len(val_idx)} "
          f"val pairs; loss {cfg.loss}, beta {cfg.beta}; {total_steps} steps x {t.batch_size * t.grad_accum} pairs"
          f"{f' (at most: time budget {t.time_budget:g} min)' if t.time_budget else ''} "
          f"-> {out}", file=sys.stderr)
    summary = run.train(model, objective, total_steps=total_steps, resume_config=resume_config, desc="dpo")

    total_steps = summary["steps"]  # with a time budget: the resolved length
    stats = pair_run_stats(summary, cfg, objective, {**counts, **invalid}, len(train_idx), len(val_idx), max_len,
                           METRICS, (trainable, total), template, loss=cfg.loss, beta=cfg.beta,
                           reference_reused=reused, reference_time_s=timer.timings.get("reference"))
    inputs["tokenizer"] = {"path": str(out / "tokenizer"), "fingerprint": tokenizer.sha256}
    run.finish(lambda m: write_outputs(out, m, tokenizer, cfg.model_copy(update={"template": template}), init_format),
               stats, inputs, tokenizer.sha256, summary)
    extra = final_line(stats, [("rewards/margins", "reward margin", ".4f"), ("rewards/accuracies", "accuracy", ".2f")])
    loss = f"{stats['final_train_loss']:.4f}" if stats["final_train_loss"] is not None else "n/a"
    print(f"dpo: wrote {out} ({mode}, {total_steps} steps, train loss {loss}{extra})")
    return out
