"""`lmlab bench trm-jax`: a TRM training step in JAX (lmlab.jax_backend) against lmlab's PyTorch TRM,
same weights and batch, in the same run; and the JAX step's compile time.

    lmlab bench trm-jax batch_size=64 steps=3 repeats=3                  # Sudoku MLP variant (81 cells)
    lmlab bench trm-jax trm_mlp_t=false trm_seq_len=900 trm_vocab=6 batch_size=8   # maze attention variant

One supervision step on each side: the ACT forward, the loss (stable-max cross-entropy + 0.5 x
Q-halt BCE), the backward and AdamATan2 (the torch TRMOptimizer; the JAX optax transformation,
the update jitted with the step). Both in float32 (`trm_dtype=bfloat16`: torch under bf16
autocast, the JAX TRM computing in bf16) on the same device kind: the JAX side on
the first device JAX sees (its CPU build here; JAX CUDA or TPU where installed), torch on
`device`. Sides alternate, each figure is the median step; the JAX side's first call, which
compiles, is reported apart (`compile_s`).
"""

from __future__ import annotations

import time

import torch


def bench_trm_jax(cfg, device) -> dict:
    from lmlab.jax_backend import require_jax

    require_jax()
    import jax
    import jax.numpy as jnp

    from lmlab.bench_timing import interleaved, median
    from lmlab.jax_backend.trm import convert, losses, model as jm
    from lmlab.jax_backend.trm.optim import network_optimizer
    from lmlab.bench_trm import bench_model_config
    from lmlab.models.trm import TRM
    from lmlab.train.trm_losses import act_loss
    from lmlab.train.trm_optim import TRMOptimizer

    mcfg = bench_model_config(cfg)
    torch.manual_seed(cfg.seed)
    ours = TRM(mcfg).to(device).train()
    params, consts, table = convert.from_torch_state(ours.state_dict(), mcfg)
    g = torch.Generator().manual_seed(cfg.seed)
    batch = {"inputs": torch.randint(1, mcfg.vocab_size, (cfg.batch_size, mcfg.seq_len), generator=g).int(),
             "labels": torch.randint(1, mcfg.vocab_size, (cfg.batch_size, mcfg.seq_len), generator=g).int(),
             "puzzle_identifiers": torch.zeros(cfg.batch_size, dtype=torch.int32),
             # the exploration draws, given to both sides (as lmlab's trainer gives them)
             "halt_rand": torch.rand(cfg.batch_size, generator=g),
             "halt_min": torch.randint(2, mcfg.halt_max_steps + 1, (cfg.batch_size,), generator=g).int()}
    jbatch = {k: jnp.asarray(v.numpy()) for k, v in batch.items()}
    batch = {k: v.to(device) for k, v in batch.items()}
    opt_t = TRMOptimizer(ours, "adam_atan2", 1e-4, (0.9, 0.95), 0.1, 1e-4, 0.1)
    opt_j = network_optimizer("adam_atan2", (0.9, 0.95), 0.1)
    bf16 = cfg.trm_dtype == "bfloat16"
    net = jm.TRMNet(mcfg, jnp.bfloat16 if bf16 else None)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    rows = jnp.asarray(table)[jbatch["puzzle_identifiers"]] if table is not None else None

    def jstep(params, opt_state, carry, batch, rows):
        def loss_fn(p):
            new, out = jm.act_step(net, p, consts, carry, batch, rows, training=True)
            return losses.act_loss(out, new.labels, new.halted, new.steps)[0] / cfg.batch_size, new

        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt_j.update(grads, opt_state, params, lr=1e-4)
        return jax.tree_util.tree_map(lambda p, u: p + u, params, updates), opt_state, new, loss

    jstep = jax.jit(jstep, donate_argnums=(0, 1, 2))
    state = {"t": ours.initial_carry(cfg.batch_size, device=device),
             "j": (params, opt_j.init(params), jm.initial_carry(mcfg, cfg.batch_size))}

    def step_torch():
        with autocast:  # (lmlab's torch trainer: the forward and the loss under autocast, as here)
            state["t"], out = ours(state["t"], batch)
            c = state["t"]
            loss = act_loss(out, c.labels.long(), c.halted, c.steps).loss / cfg.batch_size
        loss.backward()
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)

    def step_jax():
        p, o, c = state["j"]
        p, o, c, loss = jstep(p, o, c, jbatch, rows)
        loss.block_until_ready()
        state["j"] = (p, o, c)

    t0 = time.perf_counter()
    step_jax()  # compiles
    compile_s = time.perf_counter() - t0
    times = interleaved({"jax": step_jax, "torch": step_torch}, cfg.warmup, cfg.repeats * cfg.steps, device)
    pps = {k: cfg.batch_size / median(v) for k, v in times.items()}
    return {"what": "trm-jax", "dtype": cfg.trm_dtype, "params": ours.num_params(), "puzzles_per_s": pps,
            "ratio": pps["jax"] / pps["torch"],
            "times_s": times, "compile_s": compile_s, "jax_device": str(jax.devices()[0]), "jax": jax.__version__,
            "flops_per_example": ours.flops_per_example()}


def print_trm_jax(cfg, res: dict, device) -> None:
    variant = "MLP" if cfg.trm_mlp_t else "attention"
    print(f"bench trm-jax: {variant} variant, hidden {cfg.trm_hidden}, T={cfg.trm_h_cycles} n={cfg.trm_l_cycles}, "
          f"{cfg.trm_seq_len} cells, {res['params'] / 1e6:.2f}M params; batch {cfg.batch_size}, one supervision step "
          f"(ACT forward, loss, backward, AdamATan2), {res['dtype']}, median of {cfg.repeats * cfg.steps} interleaved "
          f"timings; torch on {device} ({res['threads']} threads), JAX {res['jax']} on {res['jax_device']}")
    print(f"  {'':<14}{'puzzles/s':>12}{'ms/step':>10}")
    for k, v in res["puzzles_per_s"].items():
        print(f"  {k:<14}{v:>12,.1f}{1000 * cfg.batch_size / v:>10,.1f}")
    print(f"  ratio jax/torch: {res['ratio']:.2f}x; the JAX step's first call (compile) {res['compile_s']:.1f} s")
