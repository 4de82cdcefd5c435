"""The one training loop. Objectives (pretraining now; SFT, DPO, ... later) plug into it.

    summary = train(model, objective, cfg, run_dir, total_steps=1000, resume_config={...})

`cfg` is a stage config with the sections defined here: `train` (TrainConfig), `eval`
(EvalConfig), `checkpoint` (CheckpointConfig), `log` (LogConfig) and `resume`. The loop
owns everything that is the same for every objective: device and mixed precision, compile,
AdamW and the LR schedule, gradient accumulation and clipping, eval cadence, checkpoints
and exact resume, Ctrl-C, metrics and the progress bar. An objective owns its data and loss:

    objective.batch(step, micro, rows=None) -> batch
                                               # tensors (or dict/tuple of them) of canonical
                                               # micro-batch `micro` (train.batch_size rows), or
                                               # only its rows[slice] when several processes
                                               # share it or train.micro_batch cuts it
                                               # (lmlab.train.batching); a pure function of its
                                               # arguments: resume needs nothing but the step
    objective.loss(model, batch) -> (sum, n)   # the SUM of the micro-batch's loss terms (scalar
                                               # tensor) and how many terms (a Python int: target
                                               # tokens, pairs); the step's loss is the sum over its
                                               # micro-batches divided by their total n, so every
                                               # term weighs the same however they fall into
                                               # micro-batches
    objective.tokens(batch) -> int             # optional: tokens the micro-batch processes, for
                                               # throughput and tokens_seen (default: n)
    objective.before_step(model, step)         # optional: once per optimizer step, before its
                                               # micro-batches, under no_grad with the model in
                                               # eval mode: where GRPO generates its rollouts. Must
                                               # depend only on (step, model, objective state)
    objective.state_dict() / load_state_dict() # optional: state carried across steps (TRM's
                                               # halting carry, a data cursor), saved in every
                                               # checkpoint (objective.pt) so resume stays exact;
                                               # on several processes each rank's (CPU tensors),
                                               # and each rank gets its own back
    objective.build_optimizer(model, train, device) -> torch.optim.Optimizer
                                               # optional: instead of AdamW (TRM: sign-SGD for the
                                               # puzzle embeddings); a param group's `lr_scale`
                                               # multiplies the scheduled LR for that group
    objective.frozen_models                    # optional: extra models (a reference, a reward
                                               # model); the loop moves them to the device in eval
                                               # mode without gradients, never trains or saves them
    objective.evaluate(model, device[, shard]) -> dict
                                               # eval metrics, e.g. {"val_loss", "val_bpb"};
                                               # called under no_grad/eval()/autocast; with a
                                               # `shard` parameter (lmlab.train.batching.EvalShard)
                                               # it evaluates shard.take(batches) and adds its
                                               # sums with shard.total (DDP splits the batches)
    objective.epoch_tokens                     # optional: tokens in one pass over the data
    objective.train_metrics() -> dict          # optional: called at every log step (`log.every`);
                                               # merged into that step's train line of metrics.jsonl,
                                               # e.g. DPO's running means since the previous call.
                                               # The one place an objective may sync the device for
                                               # its own metrics (keep them as tensors until then)
    objective.progress_metrics                 # optional: {metric: label} of train_metrics() shown
                                               # on the progress bar, e.g. {"rewards/margins": "margin"}

Steps: `step` below is the 0-based index of the optimizer step being taken; metrics and
checkpoints are labelled with `done = step + 1`, the number of finished steps. After step
`done` the loop logs, evaluates (every `eval.every`), then checkpoints (every
`checkpoint.every`, at the end, and on Ctrl-C). Because the batch, the LR and the RNG state
are functions of the step, a run resumed from checkpoint N reproduces an uninterrupted run
bit for bit on CPU (see docs/training.md for GPU caveats).

`train.ema` keeps an EMA of the weights (lmlab.train.ema): updated after every optimizer step,
used for every evaluation, checkpointed (ema.pt), and copied into the model at the end, so
the stage saves the average.

With `train.time_budget` (minutes), `total_steps` is a maximum: the loop times the first
steps (`clock`, optimizer steps only), then fixes the length that fits the budget
(lmlab.train.budget), prints it and saves it in every later checkpoint, so a
resumed run keeps it; a run stopped before that point measures again.

Several processes (torchrun, srun; lmlab.dist): the model is wrapped by
lmlab.train.parallelize (DDP or FSDP2, activation checkpointing, compile); each process
computes its share of the same global batch (lmlab.train.batching), the loss sum, its count
and a stop flag are all-reduced once per step, so the gradient is that of the mean over the
global batch's loss terms whatever the number of processes. Under DDP the processes split
the evaluation batches and all-reduce the sums; under FSDP (collective forwards) each runs
them all; the metrics are the same on every rank. Rank 0 alone writes metrics, progress and the
checkpoint's trainer state, while every rank writes its shards (lmlab.train.checkpoint).
SIGTERM and SIGUSR1 (SLURM's warning before a time limit or preemption, torchrun stopping
its workers) stop like a first Ctrl-C, on every rank at the same step, and exit with
Preempted's code (75) after the checkpoint.

A loss or gradient norm that is not finite (NaN, inf) stops the run with `Diverged` at the
next log line or checkpoint, whichever comes first: the weights it reached are never saved,
and the last checkpoint (written before it) stays.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from lmlab import artifacts
from lmlab import dist as lmdist
from lmlab.config import Strict
from lmlab.errors import Diverged, Interrupted, Preempted, UserError
from lmlab.runtime import cpu_has_native_bf16, pick_device, progress  # noqa: F401 (cpu_has_native_bf16: re-exported)
from lmlab.train.batching import EvalShard, rank_pieces
from lmlab.train.budget import Length
from lmlab.train.checkpoint import (CHECKPOINTS, find_resumable, list_checkpoints, remove_stale_temps,
                                    save_checkpoint)
from lmlab.train.ema import EMA
from lmlab.train.parallel_config import ParallelConfig
from lmlab.train.parallelize import grad_sync, local_scalar, parallelize, resolve_strategy
from lmlab.train.logging import MetricsLogger, read_metrics
from lmlab.train.optim import build_optimizer, set_lr

CHINCHILLA_TOKENS_PER_PARAM = 20


class TrainConfig(Strict):
    batch_size: int = Field(8, ge=1, description="micro-batch: rows per forward/backward pass (on one process; "
                            "several processes share each micro-batch's rows or take whole micro-batches)")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step "
                                                 "(rows per step = batch_size * grad_accum, the global batch, "
                                                 "whatever the number of processes)")
    micro_batch: int | None = Field(None, ge=1, description="at most this many rows per forward pass per process "
                                    "(a process's share of the global batch is then split into more "
                                    "accumulation steps; the global batch and the result do not change); "
                                    "null = batch_size rows, or fewer when several processes share it")
    seq_len: int | None = Field(None, ge=2, description="tokens per training row; packed rows are cut to "
                                "row[:seq_len] (must be <= the packed seq_len; null = the packed seq_len). "
                                "The model sees seq_len-1 positions (x=row[:-1], y=row[1:])")
    steps: int | None = Field(None, ge=1, description="run length in optimizer steps (set exactly one of "
                              "steps and tokens)")
    tokens: int | Literal["chinchilla"] | None = Field(None, description="run length in training tokens, or "
                                                       "'chinchilla' for 20 tokens per model parameter "
                                                       "(rounded up to whole steps)")
    time_budget: float | None = Field(None, gt=0, allow_inf_nan=False, description="minutes of training steps "
                                      "(evals and checkpoints not counted): the first steps are timed, then the "
                                      "run length becomes the steps that fit, at most the length the other "
                                      "settings give; recorded in the checkpoints and the manifest "
                                      "(docs/training.md). A fractional warmup_steps is then a share of that "
                                      "maximum")
    ema: float | None = Field(None, gt=0, lt=1, description="keep an exponential moving average of the weights "
                              "with this decay (e.g. 0.999); evaluation and the saved model use it")
    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of lr")
    warmup_steps: int | float = Field(0.02, ge=0, description="linear warmup: a step count (int) or a "
                                      "fraction of the run (float < 1)")
    schedule: Literal["cosine", "wsd"] = Field("cosine", description="cosine decay to min_lr, or wsd: "
                                               "warmup-stable-decay (constant lr, then a linear decay over "
                                               "the last decay_frac of the run)")
    decay_frac: float = Field(0.2, gt=0, le=1, description="wsd only: share of the run spent decaying")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on linear-layer weight matrices "
                                "(never on norms, biases or embeddings)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0 = no clipping)")
    seed: int = Field(1337, description="seed for the model init and the data order")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bfloat16 autocast on "
                                                          "CUDA (when supported) and on CPUs with native bf16 "
                                                          "instructions (AVX512-BF16/AMX), float32 elsewhere")
    compile: bool = Field(False, description="torch.compile the model (faster on GPU; slow to start)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")

    @model_validator(mode="after")
    def _one_length(self):
        if self.steps is not None and self.tokens is not None:
            raise ValueError(f"train.steps={self.steps} and train.tokens={self.tokens!r} are both set; set "
                             f"exactly one (e.g. add train.steps=null to the overrides)")
        return self


class EvalConfig(Strict):
    every: int = Field(100, ge=0, description="evaluate every N steps (and always at the end; 0 = end only)")
    batches: int = Field(20, ge=0, description="validation batches (of train.batch_size rows) per "
                         "evaluation; 0 turns evaluation off")


class CheckpointConfig(Strict):
    every: int = Field(200, ge=0, description="save a checkpoint every N steps (and at the end and on "
                       "Ctrl-C; 0 = only those)")
    keep: int = Field(3, ge=1, description="keep the newest K checkpoints")


class LogConfig(Strict):
    every: int = Field(10, ge=1, description="write a metrics.jsonl line (and TensorBoard/W&B) every N steps")
    tensorboard: bool = Field(False, description="also log to RUN/tensorboard (needs `pip install tensorboard`)")
    wandb: bool = Field(False, description="also log to Weights & Biases (needs `pip install wandb`)")
    wandb_mode: Literal["offline", "online"] = Field("offline", description="W&B mode; offline writes RUN/wandb")
    wandb_project: str = Field("lmlab", description="W&B project name")


class RunOptions(Strict):
    """What every training stage's config shares: checkpoints, logging, resume, parallelism, hardware."""

    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="how the run spreads over "
                                     "processes (torchrun / srun): ddp, fsdp, activation checkpointing")
    hardware: str | None = Field(None, description="a hardware preset (configs/hardware/NAME.yaml: micro-batch, "
                                 "dtype, compile, activation checkpointing, strategy) or auto (picked from the "
                                 "detected device); values set in the config or on the command line win")

    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpoints")
    log: LogConfig = Field(default_factory=LogConfig, description="metrics logging")
    resume: Literal["auto", "never"] = Field("auto", description="auto: continue from the newest good checkpoint "
                                             "in out/checkpoints; never: delete them and start over")


