"""Export a transformer model to one GGUF file, for llama.cpp, Ollama, LM Studio and friends.

    lmlab export runs/model out=runs/model.gguf format=gguf dtype=q8_0     # f32 | f16 | bf16 | q8_0

(`format` may be left out when `out` ends in `.gguf`.) The file holds what `convert_hf_to_gguf.py`
of llama.cpp would write for our Hugging Face export (lmlab.models.hf), without the detour:

- architecture `llama`; `qwen3` for a model with QK-norm (llama.cpp's qwen3 graph RMS-normalises
  each query/key head before RoPE, as we do), `qwen2` for q/k/v biases without QK-norm; with
  every `{arch}.*` hyperparameter;
- the weights under llama.cpp's tensor names (those gguf's TensorNameMap gives the HF names). Our
  RoPE rotates halves (HF's `rotate_half`, llama.cpp's "neox" style); llama.cpp's `llama`
  graph rotates adjacent pairs ("norm" style), so q/k rows are permuted within each head exactly
  as convert_hf_to_gguf.py's `LlamaModel.permute` does (qwen2/qwen3 are neox: nothing permuted);
- norms and biases always f32; matrices in `dtype` (q8_0 through gguf's own quantizer, bit-exact with
  ggml's; a matrix whose rows are not a multiple of 32 falls back to f16, as llama.cpp's does);
  a tied output head is left out, and llama.cpp reuses token_embd;
- the tokenizer: SentencePiece models as `tokenizer.ggml.model = llama` (pieces, scores, types;
  no space prefix, as lmlab trains them), byte-level BPE as `gpt2` (tokens, merges, types,
  pre-tokenizer `gpt-2`); bos/eos/pad as control tokens and the chat markers as user-defined ones
  (`special_token_types`); bos/eos/pad/unk ids, add_bos_token (lmlab's prompts start with bos,
  as its training documents do), and for a chat model (chat.json) the Jinja chat template and
  the end-of-turn token as `tokenizer.ggml.eot_token_id`.

The file is written to a temporary name beside `out` and renamed over it, so a failed export
never leaves half a file. `out` may be absent or a GGUF file an earlier `lmlab export` wrote
(it carries `lmlab.fingerprint`; the same model and dtype again is "up to date"); anything
else is refused. See docs/gguf.md for what llama.cpp and Ollama do with the file, and what
was checked against llama.cpp itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from lmlab.errors import UserError

# our dtype names (and the HF stage's) -> GGUF's
DTYPE_ALIASES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
FINGERPRINT_KEY = "lmlab.fingerprint"
GGUF_MAGIC = b"GGUF"


def gguf_dtype(dtype: str) -> str:
    """'f32' | 'f16' | 'bf16' | 'q8_0' for a dtype name of either stage (float16 -> f16, ...)."""
    d = DTYPE_ALIASES.get(dtype, dtype)
    if d not in GGUF_DTYPES:
        raise UserError(f"dtype={dtype} is not a GGUF weight type; use one of {', '.join(GGUF_DTYPES)}")
    return d


def _qtype(name: str):
    import gguf
    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[name]


def _file_type(name: str) -> int:
    import gguf
    return int({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[name])


def _import_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("GGUF export needs the `gguf` package: pip install 'gguf>=0.10'") from None
    return gguf


# ----------------------------------------------------------------------------- family

NOT_GGUF = ("GGUF export supports the transformer family; llama.cpp has no {what}, so a '{family}' model cannot "
            "be written as GGUF{hint}")
_NO_LLAMACPP = {"griffin": ("RecurrentGemma/Griffin architecture (RG-LRU recurrence with local attention)",
                            "; export it to Hugging Face instead: lmlab export RUN_DIR out=DIR (format=hf)"),
                "trm": ("tiny recursive reasoning model (a puzzle model, not a language model)", "")}


def refuse_family(family: str, where) -> None:
    """UserError unless `family` is the transformer (the only family llama.cpp runs)."""
    if family == "transformer":
        return
    what, hint = _NO_LLAMACPP.get(family, (f"'{family}' architecture", ""))
    raise UserError(f"{where}: " + NOT_GGUF.format(what=what, family=family, hint=hint))


def check_family_file(src: Path) -> None:
    """Refuse, from model.json and before loading anything, a family that llama.cpp does not run."""
    from lmlab.models.family import split_model_json

    try:
        family, _ = split_model_json(json.loads((src / "model.json").read_text()))
    except (OSError, ValueError):
        return  # an adapter run or a broken dir: load_model explains, and the loaded model is checked
    refuse_family(family, src)


def arch_of(cfg) -> str:
    """'llama'; 'qwen3' for a model with QK-norm, 'qwen2' for q/k/v biases without it (the HF export's
    mapping). llama.cpp runs qwen2 and qwen3 with "neox" RoPE and loads q/k/v biases for both."""
    if getattr(cfg, "attn_sink", False):
        raise UserError("this model has learned attention sinks (model.attn_sink), which llama.cpp's llama, qwen2 "
                        "and qwen3 architectures lack; it cannot be written as GGUF (lmlab serve runs it as it is)")
    if getattr(cfg, "nope_layers", None):
        # llama.cpp's smollm3 graph fixes its NoPE layers itself; ours are not written, so refuse
        raise UserError(f"this model has layers without the rotary embedding (model.nope_layers={cfg.nope_layers}, "
                        f"as SmolLM3); lmlab does not write them as GGUF. Export it to Hugging Face (`lmlab export "
                        f"RUN_DIR out=DIR`) and convert that with llama.cpp's convert_hf_to_gguf.py")
    if cfg.qk_norm:
        return "qwen3"
    return "qwen2" if getattr(cfg, "attn_bias", False) else "llama"


# ----------------------------------------------------------------------------- weights

def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection (n_head*hd, d) from the rotate-half RoPE layout (HF, ours) to
    the adjacent-pair layout of llama.cpp's `llama` graph: within each head, row j of the first
    half goes to 2j and row j of the second half to 2j+1 (convert_hf_to_gguf.py's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_rope` (for reading a GGUF back)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# HF Llama/Qwen3 names (lmlab.models.hf.to_hf_state_dict) -> llama.cpp's, as gguf's TensorNameMap maps them
# for convert_hf_to_gguf.py; spelled out here so that any gguf version works (qwen3 is in its table
# only from 2025 on)
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of an HF Llama/Qwen tensor: model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight
    (and .bias alike). UserError for a tensor that has none here."""
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    parts = hf_name.split(".")
    inner = ".".join(parts[3:-1])
    if parts[:2] == ["model", "layers"] and parts[-1] in ("weight", "bias") and inner in GGUF_LAYER_NAMES:
        return f"blk.{parts[2]}.{GGUF_LAYER_NAMES[inner]}.{parts[-1]}"
    raise UserError(f"GGUF export has no llama.cpp tensor for {hf_name}; this model uses a feature the export "
                    f"does not map yet")


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """The model's parameters under llama.cpp's names, float32, q/k permuted for `llama`."""
    from lmlab.models.hf import to_hf_state_dict

    cfg = model.cfg
    arch = arch_of(cfg)
    out: dict[str, torch.Tensor] = {}
    for hf_name, t in to_hf_state_dict(model).items():
        t = t.detach().float().cpu()
        if hf_name.endswith("self_attn.o_proj.bias"):  # the HF export's zeros for Qwen3's attention_bias
            if bool(t.any()):
                raise UserError(f"{hf_name} is not zero; llama.cpp's {arch} graph has no output-projection bias")
            continue
        if arch == "llama" and hf_name.endswith("self_attn.q_proj.weight"):
            t = permute_rope(t, cfg.n_head)
        elif arch == "llama" and hf_name.endswith("self_attn.k_proj.weight"):
            t = permute_rope(t, cfg.n_kv_head)
        out[gguf_name(hf_name)] = t.contiguous()
    return out


