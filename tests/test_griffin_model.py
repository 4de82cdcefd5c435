"""Griffin's own parts beyond the shared family contract: the chunked scan against the
reference loop (values and gradients), the bounded sqrt gradient, the soft-capped fused loss,
a decoding cache that stays the same size however long it runs, the finetuning rules (no
weight decay on the RG-LRU, LoRA on its linear layers by name, activation checkpointing per
block), bf16, the published preset sizes and the checkpoint loaders' errors."""

from __future__ import annotations

import pytest
import torch

from lmlab.errors import UserError
from lmlab.models.griffin import Griffin, resolve_griffin_config
from lmlab.models.griffin.scan import _LinearScan, linear_scan, loop_scan

V = 101


def micro(**kw):
    torch.manual_seed(0)
    return Griffin({"preset": "micro", "vocab_size": V, "width": 32, "num_heads": 4, "mlp_expanded_width": 48,
                    "attention_window_size": 6, **kw})


def test_the_scan_is_a_graph_break_under_compile_yet_importing_lmlab_loads_no_dynamo():
    """linear_scan is eager under torch.compile (its loops are not traced: 2 graphs, 1 break, the
    compiled gradients are eager's), decided at the call (lmlab.runtime.eager_under_compile):
    importing the models, trainers and lmlab.dist loads neither torch._dynamo nor
    torch.distributed.tensor, which took 1.8 s of CPU of every lmlab command's start."""
    import subprocess
    import sys

    heavy = ("torch._dynamo", "torch.distributed.tensor", "sympy")
    code = ("import sys, lmlab.cli, lmlab.train.pretrain, lmlab.train.sft, lmlab.eval.evaluate, lmlab.models; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]

    import torch._dynamo

    a, x = torch.rand(2, 64, 8), torch.randn(2, 64, 8, requires_grad=True)

    def f(a, x):
        h, last = linear_scan(torch.sigmoid(a), x)
        return (h * 2).sum() + last.sum()

    want = f(a, x)
    want.backward()
    grad, x.grad = x.grad.clone(), None
    seen = torch._dynamo.explain(f)(a, x)
    assert (seen.graph_count, seen.graph_break_count, seen.op_count) == (2, 1, 3)
    got = torch.compile(f, backend="eager")(a, x)
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(x.grad, grad)


def test_chunked_scan_equals_the_loop_with_gradients():
    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 7, 33, 129):
        a = torch.rand(2, T, 5, generator=g, dtype=torch.float64)
        a[:, T // 2] = 0  # a reset
        x = torch.randn(2, T, 5, generator=g, dtype=torch.float64)
        h0 = torch.randn(2, 5, generator=g, dtype=torch.float64)
        ref, ref_last = loop_scan(a.float(), x.float(), h0.float())
        got, last = linear_scan(a, x, h0)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(last, ref_last, atol=1e-6, rtol=0)
        if 1 < T < 64:  # gradcheck is slow; 33 steps span several chunks and a reset
            args = tuple(t.clone().requires_grad_() for t in (a, x, h0))
            assert torch.autograd.gradcheck(lambda a, x, h: _LinearScan.apply(a, x, h), args)


def test_sqrt_gradient_is_bounded_where_a_is_one():
    from lmlab.models.griffin.layers import _SqrtBoundDerivative

    x = torch.tensor([0.0, 1e-12, 0.25], requires_grad=True)
    _SqrtBoundDerivative.apply(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1000.0, 1000.0, 1.0]))  # 1 / (2 sqrt(x)), at most 1000


def test_soft_capped_fused_loss_and_its_gradients_equal_the_plain_path():
    m = micro()
    x = torch.randint(0, V, (2, 9))
    y = torch.randint(0, V, (2, 9))
    y[0, :3] = -100
    _, plain = m(x, y)
    plain.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    _, fused = m(x, y, return_logits=False)
    fused.backward()
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4, msg=n)
    assert m.logits(m.hidden(x)).abs().max() <= m.cfg.logits_soft_cap


