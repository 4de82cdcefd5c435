"""`lmlab import`: bring an existing checkpoint in as an lmlab model directory.

    lmlab import path/to/hf_qwen2_instruct out=runs/qwen            # chat template detected
    lmlab import path/to/google-recurrentgemma-2b-it out=runs/rg2b_it template=gemma
    lmlab import recurrentgemma-2b.pt tokenizer=path/to/tokenizer.model out=runs/rg2b

Sources: a Hugging Face directory (config.json + safetensors) of a Llama (SmolLM and SmolLM2
are Llama), Mistral, Qwen2, Qwen3, SmolLM3 or RecurrentGemma model, or Google DeepMind's recurrentgemma
torch checkpoint (a `.pt` / `.safetensors` state_dict with `embedder.input_embedding`,
`blocks.N...` keys; its shape is read from the tensors, the window and soft cap are the
published 2b/9b ones unless set), or its Flax/Orbax checkpoint directory (Kaggle's
`recurrentgemma/flax/2b/1/2b`, read with the jax extra; tokenizer.model in or beside it).
Any other architecture (GPT-2, Phi, Gemma, Mixtral, ...) is refused before anything loads,
naming it; so is a feature lmlab's transformer does not compute exactly
(lmlab.models.hf.model_config_from_hf). A Mistral `sliding_window` shorter than its context
becomes max_seq_len (noted). SmolLM3's layers without RoPE become `nope_layers`.

The tokenizer: a Llama/Mistral/Qwen directory's `tokenizer.json` is taken unchanged, with
bos/eos/pad the model's own (tokenizer_config.json's tokens, else config.json's ids; a model
whose tokenizer has no bos, as Qwen's, starts sequences with config.json's bos_token_id, and
with eos when there is none); lmlab's chat templates find bos/eos under lmlab's names
(`<|bos|>`, `<|eos|>` alias the model's tokens) and `<|im_start|>`/`<|im_end|>` when the
tokenizer has them. A RecurrentGemma directory's `tokenizer.model` (SentencePiece, preferred:
Gemma's 256k vocabulary) or `tokenizer.json`, or `tokenizer=` (a file, or an lmlab tokenizer
directory), is imported as `lmlab tokenizer from_file=` does; a tokenizer larger than the
model's embedding table is refused. The output is what `lmlab pretrain` writes
(model.safetensors, model.json, tokenizer/, manifest.json), so every stage takes it: sft, eval,
generate, chat, export.

`template=` records the chat template an instruction-tuned model was trained with (chat.json).
Without it, the HF directory's own chat template (tokenizer_config.json's `chat_template`, or
chat_template.jinja) is compared with each lmlab template on a few sample conversations,
token id for token id (transformers' `apply_chat_template` against lmlab's rendering): the
first that matches exactly is recorded; when none does, nothing is guessed: the model is
imported without one, with a note naming what was found and the closest difference. The
thinking templates (think, qwen3 for Qwen3's template, smollm3 for SmolLM3's) are tried first
and must also render replies that think and `enable_thinking=False` prompts exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import Field

from lmlab import artifacts
from lmlab.config import Strict
from lmlab.errors import UserError

POSITIONAL = ("src", "the checkpoint to import: a Hugging Face directory or a DeepMind recurrentgemma .pt file")
KIND = "model"


class Config(Strict):
    src: str = Field("", description="a Hugging Face model directory (llama incl. SmolLM/SmolLM2, mistral, qwen2, "
                     "qwen3, smollm3, recurrent_gemma) or a DeepMind recurrentgemma torch checkpoint "
                     "(.pt / .safetensors)")
    out: str = Field("", description="the lmlab model directory to write")
    tokenizer: Optional[str] = Field(None, description="tokenizer.model / tokenizer.json / an lmlab tokenizer dir; "
                                     "default: the one in the source directory")
    template: Optional[str] = Field(None, description="chat template the model was tuned with (e.g. gemma for "
                                    "recurrentgemma-2b-it), recorded in chat.json; default: the HF directory's "
                                    "own chat template when an lmlab template renders it exactly")
    attention_window_size: Optional[int] = Field(None, ge=1, description="DeepMind checkpoints: the local-attention "
                                                 "window (default the published 2048)")
    max_seq_len: Optional[int] = Field(None, ge=1, description="DeepMind checkpoints: the context the model is used "
                                       "with (default 8192)")


# HF model_types that map onto lmlab's transformer
TRANSFORMER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, {} when the file is absent; UserError naming it when unreadable."""
    import json

    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({type(e).__name__}: {e})") from None
    return d if isinstance(d, dict) else {}


