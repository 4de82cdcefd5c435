"""Hugging Face export/import: logits parity with transformers, round trip, the `export` stage."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmlab.models import save_model
from lmlab.models.hf import import_hf, write_hf
from lmlab.models.transformer import Transformer, resolve_model_config

TEXT = ["Once upon a time there was a little fox.", "The quick brown fox jumps over the lazy dog.",
        "Language models predict the next token.", "Hello world, hello tokenizer!"] * 20


def make_tokenizer(tmp_path):
    """A real byte-level BPE tokenizer artifact, trained in memory and imported by the tokenizer stage."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lmlab.data import tokenizer as T
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=320, special_tokens=[T.BOS, T.EOS, T.PAD],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tok.save(str(tmp_path / "src_tokenizer.json"))
    T.run(T.Config(from_file=str(tmp_path / "src_tokenizer.json"), out=str(tmp_path / "tok")))
    return T.Tokenizer.load(tmp_path / "tok")


def micro(vocab=101, **kw):
    torch.manual_seed(0)
    m = Transformer(resolve_model_config({"preset": "micro", **kw}, vocab_size=vocab)).eval()
    with torch.no_grad():  # norms away from 1 so a mis-mapped norm weight shows up
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


CASES = {
    "llama_tied_gqa": dict(tie_embeddings=True, n_kv_head=2),
    "llama_untied_mha": dict(tie_embeddings=False, n_kv_head=4),
    "qwen3_qknorm": dict(qk_norm=True, tie_embeddings=False, n_kv_head=2, rope_theta=500000.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_and_roundtrip(tmp_path, case):
    m = micro(**CASES[case])
    write_hf(m, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == ("qwen3" if m.cfg.qk_norm else "llama")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if m.cfg.qk_norm else "LlamaForCausalLM")
    x = torch.randint(0, 101, (2, 33))
    with torch.no_grad():
        ours = m(x)[0]
        theirs = hf(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    back, back_cfg = import_hf(tmp_path)
    assert back_cfg.model_dump(exclude={"preset"}) == m.cfg.model_dump(exclude={"preset"})
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], ours, atol=0, rtol=0)


def test_import_refuses_unsupported(tmp_path):
    from lmlab.errors import UserError
    write_hf(micro(), tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    c["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(UserError, match="yarn"):
        import_hf(tmp_path)


def test_export_stage_cli_loads_in_transformers(tmp_path):
    tok = make_tokenizer(tmp_path)
    m = micro(vocab=tok.vocab_size)
    run_dir = tmp_path / "run"
    save_model(m, run_dir)
    tok.copy_to(run_dir / "tokenizer")
    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "lmlab", "export", str(run_dir), f"out={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["kind"] == "hf_export"
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "Once upon a fox"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eos_id
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert (hf(ids).logits - m(ids)[0]).abs().max().item() <= 1e-4
    r2 = subprocess.run(cmd, capture_output=True, text=True)
    assert "up to date" in r2.stdout
    # a missing model dir is a one-line user error, exit 2, no traceback
    r3 = subprocess.run([sys.executable, "-m", "lmlab", "export", str(tmp_path / "nope"), f"out={out}"],
                        capture_output=True, text=True)
    assert r3.returncode == 2 and "Traceback" not in r3.stderr and "nope" in r3.stderr
