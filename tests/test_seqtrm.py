"""SequenceTRM (lmlab.models.seqtrm), LLM-TRM's reasoner: the recursion's semantics pinned against
a written-out reference, gradients from the last recursion only, detached state, padding that
changes nothing, and the two block variants."""

from __future__ import annotations

import pytest
import torch

from lmlab.models.seqtrm import SeqTRMConfig, SequenceTRM

CFG = dict(d=16, heads=2, layers=2, n=2, T=3, n_sup=4, max_len=32)


def _batch(b=3, lengths=(5, 3, 7), d=16, seed=0):
    """Left-padded contexts of the given lengths, and their mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    x = torch.zeros(b, width, d)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        x[i, width - n:] = torch.randn(n, d, generator=g)
        mask[i, width - n:] = True
    return x, mask


@pytest.mark.parametrize("block", ["trm", "prototype"])
def test_a_row_computes_the_same_alone_and_left_padded_in_a_batch(block):
    torch.manual_seed(0)
    m = SequenceTRM(SeqTRMConfig(**CFG, block=block)).eval()
    x, mask = _batch()
    y, z = m.initial_state(x, mask)
    (_, _), pred, q = m.supervision_step(x, mask, y, z)
    for i in range(3):
        n = int(mask[i].sum())
        xi, mi = x[i:i + 1, -n:], mask[i:i + 1, -n:]
        yi, zi = m.initial_state(xi, mi)
        (_, _), p1, q1 = m.supervision_step(xi, mi, yi, zi)
        torch.testing.assert_close(p1[0], pred[i], atol=1e-5, rtol=1e-5)  # the prototype's states grow large
        torch.testing.assert_close(q1[0], q[i], atol=1e-5, rtol=1e-5)


def test_the_recursion_is_z_from_z_y_x_n_times_then_y_from_y_z_and_T_deep():
    torch.manual_seed(0)
    m = SequenceTRM(SeqTRMConfig(**CFG)).eval()
    x, mask = _batch(b=1, lengths=(6,))
    y, z = m.initial_state(x, mask)
    xs, keys, rope = m.inputs(x, mask)
    f = lambda h: m.net(h, keys, rope)  # noqa: E731
    ry, rz = y, z
    for _ in range(CFG["T"]):
        for _ in range(CFG["n"]):
            rz = f(rz + ry + xs)
        ry = f(ry + rz)
    (y2, z2), pred, q = m.supervision_step(x, mask, y, z)
    torch.testing.assert_close(y2, ry, atol=1e-5, rtol=0)
    torch.testing.assert_close(z2, rz, atol=1e-5, rtol=0)
    torch.testing.assert_close(pred, m.readout(ry[:, -1]), atol=1e-5, rtol=0)  # read out at the reasoning token
    assert not y2.requires_grad and not z2.requires_grad  # the carry is detached


def test_gradients_come_from_the_last_recursion_only():
    torch.manual_seed(0)
    cfg = SeqTRMConfig(**{**CFG, "T": 3})
    m = SequenceTRM(cfg)
    x, mask = _batch(b=2, lengths=(4, 6))
    y, z = m.initial_state(x, mask)
    (_, _), pred, _ = m.supervision_step(x, mask, y, z)
    g_full = torch.autograd.grad(pred.sum(), m.blocks[0].attn.qkv.weight)[0]
    # the same gradient as running T-1 recursions first, then one recursion from their detached result
    xs, keys, rope = m.inputs(x, mask)
    with torch.no_grad():
        for _ in range(cfg.T - 1):
            y, z = m.latent_recursion(xs, y, z, keys, rope)
    y1, _ = m.latent_recursion(xs, y, z, keys, rope)
    g_last = torch.autograd.grad(m.readout(y1[:, -1]).sum(), m.blocks[0].attn.qkv.weight)[0]
    torch.testing.assert_close(g_full, g_last, atol=1e-6, rtol=0)
    # and the initial states learn in the paper's block only
    assert m.y_init.requires_grad and not SequenceTRM(SeqTRMConfig(**CFG, block="prototype")).y_init.requires_grad


def test_predict_runs_every_supervision_step_and_bad_input_is_refused():
    torch.manual_seed(0)
    m = SequenceTRM(SeqTRMConfig(**CFG))
    x, mask = _batch()
    steps = m.predict(x, mask)
    assert len(steps) == CFG["n_sup"] and steps[0][0].shape == (3, 16) and steps[0][1].shape == (3,)
    with pytest.raises(ValueError, match="left-padded"):
        m.inputs(x, torch.flip(mask, [1]))
    with pytest.raises(ValueError, match="max_len"):
        m.inputs(torch.zeros(1, 40, 16), torch.ones(1, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match="heads"):
        SequenceTRM(SeqTRMConfig(**{**CFG, "heads": 3}))
