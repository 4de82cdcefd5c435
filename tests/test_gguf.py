"""GGUF export (lmlab.models.gguf): the file read back with gguf's reader, a reference forward of the
file in numpy with llama.cpp's semantics (adjacent-pair RoPE on the permuted q/k), and, where
llama-cpp-python is installed, llama.cpp itself against lmlab's engine (tokens, logits, greedy).

llama.cpp is looked for in this interpreter, then in the python named by LMLAB_LLAMACPP_PYTHON,
then in /work/peers/llamacpp-venv/bin/python; it always runs in a subprocess (a crash in the C++
library fails one test, not the session). Without it those tests are skipped, saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_micro_pipeline

gguf = pytest.importorskip("gguf")

from lmlab.errors import UserError  # noqa: E402
from lmlab.models import gguf as G  # noqa: E402
from lmlab.models import export as export_stage  # noqa: E402

DTYPES = ("f32", "f16", "bf16", "q8_0")
HAS_BIAS = "attn_bias" in __import__("lmlab.models.transformer", fromlist=["ModelConfig"]).ModelConfig.model_fields

# texts whose token ids lmlab and llama.cpp must agree on (special tokens matched in text: parse_special)
TEXTS = [
    "Hello world, hello tokenizer!",
    "def f(x):\n    return x * 2  # double\n",
    "  leading spaces and trailing  ",
    "numbers 12345 and 3.14159, dates 2024-06-01",
    "unicode: café, naïve, 東京, emoji 🚀🦙",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "tabs\tand\nnew\n\nlines",
    "<|bos|>a document<|eos|>",
    "",
    " ",
]
PROMPTS = ["The ", "import os\n", "Once upon a time", "1 2 3 4", "class Foo:"]


# ----------------------------------------------------------------------------- fixtures

def _model_dir(root: Path, name: str, tok_dir: Path, fields: dict, seed: int, state=None, chat=None) -> Path:
    """A run dir of a micro transformer: `state` (or a fresh init) plus noise, so that greedy text
    depends on the prompt and a mis-mapped weight shows up."""
    from lmlab.data.chat import save_chat_template
    from lmlab.data.tokenizer import Tokenizer
    from lmlab.models import save_model
    from lmlab.models.family import build_model

    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(seed)
    model = build_model({"family": "transformer", "preset": "micro", "vocab_size": tok.vocab_size, **fields}).eval()
    if state is not None:
        model.load_state_dict(state)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # 0.05 still repeats one token greedily
    out = root / name
    out.mkdir(parents=True)
    save_model(model, out)
    tok.copy_to(out / "tokenizer")
    if chat:
        save_chat_template(out, chat)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"trained": the micro pipeline's model (SentencePiece), "noisy": it plus noise with chatml,
    "bpe": byte-level BPE + untied head, "qwen3": QK-norm} run dirs."""
    from lmlab.data import tokenizer as T
    from lmlab.models import load_model

    root = tmp_path_factory.mktemp("gguf")
    pipe = build_micro_pipeline(root / "pipe")
    bpe_tok = T.run(T.Config(corpus=str(pipe["corpus"]), out=str(root / "bpe_tok"), type="bpe", vocab_size=400))
    state = load_model(pipe["model"])[0].state_dict()
    return {
        "trained": pipe["model"],
        "noisy": _model_dir(root, "noisy", pipe["tokenizer"], {"max_seq_len": 64}, 1, state=state, chat="chatml"),
        "bpe": _model_dir(root, "bpe", bpe_tok, {"max_seq_len": 128, "tie_embeddings": False}, 2),
        "qwen3": _model_dir(root, "qwen3", pipe["tokenizer"], {"max_seq_len": 128, "qk_norm": True,
                                                                "rope_theta": 500000.0}, 3),
        # q/k/v biases (Qwen2), where this lmlab's transformer has them
        "qwen2": _model_dir(root, "qwen2", pipe["tokenizer"], {"max_seq_len": 128, "attn_bias": True}, 4)
        if HAS_BIAS else None,
        "root": root,
    }


_EXPORTS: dict = {}