def finished_run(out: Path, fp: str, verb: str, kind: str = "model") -> bool:
    """True (and says so) when `out` already holds this exact finished run.

    Anything at `out` that this run must not replace (a user's files, a file, another kind of
    artifact, a model or unfinished run made by another verb) is refused by the shared guard;
    the stages call `artifacts.check_out` first thing too, before any expensive work, and
    again here in case a caller did not.
    """
    artifacts.check_out(out, kind, verb)
    if artifacts.is_up_to_date(out, fp):
        print(f"{verb}: up to date ({out}), nothing to do")
        return True
    return False


def as_data_specs(value, **defaults):
    """A stage's `data:` as a list of dicts: `PATH`, `[PATH, {...}]` -> `[{"path": PATH, **defaults}, {...}]`.

    Used as a pydantic `mode="before"` validator by every training stage, so a single path on
    the command line (`data=runs/x/packed`) means the same as a one-element list.
    """
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        value = [{"path": x, **defaults} if isinstance(x, str) else x for x in value]
    return value


def resolve_total_steps(t: TrainConfig, tokens_per_step: int, n_params: int) -> int:
    """Steps from train.steps, train.tokens or train.tokens=chinchilla (20 tokens per parameter)."""
    if t.steps is None and t.tokens is None:
        if t.time_budget is not None:
            raise UserError(f"train.time_budget={t.time_budget:g} needs a maximum length too: add train.steps=N, "
                            f"train.tokens=N or train.tokens=chinchilla")
        raise UserError("set the run length: train.steps=N, train.tokens=N or train.tokens=chinchilla")
    if t.steps is not None:
        return t.steps
    tokens = CHINCHILLA_TOKENS_PER_PARAM * n_params if t.tokens == "chinchilla" else int(t.tokens)
    return max(1, math.ceil(tokens / tokens_per_step))


