"""LoRA through PEFT on our Transformer: frozen base, PEFT-format save/load, merge, DoRA/rsLoRA, bad targets."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from lmlab.errors import UserError
from lmlab.models.lora import (LoraConfig, adapters_disabled, apply_lora, load_adapter, merge_lora, param_counts,
                               save_adapter)
from lmlab.models.transformer import Transformer

V = 97


def micro(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer({"preset": "micro", "vocab_size": V, "max_seq_len": 32})


def nudge_adapters(model, seed: int = 1) -> None:
    """B starts at zero (an adapter is a no-op until trained); give every adapter weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def train_step(model, lr: float = 1e-2) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    _, loss = model(x[:, :-1], x[:, 1:], return_logits=False)
    loss.backward()
    opt.step()
    return loss.item()


def test_only_adapters_train_and_the_base_is_untouched():
    model = micro()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    trainable, total = param_counts(wrapped)
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    # 2 layers x (qkv 64->128, o_proj 64->64, gate_up 64->256, down_proj 128->64), rank 4: r*(in+out) each
    assert trainable == 2 * 4 * ((64 + 128) + (64 + 64) + (64 + 256) + (128 + 64))
    assert total == micro().num_params() + trainable
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    train_step(wrapped)
    for n, p in wrapped.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == ("lora_B" in n or "lora_A" in n), n
    base_now = wrapped.get_base_model().state_dict()
    for k, v in base_before.items():
        key = k.replace(".weight", ".base_layer.weight") if any(t in k for t in ("qkv", "o_proj", "gate_up", "down_proj")) else k
        assert torch.equal(base_now[key], v), k


def test_adapter_saved_in_peft_format_loads_with_peft_and_lmlab(tmp_path):
    wrapped = apply_lora(micro(), LoraConfig(enabled=True, r=4, alpha=8))
    nudge_adapters(wrapped)
    x = torch.randint(0, V, (2, 12))
    want = wrapped(x)[0]
    save_adapter(wrapped, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == ["down_proj", "gate_up", "o_proj", "qkv"]
    # PEFT itself reads it: PeftModel.from_pretrained, and set_peft_model_state_dict on the raw tensors
    via_peft = peft.PeftModel.from_pretrained(micro(), str(tmp_path / "adapter"))
    assert torch.allclose(via_peft(x)[0], want, atol=1e-6)
    fresh = apply_lora(micro(), LoraConfig(enabled=True, r=4, alpha=8))
    result = peft.set_peft_model_state_dict(fresh, load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert not [k for k in result.unexpected_keys if "lora" in k]
    assert torch.allclose(fresh(x)[0], want, atol=1e-6)
    assert torch.allclose(load_adapter(micro(), tmp_path / "adapter")(x)[0], want, atol=1e-6)
    with pytest.raises(UserError, match="not a PEFT adapter"):
        load_adapter(micro(), tmp_path)


@pytest.mark.parametrize("opts", [{}, {"use_rslora": True}, {"use_dora": True}, {"use_dora": True, "use_rslora": True}])
def test_merge_equals_the_adapted_model_and_options_train(opts):
    wrapped = apply_lora(micro(), LoraConfig(enabled=True, r=4, alpha=8, **opts))
    nudge_adapters(wrapped)
    l0 = train_step(wrapped)
    assert l0 == l0  # finite: the option constructs and trains
    x = torch.randint(0, V, (2, 12))
    adapted = wrapped(x)[0]
    merged = merge_lora(wrapped)  # a copy: the wrapped model keeps its adapters
    assert type(merged) is Transformer and not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(merged(x)[0], adapted, atol=1e-5)
    assert torch.allclose(wrapped(x)[0], adapted)
    scale = wrapped.base_model.model.blocks[0].attn.qkv.scaling["default"]
    assert scale == pytest.approx(8 / 2 if opts.get("use_rslora") else 8 / 4)


def test_adapters_disabled_is_the_base_model():
    base = micro()
    x = torch.randint(0, V, (2, 12))
    want = base(x)[0].detach()
    wrapped = apply_lora(base, LoraConfig(enabled=True, r=4))
    nudge_adapters(wrapped)
    assert not torch.allclose(wrapped(x)[0], want)
    with adapters_disabled(wrapped) as ref:
        assert torch.allclose(ref(x)[0], want)
    assert not torch.allclose(wrapped(x)[0], want)  # back on after the block
    plain = micro()
    with adapters_disabled(plain) as same:
        assert same is plain


def test_unknown_or_unsupported_target_lists_the_real_linear_layers():
    with pytest.raises(UserError) as e:
        apply_lora(micro(), LoraConfig(enabled=True, target_modules=["q_proj", "qkv"]))
    msg = str(e.value)
    assert "'q_proj'" in msg and all(n in msg for n in ("qkv", "o_proj", "gate_up", "down_proj"))
    with pytest.raises(UserError, match="lm_head"):
        apply_lora(micro(), LoraConfig(enabled=True, target_modules=["lm_head"]))
    with pytest.raises(UserError, match="empty"):
        apply_lora(micro(), LoraConfig(enabled=True, target_modules=[]))
