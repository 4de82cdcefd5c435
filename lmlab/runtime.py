"""Runtime helpers shared by stages: device choice, seeding, threads, hardware summary, progress bars."""

from __future__ import annotations

import os
import platform
import random
import sys

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
                mininterval=0.2 if tty else 15.0, disable=os.environ.get("LMLAB_NO_PROGRESS") == "1",
                unit_scale=kw.pop("unit_scale", False), **kw)
