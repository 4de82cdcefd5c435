"""SmolLM3 (NoPE layers) through `lmlab import` and `lmlab export`, offline.

A tiny random SmolLM3ForCausalLM (transformers' own class, weights moved off their init, a real
byte-level BPE tokenizer.json with SmolLM3's chat and thinking tokens) must import as lmlab's
transformer with `nope_layers` — the layers whose `no_rope_layers` flag is 0 — and then compute
transformers' logits (fp32, 1e-4), and greedy generation from a left-padded batch must give
transformers' tokens. Export writes SmolLM3ForCausalLM back with the same flags.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import build_tiny_smollm3

from lmlab.cli import main
from lmlab.models import load_model

@pytest.fixture(scope="module")
def smollm3(tmp_path_factory):
    """(HF dir, the transformers model, special-token ids) of a 4-layer SmolLM3 (NoPE on layer 3)."""
    d = tmp_path_factory.mktemp("smollm3")
    model, ids = build_tiny_smollm3(d)
    assert model.config.no_rope_layers == [1, 1, 1, 0]  # transformers' default: every 4th layer without RoPE
    return d, model, ids


def test_import_computes_transformers_logits_and_greedy_tokens(smollm3, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lmlab.infer.engine import generate_ids

    d, ref, ids = smollm3
    out = tmp_path / "run"
    assert main(["import", str(d), f"out={out}"]) == 0
    model, tok, _ = load_model(out)
    assert model.cfg.nope_layers == [3] and model.cfg.tie_embeddings
    assert json.loads((out / "model.json").read_text())["nope_layers"] == [3]
    assert tok.special_tokens["<think>"] == ids["<think>"] and tok.special_tokens["</think>"] == ids["</think>"]
    x = torch.randint(0, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x)[0] - ref(x).logits).abs().max().item() <= 1e-4
    # the same model with RoPE on every layer is far off: the NoPE layer is what makes it exact
    wrong = AutoModelForCausalLM.from_pretrained(d, no_rope_layers=[1, 1, 1, 1]).eval()
    with torch.no_grad():
        assert (wrong(x).logits - ref(x).logits).abs().max().item() > 1e-2
    # greedy decoding from a left-padded batch, through lmlab's KV cache, gives transformers' tokens
    prompts = [tok.encode("Ann has 3 pens. She buys"), tok.encode("What is 3 plus 4?")]
    got = [[] for _ in prompts]
    for step in generate_ids(model, prompts, max_new_tokens=12, pad_id=ids["<|end_of_text|>"]):
        for row, t in zip(got, step):
            row.extend([] if t is None else [t])
    assert len(prompts[0]) != len(prompts[1])
    for p, g in zip(prompts, got):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=ids["<|end_of_text|>"])[0, len(p):].tolist()
        assert list(g) == want


def test_explicit_flags_export_back_as_smollm3_and_gguf_is_refused(smollm3, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    d, _, _ = smollm3
    src = tmp_path / "src"
    shutil.copytree(d, src)
    c = json.loads((src / "config.json").read_text())
    c["no_rope_layers"] = [0, 1, 0, 1]  # any pattern: layers 0 and 2 without RoPE
    (src / "config.json").write_text(json.dumps(c))
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    run, hf_out = tmp_path / "run", tmp_path / "hf"
    assert main(["import", str(src), f"out={run}"]) == 0
    assert json.loads((run / "model.json").read_text())["nope_layers"] == [0, 2]
    assert main(["export", str(run), f"out={hf_out}"]) == 0
    config = json.loads((hf_out / "config.json").read_text())
    assert config["architectures"] == ["SmolLM3ForCausalLM"] and config["no_rope_layers"] == [0, 1, 0, 1]
    back = AutoModelForCausalLM.from_pretrained(hf_out).eval()
    x = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (back(x).logits - ref(x).logits).abs().max().item() <= 1e-4
    capsys.readouterr()
    gguf = tmp_path / "m.gguf"
    assert main(["export", str(run), f"out={gguf}", "format=gguf"]) == 2
    err = capsys.readouterr().err
    assert "nope_layers=[0, 2]" in err and "convert_hf_to_gguf" in err and "Traceback" not in err
    assert not gguf.exists()


def test_bad_nope_layers_are_a_clear_error():
    from lmlab.errors import UserError
    from lmlab.models.transformer import resolve_model_config

    with pytest.raises(UserError, match=r"nope_layers=\[2\] must be distinct layer indices in 0\.\.1"):
        resolve_model_config({"preset": "micro", "vocab_size": 50, "nope_layers": [2]})
    assert resolve_model_config({"preset": "micro", "vocab_size": 50, "nope_layers": [1, 0]}).nope_layers == [0, 1]