def export(runs, which: str, dtype: str) -> Path:
    """The GGUF of run `which` in `dtype`, written once by the real `lmlab export` stage."""
    key = (which, dtype)
    if key not in _EXPORTS:
        out = runs["root"] / "gguf" / f"{which}-{dtype}.gguf"
        _EXPORTS[key] = export_stage.run(export_stage.Config(model=str(runs[which]), out=str(out), format="gguf", dtype=dtype))
    return _EXPORTS[key]


def load(run_dir):
    if run_dir is None:
        pytest.skip("this lmlab's transformer has no q/k/v biases (attn_bias)")
    from lmlab.models import load_model
    model, tok, _ = load_model(run_dir)
    return model.eval(), tok


def field(reader, key):
    """A metadata value as Python (str, int, float, bool, or a list of them)."""
    f = reader.get_field(key)
    assert f is not None, f"{key} missing"
    V = gguf.GGUFValueType

    def one(part, t):
        return bytes(part).decode("utf-8") if t == V.STRING else part.tolist()[0]
    if f.types[0] == V.ARRAY:
        return [one(f.parts[i], f.types[-1]) for i in f.data]
    return one(f.parts[f.data[0]], f.types[0])


def dequant(t) -> np.ndarray:
    """A reader tensor as float64 in PyTorch's (rows, cols) order."""
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(shape)


# ----------------------------------------------------------------------------- the file

def test_keys_and_tokenizer_spm(runs):
    model, tok = load(runs["trained"])
    c = model.cfg
    r = gguf.GGUFReader(export(runs, "trained", "f32"))
    hd = c.d_model // c.n_head
    expect = {
        "general.architecture": "llama", "general.name": "model", "general.file_type": 0,
        "llama.context_length": c.max_seq_len, "llama.embedding_length": c.d_model, "llama.block_count": c.n_layer,
        "llama.feed_forward_length": c.ffn_dim, "llama.attention.head_count": c.n_head,
        "llama.attention.head_count_kv": c.n_kv_head, "llama.rope.dimension_count": hd,
        "llama.vocab_size": c.vocab_size, "llama.attention.key_length": hd,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.padding_token_id": tok.pad_id, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.remove_extra_whitespaces": False,
    }
    for k, v in expect.items():
        assert field(r, k) == v, k
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.norm_eps)
    assert field(r, "llama.rope.freq_base") == pytest.approx(c.rope_theta)
    assert field(r, "lmlab.tokenizer_sha256") == tok.sha256
    assert r.get_field("tokenizer.chat_template") is None  # no chat.json in a pretrain run
    tokens = field(r, "tokenizer.ggml.tokens")
    assert tokens == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    sp = tok._backend
    assert field(r, "tokenizer.ggml.scores") == pytest.approx([sp.get_score(i) for i in range(tok.vocab_size)])
    types = field(r, "tokenizer.ggml.token_type")
    T = gguf.TokenType
    assert types[0] == T.UNKNOWN
    assert types == [G.special_token_types(tok).get(i, t) for i, t in enumerate(types)]
    assert {n: types[i] for n, i in tok.special_tokens.items() if not n.startswith("<|reserved")} == {
        "<|bos|>": T.CONTROL, "<|eos|>": T.CONTROL, "<|pad|>": T.CONTROL,  # hidden when decoding, as in lmlab
        "<|im_start|>": T.USER_DEFINED,  # kept when decoding, as in lmlab; always matched in text
        "<think>": T.USER_DEFINED, "</think>": T.USER_DEFINED,  # thinking is text a reader sees
        "<|im_end|>": T.CONTROL}  # the end of a turn: llama.cpp makes it a control token in any case
    assert {types[i] for n, i in tok.special_tokens.items() if n.startswith("<|reserved")} == {T.USER_DEFINED}
    assert all(types[i] == T.BYTE for i in range(tok.vocab_size) if sp.is_byte(i))
    assert sum(t == T.NORMAL for t in types) == tok.vocab_size - 1 - len(tok.special_tokens) - 256


