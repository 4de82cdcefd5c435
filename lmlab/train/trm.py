"""`lmlab trm`: train a Tiny Recursive Model on a puzzle set (Jolicoeur-Martineau 2025), in the shared trainer.

    lmlab trm data=runs/sudoku/puzzles out=runs/sudoku/trm train.steps=2000
    lmlab trm --config configs/trm/sudoku_extreme.yaml            # the paper's Sudoku-Extreme recipe
    torchrun --nproc_per_node 4 -m lmlab trm --config configs/trm/maze_hard.yaml

The model (lmlab.models.trm) takes its cell count, vocabulary and puzzle identifiers from the
puzzle set (`lmlab puzzles`). Training follows the official code: one optimizer step is one
supervision step with the ACT carry across steps (lmlab.train.trm_objective), stable-max
cross-entropy plus 0.5 x the Q-halt BCE, AdamATan2 with betas (0.9, 0.95), warmup then a
constant LR (train.min_lr_ratio=1; lower it for a cosine decay), sign-SGD for the puzzle
embeddings with their own LR and weight decay, no gradient clipping, an EMA of 0.999 that
the evaluations and the saved model use, bf16 autocast on GPU. The run length is
train.steps, or `epochs` counted as the official code does (groups x mean examples per
puzzle / global batch, so an "epoch" of an augmented set visits every original puzzle once).

Output: a model run dir (model.safetensors, model.json with `family: trm`, puzzles.json of
the set it was trained on, metrics.jsonl with the official train metrics and val_* exact
accuracy, manifest). `lmlab puzzle-eval` measures it on a whole test split. See docs/trm.md.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from lmlab import artifacts
from lmlab.errors import UserError
from lmlab.models.trm import TRMConfig
from lmlab.runtime import seed_everything
from lmlab.train.loop import EvalConfig, RunOptions, TrainConfig
from lmlab.train.stage import RESUMABLE_TRAIN_KEYS, TrainingRun, swap_in

KIND = "trm"  # not "model": the language-model stages refuse it by kind, naming it
POSITIONAL = ("--config", "trm config YAML (same as --config)")
DATA_FIELDS = ("seq_len", "vocab_size", "num_puzzle_identifiers")


class TRMTrainConfig(TrainConfig):
    """The shared TrainConfig with the official TRM defaults (config/cfg_pretrain.yaml)."""

    batch_size: int = Field(768, ge=1, description="puzzles per micro-batch (the official global_batch_size when "
                            "grad_accum=1)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate of the network (AdamATan2)")
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="LR after warmup as a fraction of lr, reached by a "
                                "cosine; 1 = constant (the paper)")
    warmup_steps: int | float = Field(2000, ge=0, description="linear warmup steps (int) or share of the run (float < 1)")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay on every network parameter (the "
                                "paper: 1.0 for Sudoku and mazes, 0.1 for ARC)")
    grad_clip: float = Field(0.0, ge=0, description="clip the gradient norm (0 = off, as the official code)")
    ema: Optional[float] = Field(0.999, gt=0, lt=1, description="EMA decay of the weights used for evaluation and "
                                 "the saved model (null = off)")
    epochs: Optional[float] = Field(None, gt=0, description="run length in the official code's epochs (used when "
                                    "train.steps is not set)")
    tokens: Optional[int] = Field(None, description="unused by trm (refused): set train.steps or train.epochs")
    seq_len: Optional[int] = Field(None, description="unused by trm: the puzzle set fixes the cells per puzzle")


class TRMEvalConfig(EvalConfig):
    every: int = Field(500, ge=0, description="exact accuracy on the test split every N steps (and at the end)")
    batches: int = Field(2, ge=0, description="test batches of train.batch_size puzzles per evaluation, all "
                         "supervision steps each (0 = off; `lmlab puzzle-eval` evaluates a whole split)")
    batch_size: Optional[int] = Field(None, ge=1, description="puzzles per evaluation forward (null = train.batch_size)")


class Config(RunOptions):
    data: str = Field("runs/puzzles", description="the puzzle set (`lmlab puzzles`): trains on its train split, "
                      "evaluates on its test split")
    out: str = Field("runs/trm", description="run directory (model artifact, checkpoints, metrics)")
    model: TRMConfig = Field(default_factory=TRMConfig, description="the TRM (seq_len, vocab_size and "
                             "num_puzzle_identifiers are taken from the puzzle set)")
    train: TRMTrainConfig = Field(default_factory=TRMTrainConfig, description="optimisation")
    eval: TRMEvalConfig = Field(default_factory=TRMEvalConfig, description="evaluation during training")
    optimizer: Literal["adam_atan2", "adamw"] = Field("adam_atan2", description="the network's optimizer "
                                                      "(AdamATan2 as the paper, or AdamW with train.betas)")
    puzzle_emb_lr: float = Field(1e-2, gt=0, description="sign-SGD LR of the puzzle embeddings (the paper: 1e-4 "
                                 "for Sudoku and mazes, 1e-2 for ARC)")
    puzzle_emb_weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay of the looked-up puzzle "
                                           "embeddings")
    loss: Literal["stablemax", "softmax"] = Field("stablemax", description="cross-entropy on the cells: "
                                                  "stable-max (the paper) or softmax")
    halt_loss_weight: float = Field(0.5, ge=0, description="weight of the Q-halt BCE (and Q-continue, with "
                                    "model.no_act_continue=false)")
    backend: Literal["torch", "jax"] = Field("torch", description="torch (the shared trainer: torchrun, DDP, "
                                             "checkpoints) or jax (lmlab.jax_backend: jit over a device mesh, "
                                             "for TPUs; the jax extra)")


def model_config_for(cfg: Config, meta: dict) -> TRMConfig:
    """The TRM config with the puzzle set's shape; a shape the user set that disagrees is an error."""
    data = {"seq_len": int(meta["seq_len"]), "vocab_size": int(meta["vocab_size"]),
            "num_puzzle_identifiers": int(meta["num_puzzle_identifiers"])}
    for k in DATA_FIELDS:
        if k in cfg.model.model_fields_set and getattr(cfg.model, k) != data[k]:
            raise UserError(f"model.{k}={getattr(cfg.model, k)} but the puzzle set {cfg.data} has {k}={data[k]}; "
                            f"leave model.{k} unset (it is taken from the set)")
    return TRMConfig(**{**cfg.model.model_dump(), **data})


