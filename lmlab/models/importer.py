"""`lmlab import`: bring an existing checkpoint in as an lmlab model directory.

    lmlab import path/to/google-recurrentgemma-2b-it out=runs/rg2b_it template=gemma
    lmlab import recurrentgemma-2b.pt tokenizer=path/to/tokenizer.model out=runs/rg2b
    lmlab import path/to/hf_llama out=runs/llama

Sources: a Hugging Face directory (config.json + safetensors) of a Llama, Qwen3 or
RecurrentGemma model, or Google DeepMind's recurrentgemma torch checkpoint (a `.pt` /
`.safetensors` state_dict with `embedder.input_embedding`, `blocks.N...` keys; its shape is
read from the tensors, the window and soft cap are the published 2b/9b ones unless set). The
tokenizer is the source directory's `tokenizer.model` (SentencePiece, preferred: Gemma's
256k vocabulary) or `tokenizer.json`, or `tokenizer=` (a file, or an lmlab tokenizer
directory); a tokenizer larger than the model's embedding table is refused. The output is what
`lmlab pretrain` writes (model.safetensors, model.json, tokenizer/, manifest.json), so every
stage takes it: sft, eval, generate, chat, export. `template=` records the chat template an
instruction-tuned model was trained with (chat.json).
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
    src: str = Field("", description="a Hugging Face model directory (llama, qwen3, recurrent_gemma) or a DeepMind "
                     "recurrentgemma torch checkpoint (.pt / .safetensors)")
    out: str = Field("", description="the lmlab model directory to write")
    tokenizer: Optional[str] = Field(None, description="tokenizer.model / tokenizer.json / an lmlab tokenizer dir; "
                                     "default: the one in the source directory")
    template: Optional[str] = Field(None, description="chat template the model was tuned with (e.g. gemma for "
                                    "recurrentgemma-2b-it), recorded in chat.json")
    attention_window_size: Optional[int] = Field(None, ge=1, description="DeepMind checkpoints: the local-attention "
                                                 "window (default the published 2048)")
    max_seq_len: Optional[int] = Field(None, ge=1, description="DeepMind checkpoints: the context the model is used "
                                       "with (default 8192)")


def _tokenizer(src: Path, given: Optional[str]):
    from lmlab.data import tokenizer as tk

    if given:
        p = Path(given)
        if p.is_dir():
            return tk.Tokenizer.load(p)
        candidates = [p]
    else:
        folder = src if src.is_dir() else src.parent
        candidates = [folder / "tokenizer.model", folder / "tokenizer.json"]
    for f in candidates:
        if f.is_file():
            return tk.import_tokenizer(f)
    raise UserError(f"no tokenizer found for {src} (looked for {', '.join(str(c) for c in candidates)}); "
                    f"pass tokenizer=PATH (its tokenizer.model or tokenizer.json)")


def load_source(cfg: Config):
    """-> the model (float32) of `cfg.src`."""
    src = Path(cfg.src)
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise UserError(f"{src} holds no config.json; give a Hugging Face model directory or a DeepMind .pt file")
        from lmlab.models.hf import import_hf
        return import_hf(src)[0]
    if not src.is_file():
        raise UserError(f"checkpoint not found: {src}")
    from lmlab.models.griffin.checkpoints import load_deepmind
    overrides = {k: v for k, v in (("attention_window_size", cfg.attention_window_size),
                                   ("max_seq_len", cfg.max_seq_len)) if v is not None}
    return load_deepmind(src, **overrides)


def source_vocab_size(src: Path) -> int:
    """The embedding rows of `src`, read without loading its weights (config.json, or the
    DeepMind checkpoint's embedding shape: safetensors and mmap-ed .pt read only that)."""
    import json

    if src.is_dir():
        try:
            return int(json.loads((src / "config.json").read_text())["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
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
    from lmlab.data import chat
    from lmlab.models import save_model

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
    with timer("tokenizer"):
        tokenizer = _tokenizer(src, cfg.tokenizer)
    if cfg.template:
        chat.check_template(cfg.template, tokenizer)
    # checked before the weights load: a mismatch is found in a second, not after minutes
    vocab = source_vocab_size(src)
    if tokenizer.vocab_size > vocab:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's embedding table has "
                        f"{vocab} rows: they do not belong together; pass the model's own tokenizer (tokenizer=PATH)")
    with timer("load"):
        model = load_source(cfg)
    try:
        with artifacts.atomic_dir(out) as tmp:
            with timer("write"):
                save_model(model, tmp)
                tokenizer.copy_to(tmp / "tokenizer")
                if cfg.template:
                    chat.save_chat_template(tmp, cfg.template)
            artifacts.write_manifest(
                tmp, KIND, config, fp, verb="import", inputs={"source": {"path": str(src), "fingerprint": fp}},
                tokenizer_sha256=tokenizer.sha256, timings=timer.total(),
                stats={"family": model.family, "params": model.num_params(),
                       "non_embedding_params": model.num_params(non_embedding=True), "vocab_size": vocab})
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    print(f"import: wrote {out} ({model.family}, {model.num_params():,} params, tokenizer {tokenizer.vocab_size:,} "
          f"tokens{', template ' + cfg.template if cfg.template else ''})")
    return out