clock = time.perf_counter  # times the optimizer steps (tests replace it to inject a step time)

# Callables hook(step, metrics) run after every evaluation (rank 0's metrics, on every rank).
# `lmlab sweep` reports the validation loss to Optuna here and raises to prune a trial.
EVAL_HOOKS: list = []


# Dense bf16 peak FLOP/s per GPU, for MFU. Matched by substring of the device name; the first
# match wins, so the more specific names come first. Unknown GPUs get no MFU figure.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A6000", 155e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_BF16_FLOPS if key in name), None)


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.dtype on this device (None = plain float32)."""
    if dtype == "float32":
        return None
    if dtype == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("train.dtype=bfloat16 but this GPU does not support bfloat16; use train.dtype=float32")
        return torch.bfloat16
    # auto: bf16 only where it is fast and safe. On CPUs with native bf16 dot-product instructions
    # (AVX512-BF16, AMX) oneDNN's bf16 matmuls made the cpu speedrun's 5.5M model train 1.47x
    # faster (3,949 vs 2,684 tok/s, 2 Zen 4 cores) for +0.014 val loss after 120 steps; without
    # them bf16 is emulated and slower than fp32, so auto stays fp32 there.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def _divide_grads(model: torch.nn.Module, n: int) -> None:
    """Turn the accumulated gradient of a loss sum into that of the mean over `n` terms."""
    if n == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(n)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def connected_zero(model: torch.nn.Module) -> torch.Tensor:
    """0, with a gradient path to every trainable parameter: what a process whose piece has no
    loss terms backpropagates, so that DDP/FSDP's gradient reduction still runs on every rank."""
    return sum(p.reshape(-1)[0] * 0.0 for p in model.parameters() if p.requires_grad)


