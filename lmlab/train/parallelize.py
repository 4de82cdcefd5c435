"""Wrap a model for its run: activation checkpointing, DDP or FSDP2, then torch.compile.

    strategy = resolve_strategy(cfg.parallel, env)         # "none" | "ddp" | "fsdp"
    forward_model = parallelize(model, strategy, cfg.parallel, device, amp, compile=True)

Model code stays free of parallelism (torchtitan keeps `parallelize.py` apart from
`model.py`); what this file needs from a family is written down in docs/architecture.md:
the model's repeated blocks in `model.blocks` (an nn.ModuleList, each block called as
`block(x, ...)`), and the methods other than `forward` that callers use during training
and evaluation (`hidden`, `logits`), which FSDP2 must see as forward passes too.

- ddp: `DistributedDataParallel` around the model; the loop skips the gradient all-reduce
  on all but the last micro-batch of a step (`no_sync`).
- fsdp: `fully_shard` on every block, then on the root (embeddings, final norm and output
  head stay together in the root's group, so the fused linear+cross-entropy loss reads the
  whole head weight inside the root's forward). Parameters are gathered in bf16 when the
  run trains under bf16 autocast (`MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=float32)`): gradients are reduced and the optimizer steps in float32.
- activation checkpointing: each block's forward is recomputed in the backward pass
  (torch.utils.checkpoint, non-reentrant); the block's parameters and state-dict keys are
  unchanged, so checkpoints and exports do not see it.
- compile: after wrapping, as the PyTorch docs advise for DDP; on FSDP, per block before
  sharding would be faster to compile (torchtitan), the whole model after sharding is
  simpler and what we measured.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from lmlab import dist as lmdist
from lmlab.errors import UserError
from lmlab.train.parallel_config import ParallelConfig

FORWARD_METHODS = ("hidden", "logits")  # called directly by DPO, generation and evaluation


def resolve_strategy(p: ParallelConfig, launched: lmdist.Env) -> str:
    """The strategy this run uses; refuses one that cannot work with how the run was launched."""
    world = launched.world
    if p.mesh:
        raise UserError(f"parallel.mesh={p.mesh} shapes the JAX device mesh: it takes backend=jax (on the stages "
                        f"that have one); torch runs spread with parallel.strategy=ddp or fsdp")
    if p.strategy == "auto":
        return "ddp" if world > 1 else "none"
    if p.strategy == "none" and world > 1:
        raise UserError(f"parallel.strategy=none but the run was launched as {world} processes; use "
                        f"parallel.strategy=ddp (or fsdp, or auto), or launch one process")
    if p.strategy in ("ddp", "fsdp") and launched.launcher == "none":
        raise UserError(f"parallel.strategy={p.strategy} needs a process group, and this run was started as a "
                        f"plain single process: launch it with `torchrun --nproc_per_node N -m lmlab VERB ...` "
                        f"(N=1 for one GPU), `lmlab slurm VERB ...` on a cluster, or use parallel.strategy=auto")
    return p.strategy


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    from torch.utils.checkpoint import checkpoint

    blocks = _blocks(model, "activation checkpointing")
    for block in blocks:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # evaluation, generation: nothing to recompute
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The family's model inside a PEFT (LoRA) wrapper; the model itself otherwise."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _blocks(model: torch.nn.Module, what: str) -> torch.nn.ModuleList:
    blocks = getattr(_base(model), "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks):
        raise UserError(f"{what} needs the model's blocks in `model.blocks` (an nn.ModuleList); family "
                        f"{getattr(model, 'family', type(model).__name__)!r} has none")
    return blocks


def parallelize(model: torch.nn.Module, strategy: str, p: ParallelConfig, device: torch.device,
                amp: torch.dtype | None, compile: bool, mesh=None) -> torch.nn.Module:
    """The module the loop calls forward on (`model` itself is wrapped in place for fsdp).

    `mesh`: FSDP's device mesh (default: the process group's, on the device torch finds); the
    memory planner passes a CPU mesh over a fake process group (lmlab.plan_trace)."""
    if p.activation_checkpointing:
        apply_activation_checkpointing(model)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        param_dtype = {"auto": amp, "float32": None, "bfloat16": torch.bfloat16}[p.fsdp_param_dtype]
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in _blocks(model, "parallel.strategy=fsdp"):
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=p.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=p.reshard_after_forward)
        if _base(model) is model:  # (a LoRA model is called through PEFT's forward only)
            for name in FORWARD_METHODS:
                if hasattr(model, name):
                    register_fsdp_forward_method(model, name)
        wrapped = model
    elif strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=ids)
    else:
        wrapped = model
    return torch.compile(wrapped) if compile else wrapped



def grad_sync(forward_model: torch.nn.Module, strategy: str, sync: bool):
    """A context for one micro-batch's forward+backward: gradients are reduced over ranks only
    when `sync` (the last micro-batch of a step), saving the all-reduce on the others."""
    inner = getattr(forward_model, "_orig_mod", forward_model)
    if strategy == "ddp" and not sync:
        return inner.no_sync()
    if strategy == "fsdp":
        inner.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def local_scalar(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. FSDP's gradient norm) as a plain tensor; others unchanged."""
    return t.full_tensor() if lmdist.is_dtensor(t) else t