def test_tensor_names_shapes_and_dtypes(runs):
    model, _ = load(runs["trained"])
    c = model.cfg
    hd = c.d_model // c.n_head
    for dtype in DTYPES:
        r = gguf.GGUFReader(export(runs, "trained", dtype))
        got = {t.name: (tuple(int(n) for n in t.shape), t.tensor_type.name) for t in r.tensors}
        mat = dtype.upper()
        want = {"token_embd.weight": ((c.d_model, c.vocab_size), mat), "output_norm.weight": ((c.d_model,), "F32")}
        for i in range(c.n_layer):  # GGUF shapes list the row length first
            want.update({
                f"blk.{i}.attn_norm.weight": ((c.d_model,), "F32"), f"blk.{i}.ffn_norm.weight": ((c.d_model,), "F32"),
                f"blk.{i}.attn_q.weight": ((c.d_model, c.n_head * hd), mat),
                f"blk.{i}.attn_k.weight": ((c.d_model, c.n_kv_head * hd), mat),
                f"blk.{i}.attn_v.weight": ((c.d_model, c.n_kv_head * hd), mat),
                f"blk.{i}.attn_output.weight": ((c.n_head * hd, c.d_model), mat),
                f"blk.{i}.ffn_gate.weight": ((c.d_model, c.ffn_dim), mat),
                f"blk.{i}.ffn_up.weight": ((c.d_model, c.ffn_dim), mat),
                f"blk.{i}.ffn_down.weight": ((c.ffn_dim, c.d_model), mat),
            })
        assert got == want, dtype  # tied: no output.weight (llama.cpp reuses token_embd)
        assert field(r, "general.file_type") == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[dtype]


def _ours_by_gguf_name(model) -> dict[str, np.ndarray]:
    """Our weights under GGUF names, q/k in our (rotate-half) layout."""
    from lmlab.models.hf import to_hf_state_dict
    return {G.gguf_name(k): v.double().numpy() for k, v in to_hf_state_dict(model).items()}


@pytest.mark.parametrize("arch", ["LLAMA", "QWEN2", "QWEN3"])
def test_names_are_gguf_packages_own(arch):
    """Our spelled-out names are those of gguf's TensorNameMap (what convert_hf_to_gguf.py uses)."""
    if not hasattr(gguf.MODEL_ARCH, arch):
        pytest.skip(f"this gguf ({gguf.__name__}) has no {arch} table")
    from lmlab.models.hf import to_hf_state_dict
    from lmlab.models.transformer import Transformer, resolve_model_config
    fields = {"preset": "micro", "qk_norm": arch == "QWEN3", "tie_embeddings": False}
    if arch == "QWEN2":
        if not HAS_BIAS:
            pytest.skip("no attn_bias in this lmlab")
        fields["attn_bias"] = True
    m = Transformer(resolve_model_config(fields, vocab_size=64))
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), m.cfg.n_layer)
    for k in to_hf_state_dict(m):
        assert G.gguf_name(k) == names.get_name(k, try_suffixes=(".weight", ".bias")), k


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_read_back(runs, dtype):
    model, _ = load(runs["noisy"])
    c = model.cfg
    ours = _ours_by_gguf_name(model)
    r = gguf.GGUFReader(export(runs, "noisy", dtype))
    assert {t.name for t in r.tensors} == set(ours)
    for t in r.tensors:
        got = dequant(t)
        if t.name.endswith("attn_q.weight"):
            got = G.unpermute_rope(torch.from_numpy(got), c.n_head).numpy()
        elif t.name.endswith("attn_k.weight"):
            got = G.unpermute_rope(torch.from_numpy(got), c.n_kv_head).numpy()
        want = ours[t.name]
        if t.name.endswith("norm.weight") or dtype == "f32":
            np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=t.name)
        elif dtype == "f16":
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float64), err_msg=t.name)
        elif dtype == "bf16":
            bf = torch.from_numpy(want).to(torch.bfloat16).double().numpy()  # both round to nearest even
            np.testing.assert_array_equal(got, bf, err_msg=t.name)
        else:  # q8_0: blocks of 32, q = round(x/d) with d = max|x|/127, stored as q * f16(d): |error| is at
            # most d/2 from rounding q plus 127 * |d - f16(d)| <= 127 * d * 2^-11 from rounding d
            blocks = want.reshape(-1, 32)
            bound = np.abs(blocks).max(axis=1, keepdims=True) / 127 * (0.5 + 127 / 2048) + 1e-9
            assert (np.abs(got.reshape(-1, 32) - blocks) <= bound).all(), t.name
            assert np.abs(got - want).max() > 0  # it did quantize