def tensor_dtype(name: str, shape, dtype: str) -> str:
    """The GGUF type one tensor is stored in: norms (1-D) f32; q8_0 needs rows of 32k elements."""
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return "f32"
    if dtype == "q8_0" and shape[-1] % 32:
        return "f16"
    return dtype


def encode_tensor(t: torch.Tensor, kind: str) -> np.ndarray:
    """float32 tensor -> the array gguf's writer stores for `kind` (raw blocks for bf16 / q8_0)."""
    import gguf.quants

    return gguf.quants.quantize(t.numpy().astype(np.float32, copy=False), _qtype(kind))


# ----------------------------------------------------------------------------- tokenizer

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _proto_fields(buf: bytes) -> dict[int, list]:
    """Top-level fields of a protobuf message: {number: [varint or bytes, ...]} (no schema needed)."""
    fields: dict[int, list] = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wire == 1:
            v, i = buf[i:i + 8], i + 8
        elif wire == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(num, []).append(v)
    return fields


def sentencepiece_spec(sp) -> dict:
    """What llama.cpp needs from a SentencePiece ModelProto: the model type, the normalizer name and
    its add_dummy_prefix / remove_extra_whitespaces / escape_whitespaces flags (proto2 defaults)."""
    top = _proto_fields(sp.serialized_model_proto())
    trainer = _proto_fields(top[2][0]) if 2 in top else {}
    norm = _proto_fields(top[3][0]) if 3 in top else {}
    types = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
    return {
        "model_type": types.get(trainer.get(3, [1])[0], "unknown"),
        "normalizer": norm.get(1, [b"nmt_nfkc"])[0].decode(),
        "add_dummy_prefix": bool(norm.get(3, [1])[0]),
        "remove_extra_whitespaces": bool(norm.get(4, [1])[0]),
        "escape_whitespaces": bool(norm.get(5, [1])[0]),
    }


