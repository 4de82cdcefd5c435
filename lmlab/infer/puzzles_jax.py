"""Solve a puzzle split with the JAX TRM over a device mesh: lmlab.infer.puzzles.solve in JAX.

    solver = Solver(model_cfg, mesh)             # mesh: lmlab.jax_backend.mesh.make_mesh(); dtype="bfloat16"
    solved = solve_split(solver, params, consts, table, split, batch_size=256)   # a Solved

Every example runs all `halt_max_steps` supervision steps in one compiled `lax.scan`, the rows
split over every device of the mesh; the answers come back replicated, so every host reads
them. `lmlab trm backend=jax` evaluates its test split with it, `lmlab puzzle-eval
backend=jax` a whole split.
"""

from __future__ import annotations

import numpy as np


class Solver:
    """The compiled evaluation step of a TRM on a mesh, and how host arrays are placed on it."""

    def __init__(self, model_cfg, mesh, dtype: str = "float32") -> None:
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P

        from lmlab.jax_backend.mesh import rows_sharding, serial_dispatch
        from lmlab.jax_backend.trm import model as jm

        self.model_cfg, self.mesh, self.precision = model_cfg, mesh, dtype
        self.dtype = jnp.bfloat16 if dtype == "bfloat16" else None  # the matmuls' (lmlab.jax_backend.trm.model)
        self.net = net = jm.TRMNet(model_cfg, self.dtype)
        self.rows_sharded = rows_sharding(mesh)  # a batch's rows over every device
        self.replicated = NamedSharding(mesh, P())
        self.serial = serial_dispatch()  # (CPU hosts: one program at a time, lmlab.jax_backend.mesh)

        def evaluate(params, consts, batch, table):
            rows = table[batch["puzzle_identifiers"]] if table is not None else None
            carry = jm.initial_carry(model_cfg, batch["inputs"].shape[0])
            carry = carry._replace(**{k: jax.lax.with_sharding_constraint(v, self.rows_sharded)
                                      for k, v in carry._asdict().items()})

            def one(carry, _):
                carry, out = jm.act_step(net, params, consts, carry, batch, rows, training=False)
                pred = jax.numpy.argmax(out["logits"], -1)
                return carry, (pred, out["q_halt_logits"])

            _, (preds, q) = jax.lax.scan(one, carry, None, length=model_cfg.halt_max_steps)
            return preds, q  # (S, B, L), (S, B)

        self._evaluate = jax.jit(evaluate, out_shardings=self.replicated)  # every host reads the answers

    def run(self, fn, *args):
        import jax

        out = fn(*args)
        return jax.block_until_ready(out) if self.serial else out

    def evaluate(self, *args):
        return self.run(self._evaluate, *args)

    def put(self, tree, rows: bool):
        """Host arrays (the same on every process) as global arrays: split by rows, or replicated."""
        import jax

        from lmlab.jax_backend.mesh import place

        sharding = self.rows_sharded if rows else self.replicated
        return place(tree, jax.tree_util.tree_map(lambda _: sharding, tree))


def np_batch(batch: dict) -> dict:
    """A sampler batch (torch tensors) as numpy arrays, without the carry's slot index."""
    return {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in batch.items() if k != "slot"}


def solve_split(solver: Solver, params, consts, table, split, batch_size: int, limit=None, progress_bar=None):
    """lmlab.infer.puzzles.solve in JAX: every example through all supervision steps (a short last
    batch is padded to the batch size, its padding rows dropped)."""
    from lmlab.data.puzzles.sampler import eval_batches
    from lmlab.infer.puzzles import Solved

    parts: dict[str, list] = {k: [] for k in ("preds", "exact", "token_acc", "q_halt", "scored", "examples")}
    for idx, batch in eval_batches(split, batch_size, limit):
        b = np_batch(batch)
        n = len(idx)
        b = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)]) for k, v in b.items()}
        preds, q = solver.evaluate(params, consts, solver.put(b, True), table)
        preds, q = np.asarray(preds)[:, :n], np.asarray(q)[:, :n]
        labels = b["labels"][:n].astype(np.int64)
        mask = labels != 0
        counts = mask.sum(-1)
        right = (mask[None] & (preds == labels[None])).sum(-1)  # (S, n)
        parts["preds"].append(preds[-1].astype(np.int16))
        parts["exact"].append((right == counts[None]).T)
        parts["token_acc"].append((right / np.maximum(counts, 1)[None]).T.astype(np.float32))
        parts["q_halt"].append(q.T.astype(np.float32))
        parts["scored"].append(counts > 0)
        parts["examples"].append(idx)
        if progress_bar is not None:
            progress_bar.update(n)
    if not parts["examples"]:
        raise ValueError("no examples to evaluate")
    return Solved(**{k: np.concatenate(v) for k, v in parts.items()})