def check_source(src: Path, notes: list[str]) -> Optional[dict]:
    """An HF directory's config.json (None for a DeepMind checkpoint file), refusing an
    architecture lmlab does not map exactly before anything else is read."""
    from lmlab.models.griffin.orbax import is_orbax_dir

    if not src.is_dir() or is_orbax_dir(src):
        return None
    if not (src / "config.json").is_file():
        raise UserError(f"{src} holds no config.json; give a Hugging Face model directory, a DeepMind .pt file or a "
                        f"DeepMind Orbax checkpoint directory")
    c = _read_json(src / "config.json")
    if c.get("model_type") != "recurrent_gemma":
        from lmlab.models.hf import model_config_from_hf
        model_config_from_hf(c, str(src / "config.json"), notes)
    return c


def hf_tokenizer(folder: Path, hf_cfg: dict, notes: Optional[list[str]] = None):
    """`folder/tokenizer.json` of an HF model as an lmlab tokenizer, the file unchanged (no token is
    added: the embedding table has rows for its tokens only), bos/eos/pad the model's own.

    Each is tokenizer_config.json's (or special_tokens_map.json's) token, else config.json's (or
    generation_config.json's) id; no bos: eos starts sequences; no pad: eos. lmlab's chat
    templates name bos/eos `<|bos|>`/`<|eos|>`: those names alias the model's tokens in the
    special-token table, before the real names (which an export writes back)."""
    import shutil
    import tempfile

    from tokenizers import Tokenizer as HFTokenizer

    from lmlab import artifacts
    from lmlab.data import tokenizer as tk

    path = folder / tk.HF_FILE
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise UserError(f"{path} is not a Hugging Face tokenizer.json: {e}") from None
    size = tok.get_vocab_size(with_added_tokens=True)
    tok_cfgs = [_read_json(folder / "tokenizer_config.json"), _read_json(folder / "special_tokens_map.json")]
    model_cfgs = [hf_cfg, _read_json(folder / "generation_config.json")]

    def find(role: str) -> tuple[Optional[int], str]:
        for name, d in zip(("tokenizer_config.json", "special_tokens_map.json"), tok_cfgs):
            v = d.get(f"{role}_token")
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str) and tok.token_to_id(v) is not None:
                return tok.token_to_id(v), name
        for name, d in zip(("config.json", "generation_config.json"), model_cfgs):
            v = d.get(f"{role}_token_id")
            v = (v[0] if v else None) if isinstance(v, list) else v
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < size:
                return v, name
        return None, ""

    (bos, bos_from), (eos, _), (pad, _) = find("bos"), find("eos"), find("pad")
    if eos is None:
        raise UserError(f"{folder}: neither tokenizer_config.json nor config.json names an eos token (eos_token / "
                        f"eos_token_id) that {path.name} holds; lmlab needs one to end documents and replies")
    piece = tok.id_to_token
    if bos is None:
        bos = eos
        if notes is not None:
            notes.append(f"the tokenizer has no bos token: sequences start with eos {piece(eos)!r} ({eos})")
    elif bos_from in ("config.json", "generation_config.json") and notes is not None:
        notes.append(f"the tokenizer adds no bos token; lmlab starts sequences with {bos_from}'s bos_token_id "
                     f"{piece(bos)!r} ({bos})")
    pad = eos if pad is None else pad
    specials = {tk.BOS: bos, tk.EOS: eos, tk.PAD: pad}  # lmlab's names for the roles (chat templates use them)
    for t in tk.TEXT_SPECIALS + tk.GEMMA_TURN_TOKENS:
        if tok.token_to_id(t) is not None:
            specials[t] = tok.token_to_id(t)
    for i in (pad, eos, bos):  # the real names last: an export's tokenizer_config takes the last name of an id
        specials.pop(piece(i), None)
        specials[piece(i)] = i
    dest = Path(tempfile.mkdtemp(prefix="lmlab-tok-"))
    shutil.copy2(path, dest / tk.HF_FILE)
    artifacts.write_json_atomic(dest / tk.META, {
        "type": "bpe", "vocab_size": size, "bos_id": bos, "eos_id": eos, "pad_id": pad, "special_tokens": specials,
        "sha256": artifacts.sha256_file(dest / tk.HF_FILE)})
    return tk.Tokenizer.load(dest)