def test_permutation_inverts_and_matches_llama_cpp_convention():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of head_dim 8
    p = G.permute_rope(w, 2)
    # head 0: rows 0..3 (first half) go to 0,2,4,6; rows 4..7 (second half) to 1,3,5,7
    assert p[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]
    assert torch.equal(G.unpermute_rope(p, 2), w)


# ----------------------------------------------------------------------------- a reference forward

def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def reference_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Logits (T, V) of a GGUF file computed the way llama.cpp's llama / qwen3 graphs do, in float64:
    RoPE on adjacent pairs ("norm") for llama, on halves ("neox") for qwen2 and qwen3."""
    r = gguf.GGUFReader(path)
    arch = field(r, "general.architecture")
    k = lambda name: field(r, f"{arch}.{name}")  # noqa: E731
    W = {t.name: dequant(t) for t in r.tensors}
    n_layer, n_head, n_kv = k("block_count"), k("attention.head_count"), k("attention.head_count_kv")
    eps, base, n_rot = k("attention.layer_norm_rms_epsilon"), k("rope.freq_base"), k("rope.dimension_count")
    T = len(ids)
    x = W["token_embd.weight"][ids]
    hd = x.shape[1] // n_head
    pos = np.arange(T)[:, None]
    theta = pos * base ** (-np.arange(0, n_rot, 2) / n_rot)  # (T, n_rot/2)
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]

    def rope(v):  # (T, H, hd)
        if arch in ("qwen2", "qwen3"):
            a, b = v[..., :hd // 2], v[..., hd // 2:]
            return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(n_layer):
        p = f"blk.{i}."
        h = _rms(x, W[p + "attn_norm.weight"], eps)
        q, kk, v = (h @ W[p + f"attn_{n}.weight"].T + W.get(p + f"attn_{n}.bias", 0.0) for n in "qkv")
        q, kk, v = q.reshape(T, n_head, hd), kk.reshape(T, n_kv, hd), v.reshape(T, n_kv, hd)
        if p + "attn_q_norm.weight" in W:
            q, kk = _rms(q, W[p + "attn_q_norm.weight"], eps), _rms(kk, W[p + "attn_k_norm.weight"], eps)
        q, kk = rope(q), rope(kk)
        rep = n_head // n_kv
        kk, v = np.repeat(kk, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, kk) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = np.einsum("hts,shd->thd", att, v).reshape(T, n_head * hd)
        x = x + y @ W[p + "attn_output.weight"].T
        h = _rms(x, W[p + "ffn_norm.weight"], eps)
        g, u = h @ W[p + "ffn_gate.weight"].T, h @ W[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "ffn_down.weight"].T
    x = _rms(x, W["output_norm.weight"], eps)
    return x @ W.get("output.weight", W["token_embd.weight"]).T


def our_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].double().numpy()


@pytest.mark.parametrize("which", ["noisy", "bpe", "qwen3", "qwen2"])
def test_reference_forward_of_the_file_equals_our_model(runs, which):
    """The file, run with llama.cpp's RoPE convention, computes our model's logits: the q/k permutation,
    tensor names, norms, GQA, tied/untied head and qwen3's QK-norm are all right, without llama.cpp."""
    model, tok = load(runs[which])
    ids = [tok.bos_id] + tok.encode("Once upon a time, in a land far away, 12345")
    ours = our_logits(model, ids)
    np.testing.assert_allclose(reference_logits(export(runs, which, "f32"), ids), ours, atol=2e-4, rtol=1e-4)
    q8 = reference_logits(export(runs, which, "q8_0"), ids)  # q8_0 weights alone: ~5% of the largest logit
    assert np.abs(q8 - ours).max() < 0.1 * np.abs(ours).max()


