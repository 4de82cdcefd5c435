"""TRM's optimizers in JAX, the updates of lmlab.train.trm_optim.TRMOptimizer (which documents them):

    opt = network_optimizer("adam_atan2", betas=(0.9, 0.95), weight_decay=1.0)   # an optax transformation
    state = opt.init(params)
    updates, state = opt.update(grads, state, params, lr=lr)    # lr: this step's scheduled rate
    params = optax.apply_updates(params, updates)
    table = sign_sgd_rows(table, ids, row_grads, lr=emb_lr_now, weight_decay=0.1)
    shadow = ema_update(shadow, params, 0.999)

- AdamATan2 (the official code's CUDA kernel): p <- p (1 - lr wd) - (lr / (1 - b1^t)) atan2(m, sqrt(v) /
  sqrt(1 - b2^t)); AdamW as torch.optim.AdamW (optax.adamw computes the same: m_hat / (sqrt(v_hat) + eps),
  decoupled decay times lr). The LR comes in per step (`lr=`), so the trainer's schedule
  (lmlab.train.optim.Schedule) drives it as in the torch loop, with no recompilation.
- Sign-SGD on the puzzle embeddings: the gradients of the rows a step looked up are summed per
  identifier; only those rows change, w <- w (1 - lr wd) - lr sign(g). Written with a fixed-size
  `unique` (padding ids point past the table and are dropped), so it compiles once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class AdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def network_optimizer(kind: str, betas: tuple[float, float], weight_decay: float,
                      eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
    """AdamATan2 or AdamW over the network's parameters, every one decayed; `update(..., lr=)`."""
    if kind not in ("adam_atan2", "adamw"):
        raise ValueError(f"unknown TRM optimizer {kind!r}")
    b1, b2 = betas

    def init(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return AdamState(jnp.zeros((), jnp.int32), zeros, jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(grads, state, params, *, lr, **_):
        count = state.count + 1
        t = count.astype(jnp.float32)
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        mu = jax.tree_util.tree_map(lambda m, g: m + (1 - b1) * (g - m), state.mu, grads)  # torch's lerp
        nu = jax.tree_util.tree_map(lambda v, g: v + (1 - b2) * (g * g - v), state.nu, grads)

        def step(p, m, v):
            decay = -lr * weight_decay * p
            if kind == "adam_atan2":
                return decay - (lr / bc1) * jnp.arctan2(m, jnp.sqrt(v) / jnp.sqrt(bc2))
            return decay - (lr / bc1) * m / (jnp.sqrt(v) / jnp.sqrt(bc2) + eps)

        # torch decays p first, then moves the decayed p: the decay term is lr*wd*p of the old p in both
        return jax.tree_util.tree_map(step, params, mu, nu), AdamState(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init, update)


def sign_sgd_rows(table: jax.Array, ids: jax.Array, grads: jax.Array, lr, weight_decay: float) -> jax.Array:
    """The puzzle-embedding table after one sign-SGD step on the looked-up rows `ids` (n,) with
    their gradients `grads` (n, emb), summed per identifier."""
    n, num = ids.shape[0], table.shape[0]
    uniq, inverse = jnp.unique(ids, return_inverse=True, size=n, fill_value=num)
    total = jax.ops.segment_sum(grads, inverse.reshape(-1), num_segments=n)
    rows = table.at[uniq].get(mode="fill", fill_value=0.0)
    new = rows * (1.0 - lr * weight_decay) - lr * jnp.sign(total).astype(rows.dtype)
    return table.at[uniq].set(new, mode="drop")


def ema_update(shadow, params, decay: float):
    """shadow <- decay shadow + (1 - decay) params (lmlab.train.ema.EMA.update)."""
    return jax.tree_util.tree_map(lambda s, p: decay * s + (1.0 - decay) * p.astype(jnp.float32), shadow, params)
