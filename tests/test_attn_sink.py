"""The transformer's learned attention sink (model.attn_sink): the maths against an eager
softmax with an extra column, its limits (a sink at -inf is the plain model, a large one
silences the head), sizes, training, and the exports that refuse it."""

from __future__ import annotations

import pytest
import torch

from lmlab.errors import UserError
from lmlab.models.transformer import Transformer, param_count, resolve_model_config, sink_attention

CFG = {"preset": "micro", "vocab_size": 61, "max_seq_len": 32, "n_head": 4, "n_kv_head": 2}


def eager(q, k, v, sink, allowed):
    """softmax over [scores, sink] with the sink's share dropped, written out."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(~allowed, float("-inf"))
    col = sink.view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
    p = torch.softmax(torch.cat([s, col], -1), -1)[..., :-1]
    return p @ v


@pytest.mark.parametrize("case", ["causal", "all", "mask2d", "mask4d"])
def test_sink_attention_equals_an_eager_softmax_with_a_sink_column_values_and_gradients(case):
    torch.manual_seed(0)
    B, H, Hkv, T, S, hd = 2, 4, 2, 5, 5 if case == "causal" else 7, 8
    q = torch.randn(B, H, T, hd, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, S, hd, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, S, hd, dtype=torch.float64, requires_grad=True)
    sink = torch.randn(H, dtype=torch.float64, requires_grad=True)
    mask = None
    allowed = torch.ones(T, S, dtype=torch.bool)
    if case == "causal":
        allowed = allowed.tril()
    elif case in ("mask2d", "mask4d"):
        shape = (T, S) if case == "mask2d" else (B, 1, T, S)
        mask = allowed = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.4
        allowed[..., 0] = True  # every query sees a key (the eager softmax of none is NaN)
    got = sink_attention(q, k, v, sink, mask, is_causal=case == "causal")
    want = eager(q, k, v, sink, allowed if allowed.dim() == 4 else allowed[None, None])
    torch.testing.assert_close(got, want)
    w = torch.randn_like(got)
    g1 = torch.autograd.grad((got * w).sum(), (q, k, v, sink))
    q2, k2, v2, s2 = (t.detach().clone().requires_grad_() for t in (q, k, v, sink))
    ref = eager(q2, k2, v2, s2, allowed if allowed.dim() == 4 else allowed[None, None])
    g2 = torch.autograd.grad((ref * w).sum(), (q2, k2, v2, s2))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@torch.no_grad()
def test_a_sink_at_minus_infinity_is_the_plain_model_and_a_large_one_silences_attention():
    torch.manual_seed(0)
    plain = Transformer(CFG).eval()
    sunk = Transformer({**CFG, "attn_sink": True}).eval()
    missing, unexpected = sunk.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == [f"blocks.{i}.attn.sink" for i in range(2)]
    x = torch.randint(0, 61, (2, 12))
    for b in sunk.blocks:
        b.attn.sink.fill_(-1e4)
    torch.testing.assert_close(sunk(x)[0], plain(x)[0], atol=1e-5, rtol=0)
    for b in sunk.blocks:
        b.attn.sink.fill_(1e4)  # all mass on the sink: each block is x + MLP(norm(x))
    h = sunk.embed(x)
    for b in sunk.blocks:
        h = h + b.mlp(b.mlp_norm(h))
    torch.testing.assert_close(sunk(x)[0], sunk.lm_head(sunk.norm(h)), atol=1e-5, rtol=0)


def test_size_init_decay_group_and_a_training_step_moves_the_sink():
    from lmlab.train.optim import param_groups

    cfg = resolve_model_config({**CFG, "attn_sink": True})
    m = Transformer(cfg)
    assert m.num_params() == param_count(cfg) == param_count(resolve_model_config(CFG)) + 2 * 4
    assert all(float(b.attn.sink.detach().abs().max()) == 0.0 for b in m.blocks)
    no_decay = {id(p) for g in param_groups(m, 0.1) if g["weight_decay"] == 0.0 for p in g["params"]}
    assert all(id(b.attn.sink) in no_decay for b in m.blocks)
    x = torch.randint(0, 61, (4, 16))
    _, loss = m(x[:, :-1], x[:, 1:])
    loss.backward()
    assert all(float(b.attn.sink.grad.abs().max()) > 0 for b in m.blocks)


def test_hf_and_gguf_exports_refuse_a_model_with_sinks(tmp_path):
    from lmlab.models.gguf import arch_of
    from lmlab.models.hf import hf_config

    cfg = resolve_model_config({**CFG, "attn_sink": True})
    with pytest.raises(UserError, match="attention sinks.*no Hugging Face export"):
        hf_config(cfg)
    with pytest.raises(UserError, match="attention sinks.*cannot be written as GGUF"):
        arch_of(cfg)