# Token texts that llama.cpp takes for an end of generation by name (llama-vocab.cpp), forcing them to
# CONTROL with a warning when they are not
LLAMA_CPP_EOG_TEXTS = ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<|end_of_text|>")


def special_token_types(tokenizer) -> dict[int, int]:
    """GGUF token types of lmlab's special tokens, so that llama.cpp treats each as lmlab does.

    bos/eos/pad are CONTROL: matched in text only when llama.cpp parses special tokens (llama-server
    and llama-cli do for prompts; lmlab always matches them) and left out of decoded text, as
    `Tokenizer.decode` leaves them out. The text-like ones (chat markers, reserved tokens) are
    USER_DEFINED: always matched in text and kept when decoding, as lmlab does, so that a stop string
    such as `<|im_start|>` is seen in generated text. An end-of-turn token (`<|im_end|>`) is CONTROL:
    llama.cpp makes it one anyway, since it ends generation like eos.
    """
    from gguf import TokenType

    from lmlab.data.tokenizer import TEXT_SPECIALS_IN

    text_like = set(TEXT_SPECIALS_IN(tokenizer.special_tokens))
    return {i: int(TokenType.USER_DEFINED if t in text_like and t not in LLAMA_CPP_EOG_TEXTS else TokenType.CONTROL)
            for t, i in tokenizer.special_tokens.items()}


def _sentencepiece_vocab(tokenizer) -> dict:
    from gguf import TokenType

    sp = tokenizer._backend
    spec = sentencepiece_spec(sp)
    if spec["model_type"] != "bpe":
        raise UserError(f"{tokenizer.path}: a SentencePiece {spec['model_type']} model; llama.cpp's `llama` tokenizer "
                        f"merges pieces by score as SentencePiece BPE does, so GGUF export needs a BPE model "
                        f"(every tokenizer `lmlab tokenizer` trains is one)")
    if not spec["escape_whitespaces"]:
        raise UserError(f"{tokenizer.path}: SentencePiece model without whitespace escaping ('▁'), which llama.cpp's "
                        f"`llama` tokenizer always applies")
    # SentencePiece's piece types (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6) are
    # GGUF's token types, number for number; special_token_types settles lmlab's special tokens.
    kinds = [_proto_fields(p).get(3, [int(TokenType.NORMAL)])[0] for p in _proto_fields(sp.serialized_model_proto())[1]]
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    scores = [float(sp.get_score(i)) for i in range(sp.get_piece_size())]
    types = [int(k) for k in kinds]
    for i, t in special_token_types(tokenizer).items():
        types[i] = t
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "types": types,
            "unk_id": sp.unk_id() if sp.unk_id() >= 0 else None,
            "add_space_prefix": spec["add_dummy_prefix"],
            "remove_extra_whitespaces": spec["remove_extra_whitespaces"], "normalizer": spec["normalizer"]}