def _tokenizer(src: Path, given: Optional[str], hf_cfg: Optional[dict] = None, notes: Optional[list[str]] = None):
    from lmlab.data import tokenizer as tk

    if given:
        p = Path(given)
        if p.is_dir():
            return tk.Tokenizer.load(p)
        candidates = [p]
    else:
        folder = src if src.is_dir() else src.parent
        if hf_cfg is not None and hf_cfg.get("model_type") in TRANSFORMER_TYPES and (folder / tk.HF_FILE).is_file():
            return hf_tokenizer(folder, hf_cfg, notes)
        candidates = [folder / "tokenizer.model", folder / "tokenizer.json"]
        if src.is_dir() and hf_cfg is None:  # an Orbax checkpoint: Kaggle puts tokenizer.model beside it
            candidates += [src.parent / "tokenizer.model"]
    for f in candidates:
        if f.is_file():
            return tk.import_tokenizer(f)
    raise UserError(f"no tokenizer found for {src} (looked for {', '.join(str(c) for c in candidates)}); "
                    f"pass tokenizer=PATH (its tokenizer.model or tokenizer.json)")


# ----------------------------------------------------------------------------- chat template detection

# The sample conversations an HF chat template is compared on: (messages, add_generation_prompt).
_SAMPLE = [{"role": "system", "content": "You answer in one short sentence."},
           {"role": "user", "content": "What is the capital of France?"},
           {"role": "assistant", "content": "Paris is the capital of France."},
           {"role": "user", "content": "And of Italy, please?"},
           {"role": "assistant", "content": "It is Rome."}]
_CASES = [(_SAMPLE, False, "a conversation with a system message"),
          (_SAMPLE[1:], False, "a conversation without a system message"),
          (_SAMPLE[:4], True, "a generation prompt after a system message"),
          (_SAMPLE[1:4], True, "a generation prompt")]
# A thinking template (chat.THINKING_TEMPLATES) must also render these as transformers does:
# (messages, add_generation_prompt, thinking, what); thinking=False is `enable_thinking=False`.
_THINKING_REPLY = {"role": "assistant", "thinking": "Italy's capital is Rome.", "content": "It is Rome."}
_THINKING_CASES = [(_SAMPLE[:4] + [_THINKING_REPLY], False, True, "a conversation whose last reply thinks"),
                   (_SAMPLE[1:4] + [_THINKING_REPLY], False, True,
                    "a conversation without a system message whose last reply thinks"),
                   (_SAMPLE[:4], True, False, "a generation prompt with enable_thinking=False after a system message"),
                   (_SAMPLE[1:4], True, False, "a generation prompt with enable_thinking=False")]
