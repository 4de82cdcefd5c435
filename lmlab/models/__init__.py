"""Models and their files on disk.

A model directory holds `model.safetensors` (the weights), `model.json` (the model's
family and its resolved config, lmlab.models.family) and, for a trained run, `tokenizer/` and `manifest.json` (kind "model").
A chat model (from `sft`/`dpo`) also holds `chat.json` (`{"template": name}`). A LoRA run
that was not merged holds `adapter/` (PEFT format) and `base.json` (`{"path", "format":
"lmlab" | "hf"}`, the base model it adapts) instead of `model.safetensors`.

    from lmlab.models import save_model, load_model
    save_model(model, "runs/my_model")                       # weights + config, each file atomic
    model, tokenizer, manifest = load_model("runs/my_model")  # manifest is {} when absent
    manifest.get("chat")                                     # chat.json's content, when there is one
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lmlab.errors import UserError

WEIGHTS = "model.safetensors"
CONFIG = "model.json"
BASE_POINTER = "base.json"
CHAT = "chat.json"


def unwrap(model):
    """The plain model behind torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_model(model, out_dir: str | Path) -> None:
    """Write `model.safetensors` and `model.json` into `out_dir`, each via temp-then-rename.

    A tied output head is the embedding matrix; it is stored once (as `embed.weight`).
    """
    from safetensors.torch import save_file

    model = unwrap(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tied = bool(getattr(model.cfg, "tie_embeddings", False))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    tmp = out / f".{WEIGHTS}.tmp-{os.getpid()}"
    try:
        # One metadata key only: safetensors writes the metadata map in a per-process hash order,
        # so two keys would make identical weights give different file bytes across runs.
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / WEIGHTS)
    finally:
        tmp.unlink(missing_ok=True)
    from lmlab.artifacts import write_json_atomic
    from lmlab.models.family import model_json
    write_json_atomic(out / CONFIG, model_json(model))


def load_weights(model_dir: str | Path, device: str | torch.device = "cpu", kind: str = "lm"):
    """Build the model of `model.json`'s family and fill it from `model.safetensors`.

    `kind` is the family kind the caller works with (lmlab.models.family): a language-model
    stage given a TRM (or the reverse) stops with a message naming the stages that take it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lmlab.models.family import get_family, split_model_json

    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"model directory not found: {d} (train one with `lmlab pretrain`, or fix the path)")
    cfg_path, w_path = d / CONFIG, d / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise UserError(f"{p} is missing; {d} is not a model directory (expected {CONFIG} and {WEIGHTS})")
    try:
        family, fields = split_model_json(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e}); the model directory is damaged, re-export or retrain it") from None
    fam = get_family(family)
    if fam.kind != kind:
        takes = "`lmlab trm` / `lmlab puzzle-eval`" if fam.kind == "puzzle" else "the language-model stages"
        raise UserError(f"{d} holds a '{family}' model, a {fam.kind} model; this stage needs a "
                        f"{'language' if kind == 'lm' else kind} model (a '{family}' model is used by {takes})")
    cfg = fam.config(fields)
    try:
        state = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{w_path} cannot be read ({e}); the file is damaged or incomplete, retrain or restore it") from None
    model = fam.build(cfg)
    tied = bool(getattr(cfg, "tie_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{w_path} does not match {cfg_path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval()


def write_base_pointer(run_dir: str | Path, base: str | Path, fmt: str = "lmlab") -> None:
    """Record which model an adapter-only run adapts (as given, and absolute as a fallback)."""
    from lmlab.artifacts import write_json_atomic
    write_json_atomic(Path(run_dir) / BASE_POINTER, {"path": str(base), "abs_path": str(Path(base).resolve()),
                                                     "format": fmt})


def _base_dir(run_dir: Path) -> tuple[Path, str]:
    try:
        ptr = json.loads((run_dir / BASE_POINTER).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{run_dir / BASE_POINTER} cannot be read ({e}); the adapter run does not say "
                        f"which base model it adapts") from None
    for cand in (ptr.get("path"), ptr.get("abs_path")):
        if cand and Path(cand).is_dir():
            return Path(cand), ptr.get("format", "lmlab")
    raise UserError(f"the base model of the adapter run {run_dir} is not found ({ptr.get('path')}, "
                    f"{ptr.get('abs_path')}); restore it, or re-run sft with lora.merge=true for a self-contained model")


def load_weights_or_adapter(run_dir: str | Path, device: str | torch.device = "cpu", merge: bool = True):
    """The model of a run dir: plain weights, or base + PEFT adapter (merged into a plain model
    unless merge=False, which returns the peft.PeftModel)."""
    d = Path(run_dir)
    if (d / WEIGHTS).is_file() or not (d / "adapter").is_dir():
        return load_weights(d, device)
    base_dir, fmt = _base_dir(d)
    if fmt == "hf":
        from lmlab.models.hf import import_hf
        base = import_hf(base_dir)[0]
    else:
        base = load_weights_or_adapter(base_dir, "cpu", merge=True)  # an adapter on an adapter run
    from lmlab.models.lora import load_adapter, merge_lora
    model = load_adapter(base, d / "adapter")
    if merge:
        model = merge_lora(model, copy_first=False)
    return model.to(device).eval()


def load_model(run_dir: str | Path, device: str | torch.device = "cpu", merge: bool = True):
    """-> (model, tokenizer, manifest) from a model run dir; manifest is {} if there is none.

    A LoRA run without merged weights loads as base + adapter (merged into a plain
    Transformer, which computes the same and decodes faster; merge=False keeps the PeftModel).
    When the run holds `chat.json`, its content is in `manifest["chat"]`.
    """
    from lmlab.artifacts import read_manifest

    d = Path(run_dir)
    model = load_weights_or_adapter(d, device, merge=merge)
    tok_dir = d / "tokenizer"
    if not tok_dir.is_dir():
        raise UserError(f"{tok_dir} is missing; a model run dir must hold a copy of its tokenizer")
    from lmlab.data.tokenizer import Tokenizer  # lazy: keeps `import lmlab.models` light
    tokenizer = Tokenizer.load(tok_dir)
    manifest = read_manifest(d) or {}
    if (d / CHAT).is_file():
        try:
            manifest["chat"] = json.loads((d / CHAT).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{d / CHAT} cannot be read ({e}); re-run the stage that made {d}") from None
    return model, tokenizer, manifest