def test_decoding_state_does_not_grow_past_the_window():
    m = micro().eval()

    def cache_bytes(max_len):
        c = m.new_cache(2, max_len)
        return sum(t.numel() * t.element_size() for d in (c.conv, c.rg_state, c.k, c.v) for t in d.values())

    assert cache_bytes(64) == cache_bytes(100_000)  # window 6: a ring of 6 keys per attention layer
    assert cache_bytes(3) < cache_bytes(64)          # shorter than the window: only what fits


def test_weight_decay_skips_the_rg_lru_embeddings_biases_and_norms():
    from lmlab.train.optim import param_groups

    m = micro()
    decayed = {id(p) for g in param_groups(m, 0.1) if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in m.named_parameters() if id(p) in decayed}
    assert names and not [n for n in names if ".rg_lru." in n or "norm" in n or n.endswith("bias") or "embed" in n]
    assert "blocks.0.temporal_block.linear_x.weight" in names and "blocks.2.temporal_block.q_proj.weight" in names
    assert "blocks.0.temporal_block.rg_lru.input_gate_weight" not in names


def test_lora_targets_griffins_linear_layers_by_name():
    from lmlab.models.lora import LoraConfig, apply_lora

    m = apply_lora(micro(), LoraConfig(enabled=True, r=2))
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "linear_x", "linear_y", "linear_out",
                       "gate_proj", "up_proj", "down_proj"}
    x = torch.randint(0, V, (2, 8))
    _, loss = m(x, x, return_logits=False)
    loss.backward()
    with pytest.raises(UserError, match="no linear layer named 'qkv'"):
        apply_lora(micro(), LoraConfig(enabled=True, target_modules=["qkv"]))


def test_activation_checkpointing_per_block_gives_the_same_gradients():
    from lmlab.train.parallelize import apply_activation_checkpointing

    x = torch.randint(0, V, (2, 12))
    grads = []
    for ckpt in (False, True):
        m = micro()
        if ckpt:
            apply_activation_checkpointing(m)
        _, loss = m(x, x, return_logits=False)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


def test_bf16_autocast_trains_with_a_float32_state():
    m = micro()
    x = torch.randint(0, V, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = m(x, x, return_logits=False)
    loss.backward()
    _, ref = m(x, x)
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    cache = m.new_cache(1, 8, dtype=torch.bfloat16)
    assert cache.rg_state[0].dtype == torch.float32 and cache.conv[0].dtype == torch.bfloat16


def test_presets_have_the_published_sizes():
    with torch.device("meta"):
        two_b = Griffin(resolve_griffin_config({"preset": "2b"}))
    c = two_b.cfg
    assert (c.width, c.n_layer, c.num_heads, c.mlp_expanded_width, c.attention_window_size, c.vocab_size) == \
        (2560, 26, 10, 7680, 2048, 256000)
    assert c.block_types[:3] == ["recurrent", "recurrent", "attention"] and c.block_types.count("attention") == 8
    assert two_b.num_params() == 2_682_862_080  # RecurrentGemma-2B: 2.7B, 2.0B without the embedding
    assert two_b.embed_scale == 50.5             # sqrt(2560) = 50.596 rounded to bfloat16


def test_bad_shapes_and_checkpoints_are_clear_errors(tmp_path):
    from lmlab.models.griffin.checkpoints import load_deepmind

    with pytest.raises(UserError, match="not divisible by model.num_heads"):
        resolve_griffin_config({"preset": "micro", "vocab_size": V, "width": 60, "num_heads": 8})
    torch.save(micro().state_dict(), tmp_path / "ours.pt")  # our layout, not DeepMind's
    with pytest.raises(UserError, match="not a DeepMind recurrentgemma checkpoint"):
        load_deepmind(tmp_path / "ours.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read as a torch checkpoint"):
        load_deepmind(tmp_path / "junk.pt")
