"""`lmlab trm backend=jax`: TRM's training loop in JAX, over every device of a `jax.sharding.Mesh`.

The same run as the torch trainer (lmlab.train.trm + the shared loop), step for step:
- the start: the torch model built with train.seed, converted (lmlab.jax_backend.trm.convert), so
  both backends begin from the same weights, puzzle table and initial states;
- the data: each optimizer step's micro-batches are TRMObjective's (the same canonical batches
  and exploration draws per row), the ACT carry kept per micro-batch across steps;
- the loss summed over rows, the gradients summed over micro-batches and divided by the step's
  rows; AdamATan2 / AdamW with the loop's schedule; sign-SGD on the looked-up puzzle rows; an
  optional gradient clip; the EMA the evaluations and the saved model use;
- the metrics (metrics.jsonl: loss, lr, tokens, tokens_per_s, grad_norm, time_s and the official
  train metrics; val_* from the test split through all supervision steps).

Parallelism: `jax.jit` with `NamedSharding` over the mesh `parallel.mesh` describes
(lmlab.jax_backend.mesh; unset: one "data" axis over every device): each micro-batch is split
by rows over all devices; the parameters, optimizer state, EMA and puzzle table are replicated
over "data" and split over "fsdp" where the mesh has one (their gradients too); XLA inserts the
collectives. A batch that does not divide the devices is refused, naming the sizes that do.
Several hosts (lmlab.jax_backend.init_distributed): each process reads only its slice of every
micro-batch's rows and hands it to `make_array_from_process_local_data`; process 0 alone
writes.

Checkpoints (lmlab.train.jax_checkpoint, Orbax): every `checkpoint.every` steps, at the end and
on Ctrl-C, the parameters, optimizer state, puzzle table, EMA, initial states and every
micro-batch's ACT carry, with the step, tokens and time; the same command resumes from the
newest (refusing another run's settings), with the same data order, so a resumed run on the
CPU is bitwise the uninterrupted one. It restores onto the current mesh, whatever the device
count it was saved on.

The final weights (EMA'd) go back to the torch layout: the run directory is what the torch
trainer writes (model.safetensors, model.json, puzzles.json, metrics.jsonl, manifest), so
`lmlab puzzle-eval`, the report and export read it unchanged.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from lmlab.errors import UserError
from lmlab.train.trm_objective import STAT_KEYS, train_metrics_of


def check_batch(batch_size: int, shards: int, what: str = "train.batch_size") -> None:
    if batch_size % shards:
        valid = [k * shards for k in range(1, 5)]
        raise UserError(f"{what}={batch_size} does not divide into the {shards} devices of the mesh; use a multiple "
                        f"of {shards} ({', '.join(map(str, valid))}, ...)")


class Trainer:
    """The compiled pieces of a run: the micro-batch gradient, the update, the evaluation step."""

    def __init__(self, cfg, model_cfg, mesh) -> None:
        import jax

        from lmlab.infer.puzzles_jax import Solver
        from lmlab.jax_backend import compute_dtype
        from lmlab.jax_backend.trm import losses, model as jm
        from lmlab.jax_backend.trm.optim import ema_update, network_optimizer, sign_sgd_rows

        self.cfg, self.model_cfg, self.mesh = cfg, model_cfg, mesh
        self.precision = compute_dtype(cfg.train.dtype, jax.devices()[0].platform)
        # the evaluation step (in the same dtype), the shardings, how arrays are placed
        self.solver = Solver(model_cfg, mesh, self.precision)
        self.net = net = self.solver.net
        self.rows_sharded, self.replicated = self.solver.rows_sharded, self.solver.replicated
        t = cfg.train
        self.opt = network_optimizer(cfg.optimizer, tuple(t.betas), t.weight_decay)

        def micro(params, consts, carry, batch, table):
            ids = jm.merge(carry, batch)["puzzle_identifiers"]
            rows = table[ids] if table is not None else None  # the looked-up puzzle embeddings

            def loss_fn(p, r):
                new, out = jm.act_step(net, p, consts, carry, batch, r, training=True)
                loss, aux = losses.act_loss(out, new.labels, new.halted, new.steps, cfg.loss, cfg.halt_loss_weight)
                return loss, (new, aux)

            (loss, (new, aux)), (g, g_rows) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, rows)
            stats = {k: aux[k] for k in STAT_KEYS + ("lm_loss", "q_halt_loss")}
            return loss, g, ids, g_rows, new, stats

        def add(a, b):  # the micro-batches' sums (loss, gradients, train stats): one program, no eager ops
            return jax.tree_util.tree_map(jax.numpy.add, a, b)

        def update(params, opt_state, table, shadow, grads, ids, row_grads, n_rows, lr, emb_lr):
            grads = jax.tree_util.tree_map(lambda g: g / n_rows, grads)
            ids = jax.numpy.concatenate(ids) if ids else None  # (the micro-batches' puzzle rows)
            row_grads = jax.numpy.concatenate(row_grads) if row_grads else None
            leaves = jax.tree_util.tree_leaves(grads)
            norm = jax.numpy.sqrt(sum(jax.numpy.sum(g * g) for g in leaves))
            if t.grad_clip:
                scale = jax.numpy.minimum(1.0, t.grad_clip / (norm + 1e-6))
                grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
            updates, opt_state = self.opt.update(grads, opt_state, params, lr=lr)
            params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
            if table is not None:
                table = sign_sgd_rows(table, ids, row_grads, emb_lr, cfg.puzzle_emb_weight_decay)
            if shadow is not None:
                shadow = ema_update(shadow, params, t.ema)
            return params, opt_state, table, shadow, norm

        self._fns = {"micro": micro, "update": update}
        self._micro = self._update = None  # compiled at the first call, for the state's shardings
        self._add = jax.jit(add)
        self._run = self.solver.run

    def micro(self, params, *args):
        import jax

        if self._micro is None:  # gradients sharded as the parameters: reduce-scattered under fsdp
            grads = jax.tree_util.tree_map(lambda x: x.sharding, params)
            rows, rep = self.rows_sharded, self.replicated
            self._micro = jax.jit(self._fns["micro"], out_shardings=(rep, grads, rows, rows, rows, rep))
        return self._run(self._micro, params, *args)

    def add(self, a, b):
        return b if a is None else self._run(self._add, a, b)

    def update(self, params, opt_state, table, shadow, *args):
        import jax

        if self._update is None:  # the new state keeps the old one's shardings
            def same(tree):
                return None if tree is None else jax.tree_util.tree_map(lambda x: x.sharding, tree)

            self._update = jax.jit(self._fns["update"], donate_argnums=(0, 1, 2, 3),
                                   out_shardings=(same(params), same(opt_state), same(table), same(shadow),
                                                  self.replicated))
        return self._run(self._update, params, opt_state, table, shadow, *args)

    def put(self, tree, rows: bool):
        return self.solver.put(tree, rows)

    def put_local(self, tree):
        """This process's rows (its slice of the global batch) as global arrays split by rows."""
        from lmlab.jax_backend.mesh import local_rows

        return local_rows(tree, self.rows_sharded)