# How a thinking reply is given to transformers: Qwen3's templates read `reasoning_content`, lmlab's
# exported ones `thinking`, and SmolLM3's, which reads neither, take the block in the content as
# the model writes it (`<think>\n...\n</think>\n` and the answer).
_HF_THINKING = {
    "reasoning_content": lambda m: {"role": m["role"], "content": m["content"], "reasoning_content": m["thinking"]},
    "thinking": lambda m: {"role": m["role"], "content": m["content"], "thinking": m["thinking"]},
    "inline": lambda m: {"role": m["role"], "content": f"<think>\n{m['thinking']}\n</think>\n{m['content']}"},
}
# What a chat template's text shows of its family, for the note when lmlab has no equivalent.
_MARKERS = [("<|start_header_id|>", "Llama-3 headers"), ("[INST]", "[INST] turns, as Llama-2 and Mistral"),
            ("<start_of_turn>", "Gemma turns"), ("<|im_start|>", "ChatML turns"),
            ("<|user|>", "<|user|> turns, as Zephyr and Phi-3"), ("<｜User｜>", "DeepSeek turns")]


def hf_chat_template_source(folder: Path) -> tuple[Optional[str], str]:
    """(the Jinja text, the file it is in) of an HF directory's chat template, or (None, "")."""
    t = _read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(t, list):  # named templates: transformers uses "default" when no tools are given
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    if isinstance(t, str) and t.strip():
        return t, "tokenizer_config.json"
    f = folder / "chat_template.jinja"
    if f.is_file() and f.read_text().strip():
        return f.read_text(), "chat_template.jinja"
    return None, ""


def detect_chat_template(folder: Path, tokenizer) -> tuple[Optional[str], Optional[str]]:
    """(the lmlab template the HF directory's chat template is, or None; a note when there is a
    chat template lmlab has no exact equivalent of). Exact: on every sample conversation
    (_CASES) that transformers' `apply_chat_template` renders, its token ids equal lmlab's
    (`chat.render` / `chat.prompt_ids` with `tokenizer`), and it renders those without a system
    message (a template may refuse a system role, as Gemma's does). A thinking template (think,
    qwen3, smollm3) must match on _THINKING_CASES too (replies that think, given to transformers in
    one of the _HF_THINKING ways, and prompts with `enable_thinking=False`); those are tried first,
    so a template that thinks is recorded as the thinking template it is (a non-thinking template
    cannot render `enable_thinking=False` as they do)."""
    from lmlab.data import chat

    source, where = hf_chat_template_source(folder)
    if source is None:
        return None, None
    desc = next((d for m, d in _MARKERS if m in source), "a format lmlab does not recognise")
    usable = []
    for name in chat.ALL_TEMPLATES:
        try:
            chat.check_template(name, tokenizer)
            usable.append(name)
        except UserError:
            pass
    advice = f"pass template=NAME to choose one ({', '.join(usable) or 'none fits this tokenizer'})"
    try:
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # a tokenizer transformers cannot load: say so, import without a template
        return None, (f"{where} has a chat template ({desc}), but transformers cannot load the tokenizer to compare it "
                      f"with lmlab's ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); imported "
                      f"without a chat template: {advice}")

    def theirs(msgs, gen, thinking=True):
        try:
            r = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen,
                                       **({} if thinking else {"enable_thinking": False}))
        except Exception:  # the template refuses this conversation (raise_exception), e.g. a system role
            return None
        return [int(i) for i in (r["input_ids"] if hasattr(r, "keys") else r)]

    want = [theirs(m, g) for m, g, _ in _CASES]
    if any(w is None for (m, _, _), w in zip(_CASES, want) if m[0]["role"] != "system"):
        return None, (f"{where} has a chat template ({desc}) that transformers cannot render on a plain "
                      f"user/assistant conversation; imported without a chat template: {advice}")
    want_thinking = None  # per way of giving transformers the thinking: its ids on each _THINKING_CASES (or [])
    best = None  # (rank, name, detail) of the closest template, for the note
    for name in sorted(usable, key=lambda n: n not in chat.THINKING_TEMPLATES):  # thinking templates first
        got = [chat.prompt_ids(name, m, tokenizer) if g else chat.render(name, m, tokenizer)[0] for m, g, _ in _CASES]
        pairs = [(o, t, what) for o, t, (_, _, what) in zip(got, want, _CASES) if t is not None]
        if name in chat.THINKING_TEMPLATES:
            if want_thinking is None:
                want_thinking = [[theirs([enc(x) if "thinking" in x else x for x in m], g, th) or []
                                  for m, g, th, _ in _THINKING_CASES] for enc in _HF_THINKING.values()]
            mine = [chat.prompt_ids(name, m, tokenizer, thinking=th) if g else chat.render(name, m, tokenizer)[0]
                    for m, g, th, _ in _THINKING_CASES]
            ways = [[(o, t, what) for o, t, (_, _, _, what) in zip(mine, w, _THINKING_CASES)] for w in want_thinking]
            pairs = pairs + max(ways, key=lambda ps: sum(o == t for o, t, _ in ps))
        if all(o == t for o, t, _ in pairs):
            return name, None
        if all(o[:1] == [tokenizer.bos_id] and o[1:] == t for o, t, _ in pairs):
            rank, detail = (len(pairs) + 1, f"it is lmlab's {name} except that lmlab starts the conversation with "
                            f"the bos token {hf.convert_ids_to_tokens(tokenizer.bos_id)!r}, which it does not write")
        else:
            o, t, what = next(x for x in pairs if x[0] != x[1])
            k = next((i for i, (a, b) in enumerate(zip(o, t)) if a != b), min(len(o), len(t)))
            show = lambda ids: hf.decode(ids[k:k + 12], skip_special_tokens=False)  # noqa: E731
            rank = sum(a == b for a, b, _ in pairs)
            detail = (f"closest is lmlab's {name}, but on {what} transformers renders {show(t)!r} where lmlab "
                      f"renders {show(o)!r}")
        if best is None or rank > best[0]:
            best = (rank, name, detail)
    return None, (f"{where} has a chat template lmlab has no exact equivalent of ({desc}"
                  + (f"; {best[2]}" if best and best[0] > 0 else "") + f"); imported without a chat template: {advice}")


