"""Runtime helpers shared by stages: device choice, seeding, threads, hardware summary, progress bars."""

from __future__ import annotations

import functools
import os
import platform
import random
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lmlab.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu. An explicit unavailable device is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was asked for but CUDA is not available; use device=cpu or device=auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; valid: auto, cpu, cuda, cuda:N, mps") from None


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU flags list bf16 dot-product instructions (Linux /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine_kind(device: str = "auto") -> tuple[str, str]:
    """(kind, description) of what a run on `device` trains on, for expected durations.

    kind is `cuda`, `cpu_bf16` (a CPU with native bf16 instructions: `train.dtype=auto` trains
    under bf16 autocast), `cpu_fp32` (one without: float32 training) or another device type
    (`mps`). An unavailable device gives the kind of the CPU.
    """
    try:
        dev = pick_device(device)
    except UserError:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        return "cuda", f"CUDA GPU {torch.cuda.get_device_name(dev)}"
    if dev.type == "cpu":
        if cpu_has_native_bf16():
            return "cpu_bf16", "CPU with native bf16 instructions: bf16 autocast"
        return "cpu_fp32", "CPU without native bf16 instructions: float32 training"
    return dev.type, dev.type


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def hardware_summary() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def progress(total: int | None = None, desc: str = "", unit: str = "it", **kw) -> tqdm:
    """A progress bar on stderr with rate and ETA; refreshes rarely when stderr is not a terminal."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                mininterval=0.2 if tty else 15.0,
                disable=kw.pop("disable", False) or os.environ.get("LMLAB_NO_PROGRESS") == "1",
                unit_scale=kw.pop("unit_scale", False), **kw)


def eager_under_compile(fn):
    """`torch.compiler.disable` for `fn`, decided at the call rather than at import.

    The decorator imports torch._dynamo, which took 1.0 s of every lmlab command's 3.1 s start
    (`python -X importtime`), though only `train.compile=true` runs use it. Outside torch.compile
    this calls `fn`; while dynamo traces a caller, it calls the disabled `fn` (made once), so the
    graph breaks there as the decorator would make it.
    """
    disabled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            if not disabled:
                disabled.append(torch.compiler.disable(fn))
            return disabled[0](*args, **kwargs)
        return fn(*args, **kwargs)

    return call
