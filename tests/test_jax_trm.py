"""The JAX TRM (lmlab.jax_backend.trm) against lmlab's PyTorch TRM, the reference: the same weights
(converted both ways, exactly) give the same logits, Q-values, carried state and halting over two
ACT steps (the second continues the rows that did not halt and loads new ones where they did), and
the same loss and gradients (every trained parameter and the puzzle-embedding rows), fp32, 1e-4.
Three variants: attention with RoPE and a puzzle embedding padded over two positions; the mlp_t
block without positions or puzzle embedding; learned positions with HRM's Q-continue target.
bf16 (torch's autocast in JAX) against float32 and torch's autocast; `lmlab bench trm-jax` in both dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax", reason="the jax extra is not installed (pip install 'lmlab[jax]')")
pytest.importorskip("flax")
import jax.numpy as jnp  # noqa: E402

from lmlab.jax_backend.trm import convert, losses, model as jm  # noqa: E402
from lmlab.models.trm.config import TRMConfig  # noqa: E402
from lmlab.models.trm.model import TRM  # noqa: E402
from lmlab.train.trm_losses import act_loss  # noqa: E402

B = 6
VARIANTS = {
    "attention": dict(seq_len=9, vocab_size=6, hidden_size=32, num_heads=4, h_cycles=2, l_cycles=2,
                      num_puzzle_identifiers=5, puzzle_emb_ndim=40, puzzle_emb_len=2, halt_max_steps=3),
    "mlp_t": dict(seq_len=9, vocab_size=6, hidden_size=32, mlp_t=True, pos_encodings="none", puzzle_emb_ndim=0,
                  h_cycles=3, l_cycles=2, halt_max_steps=3, l_layers=1),
    "learned_hrm_q": dict(seq_len=9, vocab_size=6, hidden_size=32, num_heads=2, pos_encodings="learned",
                          num_puzzle_identifiers=3, puzzle_emb_len=1, h_cycles=2, l_cycles=1, halt_max_steps=3,
                          no_act_continue=False),
}


def _batch(cfg: TRMConfig, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, cfg.vocab_size, (B, cfg.seq_len), generator=g, dtype=torch.int32)
    labels[:, :2] = 0  # not scored
    labels[0] = 0      # a row with nothing to score
    return {"inputs": torch.randint(1, cfg.vocab_size, (B, cfg.seq_len), generator=g, dtype=torch.int32),
            "labels": labels,
            "puzzle_identifiers": torch.randint(0, cfg.num_puzzle_identifiers, (B,), generator=g, dtype=torch.int32),
            "halt_rand": torch.rand(B, generator=g), "halt_min": torch.randint(2, cfg.halt_max_steps + 1, (B,), generator=g)}


def _torch_model(cfg: TRMConfig) -> TRM:
    torch.manual_seed(0)
    m = TRM(cfg)
    with torch.no_grad():  # off the init, so halting differs by row and the heads matter
        m.q_head.weight.normal_(0, 0.5)
        m.q_head.bias.zero_()
        if m.puzzle_emb is not None:
            m.puzzle_emb.weight.normal_(0, 1.0)
    return m.train()


def _jx(batch: dict) -> dict:
    return {k: jnp.asarray(v.numpy()) for k, v in batch.items()}


def _close(a, b, what, atol=1e-4):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), b.detach().double().numpy(), atol=atol, rtol=1e-4,
                               err_msg=what)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_same_weights_give_the_same_steps_loss_and_gradients(variant):
    cfg = TRMConfig(**VARIANTS[variant])
    tm = _torch_model(cfg)
    state = tm.state_dict()
    params, consts, table = convert.from_torch_state(state, cfg)
    back = convert.to_torch_state(params, consts, table)  # the round trip is exact
    assert set(back) == set(state) and all(torch.equal(back[k], state[k].float()) for k in state)

    net = jm.TRMNet(cfg)

    def loss_fn(p, r, carry, batch):
        carry, out = jm.act_step(net, p, consts, carry, batch, r, training=True)
        loss, aux = losses.act_loss(out, carry.labels, carry.halted, carry.steps)
        return loss, (carry, out, aux)

    step_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))  # one compile for both steps
    t_carry, j_carry = tm.initial_carry(B), jm.initial_carry(cfg, B)
    for step, seed in enumerate((1, 2)):
        batch = _batch(cfg, seed)
        jb = _jx(batch)
        data_ids = jm.merge(j_carry, jb)["puzzle_identifiers"]
        rows = jnp.asarray(table)[data_ids] if table is not None else None
        (j_loss, (j_next, j_out, j_aux)), (g_params, g_rows) = step_fn(params, rows, j_carry, jb)

        tm.zero_grad()
        if tm.puzzle_emb is not None:
            tm.puzzle_emb.pending.clear()
        t_next, t_out = tm(t_carry, batch)
        terms = act_loss(t_out, t_next.labels, t_next.halted, t_next.steps)
        terms.loss.backward()

        where = f"{variant}, step {step + 1}"
        for k in ("logits", "q_halt_logits", "q_continue_logits") + (("target_q_continue",) if
                                                                     not cfg.no_act_continue else ()):
            _close(j_out[k], t_out[k], f"{where}: {k}")
        _close(j_next.y, t_next.y, f"{where}: y")
        _close(j_next.z, t_next.z, f"{where}: z")
        assert np.array_equal(np.asarray(j_next.halted), t_next.halted.numpy()), where
        assert np.array_equal(np.asarray(j_next.steps), t_next.steps.numpy()), where
        assert np.array_equal(np.asarray(j_next.puzzle_identifiers), t_next.puzzle_identifiers.numpy()), where
        _close(j_loss, terms.loss, f"{where}: loss")
        for k in ("count", "exact_accuracy", "q_halt_accuracy", "steps"):
            assert int(j_aux[k]) == int(terms.stats[k]), (where, k)
        grads = convert.to_torch_state(g_params, {k: np.zeros(1) for k in convert.CONSTS})
        named = {n: p for n, p in tm.named_parameters() if p.requires_grad}
        assert set(named) == set(grads) - set(convert.CONSTS)
        for n, p in named.items():
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), n
            _close(grads[n].numpy(), p.grad, f"{where}: d{n}")
        if table is not None:
            (ids, leaf), = tm.puzzle_emb.pending
            assert np.array_equal(ids.numpy(), np.asarray(data_ids))
            _close(g_rows, leaf.grad, f"{where}: d puzzle rows")
        if step == 0:  # some rows halted (the next step loads new puzzles there), some go on
            assert 0 < int(t_next.halted.sum()) < B, t_next.halted
        t_carry, j_carry = t_next, j_next


def test_fresh_parameters_have_the_torch_models_shapes_and_scales():
    cfg = TRMConfig(**VARIANTS["attention"])
    params = jm.TRMNet(cfg).init_params(jax.random.key(0))
    state = convert.to_torch_state(params, jm.init_consts(cfg, jax.random.key(1)))
    ref = _torch_model(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in ref.items()
                                                             if k != convert.TABLE}
    assert float(state["q_head.weight"].abs().max()) == 0 and torch.all(state["q_head.bias"] == -5)
    for k in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.down.weight"):  # truncated LeCun: std 1/sqrt(fan_in)
        w = state[k]
        # truncated at 2 s, s = std / 0.8796 (the std of a standard normal cut at +-2)
        assert abs(float(w.std()) * w.shape[1] ** 0.5 - 1) < 0.1 and float(w.abs().max()) <= 2.28 / w.shape[1] ** 0.5


def test_bfloat16_computes_in_bf16_near_float32_and_torch_autocast():
    """TRMNet(dtype=bfloat16), torch's autocast in JAX: the logits in bf16, the carried y and z, Q
    values, loss and gradients in float32; its logits as near the float32 ones as torch's bf16
    autocast's are, and its gradients pointing the float32 gradients' way."""
    cfg = TRMConfig(**VARIANTS["attention"])
    tm = _torch_model(cfg)
    params, consts, table = convert.from_torch_state(tm.state_dict(), cfg)
    batch = _batch(cfg, 1)
    jb = _jx(batch)
    out = {}
    for name, dtype in (("f32", None), ("bf16", jnp.bfloat16)):
        net = jm.TRMNet(cfg, dtype)
        carry = jm.initial_carry(cfg, B)
        rows = jnp.asarray(table)[jm.merge(carry, jb)["puzzle_identifiers"]]

        def loss_fn(p, r):
            new, o = jm.act_step(net, p, consts, carry, jb, r, training=True)
            return losses.act_loss(o, new.labels, new.halted, new.steps)[0], (new, o)

        (loss, (new, o)), (g, g_rows) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(params, rows)
        out[name] = (loss, new, o, g, g_rows)
    loss, new, o, g, g_rows = out["bf16"]
    assert o["logits"].dtype == jnp.bfloat16  # the matmuls' dtype; the carried states stay float32
    assert new.y.dtype == new.z.dtype == o["q_halt_logits"].dtype == loss.dtype == g_rows.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(g))
    f32 = np.asarray(out["f32"][2]["logits"], np.float64)
    ours = np.abs(np.asarray(o["logits"], np.float64) - f32).max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, t_out = tm(tm.initial_carry(B), batch)
    theirs = np.abs(t_out["logits"].detach().double().numpy() - f32).max()
    assert 0 < ours <= 3 * max(theirs, 1e-3) and ours < 0.05 * np.abs(f32).max(), (ours, theirs)
    flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(t)])  # noqa: E731
    a, b = flat(g), flat(out["f32"][3])
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.98  # (0.988; torch's bf16 autocast: 0.994)
    assert float(loss) == pytest.approx(float(out["f32"][0]), rel=0.02)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_trm_jax_times_both_sides(dtype):
    from lmlab import bench

    res = bench.run(bench.Config(what="trm-jax", trm_hidden=64, trm_mlp_t=False, trm_seq_len=9, trm_vocab=6,
                                 trm_h_cycles=2, trm_l_cycles=1, batch_size=2, steps=1, repeats=1, warmup=0,
                                 trm_dtype=dtype))
    assert res["dtype"] == dtype and res["ratio"] > 0 and set(res["puzzles_per_s"]) == {"jax", "torch"}
