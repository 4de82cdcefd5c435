"""Processes of a distributed run: rank and world size from the launcher, the process group, helpers.

    torchrun --nproc_per_node 4 -m lmlab pretrain ...        # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*
    srun --ntasks-per-node 4 python -m lmlab pretrain ...    # SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
    accelerate launch -m lmlab pretrain ...                  # sets the same variables as torchrun

`init(device_type)` joins the process group once (NCCL on CUDA, gloo on CPU) when the
environment names more than one process, and does nothing for a plain one-process run.
Everything else asks `rank()`, `world()`, `is_main()`; only rank 0 writes files, metrics
and progress bars (`quiet_other_ranks` silences the others' ordinary output, never their
tracebacks). This module knows nothing of models; lmlab.train.parallelize wraps them.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmlab.errors import UserError


@dataclass(frozen=True)
class Env:
    rank: int
    world: int
    local_rank: int
    launcher: str  # "torchrun" | "slurm" | "none"


def read_env(environ=os.environ) -> Env:
    """Rank, world size and local rank from torchrun's variables, else SLURM's (srun without torchrun)."""
    if "WORLD_SIZE" in environ and "RANK" in environ:
        return Env(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)), "torchrun")
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return Env(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0)),
                   "slurm")
    return Env(0, 1, 0, "none")


def is_dtensor(t) -> bool:
    """Whether `t` is a torch.distributed DTensor (FSDP2's sharded parameters, their gradients).
    Looked up, not imported: a DTensor exists only once its module is loaded (FSDP loads it), and
    importing torch.distributed.tensor (sympy with it) took 1.0 s of every lmlab command's start."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0



def init(device_type: str, timeout_s: float = 600.0) -> Env:
    """Join the process group the launcher describes (idempotent). One process: nothing to join."""
    env = read_env()
    # torchrun with one process still gets a group: strategy ddp/fsdp at world size 1 (benchmarks).
    if env.launcher == "none" or (dist.is_available() and dist.is_initialized()):
        return env
    if not dist.is_available():
        raise UserError(f"launched as {env.world} processes but this torch build has no torch.distributed")
    if env.launcher == "slurm":  # srun without torchrun: the rendezvous comes from SLURM's variables
        os.environ.setdefault("RANK", str(env.rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world))
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UserError(f"launched as rank {env.rank} of {env.world} processes but {' and '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not set, so there is no rendezvous endpoint: launch "
                        f"with `torchrun --nproc_per_node N -m lmlab ...` (or `lmlab slurm ...`), or export "
                        f"MASTER_ADDR=<first node> MASTER_PORT=29500")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # Under torchrun the agent hosts the store and keeps it across `--max-restarts`: the
            # restarted workers would read the dead ones' gloo addresses from it (torch 2.13: the
            # restart hangs, then fails to connect). A prefix per restart keeps each attempt apart.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world,
                                  is_master=False, timeout=timeout)
            store = dist.PrefixStore(f"lmlab/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    except (RuntimeError, ValueError, OSError) as e:  # DistNetworkError is a RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"rank {env.rank} of {env.world} could not join the process group at "
                        f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({first}); check that "
                        f"the first node is reachable on that port and that every node got the same endpoint") from None
    quiet_other_ranks()
    return env


def quiet_other_ranks() -> None:
    """On ranks other than 0, drop ordinary stdout/stderr (rank 0 says it once); tracebacks and
    `error:` lines still reach the terminal through the real stderr, prefixed with the rank."""
    r = rank()
    if r == 0 or os.environ.get("LMLAB_ALL_RANKS_LOG"):
        return
    sys.stdout = open(os.devnull, "w")
    sys.stderr = open(os.devnull, "w")
    previous = sys.excepthook

    def hook(kind, value, tb):
        sys.stderr = sys.__stderr__
        sys.__stderr__.write(f"[rank {r}] ")
        previous(kind, value, tb)

    sys.excepthook = hook


def error_stream():
    """Where the CLI writes `error: ...`: the real stderr on every rank (prefixed off rank 0)."""
    r = rank()
    if r == 0:
        return sys.stderr, ""
    return sys.__stderr__, f"[rank {r}] "


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all ranks (a no-op on one process). A CPU tensor under NCCL, which reduces
    GPU tensors only, takes a round trip through this rank's GPU."""
    if world() > 1:
        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        if t.device.type == "cpu" and dist.get_backend() == "nccl":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=red)
            t.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(t, op=red)
    return t


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world() == 1:
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
