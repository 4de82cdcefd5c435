"""`lmlab seqtrm`: train the SequenceTRM (lmlab/models/seqtrm.py) to predict, from the compressed
states of a prompt, the compressed state the LLM reaches after thinking (LLM-TRM's phase 2).

    lmlab seqtrm pairs=runs/llm_trm/pairs compressor=runs/llm_trm/compressor out=runs/llm_trm/seqtrm \
        dim=64 train.steps=2000

Inputs are `lmlab hidden-pairs` (the states) and `lmlab compressor` (the compressor of width
`dim`); both must come from the same LLM (their fingerprints are compared, and both are named
when they differ). Only problems whose thinking closed have a target. A seeded `val_fraction` of
them (by problem index) is held out. Training is the shared loop with deep supervision
(lmlab/train/seqtrm_objective.py): AdamW, warmup then cosine over exactly the run's optimizer
steps, the EMA of the weights for every evaluation and the saved model.

The baselines that give the cosine meaning are measured on the same validation examples: the
mean target of the training examples, and the compressed state at the last prompt position.
Writes: seqtrm.safetensors and seqtrm.json (the model and what it was trained on), results.json
(cosine after each supervision step, at halting, the halting steps, the baselines, and the
cosine by thinking length), metrics.jsonl, manifest.json (kind 'seqtrm').
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from lmlab import artifacts
from lmlab.errors import UserError
from lmlab.models.seqtrm import SeqTRMConfig
from lmlab.runtime import seed_everything
from lmlab.train.loop import EvalConfig, RunOptions, TrainConfig
from lmlab.train.stage import RESUMABLE_TRAIN_KEYS, TrainingRun, swap_in

KIND = "seqtrm"
WEIGHTS, META, RESULTS = "seqtrm.safetensors", "seqtrm.json", "results.json"
LENGTH_BUCKETS = (16, 32, 64, 128)


class SeqTRMTrainConfig(TrainConfig):
    batch_size: int = Field(64, ge=1, description="problems per micro-batch")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate")
    warmup_steps: int | float = Field(0.05, ge=0, description="linear warmup steps (int) or share of the run")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay")
    # 0.99, not TRM's 0.999: there is no warmup, and at 0.999 the initial weights would still
    # weigh 0.999^800 = 45% of the average after the 800 steps of a CPU run
    ema: float | None = Field(0.99, gt=0, lt=1, description="EMA decay of the weights used for evaluation and "
                              "saving (null = off; TRM's 0.999 suits runs of 10^4+ steps)")
    tokens: int | None = Field(None, description="unused (refused): set train.steps")
    seq_len: int | None = Field(None, description="unused: the prompts fix the lengths")


class SeqTRMEvalConfig(EvalConfig):
    every: int = Field(200, ge=0, description="validation cosine every N steps (and at the end)")
    batches: int = Field(1, ge=0, description="0 turns evaluation off; otherwise the whole validation split")


class Config(RunOptions):
    pairs: str = Field("", description="`lmlab hidden-pairs` output")
    compressor: str = Field("", description="`lmlab compressor` output (the same LLM)")
    dim: int | None = Field(None, ge=1, description="which compressor D' (default: the widest)")
    out: str = Field("runs/seqtrm", description="run directory")
    model: SeqTRMConfig = Field(default_factory=SeqTRMConfig, description="the SequenceTRM (d is the compressor's D')")
    train: SeqTRMTrainConfig = Field(default_factory=SeqTRMTrainConfig, description="optimisation")
    eval: SeqTRMEvalConfig = Field(default_factory=SeqTRMEvalConfig, description="evaluation during training")
    loss: Literal["mse", "cosine"] = Field("mse", description="prediction loss: MSE or 1 - cosine")
    halt: Literal["mse_cosine", "bce_threshold"] = Field("mse_cosine", description="halting head: regress the "
                                                         "cosine (MSE), or BCE against the adaptive threshold")
    halt_loss_weight: float = Field(0.5, ge=0, description="weight of the halting loss")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of the problems held out (by index, seeded)")


def _held_out(problem: int, seed: int, fraction: float) -> bool:
    h = hashlib.sha256(f"lmlab-seqtrm:{seed}:{problem}".encode()).digest()
    return int.from_bytes(h[:4], "big") / 2 ** 32 < fraction


def load_data(cfg: Config):
    """(train (contexts, targets), val (contexts, targets, records, last-prompt states), compressor meta,
    inputs, the number of problems left out because their thinking never closed)."""
    from lmlab.models.compressor import load_compressor
    from lmlab.tasks.hidden_pairs import load_pairs

    if not cfg.pairs or not cfg.compressor:
        raise UserError("give both: `lmlab seqtrm pairs=HIDDEN_PAIRS_DIR compressor=COMPRESSOR_DIR out=DIR`")
    records, pre, post, pm = load_pairs(cfg.pairs)
    comp, cmeta = load_compressor(cfg.compressor, cfg.dim)
    llm_pairs = ((pm.get("inputs") or {}).get("model") or {})
    if llm_pairs.get("fingerprint") != cmeta.get("model_fingerprint"):
        raise UserError(f"the hidden pairs {cfg.pairs} come from the LLM {llm_pairs.get('path')} (fingerprint "
                        f"{str(llm_pairs.get('fingerprint'))[:12]}), the compressor {cfg.compressor} from "
                        f"{cmeta.get('model')} ({str(cmeta.get('model_fingerprint'))[:12]}); use a compressor of the "
                        f"same LLM")
    with torch.no_grad():
        rows = [(r, comp.compress(p), comp.compress(post[r["post_row"]]), comp.compress(p[-1]))
                for r, p in zip(records, pre) if r["closed"]]
    if not rows:
        raise UserError(f"{cfg.pairs} has no problem whose thinking closed: there is no target to learn")
    split = [_held_out(r["problem"], cfg.train.seed, cfg.val_fraction) for r, *_ in rows]
    tr = [x for x, s in zip(rows, split) if not s]
    va = [x for x, s in zip(rows, split) if s]
    if not tr or not va:
        raise UserError(f"{len(rows)} usable pairs leave no {'training' if not tr else 'validation'} example at "
                        f"val_fraction={cfg.val_fraction}; use more problems")
    train = ([x for _, x, _, _ in tr], torch.stack([t for _, _, t, _ in tr]))
    val = ([x for _, x, _, _ in va], torch.stack([t for _, _, t, _ in va]), [r for r, *_ in va],
           torch.stack([last for *_, last in va]))
    inputs = {"pairs": {"path": cfg.pairs, "fingerprint": pm["fingerprint"]},
              "compressor": {"path": cfg.compressor,
                             "fingerprint": artifacts.sha256_file(Path(cfg.compressor) / "compressor.safetensors")}}
    return train, val, {**cmeta, "d_prime": comp.k}, inputs, len(records) - len(rows)


def baselines(train_targets: torch.Tensor, val_targets: torch.Tensor, val_last: torch.Tensor) -> dict:
    mean = train_targets.mean(0, keepdim=True).expand_as(val_targets)
    return {"mean_target_cosine": float(F.cosine_similarity(val_targets, mean, dim=-1).mean()),
            "last_prompt_state_cosine": float(F.cosine_similarity(val_targets, val_last, dim=-1).mean())}


def by_thinking_length(records: list[dict], cosines: list[float]) -> list[dict]:
    out, lo = [], 0
    for hi in LENGTH_BUCKETS + (10 ** 9,):
        sel = [c for r, c in zip(records, cosines) if lo <= r["thinking_tokens"] < hi]
        if sel:
            out.append({"thinking_tokens": f"{lo}-{hi - 1}" if hi < 10 ** 9 else f"{lo}+", "n": len(sel),
                        "cosine": float(np.mean(sel))})
        lo = hi
    return out


def run(cfg: Config) -> Path:
    from lmlab.models.seqtrm import SequenceTRM
    from lmlab.train.seqtrm_objective import SeqTRMObjective, evaluate_steps

    run = TrainingRun(cfg, "seqtrm", KIND)
    cfg, out = run.cfg, run.out
    if cfg.parallel.strategy == "fsdp":
        raise UserError("seqtrm trains with parallel.strategy=ddp (or auto): the model is tiny")
    if cfg.train.tokens is not None or cfg.train.steps is None:
        raise UserError("set the run length with train.steps=N")
    run.check_out(inputs={"hidden pairs": cfg.pairs, "compressor": cfg.compressor})
    (tr_x, tr_t), (va_x, va_t, va_rec, va_last), cmeta, inputs, unclosed = load_data(cfg)
    model_cfg = SeqTRMConfig(**{**cfg.model.model_dump(), "d": cmeta["d_prime"],
                                "max_len": max(cfg.model.max_len, max(len(x) for x in tr_x + va_x) + 1)})
    if run.up_to_date(inputs):
        return out
    t = cfg.train
    resume_config = {"model": model_cfg.model_dump(mode="json"), "inputs": {k: v["fingerprint"] for k, v in inputs.items()},
                     "train": t.model_dump(mode="json", exclude=RESUMABLE_TRAIN_KEYS),
                     **{k: getattr(cfg, k) for k in ("loss", "halt", "halt_loss_weight", "val_fraction", "dim")}}
    run.start(resume_config)
    seed_everything(t.seed)
    model = SequenceTRM(model_cfg)
    cfg = cfg.model_copy(update={"model": model_cfg})
    objective = SeqTRMObjective(cfg, tr_x, tr_t, va_x, va_t)
    base = baselines(tr_t, va_t, va_last)
    print(f"seqtrm: {model.num_params():,} parameters ({model_cfg.block}, n={model_cfg.n}, T={model_cfg.T}, "
          f"N_sup={model_cfg.n_sup}), D'={model_cfg.d}; {len(tr_x)} training and {len(va_x)} validation pairs"
          f"{f' ({unclosed} problems whose thinking never closed left out)' if unclosed else ''}; "
          f"baselines: mean target cosine {base['mean_target_cosine']:.4f}, last prompt state "
          f"{base['last_prompt_state_cosine']:.4f}; {t.steps} steps -> {out}", file=sys.stderr)
    summary = run.train(model, objective, total_steps=t.steps, resume_config=resume_config, desc="seqtrm")
    from lmlab.models import unwrap

    trained = unwrap(summary["model"])
    res = evaluate_steps(trained, va_x, va_t, t.batch_size, next(trained.parameters()).device, cfg.halt,
                         objective.threshold)
    results = {**{k: v for k, v in res.items() if k != "final_cosine"}, "baselines": base,
               "by_thinking_length": by_thinking_length(va_rec, res["final_cosine"]),
               "threshold": objective.threshold, "train_pairs": len(tr_x), "val_pairs": len(va_x),
               "left_out_unclosed": unclosed}

    def write(model) -> None:
        from safetensors.torch import save_file

        def files(tmp: Path) -> None:
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
            artifacts.write_json_atomic(tmp / META, {"config": model_cfg.model_dump(mode="json"),
                                                     "compressor": cfg.compressor, "d_prime": model_cfg.d,
                                                     "llm_fingerprint": cmeta.get("model_fingerprint"),
                                                     "loss": cfg.loss, "halt": cfg.halt})
            artifacts.write_json_atomic(tmp / RESULTS, results)

        swap_in(out, files, [WEIGHTS, META, RESULTS])

    stats = {"params": model.num_params(), "steps": summary["steps"], "val_cosine": res["cosine_by_step"][-1],
             "val_cosine_at_halt": res["cosine_at_halt"], "val_mean_halt_step": res["mean_halt_step"], **base,
             "final_train_metrics": {k: v for k, v in summary["final_train"].items() if k not in ("tokens", "time_s")}}
    run.finish(write, stats, inputs, None, summary)
    print(f"seqtrm: wrote {out} (validation cosine {res['cosine_by_step'][-1]:.4f} after {model_cfg.n_sup} steps, "
          f"{res['cosine_at_halt']:.4f} at halting (mean step {res['mean_halt_step']:.1f}); mean target "
          f"{base['mean_target_cosine']:.4f}, last prompt state {base['last_prompt_state_cosine']:.4f})")
    return out