def load_source(cfg: Config):
    """-> the model (float32) of `cfg.src`."""
    from lmlab.models.griffin.orbax import is_orbax_dir, load_orbax

    src = Path(cfg.src)
    overrides = {k: v for k, v in (("attention_window_size", cfg.attention_window_size),
                                   ("max_seq_len", cfg.max_seq_len)) if v is not None}
    if is_orbax_dir(src):
        return load_orbax(src, **overrides)
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise UserError(f"{src} holds no config.json; give a Hugging Face model directory or a DeepMind .pt file")
        from lmlab.models.hf import import_hf
        return import_hf(src, notes=[])[0]  # its notes were said by check_source
    if not src.is_file():
        raise UserError(f"checkpoint not found: {src}")
    from lmlab.models.griffin.checkpoints import load_deepmind
    return load_deepmind(src, **overrides)


def source_vocab_size(src: Path, hf_cfg: Optional[dict] = None) -> int:
    """The embedding rows of `src`, read without loading its weights (`hf_cfg`, the HF directory's
    config.json, or the DeepMind checkpoint's embedding shape: safetensors and mmap-ed .pt read
    only that; an Orbax checkpoint's metadata)."""
    from lmlab.models.griffin.orbax import is_orbax_dir, orbax_vocab_size

    if is_orbax_dir(src):
        return orbax_vocab_size(src)
    if src.is_dir():
        try:
            return int((hf_cfg if hf_cfg is not None else _read_json(src / "config.json"))["vocab_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{src / 'config.json'} does not give the model's vocab_size ({type(e).__name__}: {e}); "
                            f"give a Hugging Face model directory") from None
    from lmlab.models.griffin.checkpoints import config_from_deepmind, read_torch_checkpoint
    if src.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(src), "pt") as f:
                if "embedder.input_embedding" in f.keys():
                    return int(f.get_slice("embedder.input_embedding").get_shape()[0])
        except Exception as e:  # a damaged or foreign file: name it, no traceback
            raise UserError(f"{src} cannot be read as a safetensors checkpoint ({type(e).__name__}: {e})") from None
    sd = read_torch_checkpoint(src)  # a .pt is mmap-ed: only the embedding's header is read here
    if "embedder.input_embedding" in sd:
        return int(sd["embedder.input_embedding"].shape[0])
    return config_from_deepmind(sd, str(src)).vocab_size  # not DeepMind's layout: its error names the keys