def test_bpe_tokenizer_and_untied_head(runs):
    _, tok = load(runs["bpe"])
    r = gguf.GGUFReader(export(runs, "bpe", "f16"))
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    vocab = tok._backend.get_vocab(with_added_tokens=True)
    assert field(r, "tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    spec = json.loads(tok.model_file.read_text())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert field(r, "tokenizer.ggml.merges") == merges
    types = field(r, "tokenizer.ggml.token_type")
    T = gguf.TokenType
    assert [types[tok.special_tokens[n]] for n in ("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>")] \
        == [T.CONTROL, T.CONTROL, T.CONTROL, T.USER_DEFINED, T.CONTROL]
    assert r.get_field("tokenizer.ggml.scores") is None and r.get_field("tokenizer.ggml.unknown_token_id") is None
    assert "output.weight" in {t.name for t in r.tensors}


def test_qwen3_architecture(runs):
    model, _ = load(runs["qwen3"])
    r = gguf.GGUFReader(export(runs, "qwen3", "f32"))
    assert field(r, "general.architecture") == "qwen3"
    assert field(r, "qwen3.rope.freq_base") == pytest.approx(500000.0)
    W = {t.name: dequant(t) for t in r.tensors}
    np.testing.assert_array_equal(W["blk.0.attn_q_norm.weight"], model.blocks[0].attn.q_norm.weight.detach().numpy())
    q = model.blocks[0].attn.qkv.weight.detach()[:model.cfg.d_model].numpy()
    np.testing.assert_array_equal(W["blk.0.attn_q.weight"], q)  # neox RoPE in llama.cpp: no permutation


def test_chat_template_and_end_of_turn(runs):
    from lmlab.data import chat
    from lmlab.data.chat_jinja import hf_chat_template
    _, tok = load(runs["noisy"])
    r = gguf.GGUFReader(export(runs, "noisy", "f32"))
    assert field(r, "tokenizer.chat_template") == hf_chat_template("chatml", tok)
    assert field(r, "tokenizer.ggml.eot_token_id") == tok.special_tokens["<|im_end|>"]
    assert field(r, "tokenizer.ggml.eos_token_id") == tok.eos_id
    # the template renders what lmlab's chat code renders (transformers' Jinja environment)
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # as transformers and llama-cpp-python set it up
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"}]
    text = env.from_string(field(r, "tokenizer.chat_template")).render(
        messages=msgs, add_generation_prompt=True, bos_token="<|bos|>", eos_token="<|eos|>")
    assert text == chat.render_text("chatml", msgs, add_generation_prompt=True, tokenizer=tok)


# ----------------------------------------------------------------------------- the stage's guards

def test_up_to_date_and_refusals(runs, tmp_path, capsys):
    path = export(runs, "trained", "f32")
    before = path.stat().st_mtime_ns
    export_stage.run(export_stage.Config(model=str(runs["trained"]), out=str(path), dtype="float32"))  # format from the suffix
    assert "up to date" in capsys.readouterr().out and path.stat().st_mtime_ns == before
    other = tmp_path / "notes.gguf"
    other.write_text("not a gguf")
    with pytest.raises(UserError, match="did not write"):
        export_stage.run(export_stage.Config(model=str(runs["trained"]), out=str(other), format="gguf"))
    assert other.read_text() == "not a gguf"
    foreign = tmp_path / "foreign.gguf"  # a GGUF, but not one lmlab wrote: not replaced either
    w = gguf.GGUFWriter(str(foreign), "llama")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UserError, match="did not write"):
        export_stage.run(export_stage.Config(model=str(runs["trained"]), out=str(foreign), format="gguf"))
    with pytest.raises(UserError, match="directory"):
        export_stage.run(export_stage.Config(model=str(runs["trained"]), out=str(tmp_path), format="gguf"))
    with pytest.raises(UserError, match="q8_0 is a GGUF quantization"):
        export_stage.run(export_stage.Config(model=str(runs["trained"]), out=str(tmp_path / "hf"), dtype="q8_0"))


