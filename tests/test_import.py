"""`lmlab import`: a RecurrentGemma checkpoint in the Hugging Face layout (written by
transformers' save_pretrained) and in DeepMind's torch layout (the reference's state_dict),
each with a Gemma-style SentencePiece tokenizer.model, become lmlab model directories that
compute the same logits; a tokenizer that does not fit the embedding is refused."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.cli import main
from lmlab.models import load_model

V = 300


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, gemma_tokenizer):
    import shutil

    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    c = RecurrentGemmaConfig(vocab_size=V, hidden_size=32, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=1, lru_width=32,
                             attention_window_size=16, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    m = RecurrentGemmaForCausalLM(c).eval()
    d = tmp_path_factory.mktemp("rg_hf")
    m.save_pretrained(d)
    shutil.copy(gemma_tokenizer, d / "tokenizer.model")
    return d, m


def test_hf_recurrentgemma_imports_with_its_sentencepiece_tokenizer(hf_dir, tmp_path, capsys):
    d, ref = hf_dir
    out = tmp_path / "rg"
    assert main(["import", str(d), f"out={out}", "template=gemma"]) == 0
    model, tok, manifest = load_model(out)
    assert model.family == "griffin" and manifest["kind"] == "model" and manifest["chat"]["template"] == "gemma"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    x = torch.tensor([[tok.bos_id] + tok.encode("theorem t7 (n : Nat) : n + 7 = 7 + n := by")])
    assert x.shape[1] > 16  # past the window the two references differ by one key (lmlab.models.griffin.checkpoints)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0][:, :16], ref(x, use_cache=False).logits[:, :16], atol=1e-4, rtol=0)
    capsys.readouterr()
    assert main(["import", str(d), f"out={out}", "template=gemma"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_deepmind_checkpoint_imports_with_a_tokenizer_file(tmp_path, gemma_tokenizer):
    from lmlab.models.griffin.reference import recurrentgemma_torch

    ref = recurrentgemma_torch()
    if ref is None:
        pytest.skip("recurrentgemma is not installed (pip install --no-deps recurrentgemma==1.0.1 jaxtyping)")
    common, griffin = ref
    T = common.TemporalBlockType
    cfg = common.GriffinConfig(vocab_size=V, width=32, mlp_expanded_width=96, num_heads=4, lru_width=32,
                               block_types=(T.RECURRENT, T.RECURRENT, T.ATTENTION),
                               embeddings_scale_by_sqrt_dim=True, attention_window_size=16, logits_soft_cap=30.0)
    torch.manual_seed(1)
    theirs = griffin.Griffin(cfg, gradient_checkpointing=False).eval()
    torch.save(theirs.state_dict(), tmp_path / "rg.pt")
    out = tmp_path / "rg"
    assert main(["import", str(tmp_path / "rg.pt"), f"tokenizer={gemma_tokenizer}", f"out={out}",
                 "attention_window_size=16", "max_seq_len=256"]) == 0
    model, _, _ = load_model(out)
    x = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        got = model(x)[0]
        want, _ = theirs(x, torch.arange(40)[None].expand(2, -1), return_cache=False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert json.loads((out / "model.json").read_text())["attention_window_size"] == 16


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, capsys, monkeypatch):
    import sentencepiece as spm
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"word{i} and {i * 31 % 977}" for i in range(3000)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "big"), vocab_size=V + 50,
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, num_threads=1, minloglevel=2,
                                   user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    c = RecurrentGemmaConfig(vocab_size=V, hidden_size=32, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=1, lru_width=32)
    RecurrentGemmaForCausalLM(c).save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    # refused before the weights load (a 2B checkpoint takes minutes to read)
    import lmlab.models.importer as importer
    monkeypatch.setattr(importer, "load_source", lambda cfg: pytest.fail("the weights were loaded"))
    assert main(["import", str(tmp_path / "hf"), f"tokenizer={tmp_path / 'big.model'}", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert f"the tokenizer has {V + 50} tokens but the checkpoint's embedding table has {V} rows" in err
    assert "Traceback" not in err and not out.exists()
    # a DeepMind checkpoint: its embedding's shape, read from the file without loading the rest
    torch.save({"embedder.input_embedding": torch.zeros(V, 32), "blocks.0.mlp_block.ffw_up.w": torch.zeros(2, 32, 96),
                "blocks.0.channel_pre_norm.scale": torch.zeros(32)}, tmp_path / "dm.pt")
    from safetensors.torch import save_file
    save_file({"embedder.input_embedding": torch.zeros(V, 32)}, tmp_path / "dm.safetensors")
    for ckpt in ("dm.pt", "dm.safetensors"):
        assert main(["import", str(tmp_path / ckpt), f"tokenizer={tmp_path / 'big.model'}", f"out={out}"]) == 2
        assert f"has {V} rows" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "missing.pt"), f"out={out}"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