def run(cfg: Config) -> Path:
    if not cfg.src:
        raise UserError("nothing to import: run `lmlab import SRC out=DIR`")
    if not cfg.out:
        raise UserError("no output directory given; add out=DIR")
    src, out = Path(cfg.src), Path(cfg.out)
    if not src.exists():
        raise UserError(f"checkpoint not found: {src}")
    artifacts.check_out(out, KIND, "import", inputs={"source": src})
    config = cfg.model_dump(mode="json")
    fp = artifacts.stage_fingerprint(KIND, {k: v for k, v in config.items() if k not in ("out",)},
                                     {"source": artifacts.stat_fingerprint(src)})
    if artifacts.is_up_to_date(out, fp):
        print(f"import: up to date ({out}), nothing to do")
        return out
    timer = artifacts.Timer()
    notes: list[str] = []
    hf_cfg = check_source(src, notes)  # an unsupported architecture is refused before anything loads
    made = cfg.tokenizer is None or not Path(cfg.tokenizer).is_dir()  # a temporary tokenizer dir, removed at the end
    with timer("tokenizer"):
        tokenizer = _tokenizer(src, cfg.tokenizer, hf_cfg, notes)
    try:
        return _write(cfg, src, out, config, fp, timer, tokenizer, hf_cfg, notes)
    finally:
        if made and tokenizer.path.name.startswith("lmlab-tok-"):
            import shutil
            shutil.rmtree(tokenizer.path, ignore_errors=True)


def _write(cfg: Config, src: Path, out: Path, config: dict, fp: str, timer, tokenizer, hf_cfg, notes) -> Path:
    from lmlab.data import chat
    from lmlab.models import save_model

    # checked before the weights load (and the template detection): a mismatch is found in a
    # second, not after minutes
    vocab = source_vocab_size(src, hf_cfg)
    if tokenizer.vocab_size > vocab:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's embedding table has "
                        f"{vocab} rows: they do not belong together; pass the model's own tokenizer (tokenizer=PATH)")
    template, detected = cfg.template, False
    if cfg.template:
        chat.check_template(cfg.template, tokenizer)
    elif hf_cfg is not None:
        template, note = detect_chat_template(src, tokenizer)
        detected = template is not None
        if note:
            notes.append(note)
    for n in notes:
        print(f"import: note: {n}")
    with timer("load"):
        model = load_source(cfg)
    names = {v: k for k, v in tokenizer.special_tokens.items()}
    special = {r: {"id": i, "token": names.get(i)} for r, i in
               (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id))}
    try:
        with artifacts.atomic_dir(out) as tmp:
            with timer("write"):
                save_model(model, tmp)
                tokenizer.copy_to(tmp / "tokenizer")
                if template:
                    chat.save_chat_template(tmp, template)
            artifacts.write_manifest(
                tmp, KIND, config, fp, verb="import", inputs={"source": {"path": str(src), "fingerprint": fp}},
                tokenizer_sha256=tokenizer.sha256, timings=timer.total(),
                stats={"family": model.family, "params": model.num_params(),
                       "non_embedding_params": model.num_params(non_embedding=True), "vocab_size": vocab,
                       "special_tokens": special, "chat_template": template,
                       "chat_template_from": ("detected" if detected else "template=") if template else None,
                       "notes": notes})
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    how = f", template {template}" + (" (detected from the HF chat template)" if detected else "") if template else ""
    print(f"import: wrote {out} ({model.family}, {model.num_params():,} params, tokenizer {tokenizer.vocab_size:,} "
          f"tokens{how})")
    return out
