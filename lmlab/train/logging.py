"""Training metrics: `metrics.jsonl` always, TensorBoard and Weights & Biases when asked for.

    log = MetricsLogger(run_dir, resume_step=0, tensorboard=False, wandb=False)
    log.write({"step": 10, "loss": 3.2, "lr": 3e-4})
    log.close()

`RUN/metrics.jsonl` holds one JSON object per line, the format the report reads:

    {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "epochs", "time_s", ["mfu"],
     [the objective's train_metrics(), e.g. DPO's "rewards/margins"]}
    {"step", "val_loss", "val_ppl", "val_bpb"}     (eval lines; keys come from the objective)

`step` counts finished optimizer steps (the first line of a run says step 1 or more). On
resume from checkpoint N, lines with step > N (and any line cut short by a kill) are
dropped first, so the file of a resumed run matches an uninterrupted one line for line
(apart from timing fields).

TensorBoard (`torch.utils.tensorboard`, needs the `tensorboard` package) writes to
`RUN/tensorboard/`; W&B (`wandb`) logs to `RUN/wandb/` in offline or online mode and
resumes the same W&B run id after a restart. Both are imported only when enabled; if one
is enabled but not installed a single warning is printed and training goes on.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

METRICS = "metrics.jsonl"


def truncate_metrics(path: str | Path, after_step: int) -> None:
    """Keep only complete lines with step <= after_step (atomically)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by kill -9
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= after_step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict]:
    """All parseable lines of a metrics.jsonl (for reports and tests)."""
    out = []
    p = Path(path)
    if p.is_dir():
        p = p / METRICS
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _clean(value):
    """JSON has no NaN/Infinity: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    def __init__(self, run_dir: str | Path, resume_step: int = 0, tensorboard: bool = False,
                 wandb: bool = False, wandb_mode: str = "offline", wandb_project: str = "lmlab",
                 config: dict | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS
        if resume_step > 0:
            truncate_metrics(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh start: old lines would mix two runs
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = self._open_tensorboard(resume_step) if tensorboard else None
        self._wandb = self._open_wandb(wandb_mode, wandb_project, config) if wandb else None

    def _open_tensorboard(self, resume_step: int):
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard imports without it, then fails late)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("warning: log.tensorboard=true but the `tensorboard` package is not installed "
                  "(pip install tensorboard); logging to metrics.jsonl only", file=sys.stderr)
            return None
        # purge_step drops events written after the checkpoint we resumed from.
        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def _open_wandb(self, mode: str, project: str, config: dict | None):
        try:
            import wandb
        except ImportError:
            print("warning: log.wandb=true but the `wandb` package is not installed (pip install wandb); "
                  "logging to metrics.jsonl only", file=sys.stderr)
            return None
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id)
        return wandb.init(project=project, name=self.run_dir.name, id=run_id, resume="allow", mode=mode,
                          dir=str(self.run_dir), config=config or {})

    def write(self, record: dict) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        # One write + flush per line: after kill -9 the kernel has every finished line.
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and v is not None}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(("eval/" if k.startswith("val_") else "train/") + k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
