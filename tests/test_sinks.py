"""Attention sinks (lmlab.models.kv_cache): a cache with `sinks=k` decodes past its size with
StreamingLLM's positions within the cache. In a one-layer model a key depends only on its token
and position, so there each step must equal the model run from scratch on [the row's first k
tokens, its most recent ones]: that pins the eviction, the re-rotation of kept keys and the
masks, left-padded rows included. (With more layers, kept keys keep the context they were
computed in, as in StreamingLLM, so no from-scratch run equals them.)"""

from __future__ import annotations

import pytest
import torch

from lmlab.models.transformer import Transformer, resolve_model_config

V = 97


@pytest.fixture(scope="module", params=[[], [0]], ids=["rope", "nope"])
def model(request):
    """A one-layer model; `nope`: its layer has no rotary embedding (SmolLM3's NoPE), so eviction
    must keep its keys as they are."""
    torch.manual_seed(0)
    m = Transformer(resolve_model_config({"preset": "micro", "vocab_size": V, "max_seq_len": 64, "n_kv_head": 2,
                                          "n_layer": 1, "nope_layers": request.param})).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


@torch.no_grad()
def test_decoding_past_the_cache_equals_sinks_plus_window_from_scratch(model):
    size, k = 16, 4
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, V, (60,), generator=g), torch.randint(1, V, (60,), generator=g)]
    pad = 3  # row 1 is 3 tokens shorter, left-padded
    x = torch.stack([rows[0][:10], torch.cat([torch.zeros(pad, dtype=torch.long), rows[1][:10 - pad]])])
    cache = model.new_cache(2, size, left_pad=[0, pad], sinks=k)
    model(x, cache=cache)
    fed = [rows[0][:10].tolist(), rows[1][:10 - pad].tolist()]
    for t in range(10, 50):
        nxt = torch.stack([rows[0][t], rows[1][t - pad]])
        got, _ = model(nxt[:, None], cache=cache)
        for r in range(2):
            fed[r].append(int(nxt[r]))
            # a row holds all its tokens while they fit, then its k sinks and the newest size - k
            view = fed[r] if len(fed[r]) <= size else fed[r][:k] + fed[r][-(size - k):]
            want, _ = model(torch.tensor([view]))
            torch.testing.assert_close(got[r, -1], want[0, -1], atol=1e-4, rtol=0, msg=f'step {t} row {r}')
        assert cache.pos <= size
    assert cache.evicted == 50 - size and cache.left_pad is None  # padding went first


@torch.no_grad()
def test_a_plain_cache_still_refuses_to_overflow(model):
    cache = model.new_cache(1, 8)
    model(torch.ones(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.ones(1, 1, dtype=torch.long), cache=cache)
    sink = model.new_cache(1, 8, sinks=2)
    model(torch.ones(1, 8, dtype=torch.long), cache=sink)
    with pytest.raises(ValueError, match="smaller chunks"):
        model(torch.ones(1, 7, dtype=torch.long), cache=sink)


@torch.no_grad()
def test_generation_streams_past_the_context(model):
    """generate_ids with sinks: a prompt longer than the context is prefilled in chunks and decoding
    goes on past it; in the one-layer model each token is the greedy one of [sinks, window]."""
    from lmlab.infer.engine import generate_ids

    ctx, k = model.max_context, 4
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(1, V, (ctx + 20,), generator=g).tolist()
    steps = list(generate_ids(model, [prompt], max_new_tokens=ctx, sinks=k))
    got = [s[0] for s in steps]
    seq, want = list(prompt), []
    for _ in range(ctx):
        view = seq if len(seq) <= ctx else seq[:k] + seq[-(ctx - k):]
        want.append(int(model(torch.tensor([view]))[0][0, -1].argmax()))
        seq.append(want[-1])
    assert got == want and len(got) == ctx
    with pytest.raises(ValueError, match="KV cache full"):  # without sinks a bounded cache still refuses
        model(torch.tensor([prompt]), cache=model.new_cache(1, ctx))
