"""TRM's loss in JAX: stable-max (or softmax) cross-entropy on the cells plus the Q-halt BCE, as
lmlab.train.trm_losses.act_loss (which documents the official semantics): per row the summed
cell losses over its scored cells (labels != 0), the Q-halt target whether the whole answer is
right, summed over rows; statistics over the halted rows.

One difference, on purpose: stable-max is computed in float32, not float64. JAX runs float64
only with the global `jax_enable_x64` switch, and TPUs emulate it slowly; the parity test
(tests/test_jax_trm.py) shows the float32 loss and gradients within 1e-4 of the float64 ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = 0


def log_stablemax(x: jax.Array, axis: int = -1) -> jax.Array:
    sx = jnp.where(x < 0, 1 / (1 - x + 1e-30), x + 1)
    return jnp.log(sx / jnp.sum(sx, axis=axis, keepdims=True))


def stablemax_cross_entropy(logits, labels, mask):
    logp = log_stablemax(logits.astype(jnp.float32))
    picked = jnp.take_along_axis(logp, jnp.where(mask, labels, 0)[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -jnp.where(mask, picked, 0.0)


def softmax_cross_entropy(logits, labels, mask):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(mask, labels, 0)[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -jnp.where(mask, picked, 0.0)


LOSSES = {"stablemax": stablemax_cross_entropy, "softmax": softmax_cross_entropy}


def _bce(logits, targets):
    """Binary cross-entropy with logits, summed (torch's binary_cross_entropy_with_logits, stable form)."""
    return jnp.sum(jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def act_loss(outputs: dict, labels, halted, steps, loss_type: str = "stablemax", halt_weight: float = 0.5):
    """(loss: the sum over rows, aux: lm_loss, q_halt_loss, q_continue_loss and the halted rows'
    sums count, accuracy, exact_accuracy, q_halt_accuracy, steps)."""
    logits = outputs["logits"]
    mask = labels != IGNORE
    counts = mask.sum(-1)
    divisor = jnp.maximum(counts, 1)[:, None]
    pred = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1))
    correct = mask & (pred == labels)
    seq_correct = correct.sum(-1) == counts
    valid = halted & (counts > 0)
    q_halt = outputs["q_halt_logits"]
    stats = {
        "count": valid.sum(),
        "accuracy": jnp.where(valid, (correct / divisor).sum(-1), 0.0).sum(),
        "exact_accuracy": (valid & seq_correct).sum(),
        "q_halt_accuracy": (valid & ((jax.lax.stop_gradient(q_halt) >= 0) == seq_correct)).sum(),
        "steps": jnp.where(valid, steps, 0).sum(),
    }
    lm_loss = (LOSSES[loss_type](logits, labels, mask) / divisor).sum()
    q_halt_loss = _bce(q_halt, seq_correct.astype(q_halt.dtype))
    q_continue_loss = jnp.zeros((), jnp.float32)
    if "target_q_continue" in outputs:
        q_continue_loss = _bce(outputs["q_continue_logits"], outputs["target_q_continue"])
    loss = lm_loss + halt_weight * (q_halt_loss + q_continue_loss)
    aux = {"lm_loss": lm_loss, "q_halt_loss": q_halt_loss, "q_continue_loss": q_continue_loss,
           "seq_correct": seq_correct, **stats}
    return loss, jax.lax.stop_gradient(aux)
