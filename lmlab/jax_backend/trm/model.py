"""TRM in JAX (Flax linen): the same network and the same ACT step as lmlab.models.trm.model.

    net = TRMNet(cfg)                                   # cfg: lmlab.models.trm.config.TRMConfig; dtype=jnp.bfloat16
    params = net.init_params(jax.random.key(0))         # or convert.params_from_torch(torch_model)
    carry = initial_carry(cfg, batch_size=768)
    rows = table[merged puzzle ids]                     # see `merge`; the puzzle embeddings
    carry, out = act_step(net, params, consts, carry, batch, rows, training=True)

The maths is the torch model's, written for JAX: x is the cells' embedding (after the puzzle
embedding's positions) times sqrt(D); per supervision step T = h_cycles cycles of { n =
l_cycles times z <- f(z + y + x); y <- f(y + z) }, the first T - 1 without gradients
(`jax.lax.stop_gradient` of their result: nothing flows back through them, as torch's
no_grad), f the shared post-norm blocks (RMSNorm without gain in float32, bidirectional
attention with RoPE in the rotate-half layout, or the mlp_t SwiGLU across positions; SwiGLU
MLP); the output head reads y at the cells, the Q head y at the first position (in float32).

Two things are passed in, not kept in `params`, because they are not trained by gradient
descent: `consts` (the fixed initial states y_init and z_init) and the puzzle-embedding rows
of the batch (`rows`): the table itself is trained by sign-SGD on the rows a step used, so the
step differentiates with respect to those (B, emb) rows, never the (num_puzzles, emb) table
(ARC has ~1M of them: a dense gradient would cost more than the model; lmlab.models.trm.embedding).

Parameter names follow the torch model's (converted both ways by lmlab.jax_backend.trm.convert):
a linear layer's `kernel` is the transpose of torch's `weight`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from lmlab.models.trm.config import TRMConfig, swiglu_width

DATA_KEYS = ("inputs", "labels", "puzzle_identifiers")


def trunc_normal(std: float, lower: float = -2.0, upper: float = 2.0):
    """Flax initialiser: N(0, s^2) truncated to [lower*s, upper*s], s corrected so the std is `std`
    (as lmlab.models.trm.layers.trunc_normal_, itself the official code's)."""
    a, b = math.erf(lower / math.sqrt(2)), math.erf(upper / math.sqrt(2))
    z = (b - a) / 2
    c = (2 * math.pi) ** -0.5
    p_lo, p_hi = c * math.exp(-0.5 * lower ** 2), c * math.exp(-0.5 * upper ** 2)
    s = std / math.sqrt(1 - (upper * p_hi - lower * p_lo) / z - ((p_hi - p_lo) / z) ** 2)

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32, a, b)
        return jnp.clip(jax.scipy.special.erfinv(u) * (math.sqrt(2) * s), lower * s, upper * s).astype(dtype)

    return init


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm without a gain, in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class Linear(nn.Module):
    """x @ kernel (+ bias), the truncated LeCun init (std 1/sqrt(fan_in)), zero bias. With a
    compute `dtype` (bfloat16) the input and the weights are cast to it and so is the output, as
    torch's autocast does for a linear layer; None computes in x's dtype."""

    features: int
    bias: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", trunc_normal(x.shape[-1] ** -0.5), (x.shape[-1], self.features))
        x = x if self.dtype is None else x.astype(self.dtype)
        y = x @ kernel.astype(x.dtype)
        if self.bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        return y


class SwiGLU(nn.Module):
    d: int
    expansion: float
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        inner = swiglu_width(self.d, self.expansion)
        gate, up = jnp.split(Linear(2 * inner, name="gate_up", dtype=self.dtype)(x), 2, axis=-1)
        return Linear(self.d, name="down", dtype=self.dtype)(jax.nn.silu(gate) * up)


def rope_tables(head_dim: int, positions: int, theta: float) -> tuple[jax.Array, jax.Array]:
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = jnp.outer(jnp.arange(positions, dtype=jnp.float32), inv)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, H, Dh), rotate-half layout; in the tables' float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


class Attention(nn.Module):
    """Bidirectional multi-head attention (no mask: a puzzle is read whole)."""

    d: int
    heads: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x, rope):
        b, t, _ = x.shape
        qkv = Linear(3 * self.d, name="qkv", dtype=self.dtype)(x)
        q, k, v = jnp.split(qkv.reshape(b, t, 3, self.heads, -1), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = jax.nn.dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(Dh)) v, (B, T, H, Dh)
        return Linear(self.d, name="o", dtype=self.dtype)(out.reshape(b, t, -1))


