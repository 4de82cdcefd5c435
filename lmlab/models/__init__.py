"""Models and their files on disk.

A model directory holds `model.safetensors` (the weights), `model.json` (the resolved
`ModelConfig`) and, for a trained run, `tokenizer/` and `manifest.json` (kind "model").

    from lmlab.models import save_model, load_model
    save_model(model, "runs/my_model")                       # weights + config, each file atomic
    model, tokenizer, manifest = load_model("runs/my_model")  # manifest is {} when absent
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lmlab.errors import UserError

WEIGHTS = "model.safetensors"
CONFIG = "model.json"


def _unwrap(model):
    """The plain Transformer behind torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_model(model, out_dir: str | Path) -> None:
    """Write `model.safetensors` and `model.json` into `out_dir`, each via temp-then-rename.

    A tied output head is the embedding matrix; it is stored once (as `embed.weight`).
    """
    from safetensors.torch import save_file

    model = _unwrap(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    tmp = out / f".{WEIGHTS}.tmp-{os.getpid()}"
    try:
        save_file(state, str(tmp), metadata={"format": "pt", "lmlab": "transformer"})
        os.replace(tmp, out / WEIGHTS)
    finally:
        tmp.unlink(missing_ok=True)
    from lmlab.artifacts import write_json_atomic
    write_json_atomic(out / CONFIG, model.cfg.model_dump(mode="json"))


def load_weights(model_dir: str | Path, device: str | torch.device = "cpu"):
    """Build the Transformer from `model.json` and fill it from `model.safetensors`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lmlab.models.transformer import Transformer, resolve_model_config

    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"model directory not found: {d} (train one with `lmlab pretrain`, or fix the path)")
    cfg_path, w_path = d / CONFIG, d / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise UserError(f"{p} is missing; {d} is not a model directory (expected {CONFIG} and {WEIGHTS})")
    try:
        cfg = resolve_model_config(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e}); the model directory is damaged, re-export or retrain it") from None
    try:
        state = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{w_path} cannot be read ({e}); the file is damaged or incomplete, retrain or restore it") from None
    model = Transformer(cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{w_path} does not match {cfg_path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval()


def load_model(run_dir: str | Path, device: str | torch.device = "cpu"):
    """-> (model, tokenizer, manifest) from a model run dir; manifest is {} if there is none."""
    from lmlab.artifacts import read_manifest

    d = Path(run_dir)
    model = load_weights(d, device)
    tok_dir = d / "tokenizer"
    if not tok_dir.is_dir():
        raise UserError(f"{tok_dir} is missing; a model run dir must hold a copy of its tokenizer")
    from lmlab.data.tokenizer import Tokenizer  # lazy: keeps `import lmlab.models` light
    tokenizer = Tokenizer.load(tok_dir)
    return model, tokenizer, read_manifest(d) or {}