def total_steps(cfg: Config, meta: dict) -> int:
    t = cfg.train
    if t.tokens is not None:
        raise UserError("train.tokens is not used by trm; set the length with train.steps=N or train.epochs=N")
    if t.steps is not None:
        if t.epochs is not None:
            raise UserError("set only one of train.steps and train.epochs")
        return t.steps
    if t.epochs is None:
        raise UserError("set the run length: train.steps=N or train.epochs=N")
    per_step = t.batch_size * t.grad_accum
    return max(1, int(t.epochs * meta["total_groups"] * meta["mean_puzzle_examples"] / per_step))


def write_final(out: Path, model, info: dict) -> None:
    """model.safetensors + model.json + puzzles.json (the set's description), swapped in when complete."""
    from lmlab.data.puzzles.format import INFO
    from lmlab.models import save_model

    def write(tmp: Path) -> None:
        save_model(model, tmp)
        artifacts.write_json_atomic(tmp / INFO, info)

    swap_in(out, write, ["model.safetensors", "model.json", INFO])


def run(cfg: Config) -> Path:
    from lmlab.data.puzzles.format import read_info, read_split
    from lmlab.models.trm import TRM
    from lmlab.train.trm_objective import TRMObjective

    if cfg.backend == "jax":
        from lmlab.jax_backend import init_distributed, require_jax

        require_jax()
        init_distributed()  # several hosts: before anything touches JAX (or the torch group waits)
    run = TrainingRun(cfg, "trm", KIND)
    cfg, out = run.cfg, run.out
    if cfg.parallel.strategy == "fsdp" and cfg.backend == "jax":
        raise UserError("with backend=jax, parameter sharding is a mesh axis: parallel.mesh=data:N,fsdp:M "
                        "(parallel.strategy is the torch trainer's)")
    if cfg.parallel.strategy == "fsdp":
        raise UserError("trm trains with parallel.strategy=ddp (or auto): a TRM is a few million parameters, and "
                        "its puzzle-embedding table is updated by sign-SGD outside FSDP's sharding")
    run.check_out(inputs={"puzzle set": cfg.data})
    manifest = artifacts.require_artifact(cfg.data, "puzzles", "puzzle set")
    info = read_info(cfg.data)
    train_split, meta = read_split(cfg.data, "train")
    test_split = read_split(cfg.data, "test")[0] if (Path(cfg.data) / "test" / "dataset.json").is_file() else None
    model_cfg = model_config_for(cfg, meta)
    inputs = {"puzzles": {"path": cfg.data, "fingerprint": manifest["fingerprint"]}}
    if run.up_to_date(inputs):
        return out
    steps = total_steps(cfg, meta)
    t = cfg.train
    resume_config = {"model": model_cfg.model_dump(mode="json"), "data": manifest["fingerprint"],
                     "train": t.model_dump(mode="json", exclude=RESUMABLE_TRAIN_KEYS), "total_steps": steps,
                     **{k: getattr(cfg, k) for k in ("optimizer", "puzzle_emb_lr", "puzzle_emb_weight_decay", "loss",
                                                     "halt_loss_weight")}}
    run.start(resume_config)
    seed_everything(t.seed)
    model = TRM(model_cfg)
    objective = TRMObjective(cfg, train_split, test_split, model_cfg.halt_max_steps, model_cfg.total_len)
    per_step = t.batch_size * t.grad_accum
    variant = "mlp_t" if model_cfg.mlp_t else "attention"
    budget = f" (at most: time budget {t.time_budget:g} min)" if t.time_budget else ""
    print(f"trm: {model.num_params():,} parameters ({variant}, T={model_cfg.h_cycles}, n={model_cfg.l_cycles}, "
          f"N_sup={model_cfg.halt_max_steps}); {train_split.num_examples:,} training examples in "
          f"{train_split.num_groups:,} groups; {steps} steps x {per_step} puzzles{budget} -> {out}", file=sys.stderr)
    if cfg.backend == "jax":
        from lmlab.train.trm_jax import train as train_jax
        from lmlab.train.jax_checkpoint import refuse_torch_checkpoints

        refuse_torch_checkpoints(out, cfg.resume)
        with run.timer("train"):
            summary = train_jax(cfg, out, model, objective, steps, resume_config)
    else:
        summary = run.train(model, objective, total_steps=steps, resume_config=resume_config,
                            flops_per_token=model.flops_per_token(), desc="trm")
    steps = summary["steps"]
    final_train, final_eval = summary["final_train"], summary["final_eval"]
    stats = {
        "params": model.num_params(), "variant": variant, "steps": steps, "puzzles_per_step": per_step,
        "examples_trained": steps * per_step,
        "epochs": round(steps * per_step / max(meta["total_groups"] * meta["mean_puzzle_examples"], 1), 4),
        "examples_per_s": round(steps * per_step / summary["train_time_s"], 1) if summary["train_time_s"] else None,
        "flops_per_example": model.flops_per_example(),
        "final_train_metrics": {k: v for k, v in final_train.items() if k not in ("lr", "tokens", "time_s")},
        "final_val_metrics": final_eval,
    }
    if math.isfinite(final_eval.get("val_exact_accuracy", float("nan"))):
        stats["final_val_exact_accuracy"] = final_eval["val_exact_accuracy"]
    run.finish(lambda m: write_final(out, m, info), stats, inputs, None, summary)
    shown = f", test exact accuracy {final_eval['val_exact_accuracy']:.3f}" if "val_exact_accuracy" in final_eval else ""
    print(f"trm: wrote {out} ({steps} steps{shown})")
    return out
