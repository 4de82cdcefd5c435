"""The run-directory steps every training stage shares (pretrain, sft, dpo, and the ones to come).

    run = TrainingRun(cfg, "sft")                  # applies `hardware:`, joins the process group
    run.check_out(inputs={"init model": cfg.init})  # the shared `out` rule, before any work
    if run.up_to_date(inputs): return run.out       # the same finished run: nothing to do
    ... build the model, the objective, resume_config ...
    run.start(resume_config)                        # refuses other settings' checkpoints, marks out
    summary = run.train(model, objective, total_steps=..., resume_config=..., desc="sft")
    run.finish(lambda model: write_outputs(...), stats, inputs, tokenizer.sha256, summary)

A stage's fingerprint is its config without the keys that say *how* it runs rather than
*what* it computes (`resume`, `parallel`, `hardware`, `train.micro_batch`): the same run on
1 or 8 processes, or with smaller forward passes, is the same artifact. In a distributed
run every process executes the stage (each builds the same data deterministically); rank 0
alone writes run.json, the final weights and the manifest, and the others wait for it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from lmlab import artifacts
from lmlab import dist as lmdist
from lmlab.runtime import hardware_summary, pick_device
from lmlab.train.batching import rank_pieces
from lmlab.train.loop import check_same_run, finished_run, train
from lmlab.train.parallelize import resolve_strategy

HOW_KEYS = ("resume", "parallel", "hardware", "backend")  # backend: torch or jax (trm), the same maths
TRAIN_HOW_KEYS = ("micro_batch",)
# train.* keys a checkpoint may be resumed with changed: they do not change the trajectory
RESUMABLE_TRAIN_KEYS = {"compile", "device", "micro_batch"}


def fingerprint_config(config: dict) -> dict:
    """The config a stage fingerprints: everything but how it runs (see the module docstring)."""
    out = {k: v for k, v in config.items() if k not in HOW_KEYS}
    if isinstance(out.get("train"), dict):
        out["train"] = {k: v for k, v in out["train"].items() if k not in TRAIN_HOW_KEYS}
    return out


def first_on_main(fn: Callable):
    """Run `fn` on rank 0 first, then on the other ranks: a cache rank 0 writes is read by the rest."""
    if lmdist.is_main():
        result = fn()
        lmdist.barrier()
        return result
    lmdist.barrier()
    return fn()


class TrainingRun:
    def __init__(self, cfg, verb: str, kind: str = "model") -> None:
        self.hardware: dict | None = None  # the resolved preset's record, for the manifest
        if getattr(cfg, "hardware", None) is not None:
            from lmlab.train.hardware import apply_hardware

            cfg, self.hardware = apply_hardware(cfg)
        self.cfg, self.verb, self.kind = cfg, verb, kind
        self.out = Path(cfg.out)
        self.timer = artifacts.Timer()
        self.config = cfg.model_dump(mode="json")
        self.fp: str | None = None
        # Joined here, before any output: every rank runs the stage, only rank 0 writes.
        lmdist.init(pick_device(cfg.train.device).type)

    def check_out(self, inputs: dict | None = None) -> None:
        artifacts.check_out(self.out, self.kind, self.verb, inputs=inputs)
        # every rank has looked at `out` before rank 0 writes into it (run.json, its temp file):
        # a slower rank must not see rank 0's half-written start as someone else's directory
        lmdist.barrier()

    def up_to_date(self, inputs: dict) -> bool:
        """Fingerprint the run from its config and `inputs` ({name: {"path", "fingerprint"}})."""
        self.fp = artifacts.stage_fingerprint(self.kind, fingerprint_config(self.config),
                                              {k: v["fingerprint"] for k, v in inputs.items()})
        done = finished_run(self.out, self.fp, self.verb, self.kind)  # looks at `out` again, on every rank
        # ... so every rank has done so before rank 0's start() writes run.json (through a temp file
        # that a slower rank's look would take for someone else's directory: a race CI hit twice)
        lmdist.barrier()
        return done

    def start(self, resume_config: dict) -> None:
        """Check the launch, that resumable checkpoints match, then mark `out` as this verb's unfinished run."""
        t = self.cfg.train
        if getattr(self.cfg, "backend", "torch") == "torch":  # (JAX runs shape their mesh with parallel.mesh)
            resolve_strategy(self.cfg.parallel, lmdist.read_env())  # the loop resolves it again; refuse early
        rank_pieces(t.batch_size, t.grad_accum, lmdist.world(), lmdist.rank(), t.micro_batch)
        if self.cfg.resume == "auto":
            check_same_run(self.out, resume_config)  # before touching out: a typo must not unmark a finished run
        if lmdist.is_main():
            artifacts.start_run(self.out, self.kind, self.verb)  # writes run.json, removes the manifest
        lmdist.barrier()

    def train(self, model, objective, **kwargs) -> dict:
        with self.timer("train"):
            return train(model, objective, self.cfg, self.out, **kwargs)

    def finish(self, write_weights: Callable, stats: dict, inputs: dict, tokenizer_sha256: str,
               summary: dict) -> bool:
        """Rank 0 writes the weights (`write_weights(model)`) and the manifest with the stats tail
        every training stage shares; the others wait. True on the rank that wrote."""
        model = summary.pop("model", None)
        wrote = lmdist.is_main()
        if wrote:
            with self.timer("save"):
                write_weights(model)
            stats = {**stats,
                     "train_time_s": summary["train_time_s"], "tokens_per_s": summary["tokens_per_s"],
                     "precision": summary["precision"], **summary.get("budget", {}),
                     "parallel": summary.get("parallel", {"strategy": "none", "world_size": 1}),
                     **({"peak_memory_gib": summary["peak_memory_gib"]} if "peak_memory_gib" in summary else {}),
                     "hardware": hardware_summary()}
            if self.hardware:
                stats["hardware_preset"] = self.hardware
            artifacts.write_manifest(self.out, self.kind, self.config, self.fp, inputs=inputs, verb=self.verb,
                                     tokenizer_sha256=tokenizer_sha256, timings=self.timer.total(), stats=stats)
        lmdist.barrier()
        return wrote



def swap_in(out: Path, write: Callable[[Path], None], names: list[str]) -> None:
    """`write(tmp)` the final files into a temporary directory inside `out`, then move each of
    `names` (files or directories) into `out`, replacing what was there: a failure while
    writing (a full disk) leaves the previous files whole."""
    tmp = out / f".final.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        for name in names:
            if (out / name).is_dir() and not (out / name).is_symlink():
                shutil.rmtree(out / name)
            os.replace(tmp / name, out / name)
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