class Block(nn.Module):
    """Post-norm: x = norm(x + mix(x)); x = norm(x + mlp(x)); mix is attention or (mlp_t) a SwiGLU
    across the positions of each channel."""

    cfg: TRMConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, x, rope):
        c, dt = self.cfg, self.dtype
        if c.mlp_t:
            xt = jnp.swapaxes(x, 1, 2)
            mixed = SwiGLU(c.total_len, c.expansion, name="mlp_t", dtype=dt)(xt)
            x = jnp.swapaxes(rms_norm(xt + mixed, c.rms_norm_eps), 1, 2)
        else:
            x = rms_norm(x + Attention(c.hidden_size, c.num_heads, name="attn", dtype=dt)(x, rope), c.rms_norm_eps)
        return rms_norm(x + SwiGLU(c.hidden_size, c.expansion, name="mlp", dtype=dt)(x), c.rms_norm_eps)


class QHead(nn.Module):
    """The Q head: weight 0 and bias -5 at the start (sigmoid(-5) ~ 0.007: "do not halt"), as torch's."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.zeros, (x.shape[-1], 2))
        x = x if self.dtype is None else x.astype(self.dtype)
        bias = self.param("bias", nn.initializers.constant(-5.0), (2,))
        return x @ kernel.astype(x.dtype) + bias.astype(x.dtype)


class TRMNet(nn.Module):
    """The parameters and the three pieces the recursion is made of (`method=` in `apply`).
    `dtype`: the compute dtype of the matmuls, as torch's autocast: None is float32; bfloat16
    casts each linear layer's input and weights to bf16 (so the logits and attention are bf16),
    while the embeddings, the residual stream, the carried y and z, RMSNorm and RoPE stay float32
    and the parameters are float32."""

    cfg: TRMConfig
    dtype: Any = None

    def setup(self):
        c = self.cfg
        d = c.hidden_size
        self.embed = self.param("embed", trunc_normal(1.0 / math.sqrt(d)), (c.vocab_size, d))
        self.lm_head = Linear(c.vocab_size, dtype=self.dtype)
        self.q_head = QHead(self.dtype)
        if c.pos_encodings == "learned":
            self.pos = self.param("pos", trunc_normal(1.0 / math.sqrt(d)), (c.total_len, d))
        self.blocks = [Block(c, self.dtype) for _ in range(c.l_layers)]  # named blocks_0, blocks_1, ... by flax

    def _rope(self):
        c = self.cfg
        if c.pos_encodings == "rope" and not c.mlp_t:
            return rope_tables(c.hidden_size // c.num_heads, c.total_len, c.rope_theta)
        return None

    def embed_inputs(self, inputs, rows):
        """x: (B, prefix + L, D), times sqrt(D); `rows` (B, emb_ndim) the puzzle embeddings (or None)."""
        c = self.cfg
        x = self.embed[inputs.astype(jnp.int32)]
        if c.prefix_len:
            pad = c.prefix_len * c.hidden_size - rows.shape[-1]
            pe = jnp.pad(rows, ((0, 0), (0, pad))) if pad > 0 else rows
            x = jnp.concatenate([pe.reshape(-1, c.prefix_len, c.hidden_size).astype(x.dtype), x], axis=-2)
        if c.pos_encodings == "learned":
            x = 0.707106781 * (x + self.pos)
        return math.sqrt(c.hidden_size) * x

    def f(self, h, injection):
        rope = self._rope()
        h = h + injection
        for block in self.blocks:
            h = block(h, rope)
        return h

    def heads(self, y):
        q = self.q_head(y[:, 0]).astype(jnp.float32)
        return self.lm_head(y)[:, self.cfg.prefix_len:], q[..., 0], q[..., 1]

    def __call__(self, inputs, rows):  # for `init`: touches every parameter once
        x = self.embed_inputs(inputs, rows)
        return self.heads(self.f(x, x))

    def init_params(self, key) -> dict:
        """Fresh parameters (the torch model's initialisation; other random numbers)."""
        c = self.cfg
        inputs = jnp.zeros((1, c.seq_len), jnp.int32)
        rows = jnp.zeros((1, c.emb_ndim), jnp.float32) if c.prefix_len else None
        return self.init(key, inputs, rows)["params"]


def init_consts(cfg: TRMConfig, key) -> dict:
    """The fixed initial states of a new puzzle (never trained)."""
    k1, k2 = jax.random.split(key)
    init = trunc_normal(1.0)
    return {"y_init": init(k1, (cfg.hidden_size,)), "z_init": init(k2, (cfg.hidden_size,))}


class Carry(NamedTuple):
    """What one ACT step hands to the next (per row), as the torch model's Carry."""

    y: jax.Array
    z: jax.Array
    steps: jax.Array  # (B,) int32
    halted: jax.Array  # (B,) bool
    inputs: jax.Array
    labels: jax.Array
    puzzle_identifiers: jax.Array


def initial_carry(cfg: TRMConfig, batch_size: int) -> Carry:
    """Every row halted: the first step replaces all of them by its batch."""
    n, d, L = cfg.total_len, cfg.hidden_size, cfg.seq_len
    return Carry(y=jnp.zeros((batch_size, n, d), jnp.float32), z=jnp.zeros((batch_size, n, d), jnp.float32),
                 steps=jnp.zeros((batch_size,), jnp.int32), halted=jnp.ones((batch_size,), bool),
                 inputs=jnp.zeros((batch_size, L), jnp.int32), labels=jnp.zeros((batch_size, L), jnp.int32),
                 puzzle_identifiers=jnp.zeros((batch_size,), jnp.int32))


def merge(carry: Carry, batch: dict) -> dict:
    """The rows' data for this step: the batch's where the row halted at the last step, else its own."""
    reset = carry.halted
    return {k: jnp.where(reset.reshape((-1,) + (1,) * (batch[k].ndim - 1)), batch[k].astype(getattr(carry, k).dtype),
                         getattr(carry, k)) for k in DATA_KEYS}


def recurse(net: TRMNet, params: dict, y, z, x):
    """T cycles of (n latent updates, one answer update); gradients through the last cycle only."""
    cfg = net.cfg
    f = lambda h, inj: net.apply({"params": params}, h, inj, method=TRMNet.f)  # noqa: E731

    def cycle(yz):
        y, z = yz
        for _ in range(cfg.l_cycles):
            z = f(z, y + x)
        return f(y, z), z

    if cfg.h_cycles > 1:
        y, z = jax.lax.fori_loop(0, cfg.h_cycles - 1, lambda _, yz: cycle(yz), (y, z))
        y, z = jax.lax.stop_gradient(y), jax.lax.stop_gradient(z)
    return cycle((y, z))


def act_step(net: TRMNet, params: dict, consts: dict, carry: Carry, batch: dict, rows: Optional[jax.Array],
             training: bool, key: Optional[jax.Array] = None) -> tuple[Carry, dict[str, Any]]:
    """One supervision step, as TRM.forward: reset the rows that halted (fixed initial states, the
    batch's data), recurse, read the heads, decide who halts. `rows`: the puzzle embeddings of
    `merge(carry, batch)["puzzle_identifiers"]`. In training, halting also on q_halt > 0 (or q_halt >
    q_continue), not before a minimum number of steps: `batch["halt_rand"]`, `batch["halt_min"]` (B,)
    when given (lmlab's trainer draws them per row), else drawn with `key`."""
    cfg = net.cfg
    reset = carry.halted
    y = jnp.where(reset[:, None, None], consts["y_init"].astype(carry.y.dtype), carry.y)
    z = jnp.where(reset[:, None, None], consts["z_init"].astype(carry.z.dtype), carry.z)
    steps = jnp.where(reset, 0, carry.steps)
    data = merge(carry, batch)
    x = net.apply({"params": params}, data["inputs"], rows, method=TRMNet.embed_inputs)
    y, z = recurse(net, params, y, z, x)
    logits, q_halt, q_continue = net.apply({"params": params}, y, method=TRMNet.heads)
    out = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_continue}
    y, z = jax.lax.stop_gradient(y), jax.lax.stop_gradient(z)
    steps = steps + 1
    last = steps >= cfg.halt_max_steps
    halted = last
    if training and cfg.halt_max_steps > 1:
        qh, qc = jax.lax.stop_gradient(q_halt), jax.lax.stop_gradient(q_continue)
        halted = halted | (qh > 0 if cfg.no_act_continue else qh > qc)
        if "halt_rand" in batch:
            explore = batch["halt_rand"] < cfg.halt_exploration_prob
            min_steps = explore * batch["halt_min"].astype(steps.dtype)
        else:
            k1, k2 = jax.random.split(key)
            explore = jax.random.uniform(k1, qh.shape) < cfg.halt_exploration_prob
            min_steps = explore * jax.random.randint(k2, steps.shape, 2, cfg.halt_max_steps + 1)
        halted = halted & (steps >= min_steps)
        if not cfg.no_act_continue:
            # HRM's bootstrapped Q-continue target from the next step's Q (see the torch model)
            ny, _ = recurse(net, params, y, z, x)
            _, nh, nc = net.apply({"params": params}, ny, method=TRMNet.heads)
            out["target_q_continue"] = jax.lax.stop_gradient(
                jax.nn.sigmoid(jnp.where(last, nh, jnp.maximum(nh, nc))))
    return Carry(y=y, z=z, steps=steps, halted=halted, **data), out
