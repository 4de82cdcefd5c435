"""`lmlab sft backend=jax`: supervised finetuning of a Griffin in JAX (Google DeepMind's
recurrentgemma.jax), over every device of a mesh, for TPU pods.

The same run as the torch trainer (lmlab.train.sft + the shared loop), step for step:
- the start: the init model's weights converted (lmlab.jax_backend.griffin.convert);
- the data: SFTObjective's micro-batches (the same rows per step and micro-step, prompts
  masked: only the targets the chat template or the raw completion marks are trained), padded
  to `seq_len` so one program serves every step; segment positions from the rows' document
  ids, so packed conversations never see each other (the reference restarts its recurrence,
  convolution and attention at segment position 0);
- the loss: cross-entropy summed over the step's targets, divided by their count over the
  whole step (a short reply's tokens weigh as a long one's); AdamW with the loop's schedule,
  decay only on the matrices the torch trainer decays (not embeddings, norms, biases or the
  RG-LRU's parameters), the global-norm clip;
- the metrics: metrics.jsonl's loss, lr, tokens, tokens_per_s, grad_norm, time_s; val_loss and
  val_ppl on the held-out rows at every evaluation.

Parallelism, several hosts and Orbax checkpoints (exact resume, another mesh) as the JAX TRM
trainer (lmlab.train.trm_jax, docs/jax.md): `parallel.mesh` with data and fsdp axes, each
process reading its slice of every micro-batch, process 0 writing. The final weights go back to
the torch layout, so the run directory is what the torch trainer writes.

`train.time_budget` times the first steps and fixes the length as the torch loop does (with
its lmlab.train.budget.Length). Not with backend=jax (each refused, or said): LoRA,
train.micro_batch, and the sample generations during training (`lmlab generate` on the
written model answers them).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

from lmlab.errors import UserError
from lmlab.train.optim import param_groups


def check_supported(cfg, model) -> None:
    t = cfg.train
    if getattr(model.cfg, "family", None) != "griffin":
        raise UserError(f"sft backend=jax trains Griffin / RecurrentGemma (recurrentgemma.jax); this init model is "
                        f"a {getattr(model.cfg, 'family', 'transformer')}: use backend=torch")
    for bad, why in ((cfg.parallel.strategy in ("ddp", "fsdp"), f"parallel.strategy={cfg.parallel.strategy}: the "
                      f"device mesh decides (parallel.mesh=data:N,fsdp:M); parallel.strategy is the torch trainer's"),
                     (cfg.lora.enabled, "lora.enabled: LoRA finetunes with backend=torch"),
                     (t.micro_batch, "train.micro_batch: the mesh splits each micro-batch over the devices "
                                     "(set train.grad_accum for smaller micro-batches)")):
        if bad:
            raise UserError(f"sft backend=jax does not take {why}")


def decay_mask(model) -> dict:
    """The Flax tree of booleans: which parameters AdamW decays (the torch trainer's groups),
    found by converting a tree of 1s (decayed) and 0s like the weights."""
    import jax
    import torch

    from lmlab.jax_backend.griffin import convert

    decayed = {id(p) for g in param_groups(model, 1.0) if g["weight_decay"] for p in g["params"]}
    ones = {n: torch.full_like(p, 1.0 if id(p) in decayed else 0.0) for n, p in model.named_parameters()}
    return jax.tree_util.tree_map(lambda x: bool(np.all(x > 0.5)), convert.from_torch_state(ones, model.cfg))


def segment_positions(doc: np.ndarray) -> np.ndarray:
    """(B, T) position of each token in its document: 0 where the document id changes."""
    B, T = doc.shape
    idx = np.broadcast_to(np.arange(T), (B, T))
    start = np.concatenate([np.ones((B, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)
    first = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
    return (idx - first).astype(np.int32)


def padded(b: dict, seq_len: int, pad_id: int) -> dict:
    """An objective batch (torch tensors trimmed to the longest row) padded to `seq_len`."""
    x, y, doc = (b[k].numpy() for k in ("x", "y", "doc"))
    w = seq_len - x.shape[1]
    if w:
        x = np.pad(x, ((0, 0), (0, w)), constant_values=pad_id)
        y = np.pad(y, ((0, 0), (0, w)), constant_values=-100)
        doc = np.pad(doc, ((0, 0), (0, w)), constant_values=-1)  # padding: a document of its own
    return {"x": x.astype(np.int32), "y": y.astype(np.int32), "pos": segment_positions(doc)}


class Trainer:
    """The compiled pieces of a run: a micro-batch's summed loss and gradients, their sum over
    micro-batches, the AdamW update, the validation loss."""

    def __init__(self, cfg, model_cfg, mesh, mask) -> None:
        import jax
        import jax.numpy as jnp
        import optax
        from jax.sharding import NamedSharding, PartitionSpec as P

        from lmlab.jax_backend import compute_dtype
        from lmlab.jax_backend.griffin.model import build
        from lmlab.jax_backend.mesh import rows_sharding, serial_dispatch

        t = cfg.train
        self.precision = compute_dtype(t.dtype, jax.devices()[0].platform)
        dtype = jnp.bfloat16 if self.precision == "bfloat16" else None  # parameters stay float32
        self.net = net = build(model_cfg, dtype=dtype, remat=cfg.parallel.activation_checkpointing)
        self.rows, self.replicated = rows_sharding(mesh), NamedSharding(mesh, P())
        self.opt = optax.inject_hyperparams(optax.adamw)(learning_rate=t.lr, b1=t.betas[0], b2=t.betas[1], eps=1e-8,
                                                         weight_decay=t.weight_decay, mask=mask)
        self.serial = serial_dispatch()

        def nats(params, b):
            logits, _ = net.apply(params, b["x"], b["pos"], return_cache=False)
            keep = b["y"] != -100
            ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(keep, b["y"], 0))
            return jnp.sum(jnp.where(keep, ce, 0.0)), jnp.sum(keep)

        def micro(params, b):
            (loss, n), g = jax.value_and_grad(nats, has_aux=True)(params, b)
            return {"loss": loss, "count": n, "grads": g}

        def add(a, b):
            return jax.tree_util.tree_map(jnp.add, a, b)

        def update(params, opt_state, acc, lr):
            grads = jax.tree_util.tree_map(lambda g: g / jnp.maximum(acc["count"], 1), acc["grads"])
            norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
            if t.grad_clip:
                scale = jnp.minimum(1.0, t.grad_clip / (norm + 1e-6))
                grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
            opt_state.hyperparams["learning_rate"] = lr
            updates, opt_state = self.opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, norm

        self._fns = {"micro": micro, "update": update}
        self._micro = self._update = None
        self._add = jax.jit(add)
        self._eval = jax.jit(nats)

    def _go(self, fn, *args):
        import jax

        out = fn(*args)
        return jax.block_until_ready(out) if self.serial else out

    def shardings(self, tree):
        import jax

        return jax.tree_util.tree_map(lambda x: x.sharding, tree)

    def micro(self, params, b):
        import jax

        if self._micro is None:  # gradients sharded as the parameters (reduce-scattered under fsdp)
            rep = self.replicated
            self._micro = jax.jit(self._fns["micro"],
                                  out_shardings={"loss": rep, "count": rep, "grads": self.shardings(params)})
        return self._go(self._micro, params, b)

    def add(self, a, b):
        return b if a is None else self._go(self._add, a, b)

    def update(self, params, opt_state, acc, lr):
        import jax

        if self._update is None:  # the new state keeps the old one's shardings
            self._update = jax.jit(self._fns["update"], donate_argnums=(0, 1),
                                   out_shardings=(self.shardings(params), self.shardings(opt_state), self.replicated))
        return self._go(self._update, params, opt_state, acc, lr)

    def evaluate(self, params, b):
        return self._go(self._eval, params, b)


def train(cfg, run_dir: Path, torch_model, objective, total_steps: int, resume_config: dict, seq_len: int,
          pad_id: int) -> dict:
    """Finetune `torch_model` (an lmlab Griffin) for `total_steps`, resuming from RUN/checkpoints_jax
    when it holds this run's checkpoints; -> the summary TrainingRun.finish takes."""
    import jax
    import jax.numpy as jnp

    from lmlab import dist as lmdist
    from lmlab.jax_backend import enable_compile_cache
    from lmlab.jax_backend.griffin import convert
    from lmlab.jax_backend.mesh import local_rows, make_mesh, param_shardings, place, rows_sharding
    from lmlab.runtime import progress
    from lmlab.train.jax_checkpoint import Checkpoints
    from lmlab.train.jax_loop import (Length, check_finite, clock, due, open_log, probe, steps,
                                      summary as run_summary)
    from lmlab.train.trm_jax import check_batch

    check_supported(cfg, torch_model)
    enable_compile_cache()
    t = cfg.train
    mesh = make_mesh(cfg.parallel.mesh)
    shards = int(mesh.devices.size)
    check_batch(t.batch_size, shards)
    hosts, host = jax.process_count(), jax.process_index()
    main = host == 0
    mine = None if hosts == 1 else slice(host * t.batch_size // hosts, (host + 1) * t.batch_size // hosts)
    model_cfg = torch_model.cfg
    trainer = Trainer(cfg, model_cfg, mesh, decay_mask(torch_model))
    params = convert.from_torch_state(torch_model.state_dict(), model_cfg)
    st = {"params": place(params, param_shardings(params, mesh))}
    opt_state = trainer.opt.init(params)
    st["opt_state"] = place(opt_state, param_shardings(opt_state, mesh))
    length = Length(t, total_steps)  # the schedule; with train.time_budget total_steps is a maximum

    ck = Checkpoints(run_dir, keep=cfg.checkpoint.keep, fresh=cfg.resume == "never" and main)
    lmdist.barrier()  # (several hosts) none lists the checkpoints while process 0 deletes them
    st, start, tokens_seen, train_time, meta = ck.resume(st, resume_config, total_steps, shards)
    length.resumed(meta, start, ck.dir)

    def save(done: int) -> None:
        ck.save_run(done, st, tokens_seen, train_time, resume_config, shards, length.meta())

    def evaluate_now(done: int) -> None:
        val = objective.val_rows
        if val is None or not len(val) or not cfg.eval.batches:
            return
        nats, n = 0.0, 0
        stop = min(len(val), cfg.eval.batches * t.batch_size)
        for s in range(0, stop, t.batch_size):
            rows = list(range(s, min(s + t.batch_size, stop)))
            rows += [rows[-1]] * (t.batch_size - len(rows))  # a short last batch: repeats, not counted
            b = padded(objective._assemble([(val, r) for r in rows]), seq_len, pad_id)
            b["y"][stop - s:] = -100
            total, k = trainer.evaluate(st["params"], place(b, {key: rows_sharding(mesh) for key in b}))
            nats, n = nats + float(total), n + int(k)
        if n:
            log.write({"step": done, "val_loss": nats / n, "val_ppl": math.exp(min(nats / n, 80.0))})

    if cfg.sample_prompts and main:
        print("sft (jax): sample_prompts are not answered during a JAX run; `lmlab generate` on the written model "
              "answers them", file=sys.stderr)
    log = open_log(cfg, run_dir, start, main)
    bar = progress(total=length.total, desc="sft (jax)", unit="step", initial=start, disable=not main)
    interval_t0, interval_tokens, compile_s = time.perf_counter(), 0, None
    with steps(ck, save, log, bar, length, start) as at:
        step = start
        while step < length.total:  # a time budget may shorten it once
            t0 = clock()
            lr = length.schedule(step)
            acc, positions = None, 0
            for m in range(t.grad_accum):
                full = objective.batch(step, m)
                positions += full["positions"]
                b = full if mine is None else {k: v[mine] for k, v in full.items() if k in ("x", "y", "doc")}
                acc = trainer.add(acc, trainer.micro(st["params"], local_rows(padded(b, seq_len, pad_id),
                                                                              trainer.rows)))
            st["params"], st["opt_state"], norm = trainer.update(st["params"], st["opt_state"], acc,
                                                                 jnp.float32(lr))
            done = at.done = step = step + 1
            tokens_seen += positions
            interval_tokens += positions
            step_s = probe(length, done, t0, bar, st["params"])  # a time budget being measured: may fix the length
            logging_now = done % cfg.log.every == 0 or done == length.total
            if logging_now:
                loss_value = float(acc["loss"]) / max(int(acc["count"]), 1)
                check_finite(loss_value, done, length.total, t.lr)
            if step_s is None:
                step_s = clock() - t0
            compile_s = step_s if compile_s is None else compile_s
            train_time += step_s
            bar.update(1)
            if logging_now:
                now = time.perf_counter()
                log.write({"step": done, "loss": loss_value, "lr": lr, "tokens": tokens_seen,
                           "tokens_per_s": round(interval_tokens / max(now - interval_t0, 1e-9), 1),
                           "grad_norm": float(norm), "time_s": round(train_time, 2)})
                interval_t0, interval_tokens = now, 0
                bar.set_postfix({"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}"}, refresh=False)
            if cfg.eval.batches and due(cfg.eval.every, done, length.total):
                evaluate_now(done)
            if due(cfg.checkpoint.every, done, length.total):
                save(done)

    torch_model.load_state_dict(convert.to_torch_state(jax.device_get(st["params"]), model_cfg))
    return run_summary(run_dir, main, "sft", length.total, tokens_seen, train_time, trainer.precision, mesh,
                       st["params"], hosts, compile_s, "val_loss", **length.stats(), model=torch_model)
