"""Shared test helpers: a real micro pipeline built by the real stages, and the shared data path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("LMLAB_NO_PROGRESS", "1")
# JAX's compiled programs shared by the JAX tests (lmlab.jax_backend.enable_compile_cache), not in ~/.cache
os.environ.setdefault("LMLAB_JAX_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "lmlab-test-jax-cache"))

ROOT = Path(__file__).resolve().parent.parent
# ../shared/data beside the checkout holds real public datasets; a fresh clone may not have it.
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(items):
    """The JAX tests last: once JAX has run in this process its threads exist, and a test that
    forks afterwards (multiprocessing, subprocesses) would do so from a multithreaded process."""
    items.sort(key=lambda item: Path(str(item.fspath)).name.startswith("test_jax_"))


def build_micro_pipeline(root: Path, max_docs: int = 40, seq_len: int = 65, steps: int = 12) -> dict:
    """corpus (stdlib) -> tokenizer (vocab 400) -> pack -> pretrain (a micro model) under `root`."""
    from lmlab.data import corpus, pack, tokenizer
    from lmlab.train import pretrain

    c = corpus.run(corpus.Config(out=str(root / "corpus"), sources=[{"kind": "stdlib", "max_docs": max_docs}]))
    t = tokenizer.run(tokenizer.Config(corpus=str(c), out=str(root / "tokenizer"), vocab_size=400, threads=1))
    p = pack.run(pack.Config(corpus=str(c), tokenizer=str(t), out=str(root / "packed"), seq_len=seq_len, workers=1,
                             val_fraction=0.2))
    m = pretrain.run(pretrain.Config(data=[str(p)], out=str(root / "model"),
                                     model={"preset": "micro", "max_seq_len": seq_len - 1},
                                     train={"steps": steps, "batch_size": 4, "device": "cpu"},
                                     eval={"every": 4, "batches": 2}, log={"every": 2}, checkpoint={"every": 0}))
    return {"root": root, "corpus": c, "tokenizer": t, "packed": p, "model": m}


def pretrain_griffin(root: Path, seq_len: int, batch_size: int = 4) -> Path:
    """corpus (stdlib, 30 docs) -> tokenizer (vocab 400) -> pack -> a micro Griffin pretrained 2 steps,
    context `seq_len`, under `root`; -> its model directory."""
    from lmlab.data import corpus, pack, tokenizer
    from lmlab.train import pretrain

    c = corpus.run(corpus.Config(out=str(root / "corpus"), sources=[{"kind": "stdlib", "max_docs": 30}]))
    t = tokenizer.run(tokenizer.Config(corpus=str(c), out=str(root / "tokenizer"), vocab_size=400, threads=1))
    p = pack.run(pack.Config(corpus=str(c), tokenizer=str(t), out=str(root / "packed"), seq_len=seq_len + 1,
                             workers=1, val_fraction=0.2))
    return pretrain.run(pretrain.Config(data=[str(p)], out=str(root / "griffin"),
                                        model={"family": "griffin", "preset": "micro", "max_seq_len": seq_len},
                                        train={"steps": 2, "batch_size": batch_size, "device": "cpu"},
                                        eval={"every": 0, "batches": 0}, checkpoint={"every": 0}))


SMOLLM3_TEXT = ["Once upon a time there was a little fox.", "What is 3 plus 4? It is 7.", "The answer is #### 12",
                "Think first, then answer.", "Ann has 3 pens. She buys 4 more."] * 20
SMOLLM3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def build_tiny_smollm3(d: Path, chat_template: str | None = None, **config):
    """A tiny random SmolLM3ForCausalLM (transformers' own class, weights moved off their init)
    saved to `d` as the hub ships one: config.json, model.safetensors, a byte-level BPE
    tokenizer.json with SmolLM3's chat and thinking tokens, tokenizer_config.json, and
    `chat_template` in chat_template.jinja when given. -> (the transformers model, special ids)."""
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from lmlab.data.chat import SMOLLM3_SYSTEM_THINK

    # its system header in the text too: a prompt is then ~100 tokens, not ~1000
    tok.train_from_iterator(SMOLLM3_TEXT + [SMOLLM3_SYSTEM_THINK] * 20, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=SMOLLM3_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids = {t: tok.token_to_id(t) for t in SMOLLM3_SPECIALS}
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, rope_theta=5e4)
    cfg = SmolLM3Config(vocab_size=tok.get_vocab_size(), bos_token_id=ids["<|begin_of_text|>"],
                        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|end_of_text|>"], **{**shape, **config})
    torch.manual_seed(0)
    model = SmolLM3ForCausalLM(cfg)
    with torch.no_grad():  # far from init: a layer given RoPE it should not have shows in the logits
        for n, p in model.named_parameters():
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if "norm" in n else p + torch.randn_like(p) * 0.05)
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_position_embeddings,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>"}))
    if chat_template is not None:
        (d / "chat_template.jinja").write_text(chat_template)
    return model.eval(), ids


@pytest.fixture(scope="session")
def gemma_tokenizer(tmp_path_factory):
    """A SentencePiece model (280 pieces) laid out as Gemma's: <pad>=0 <eos>=1 <bos>=2 <unk>=3, turn markers."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    text = d / "text.txt"
    text.write_text("\n".join(f"theorem t{i} (n : Nat) : n + {i} = {i} + n := by omega -- lemma{i * 7919 % 1000}"
                              for i in range(2000)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(d / "tokenizer"), vocab_size=280,
                                   hard_vocab_limit=False,
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                                   user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], num_threads=1,
                                   minloglevel=2)
    return d / "tokenizer.model"
