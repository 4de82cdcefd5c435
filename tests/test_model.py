"""The transformer: shapes, masking, KV cache, packed documents, sizes, save/load."""

import pytest
import torch

from lmlab.errors import UserError
from lmlab.models import load_weights, save_model
from lmlab.models.transformer import PRESETS, Transformer, param_count, resolve_model_config

V = 97


def micro(**kw):
    torch.manual_seed(0)
    return Transformer(resolve_model_config({"preset": "micro", **kw}, vocab_size=V)).eval()


def test_shapes_and_loss():
    m = micro()
    x = torch.randint(0, V, (3, 17))
    logits, loss = m(x)
    assert logits.shape == (3, 17, V) and loss is None
    y = torch.randint(0, V, (3, 17))
    y[:, :5] = -100
    logits2, loss = m(x, y, return_logits=False)
    assert logits2 is None
    ref = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, V), y[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_matches_plain_cross_entropy(tie):
    """return_logits=False takes the chunked linear+CE path: same loss, same gradients."""
    m = micro(tie_embeddings=tie)
    x, y = torch.randint(0, V, (3, 300)), torch.randint(0, V, (3, 300))  # > one 256-row chunk
    y[0, :50] = -100
    _, plain = m(x, y)
    g_plain = torch.autograd.grad(plain * 3.0, list(m.parameters()))
    _, fused = m(x, y, return_logits=False)
    g_fused = torch.autograd.grad(fused * 3.0, list(m.parameters()))
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(m(x, y, return_logits=False)[1], plain.detach(), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, lb = m(x, y, return_logits=False)
    lb.backward()
    assert abs(lb.item() - plain.item()) < 0.05 and m.embed.weight.grad.dtype == torch.float32


def test_causal_future_does_not_change_past():
    m = micro()
    x = torch.randint(0, V, (2, 20))
    x2 = x.clone()
    x2[:, 12:] = torch.randint(0, V, (2, 8))
    a, _ = m(x)
    b, _ = m(x2)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "tie_embeddings": False}, {"n_kv_head": 4}])
def test_kv_cache_equals_full_forward(kw):
    m = micro(**kw)
    x = torch.randint(0, V, (2, 24))
    full, _ = m(x)
    cache = m.new_cache(2, 32)
    parts = [m(x[:, :10], cache=cache)[0], m(x[:, 10:15], cache=cache)[0]]  # prefill, chunked prefill
    parts += [m(x[:, t:t + 1], cache=cache)[0] for t in range(15, 24)]       # one token at a time
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    assert cache.pos == 24


def test_kv_cache_left_padding_equals_unpadded():
    m = micro()
    x = torch.randint(1, V, (1, 9))
    alone, _ = m(x)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], 1)
    cache = m.new_cache(1, 20, left_pad=[4])
    out = m(padded[:, :7], cache=cache)[0]
    rest = [m(padded[:, t:t + 1], cache=cache)[0] for t in range(7, 13)]
    got = torch.cat([out, *rest], 1)[:, 4:]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


def test_doc_ids_keep_documents_apart():
    m = micro()
    d1, d2 = torch.randint(0, V, (1, 7)), torch.randint(0, V, (1, 11))
    packed = torch.cat([d1, d2], 1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 11])
    got, _ = m(packed, doc_ids=doc_ids)
    alone2, _ = m(d2)
    alone1, _ = m(d1)
    torch.testing.assert_close(got[:, 7:], alone2, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, :7], alone1, atol=1e-5, rtol=0)
    # one document spanning the row equals the fast causal path
    same, _ = m(packed, doc_ids=torch.zeros_like(doc_ids))
    torch.testing.assert_close(same, m(packed)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("tie", [True, False])
def test_param_count_formula(preset, tie):
    cfg = resolve_model_config({"preset": preset, "tie_embeddings": tie, "qk_norm": tie}, vocab_size=32768)
    with torch.device("meta"):
        m = Transformer(cfg)
    assert m.num_params() == param_count(cfg) == sum(p.numel() for p in set(m.parameters()))
    assert m.num_params(non_embedding=True) == m.num_params() - 32768 * cfg.d_model
    assert m.flops_per_token(256) > 6 * m.num_params(non_embedding=True)


def test_preset_sizes_near_targets():
    sizes = {p: param_count(resolve_model_config({"preset": p}, vocab_size=32768)) / 1e6 for p in PRESETS}
    assert abs(sizes["tiny"] - 23) < 1 and abs(sizes["small"] - 42) < 1.5 and abs(sizes["base"] - 124) < 2


def test_resolve_explicit_over_preset_and_errors():
    cfg = resolve_model_config({"preset": "tiny", "n_layer": 3}, vocab_size=100)
    assert cfg.n_layer == 3 and cfg.d_model == PRESETS["tiny"]["d_model"] and cfg.vocab_size == 100
    with pytest.raises(UserError, match="n_kv_head"):
        resolve_model_config({"preset": "micro", "n_kv_head": 3}, vocab_size=10)
    with pytest.raises(UserError, match="preset"):
        resolve_model_config({"preset": "huge"}, vocab_size=10)
    with pytest.raises(UserError, match="vocab_size"):
        resolve_model_config({"preset": "micro"})


def test_init_deterministic():
    a, b = micro(), micro()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_roundtrip(tmp_path, tie):
    m = micro(tie_embeddings=tie)
    save_model(m, tmp_path / "m")
    m2 = load_weights(tmp_path / "m")
    assert m2.cfg == m.cfg
    x = torch.randint(0, V, (1, 8))
    torch.testing.assert_close(m(x)[0], m2(x)[0], atol=0, rtol=0)
    assert (m2.lm_head.weight is m2.embed.weight) == tie


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_weights(tmp_path / "nope")
    save_model(micro(), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="model.safetensors"):
        load_weights(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors"):
        load_weights(tmp_path / "m")