def _bpe_vocab(tokenizer) -> dict:
    from gguf import TokenType

    spec = json.loads(Path(tokenizer.model_file).read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model type {model.get('type')!r} (llama.cpp's gpt2 tokenizer is BPE)")
    if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)):
        problems.append(f"pre-tokenizer {json.dumps(pre)[:120]} (only GPT-2's ByteLevel regex split without a prefix "
                        f"space, which `lmlab tokenizer type=bpe` trains, has a llama.cpp pre-tokenizer, 'gpt-2', "
                        f"known to match)")
    if spec.get("normalizer"):
        problems.append("a normalizer (llama.cpp's gpt2 tokenizer has none)")
    if model.get("ignore_merges"):
        problems.append("ignore_merges")
    if problems:
        raise UserError(f"{tokenizer.model_file}: cannot be written as a llama.cpp tokenizer exactly: "
                        f"{'; '.join(problems)}")
    backend = tokenizer._backend
    vocab = backend.get_vocab(with_added_tokens=True)
    size = backend.get_vocab_size(with_added_tokens=True)
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    specials = special_token_types(tokenizer)
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        tokens.append(by_id[i])
        if i in specials:
            types.append(specials[i])
        elif i in added:  # another added token: special ones are control tokens, as in convert_hf_to_gguf.py
            types.append(int(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "types": types, "merges": merges,
            "unk_id": None, "add_space_prefix": False}


def tokenizer_fields(tokenizer, n_vocab: int) -> dict:
    """The `tokenizer.ggml.*` content for an lmlab Tokenizer, padded to the model's n_vocab rows."""
    from gguf import TokenType

    v = _sentencepiece_vocab(tokenizer) if tokenizer.type == "sentencepiece" else _bpe_vocab(tokenizer)
    if len(v["tokens"]) > n_vocab:
        raise UserError(f"the tokenizer has {len(v['tokens'])} tokens but the model only {n_vocab} embedding rows")
    for i in range(len(v["tokens"]), n_vocab):  # rows the tokenizer never produces
        v["tokens"].append(f"[PAD{i}]")
        v["types"].append(int(TokenType.UNUSED))
        if "scores" in v:
            v["scores"].append(-1000.0)
    ids = {k: getattr(tokenizer, k, None) for k in ("bos_id", "eos_id", "pad_id")}
    v.update({k: (i if i is not None and i >= 0 else None) for k, i in ids.items()})
    return v


# ----------------------------------------------------------------------------- writing

def write_gguf(model, path: str | Path, dtype: str = "f32", tokenizer=None, chat_template: str | None = None,
               name: str = "lmlab", extra: dict[str, str] | None = None) -> dict:
    """Write `model` (a Transformer) as one GGUF file at `path` (not atomically: `run` renames).

    `chat_template`: an lmlab.data.chat template name, written as Jinja with the end-of-turn id.
    `extra`: more string keys (lmlab.*). Returns {"architecture", "tensors": {name: gguf type},
    "notes": [what llama.cpp will do differently, for the user]}.
    """
    gguf = _import_gguf()
    refuse_family(getattr(model, "family", "transformer"), "model")
    dtype = gguf_dtype(dtype)
    cfg = model.cfg
    arch = arch_of(cfg)
    hd = cfg.d_model // cfg.n_head

    notes: list[str] = []
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type(_file_type(dtype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(cfg.vocab_size)

    if tokenizer is not None:
        v = tokenizer_fields(tokenizer, cfg.vocab_size)
        w.add_tokenizer_model(v["model"])
        w.add_tokenizer_pre(v["pre"])
        w.add_token_list(v["tokens"])
        if "scores" in v:
            w.add_token_scores(v["scores"])
        w.add_token_types(v["types"])
        if v.get("merges"):
            w.add_token_merges(v["merges"])
        if v["model"] == "llama":
            w.add_add_space_prefix(v["add_space_prefix"])
            w.add_remove_extra_whitespaces(v["remove_extra_whitespaces"])
            if v["normalizer"] != "identity":
                notes.append(f"the SentencePiece model normalizes text ({v['normalizer']}) and llama.cpp does not: "
                             f"text that the normalizer changes (e.g. full-width forms) tokenizes differently there")
        for key, add in (("bos_id", w.add_bos_token_id), ("eos_id", w.add_eos_token_id),
                         ("pad_id", w.add_pad_token_id), ("unk_id", w.add_unk_token_id)):
            if v.get(key) is not None:
                add(int(v[key]))
        w.add_add_bos_token(v["bos_id"] is not None)  # lmlab prompts start with bos (training documents do)
        w.add_add_eos_token(False)
        if chat_template is not None:
            from lmlab.data import chat
            from lmlab.data.chat_jinja import hf_chat_template
            chat.check_template(chat_template, tokenizer)
            w.add_chat_template(hf_chat_template(chat_template, tokenizer))
            eot = [i for i in chat.end_of_turn_ids(chat_template, tokenizer) if i != v["eos_id"]]
            if eot:
                w.add_eot_token_id(int(eot[0]))
    elif chat_template is not None:
        raise ValueError("a chat template needs the tokenizer")
    for k, val in (extra or {}).items():
        w.add_string(k, str(val))

    kinds: dict[str, str] = {}
    for tname, t in gguf_tensors(model).items():
        kind = tensor_dtype(tname, tuple(t.shape), dtype)
        kinds[tname] = kind
        w.add_tensor(tname, encode_tensor(t, kind), raw_dtype=_qtype(kind))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return {"architecture": arch, "tensors": kinds, "notes": notes}


def read_fingerprint(path: str | Path) -> str | None:
    """`lmlab.fingerprint` of a GGUF file that `lmlab export` wrote; None for any other file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                return None
        from gguf import GGUFReader
        field = GGUFReader(str(path), "r").get_field(FINGERPRINT_KEY)
    except Exception:  # unreadable or damaged: not ours to replace
        return None
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def _is_lmlab_gguf(path: Path) -> bool:
    return read_fingerprint(path) is not None


# ----------------------------------------------------------------------------- the stage

def export_gguf(cfg) -> Path:
    """`lmlab export RUN_DIR out=FILE.gguf format=gguf dtype=...` (cfg: lmlab.models.export.Config)."""
    from lmlab import artifacts
    from lmlab.data.chat import load_chat_template
    from lmlab.models import WEIGHTS, load_model

    _import_gguf()
    if not cfg.model:
        raise UserError("no model given; run `lmlab export RUN_DIR out=model.gguf format=gguf`")
    if not cfg.out:
        raise UserError("no output file given; add out=model.gguf")
    dtype = gguf_dtype(cfg.dtype)
    src, out = Path(cfg.model), Path(cfg.out)
    if not src.is_dir():
        raise UserError(f"model directory {src} not found; give the run directory of `lmlab pretrain` (or sft/dpo)")
    artifacts.check_out_file(out, "export", _is_lmlab_gguf, "model.gguf")
    manifest_in = artifacts.read_manifest(src) or {}
    in_fp = manifest_in.get("fingerprint") or (artifacts.sha256_file(src / WEIGHTS)
                                               if (src / WEIGHTS).is_file() else "")
    chat_fp = artifacts.sha256_file(src / "chat.json") if (src / "chat.json").is_file() else None
    fp = artifacts.stage_fingerprint("gguf_export", {"dtype": dtype},
                                     {"model": in_fp, **({"chat": chat_fp} if chat_fp else {})})
    if out.is_file() and read_fingerprint(out) == fp:
        print(f"export: up to date ({out}), nothing to do")
        return out
    check_family_file(src)
    timer = artifacts.Timer()
    with timer("load"):
        model, tokenizer, _ = load_model(src)
    refuse_family(getattr(model, "family", "transformer"), src)
    template = load_chat_template(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with timer("write"):
            info = write_gguf(model, tmp, dtype, tokenizer, chat_template=template, name=src.resolve().name,
                              extra={FINGERPRINT_KEY: fp, "lmlab.source": str(src),
                                     "lmlab.tokenizer_sha256": getattr(tokenizer, "sha256", "") or ""})
        os.replace(tmp, out)
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    finally:
        tmp.unlink(missing_ok=True)
    for note in info["notes"]:
        print(f"export: note: {note}")
    size = out.stat().st_size
    chat_note = f", chat template {template}" if template else ""
    print(f"export: wrote {out} (GGUF {info['architecture']}, {model.num_params():,} params, {dtype}, "
          f"{size / 2**20:.1f} MiB{chat_note}; {timer.total()['total_s']:.1f}s)")
    return out