def test_refuses_griffin(tmp_path):
    from lmlab.models import save_model
    from lmlab.models.family import build_model

    model = build_model({"family": "griffin", "preset": "micro", "vocab_size": 64, "width": 32, "num_heads": 4,
                         "mlp_expanded_width": 48, "attention_window_size": 16})
    save_model(model, tmp_path / "g")
    with pytest.raises(UserError, match="GGUF export supports the transformer family; llama.cpp has no "
                                        "RecurrentGemma"):
        export_stage.run(export_stage.Config(model=str(tmp_path / "g"), out=str(tmp_path / "g.gguf")))
    assert not (tmp_path / "g.gguf").exists()


def test_failed_write_leaves_the_old_file(runs, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    export_stage.run(export_stage.Config(model=str(runs["trained"]), out=str(out), dtype="f16"))
    old = out.read_bytes()

    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(UserError, match="out of disk space"):
        export_stage.run(export_stage.Config(model=str(runs["trained"]), out=str(out), dtype="q8_0"))
    assert out.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left


# ----------------------------------------------------------------------------- llama.cpp itself

LLAMA_SCRIPT = r'''
import json, sys, time
import numpy as np
import llama_cpp
req = json.load(sys.stdin)
# an f32 KV cache (llama.cpp's default is f16): the comparison is of the weights' precision alone
kv = {} if req.get("kv_f16") else {"type_k": 0, "type_v": 0}  # GGML_TYPE_F32
llm = llama_cpp.Llama(model_path=req["model"], n_ctx=req["n_ctx"], logits_all=True, verbose=False,
                      n_threads=req.get("threads", 2), n_threads_batch=req.get("threads", 2), seed=0, **kv)
out = {"version": llama_cpp.__version__, "n_vocab": llm.n_vocab(),
       "metadata": {k: v for k, v in llm.metadata.items() if not k.startswith("tokenizer.ggml.")}}
out["tokenize"] = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in req["texts"]]
out["tokenize_bos"] = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in req["texts"]]
out["detokenize"] = [llm.detokenize(ids).decode("utf-8", "replace") for ids in req["detokenize"]]
out["logits"] = []
for ids in req["logit_prompts"]:
    llm.reset()
    llm.eval(ids)
    out["logits"].append(np.asarray(llm.scores[:len(ids)], dtype=np.float64).tolist())
out["chat"] = []
if req.get("chats"):  # the file's chat template, as llama-cpp-python's create_chat_completion applies it
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], bos_token=req["bos_text"],
                              eos_token=req["eos_text"], add_generation_prompt=True)
    for messages in req["chats"]:
        r = fmt(messages=messages)
        out["chat"].append(llm.tokenize(r.prompt.encode("utf-8"), add_bos=not r.added_special, special=True))
out["eog"] = [bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), i))
              for i in req.get("eog_ids", [])]
out["greedy"], out["seconds"] = [], []
for ids in req["greedy_prompts"]:
    llm.reset()
    toks, t0 = [], time.perf_counter()
    for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        toks.append(int(t))
        if t == llm.token_eos() or len(toks) >= req["max_new"]:
            break
    out["seconds"].append(time.perf_counter() - t0)
    out["greedy"].append(toks)
json.dump(out, sys.stdout)
'''

DEFAULT_LLAMACPP_PYTHON = "/work/peers/llamacpp-venv/bin/python"


def _llamacpp_python() -> tuple[str | None, str]:
    """(a python that imports llama_cpp, or None; why not)."""
    candidates = [sys.executable, os.environ.get("LMLAB_LLAMACPP_PYTHON"), DEFAULT_LLAMACPP_PYTHON]
    tried = []
    for py in dict.fromkeys(c for c in candidates if c):
        if py != sys.executable and not Path(py).exists():
            tried.append(f"{py} (absent)")
            continue
        ok = subprocess.run([py, "-c", "import llama_cpp"], capture_output=True, timeout=120).returncode == 0
        if ok:
            return py, ""
        tried.append(f"{py} (no llama_cpp)")
    return None, ("llama-cpp-python not found: pip install llama-cpp-python, or set LMLAB_LLAMACPP_PYTHON; tried "
                  + ", ".join(tried))


@pytest.fixture(scope="module")
def llamacpp():
    py, why = _llamacpp_python()
    if py is None:
        pytest.skip(why)

    def run(**req):
        p = subprocess.run([py, "-c", LLAMA_SCRIPT], input=json.dumps(req), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout)
    return run


def our_greedy(model, tok, ids, n) -> list[int]:
    from lmlab.infer.engine import generate_ids
    return [s[0] for s in generate_ids(model, [ids], n, temperature=0.0, eos_id=tok.eos_id)]


@pytest.mark.parametrize("which", ["noisy", "bpe"])
def test_llama_cpp_tokenizes_as_lmlab(runs, llamacpp, which):
    """llama.cpp's tokenizer (special tokens parsed) gives lmlab's ids, bos added once, and decodes alike."""
    from lmlab.data.corpus import iter_corpus_texts

    model, tok = load(runs[which])
    corpus = runs["root"] / "pipe" / "corpus"
    texts = TEXTS + [d[:2000] for _, d in zip(range(20), iter_corpus_texts(corpus))]
    res = llamacpp(model=str(export(runs, which, "f32")), n_ctx=model.cfg.max_seq_len, texts=texts,
                   detokenize=[tok.encode(t) for t in texts], logit_prompts=[], greedy_prompts=[], max_new=0)
    for text, got, got_bos in zip(texts, res["tokenize"], res["tokenize_bos"]):
        assert got == tok.encode(text), text
        assert got_bos == [tok.bos_id] + tok.encode(text), text
    im_end = tok.special_tokens["<|im_end|>"]
    for text, got in zip(texts, res["detokenize"]):  # llama.cpp leaves control tokens out: <|im_end|> too
        assert got == tok.decode([i for i in tok.encode(text) if i != im_end]), text


def test_llama_cpp_known_tokenizer_differences(runs, llamacpp):
    """The two inputs on which llama.cpp and lmlab differ by design (docs/gguf.md, "Where llama.cpp
    tokenizes differently"); when this fails, llama.cpp changed and that section needs updating."""
    from lmlab.data.tokenizer import TEXT_BREAK

    _, tok = load(runs["noisy"])
    texts = ["a<unk>b", f"x{TEXT_BREAK}y"]
    res = llamacpp(model=str(export(runs, "noisy", "f32")), n_ctx=64, texts=texts, detokenize=[],
                   logit_prompts=[], greedy_prompts=[], max_new=0)
    unk, brk = res["tokenize"]
    assert unk == tok.encode("a") + [0] + tok.encode("b")  # llama.cpp matches the unknown piece's text
    assert tok.encode("a<unk>b") == tok.encode("a<unk>b".replace("<unk>", "<" + TEXT_BREAK + "unk>"))  # lmlab: text
    byte_ids = [tok._backend.piece_to_id(f"<0x{b:02X}>") for b in TEXT_BREAK.encode("utf-8")]
    assert brk == tok.encode("x") + byte_ids + tok.encode("y")  # llama.cpp: the character, as 3 byte tokens
    assert tok.encode(texts[1]) == tok.encode("x") + tok.encode("y")  # lmlab drops it and splits there


# (run, dtype, llama.cpp's KV cache) -> the largest |logit difference| / max |logit| allowed. Measured on
# these models: f32 1.3e-6 (f32 cache) and 1.7e-3 (f16 cache), f16 3e-3, bf16 2.8e-2, q8_0 7e-2 (llama.cpp
# quantizes the activations to 8 bits too, not only the weights)
LOGIT_CASES = {
    ("noisy", "f32", "f32"): 1e-4, ("bpe", "f32", "f32"): 1e-4, ("qwen3", "f32", "f32"): 1e-4,
    ("qwen2", "f32", "f32"): 1e-4,
    ("noisy", "f32", "f16"): 1e-2,  # llama.cpp's default f16 KV cache
    ("noisy", "f16", "f32"): 1e-2, ("bpe", "f16", "f32"): 1e-2, ("qwen3", "f16", "f32"): 1e-2,
    ("noisy", "bf16", "f32"): 6e-2, ("noisy", "q8_0", "f32"): 0.15,
}


@pytest.mark.parametrize("which,dtype,kv", list(LOGIT_CASES), ids=["-".join(c) for c in LOGIT_CASES])
def test_llama_cpp_logits_and_greedy_match_lmlab(runs, llamacpp, which, dtype, kv):
    """llama.cpp's logits at every prompt position are ours; greedy decoding gives our engine's tokens
    (f32 exactly; f16 may flip only a near tie; bf16 / q8_0: logits only)."""
    from lmlab.infer.engine import encode_prompt

    model, tok = load(runs[which])
    prompts = [encode_prompt(tok, p) for p in PROMPTS]
    n_new = min(24, model.cfg.max_seq_len - max(map(len, prompts)))
    res = llamacpp(model=str(export(runs, which, dtype)), n_ctx=model.cfg.max_seq_len, texts=PROMPTS, detokenize=[],
                   logit_prompts=prompts, greedy_prompts=prompts, max_new=n_new, kv_f16=kv == "f16")
    assert res["tokenize_bos"] == prompts  # llama.cpp's own tokenizer gives the same prompt ids
    tol = LOGIT_CASES[(which, dtype, kv)]
    for ids, got in zip(prompts, res["logits"]):
        ours = our_logits(model, ids)
        err = np.abs(np.asarray(got) - ours).max() / np.abs(ours).max()
        assert err <= tol, (which, dtype, kv, err)
    if dtype in ("bf16", "q8_0"):
        return
    differ = 0
    for ids, got in zip(prompts, res["greedy"]):
        ours = our_greedy(model, tok, ids, n_new)
        assert len(set(ours)) > 1  # not a degenerate repetition: the comparison means something
        if dtype == "f32" and kv == "f32":
            assert got == ours, (tok.decode(ids), got, ours)
        elif got != ours:  # a lower precision may flip a near tie: llama.cpp's pick is (nearly) our best there
            i = next(j for j, (a, b) in enumerate(zip(got, ours)) if a != b)
            logits = our_logits(model, ids + ours[:i])[-1]
            assert logits[ours[i]] - logits[got[i]] <= 2 * tol * np.abs(logits).max(), (which, dtype, i)
            differ += 1
    assert differ <= 1


def test_llama_cpp_chat_template_and_end_of_turn(runs, llamacpp):
    """The exported chat template, rendered by llama-cpp-python and tokenized by llama.cpp, gives the ids
    lmlab's chat code gives (bos once); llama.cpp stops at <|im_end|> as at eos, and not at <|im_start|>."""
    from lmlab.data import chat

    _, tok = load(runs["noisy"])
    chats = [[{"role": "user", "content": "What is 2+2?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]]
    im_start, im_end = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    res = llamacpp(model=str(export(runs, "noisy", "f32")), n_ctx=64, texts=[], detokenize=[], logit_prompts=[],
                   greedy_prompts=[], max_new=0, chats=chats, bos_text="<|bos|>", eos_text="<|eos|>",
                   eog_ids=[tok.eos_id, im_end, im_start])
    for messages, got in zip(chats, res["chat"]):
        assert got == chat.prompt_ids("chatml", messages, tok)
    assert res["eog"] == [True, True, False]


def test_qwen2_architecture_with_biases(runs):
    model, _ = load(runs["qwen2"])
    r = gguf.GGUFReader(export(runs, "qwen2", "q8_0"))
    assert field(r, "general.architecture") == "qwen2"
    W = {t.name: (dequant(t), t.tensor_type.name) for t in r.tensors}
    c, hd = model.cfg, model.head_dim
    bias = model.blocks[1].attn.qkv.bias.detach().double().numpy()
    got = np.concatenate([W[f"blk.1.attn_{n}.bias"][0] for n in "qkv"])
    np.testing.assert_array_equal(got, bias.astype(np.float32))  # biases stay f32 in every dtype
    assert {W[f"blk.1.attn_{n}.bias"][1] for n in "qkv"} == {"F32"}
    assert W["blk.1.attn_k.bias"][0].shape == (c.n_kv_head * hd,)