def train(cfg, run_dir: Path, torch_model, objective, total_steps: int, resume_config: dict) -> dict:
    """Train for `total_steps` from `torch_model` (the TRM the stage built with train.seed, as the
    torch trainer starts from), resuming from RUN/checkpoints_jax when it holds this run's
    checkpoints; -> the summary TrainingRun.finish takes (`torch_model` holding the final EMA
    weights under "model")."""
    import jax

    from lmlab import dist as lmdist
    from lmlab.data.puzzles.sampler import owners
    from lmlab.infer.puzzles import summary as solved_summary
    from lmlab.infer.puzzles_jax import np_batch, solve_split
    from lmlab.jax_backend import enable_compile_cache
    from lmlab.jax_backend.mesh import make_mesh, param_shardings, place
    from lmlab.jax_backend.trm import convert
    from lmlab.jax_backend.trm.model import initial_carry
    from lmlab.runtime import progress
    from lmlab.train.jax_checkpoint import Checkpoints
    from lmlab.train.jax_loop import Length, check_finite, clock, due, open_log, probe, steps, summary as run_summary

    t = cfg.train
    if t.micro_batch:
        raise UserError("train.micro_batch is a torch option; with backend=jax the mesh splits each micro-batch "
                        "over the devices (set train.grad_accum for smaller micro-batches)")
    enable_compile_cache()
    model_cfg = torch_model.cfg
    mesh = make_mesh(cfg.parallel.mesh)
    shards = mesh.devices.size
    check_batch(t.batch_size, shards)
    eval_bs = cfg.eval.batch_size or t.batch_size
    check_batch(eval_bs, shards, "eval.batch_size")
    hosts, host = jax.process_count(), jax.process_index()
    main = host == 0
    # this process's rows of every micro-batch (its devices' slice of the mesh's "data" axis)
    mine = None if hosts == 1 else slice(host * t.batch_size // hosts, (host + 1) * t.batch_size // hosts)

    params, consts, table = convert.from_torch_state(torch_model.state_dict(), model_cfg)
    trainer = Trainer(cfg, model_cfg, mesh)
    # everything a step changes, and what a checkpoint holds (the carries: the rows' puzzles and states);
    # built on the host, then placed: no eager programs on arrays that span hosts
    def sharded(tree):  # split over the mesh's fsdp axis where it has one, else replicated
        return place(tree, param_shardings(tree, mesh))

    st = {"params": sharded(params), "opt_state": sharded(trainer.opt.init(params)), "consts": sharded(consts),
          "carries": {str(m): trainer.put(initial_carry(model_cfg, t.batch_size), True) for m in range(t.grad_accum)}}
    if table is not None:
        st["table"] = sharded(table)
    if t.ema:
        st["shadow"] = sharded(params)  # its own buffers
    length = Length(t, total_steps)  # the schedule; with train.time_budget total_steps is a maximum
    emb_scale = cfg.puzzle_emb_lr / t.lr  # the table's LR follows the schedule (TRMOptimizer's lr_scale)

    ck = Checkpoints(run_dir, keep=cfg.checkpoint.keep, fresh=cfg.resume == "never" and main)
    lmdist.barrier()  # (several hosts) none lists the checkpoints while process 0 deletes them
    st, start, tokens_seen, train_time, meta = ck.resume(st, resume_config, total_steps, shards)
    length.resumed(meta, start, ck.dir)

    def save(done: int) -> None:
        ck.save_run(done, st, tokens_seen, train_time, resume_config, shards, length.meta())

    log = open_log(cfg, run_dir, start, main)
    sums = None  # the train stats summed since the last log line (on the devices)
    rows_seen, t_metrics = 0, time.perf_counter()
    interval_t0, interval_tokens = time.perf_counter(), 0
    compile_s = None

    def evaluate_now(done: int) -> None:
        if objective.test is None or not cfg.eval.batches:
            return
        solved = solve_split(trainer.solver, st.get("shadow", st["params"]), st["consts"], st.get("table"),
                             objective.test, eval_bs, limit=cfg.eval.batches * t.batch_size)
        m = solved_summary(solved, objective.test.ratings, owners(objective.test))
        log.write({"step": done, "val_exact_accuracy": m["exact_accuracy"], "val_token_accuracy": m["token_accuracy"],
                   "val_q_halt_accuracy": m["q_halt_accuracy"], "val_steps_used": m["steps_used_mean"],
                   "val_exact_at_halt": m["exact_accuracy_at_halt"], "val_examples": m["examples"]})

    bar = progress(total=length.total, desc="trm (jax)", unit="step", initial=start, disable=not main)
    with steps(ck, save, log, bar, length, start) as at:
        step = start
        while step < length.total:  # a time budget may shorten it once
            t0 = clock()
            lr = length.schedule(step)
            acc, ids, row_grads, n_rows = None, [], [], 0
            table = st.get("table")
            for m in range(t.grad_accum):
                batch = np_batch(objective.batch(step, m) if mine is None else objective.batch(step, m, rows=mine))
                loss, g, data_ids, g_rows, st["carries"][str(m)], stats = trainer.micro(
                    st["params"], st["consts"], st["carries"][str(m)], trainer.put_local(batch), table)
                acc = trainer.add(acc, {"loss": loss, "grads": g})
                sums = trainer.add(sums, stats)
                if table is not None:
                    ids.append(data_ids)
                    row_grads.append(g_rows)
                n_rows += t.batch_size
            st["params"], st["opt_state"], new_table, new_shadow, norm = trainer.update(
                st["params"], st["opt_state"], table, st.get("shadow"), acc["grads"], ids, row_grads, float(n_rows),
                lr, lr * emb_scale)
            if table is not None:
                st["table"] = new_table
            if t.ema:
                st["shadow"] = new_shadow
            done = at.done = step = step + 1
            step_tokens = n_rows * model_cfg.total_len
            tokens_seen += step_tokens
            interval_tokens += step_tokens
            rows_seen += n_rows
            step_s = probe(length, done, t0, bar, st["params"])  # a time budget being measured: may fix the length
            logging_now = done % cfg.log.every == 0 or done == length.total
            if logging_now:
                loss_value = float(acc["loss"]) / n_rows  # a sync: only at log steps
                check_finite(loss_value, done, length.total, t.lr)
            if step_s is None:
                step_s = clock() - t0
            compile_s = step_s if compile_s is None else compile_s  # the first step compiles
            train_time += step_s
            bar.update(1)
            if logging_now:
                now = time.perf_counter()
                rec = {"step": done, "loss": loss_value, "lr": lr, "tokens": tokens_seen,
                       "tokens_per_s": round(interval_tokens / max(now - interval_t0, 1e-9), 1),
                       "grad_norm": float(norm), "time_s": round(train_time, 2)}
                interval_t0, interval_tokens = now, 0
                host = {**{k: float(v) for k, v in jax.device_get(sums).items()}, "rows": float(rows_seen)}
                shown = train_metrics_of(host, rows_seen, now - t_metrics)
                rec.update({k: v for k, v in shown.items() if k not in rec})
                sums, rows_seen, t_metrics = None, 0, now
                log.write(rec)
                bar.set_postfix({"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}",
                                 "exact": f"{rec['exact_accuracy']:.3g}"}, refresh=False)
            if cfg.eval.batches and due(cfg.eval.every, done, length.total):
                evaluate_now(done)
            if due(cfg.checkpoint.every, done, length.total):
                save(done)

    final = jax.device_get(st.get("shadow", st["params"]))
    table = st.get("table")
    torch_model.load_state_dict(convert.to_torch_state(final, jax.device_get(st["consts"]),
                                                       None if table is None else np.asarray(jax.device_get(table))))
    return run_summary(run_dir, main, "trm", length.total, tokens_seen, train_time, trainer.precision, mesh,
                       st["params"], hosts, compile_s, "val_exact_accuracy", **({"ema": t.ema} if t.ema else {}),
                       **length.stats(), model=torch_model)