PER_RANK = "__per_rank__"


def _ranks_state(state, world: int):
    """What objective.pt holds: the state itself on one process; on several, every rank's
    state (a TRM carry is per rank: its rows are that rank's), gathered to rank 0."""
    return state if world == 1 else {PER_RANK: lmdist.gather_objects(state)}


def _rank_state(saved, rank: int, world: int, where: Path):
    """This rank's objective state from objective.pt: its own when the world size is unchanged;
    a state the same on every rank (or a one-process one) resumes on any number of processes."""
    if not (isinstance(saved, dict) and PER_RANK in saved):
        return saved
    states = saved[PER_RANK]
    if len(states) == world:
        return states[rank]
    first = _state_bytes(states[0])
    if all(_state_bytes(s) == first for s in states[1:]):
        return states[0]
    raise UserError(f"{where} holds per-process objective state of {len(states)} processes, which cannot be "
                    f"split over {world}; resume it with {len(states)} processes, or use another `out`")


def _state_bytes(state) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


class _NoLog:
    """The metrics logger of ranks other than 0: rank 0 writes metrics.jsonl."""

    def write(self, rec: dict) -> None:
        pass

    def close(self) -> None:
        pass


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist(), "python": _jsonable(random.getstate())}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], np_state[1].tolist(), *np_state[2:]]
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(_tupled(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


def check_same_run(run_dir: Path, resume_config: dict) -> None:
    """Refuse to resume checkpoints that were trained with different settings (model, data, schedule)."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return
    try:
        saved = json.loads((ckpts[-1][1] / "trainer.json").read_text()).get("resume_config")
    except (OSError, ValueError):
        return  # unreadable: find_resumable reports it and falls back
    if saved is None:
        return
    shown = settings_diff(saved, resume_config)
    if shown:
        raise UserError(f"{run_dir} holds checkpoints of a run with different settings ({shown}); use another "
                        f"`out`, restore those settings to continue it, or pass resume=never to start over")


def settings_diff(saved: dict, now: dict) -> str:
    """The settings that differ between two resume configs, as "key: old -> new, ..." ("" when none)."""
    a, b = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(now)))
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])


class _StopOnSignals:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second Ctrl-C: stop at once.

    SIGTERM / SIGUSR1 (SLURM before a time limit or preemption, torchrun stopping its workers,
    `kill`): finish the step, checkpoint, stop with Preempted (exit 75: "run again").
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self.preempted = False
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.requested and not self.preempted:
            raise KeyboardInterrupt
        self.requested = True
        if signum == signal.SIGINT:
            print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        else:
            self.preempted = True
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint",
                  file=sys.stderr, flush=True)

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: plain KeyboardInterrupt semantics
            self._previous = {}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def train(model: torch.nn.Module, objective, cfg, run_dir: str | Path, *, total_steps: int,
          resume_config: dict, flops_per_token: float | None = None, desc: str = "train") -> dict:
    """Train `model` on `objective` for `total_steps`, resuming from RUN/checkpoints when possible.

    `resume_config` is what must be unchanged for a checkpoint to be resumed (model, data,
    optimisation settings); it is stored in every checkpoint. With `cfg.train.time_budget`,
    `total_steps` is the maximum and the loop fixes the length after timing the first steps
    (budget_resolve_at); the resolution is saved in every later checkpoint, so a resumed run
    keeps it. Returns a summary for the manifest: steps (the length trained), tokens,
    train_time_s, tokens_per_s, final_loss, the last train line (`final_train`, with the
    objective's train_metrics), the last eval metrics (`final_eval`) and, with a time budget,
    `budget` (resolve_budget's record).
    """
    run_dir = Path(run_dir)
    t = cfg.train
    device = pick_device(t.device)
    launched = lmdist.init(device.type)
    world, rank, main = lmdist.world(), lmdist.rank(), lmdist.is_main()
    if device.type == "cuda" and launched.launcher != "none":
        device = torch.device("cuda", launched.local_rank)  # one GPU per process
    parallel = getattr(cfg, "parallel", None) or ParallelConfig()
    strategy = resolve_strategy(parallel, launched)
    pieces = rank_pieces(t.batch_size, t.grad_accum, world, rank, getattr(t, "micro_batch", None))
    if any(rows is not None for _, rows in pieces) and "rows" not in inspect.signature(objective.batch).parameters:
        raise UserError(f"this objective cannot split a micro-batch's rows (train.micro_batch or {world} processes "
                        f"sharing train.batch_size={t.batch_size}); use a world size that divides "
                        f"train.grad_accum={t.grad_accum} and no train.micro_batch")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    amp = autocast_dtype(t.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    model.to(device)
    model.train()
    for frozen in getattr(objective, "frozen_models", ()) or ():
        frozen.to(device).eval().requires_grad_(False)
    # Wrapped before the optimizer is built: FSDP replaces the parameters by sharded ones.
    forward_model = parallelize(model, strategy, parallel, device, amp, t.compile)
    eval_model = forward_model if strategy != "ddp" else model  # DDP only matters for the backward
    make_optimizer = getattr(objective, "build_optimizer", None)
    optimizer = (make_optimizer(model, t, device) if make_optimizer is not None
                 else build_optimizer(model, t.lr, t.weight_decay, t.betas, device))
    ema = EMA(model, t.ema) if getattr(t, "ema", None) else None
    before_step = getattr(objective, "before_step", None)
    has_state = hasattr(objective, "state_dict") and hasattr(objective, "load_state_dict")
    # With a time budget total_steps is the maximum: a fractional warmup is a share of it, and the
    # steps before the resolution follow its schedule (inside the warmup: the same as any length's).
    length = Length(t, total_steps)
    saved: dict = {}  # what the checkpoint resumed from holds of the budget

    if main:
        remove_stale_temps(run_dir)
    lmdist.barrier()
    start_step, tokens_seen, train_time = 0, 0, 0.0
    resumed_from = None
    if cfg.resume == "never":
        if main and list_checkpoints(run_dir):
            print(f"warning: resume=never: deleting the checkpoints in {run_dir / CHECKPOINTS} and starting over",
                  file=sys.stderr)
            shutil.rmtree(run_dir / CHECKPOINTS)
        lmdist.barrier()
    else:
        check_same_run(run_dir, resume_config)
        found = find_resumable(run_dir, model, optimizer,
                               extra_into={"ema": ema.state_dict()} if ema is not None else None)
        if found is not None:
            resumed_from, state = found
            start_step, tokens_seen, train_time = state["step"], state["tokens"], state.get("train_time_s", 0.0)
            ranks = state.get("rng_ranks")
            set_rng_state(ranks[rank] if ranks and len(ranks) == world else state["rng"])
            extra = state.get("extra_states", {})
            if has_state and "objective" in extra:
                objective.load_state_dict(_rank_state(extra["objective"], rank, world, resumed_from))
            if ema is not None:
                if "ema" not in extra:
                    raise UserError(f"{resumed_from} has no EMA state (written without train.ema); use another "
                                    f"`out` or resume=never")
                try:
                    ema.load_state_dict(extra["ema"])
                except ValueError as e:
                    raise UserError(f"{resumed_from}: {e}; resume it with the strategy it was saved with, "
                                    f"or use another `out`") from None
            saved = state
    length.resumed(saved, start_step, run_dir)  # a budget resolved before the checkpoint keeps its length
    total_steps = length.total
    if resumed_from is not None:
        print(f"resuming from {resumed_from} (step {start_step} of {total_steps})", file=sys.stderr)
    if start_step > total_steps:
        raise UserError(f"{run_dir} has a checkpoint at step {start_step}, past this run's {total_steps} steps; "
                        f"use another `out` or resume=never")

    log = MetricsLogger(run_dir, resume_step=start_step, tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                        wandb_mode=cfg.log.wandb_mode, wandb_project=cfg.log.wandb_project,
                        config=cfg.model_dump(mode="json")) if main else _NoLog()
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext
    peak = peak_flops(device) if amp is not None else None
    epoch_tokens = getattr(objective, "epoch_tokens", None)
    tokens_of = getattr(objective, "tokens", None)
    train_metrics = getattr(objective, "train_metrics", None)
    progress_metrics = getattr(objective, "progress_metrics", None) or {}

    def state_now(done: int) -> dict:
        rngs = lmdist.gather_objects(rng_state())  # every rank's generators (a collective: all ranks call it)
        state = {"step": done, "tokens": tokens_seen, "train_time_s": round(train_time, 3), "rng": rngs[0],
                 "resume_config": resume_config, "world_size": world}
        if world > 1:
            state["rng_ranks"] = rngs
        state.update(length.meta())  # the time budget's record, or the steps timed so far
        return state

    shard = EvalShard(rank, world, active=strategy == "ddp", device=device)
    shardable = "shard" in inspect.signature(objective.evaluate).parameters

    def evaluate(done: int) -> None:
        model.eval()
        with torch.no_grad(), autocast(), (ema.applied(model) if ema is not None else contextlib.nullcontext()):
            metrics = (objective.evaluate(eval_model, device, shard=shard) if shardable
                       else objective.evaluate(eval_model, device))
        model.train()
        if metrics:
            log.write({"step": done, **metrics})
        for hook in EVAL_HOOKS:
            hook(done, metrics)

    def extra_state() -> dict:
        extra = {}
        if has_state:
            extra["objective"] = _ranks_state(objective.state_dict(), world)
        if ema is not None:
            extra["ema"] = ema.state_dict()
        return extra

    bar = progress(total=total_steps, desc=desc, unit="step", initial=start_step, disable=not main)
    last_ckpt = start_step if start_step else None
    # The first step whose loss or gradient norm was not finite, kept on the device so that
    # checking costs no sync per step: it is read before each log line and each checkpoint, so
    # weights a NaN has reached are never saved over good ones.
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    bad_loss = torch.zeros((), device=device)

    def check_finite(done: int) -> None:
        first = int(bad_step.item())
        if first < 0:
            return
        kept = (f"the checkpoint at step {last_ckpt} in {run_dir / CHECKPOINTS} is kept" if last_ckpt
                else "no checkpoint was written")
        raise Diverged(f"training diverged: the loss was {float(bad_loss):g} at step {first} of {total_steps} (noticed "
                       f"after step {done}); nothing trained since is saved and {kept}. Lower train.lr (now "
                       f"{t.lr:g}), set train.grad_clip (now {t.grad_clip:g}) or train.dtype=float32, and run again "
                       f"(with resume=never to start over)")

    done = start_step
    interval_t0, interval_tokens = time.perf_counter(), 0
    try:
        with _StopOnSignals() as stop:
            step = start_step
            while step < total_steps:  # total_steps may shrink once, at the budget's resolution
                t0 = clock()
                lr = length.schedule(step)
                set_lr(optimizer, lr)
                if before_step is not None:
                    model.eval()
                    with torch.no_grad():
                        before_step(model, step)
                    model.train()
                loss_sum = torch.zeros((), device=device)
                step_count, step_tokens = 0, 0
                for i, (micro, rows) in enumerate(pieces):
                    batch = objective.batch(step, micro) if rows is None else objective.batch(step, micro, rows=rows)
                    batch = to_device(batch, device)
                    with grad_sync(forward_model, strategy, sync=i == len(pieces) - 1):
                        with autocast():
                            micro_sum, micro_count = objective.loss(forward_model, batch)
                        micro_count = int(micro_count)
                        if micro_count:  # a micro-batch without loss terms adds nothing (and would be 0/0)
                            micro_sum.backward()  # the sum's gradient: divided by the step's count below
                            loss_sum += micro_sum.detach().float()
                            step_count += micro_count
                        elif world > 1:  # the other ranks wait in this pass's gradient reduction
                            zero = micro_sum * 0.0 if micro_sum.requires_grad else connected_zero(model)
                            zero.backward()
                    step_tokens += int(tokens_of(batch)) if tokens_of is not None else micro_count
                stop_now = None  # (stop, preempted) as all ranks agreed at this step's all-reduce
                if world > 1:
                    # One all-reduce per step: the loss sum, its count, the tokens and "stop" (a
                    # signal reaches each rank at its own moment; all must stop at the same step,
                    # so this step decides by the agreed flags, and a signal arriving after the
                    # all-reduce counts at the next one).
                    totals = lmdist.all_reduce_(torch.cat([loss_sum.double().reshape(1), torch.tensor(
                        [step_count, step_tokens, stop.requested, stop.preempted], dtype=torch.float64,
                        device=device)]))
                    loss_sum_g, count_g, tokens_g, stops, preempts = totals.tolist()
                    loss_sum = torch.tensor(loss_sum_g, device=device)
                    step_count, step_tokens = int(count_g), int(tokens_g)
                    stop_now = (stops > 0, preempts > 0)
                # The step's loss is the mean over all its loss terms (tokens, pairs), not the mean
                # of the micro-batches' means, which would weight a micro-batch of 10 targets like
                # one of 1,000 (torchtitan normalises the same way, over ranks too). DDP and FSDP
                # average the gradients over the ranks: undo that division by the world size.
                _divide_grads(model, max(step_count, 1) / world)
                # clip_grad_norm_ with an infinite max still returns the norm and scales by exactly 1.
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
                finite = torch.isfinite(loss_sum) & torch.isfinite(local_scalar(grad_norm).to(device))
                newly = (bad_step < 0) & ~finite
                bad_step = torch.where(newly, step + 1, bad_step)
                bad_loss = torch.where(newly, loss_sum / max(step_count, 1), bad_loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
                probing = length.budget.probing
                if probing and device.type == "cuda":
                    torch.cuda.synchronize(device)  # time the step's work, not its launch
                step_s = clock() - t0
                done = step + 1
                step = done
                tokens_seen += step_tokens
                interval_tokens += step_tokens
                train_time += step_s
                bar.update(1)
                if probing:  # may fix the length (every rank taking rank 0's measurement)
                    length.after_step(done, step_s, bar)
                    total_steps = length.total

                if done % cfg.log.every == 0 or done == total_steps:
                    check_finite(done)
                    loss_value = loss_sum.item() / max(step_count, 1)  # .item() syncs the GPU: only at log steps
                    now = time.perf_counter()
                    tps = interval_tokens / max(now - interval_t0, 1e-9)
                    interval_t0, interval_tokens = now, 0
                    rec = {"step": done, "loss": loss_value, "lr": lr, "tokens": tokens_seen,
                           "tokens_per_s": round(tps, 1), "grad_norm": local_scalar(grad_norm).item(),
                           "time_s": round(train_time, 2)}
                    if epoch_tokens:
                        rec["epochs"] = round(tokens_seen / epoch_tokens, 4)
                    if peak and flops_per_token:
                        rec["mfu"] = round(tps * flops_per_token / peak, 4)
                    extra = train_metrics() if train_metrics is not None else {}
                    rec.update({k: v for k, v in extra.items() if k not in rec})  # the loop's own keys win
                    log.write(rec)
                    post = {"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tps:,.0f}"}
                    if "mfu" in rec:
                        post["mfu"] = f"{rec['mfu']:.1%}"
                    if "epochs" in rec:
                        post["ep"] = f"{rec['epochs']:.2f}"
                    for key, label in progress_metrics.items():
                        if isinstance(extra.get(key), (int, float)):
                            post[label] = f"{extra[key]:.3g}"
                    bar.set_postfix(post, refresh=False)

                if cfg.eval.batches and ((cfg.eval.every and done % cfg.eval.every == 0) or done == total_steps):
                    evaluate(done)
                stopping, preempted = stop_now if stop_now is not None else (stop.requested, stop.preempted)
                if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == total_steps or stopping:
                    check_finite(done)
                    save_checkpoint(run_dir, done, model, optimizer, state_now(done), keep=cfg.checkpoint.keep,
                                    extra=extra_state())
                    last_ckpt = done
                if stopping:
                    kind = Preempted if preempted else Interrupted
                    raise kind(f"stopped after step {done} of {total_steps}; checkpoint saved in "
                               f"{run_dir / CHECKPOINTS}. Run the same command to continue.")
    except KeyboardInterrupt:
        where = f"from the checkpoint at step {last_ckpt}" if last_ckpt else "from the start (no checkpoint yet)"
        raise Interrupted(f"stopped during step {done + 1} of {total_steps}; run the same command to continue "
                          f"{where}") from None
    finally:
        bar.close()
        log.close()

    if ema is not None:
        ema.copy_to(model)  # the stage saves (and later stages use) the averaged weights
    lines = read_metrics(run_dir) if main else []
    train_lines = [r for r in lines if "loss" in r]
    eval_lines = [r for r in lines if "loss" not in r and r.get("step") == total_steps]
    summary = {
        "steps": total_steps,
        "tokens": tokens_seen,
        "train_time_s": round(train_time, 2),
        "tokens_per_s": round(tokens_seen / train_time, 1) if train_time > 0 else None,
        "precision": "bf16 autocast" if amp is not None else "float32",
        "final_loss": train_lines[-1]["loss"] if train_lines else None,
        "final_train": {k: v for k, v in train_lines[-1].items() if k != "step"} if train_lines else {},
        "final_eval": {k: v for k, v in eval_lines[-1].items() if k != "step"} if eval_lines else {},
    }
    summary.update(length.stats())
    if device.type == "cuda":  # what this process's tensors took at most (the CUDA context aside)
        summary["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    if ema is not None:
        summary["ema"] = ema.decay
    if strategy != "none":  # ddp or fsdp, also on one process (torchrun --nproc_per_node 1)
        summary["parallel"] = {"strategy": strategy, "world_size": world}
    summary["model"] = _model_to_save(model, strategy, main)
    return summary


def _model_to_save(model: torch.nn.Module, strategy: str, main: bool) -> torch.nn.Module | None:
    """The trained model as one plain module on rank 0 (None elsewhere), for model.safetensors.

    FSDP's parameters are shards: they are gathered to rank 0's CPU (cpu_offload: one block's
    worth on the GPU at a time) and loaded into a fresh model of the same family.
    """
    if strategy != "fsdp":
        return model if main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lmlab.models.family import build_model, model_json

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    plain = build_model(model_json(model))
    peft_configs = getattr(model, "peft_config", None)
    if peft_configs:  # LoRA: the same adapters around the fresh model, then the gathered weights
        import peft

        plain = peft.get_peft_model(plain, peft_configs["default"])
    plain.load_state_dict(full)
    return plain
