"""Checkpoints of a JAX run with Orbax: RUN/checkpoints_jax/STEP/{state, meta}.

    ck = Checkpoints(run_dir, keep=3)
    ck.save(step, state, meta)          # async: training goes on while it is written
    found = ck.latest(resume_config)    # None, or (step, meta); refuses another run's settings
    state = ck.restore(step, like=state)

`state` is any pytree of arrays (parameters, optimizer state, the ACT carries ...), `meta` a
JSON object (the step, tokens, time and the run's resume config). Orbax's CheckpointManager
writes each step into a temporary directory and renames it when complete, keeps the newest
`keep`, and saves asynchronously; `close()` waits for the last save. A checkpoint killed while
being written is never listed, so the previous one is what a resume finds.

Restoring takes the shardings of `like` (arrays of the current mesh): a checkpoint saved on 8
devices restores onto 1, or the other way round.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from lmlab.errors import UserError

DIRNAME = "checkpoints_jax"


class Checkpoints:
    def __init__(self, run_dir: str | Path, keep: int, fresh: bool = False) -> None:
        import orbax.checkpoint as ocp

        self.dir = (Path(run_dir) / DIRNAME).resolve()
        if fresh and self.dir.exists():
            shutil.rmtree(self.dir)
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                                           create=True),
            item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict) -> None:
        a = self._ocp.args
        self.manager.save(step, args=a.Composite(state=a.StandardSave(state), meta=a.JsonSave(meta)))

    def latest(self, resume_config: dict) -> Optional[tuple[int, dict]]:
        """(step, meta) of the newest checkpoint, None without one; UserError when it is another run's."""
        from lmlab.train.loop import settings_diff

        step = self.manager.latest_step()
        if step is None:
            return None
        meta = self.meta(step)
        shown = settings_diff(meta.get("resume_config") or {}, resume_config)
        if shown:
            raise UserError(f"{self.dir} holds checkpoints of a run with different settings ({shown}); use another "
                            f"`out`, restore those settings to continue it, or pass resume=never to start over")
        return step, meta

    def meta(self, step: int) -> dict:
        """The JSON object saved with step `step`."""
        a = self._ocp.args
        return self.manager.restore(step, args=a.Composite(meta=a.JsonRestore())).meta

    def restore(self, step: int, like: Any) -> Any:
        import jax

        a = self._ocp.args
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        return self.manager.restore(step, args=a.Composite(state=a.StandardRestore(abstract))).state

    def resume(self, like: Any, resume_config: dict, total_steps: int, devices: int
               ) -> tuple[Any, int, int, float, dict]:
        """(state, start step, tokens seen, train time, meta) from the newest checkpoint of this
        run, or (`like`, 0, 0, 0.0, {}) without one; says where it resumes from."""
        import sys

        found = self.latest(resume_config)
        if found is None:
            return like, 0, 0, 0.0, {}
        start, meta = found
        if start > total_steps:
            raise UserError(f"{self.dir} has a checkpoint at step {start}, past this run's {total_steps} steps; use "
                            f"another `out` or resume=never")
        print(f"resuming from {self.dir / str(start)} (step {start} of {total_steps}; saved on {meta['devices']} "
              f"device(s), now {devices})", file=sys.stderr)
        return self.restore(start, like=like), start, meta["tokens"], meta["train_time_s"], meta

    def save_run(self, done: int, state: Any, tokens: int, train_time: float, resume_config: dict,
                 devices: int, extra: Optional[dict] = None) -> None:
        """save() with the meta a resume reads (`extra`: more of it, e.g. the time budget's state)."""
        self.save(done, state, {"step": done, "tokens": tokens, "train_time_s": round(train_time, 3),
                                "resume_config": resume_config, "devices": devices, **(extra or {})})

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def refuse_torch_checkpoints(out: Path, resume: str) -> None:
    """A JAX run does not start where torch checkpoints are (it would not continue them)."""
    from lmlab.train.checkpoint import list_checkpoints

    if list_checkpoints(out) and resume == "auto":
        raise UserError(f"{out} holds torch checkpoints, which backend=jax does not read (its own are Orbax "
                        f"checkpoints in {DIRNAME}/); resume them with backend=torch, or start over with resume=never")
