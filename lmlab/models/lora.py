"""LoRA adapters on our Transformer, through PEFT (rank, alpha, dropout, targets, rsLoRA, DoRA).

    from lmlab.models.lora import LoraConfig, apply_lora, save_adapter, load_adapter, merge_lora
    model = apply_lora(model, LoraConfig(enabled=True, r=8, alpha=16))   # -> peft.PeftModel
    ...train: only the adapter matrices have requires_grad...
    save_adapter(model, "runs/sft/adapter")      # adapter_config.json + adapter_model.safetensors
    with adapters_disabled(model):               # the frozen base model, e.g. DPO's reference
        ref_logits, _ = model(idx)
    plain = merge_lora(model)                    # a plain Transformer with W + scale * B @ A folded in

PEFT wraps any `nn.Module` whose layers it can find by name, so our Transformer needs no
special code: the targets are the names of its `nn.Linear` layers — `qkv` and `o_proj`
(attention), `gate_up` and `down_proj` (the SwiGLU MLP). The wrapped model still takes
our forward arguments (`doc_ids`, `cache`, `return_logits`), and attribute look-ups
(`model.cfg`, `model.new_cache`) fall through to the Transformer, so the training loop and
the generation engine use it unchanged. The adapter directory is PEFT's own format
(`PeftModel.from_pretrained(base, dir)` reads it).

The output head is not a valid target: the chunked training loss reads `lm_head.weight`
directly (it never calls the module), so an adapter there would be silently skipped; and
with tied embeddings it is the embedding table.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Iterator, Optional

import torch
from pydantic import Field

from lmlab.config import Strict
from lmlab.errors import UserError

ADAPTER_DIR = "adapter"
DEFAULT_TARGETS = ["qkv", "o_proj", "gate_up", "down_proj"]
# Linear layers PEFT could wrap but that must stay plain (see the module docstring).
UNSUPPORTED_TARGETS = {"lm_head": "the training loss reads lm_head.weight directly, bypassing any adapter"}


class LoraConfig(Strict):
    enabled: bool = Field(False, description="train LoRA adapters instead of all weights (the base stays frozen)")
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is (alpha / r) * B @ A "
                         "(alpha / sqrt(r) with use_rslora)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: Optional[list[str]] = Field(
        None, description="names of the linear layers that get adapters; unset = the family's default: "
        "qkv, o_proj, gate_up, down_proj (transformer); q_proj, k_proj, v_proj, o_proj, linear_x, linear_y, "
        "linear_out, gate_proj, up_proj, down_proj (griffin)")
    use_rslora: bool = Field(False, description="rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r")
    use_dora: bool = Field(False, description="DoRA: learn a per-output-channel magnitude as well as the "
                           "LoRA direction (slower per step)")
    merge: bool = Field(False, description="also write the merged weights (model.safetensors) next to adapter/")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct short names of the model's nn.Linear layers (what target_modules matches)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """UserError naming a target that is not one of the model's linear layers, and the real ones."""
    real = [n for n in linear_module_names(model) if n not in UNSUPPORTED_TARGETS]
    if not targets:
        raise UserError(f"lora.target_modules is empty; name at least one of: {', '.join(real)}")
    for t in targets:
        if t in UNSUPPORTED_TARGETS:
            raise UserError(f"lora.target_modules: '{t}' cannot take an adapter ({UNSUPPORTED_TARGETS[t]}); "
                            f"valid targets: {', '.join(real)}")
        if t not in real:
            raise UserError(f"lora.target_modules: no linear layer named '{t}' in this model; "
                            f"valid targets: {', '.join(real)}")


def targets_of(model: torch.nn.Module, cfg: LoraConfig) -> list[str]:
    """The configured targets, or the family's default ones (`model.lora_targets`)."""
    if cfg.target_modules is not None:
        return list(cfg.target_modules)
    return list(getattr(model, "lora_targets", DEFAULT_TARGETS))


def peft_config(cfg: LoraConfig, targets: list[str]):
    import peft

    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=list(targets), use_rslora=cfg.use_rslora,
                           use_dora=cfg.use_dora, bias="none")


def apply_lora(model: torch.nn.Module, cfg: LoraConfig):
    """Wrap `model` (in place) with fresh adapters; everything but the adapters is frozen.

    The adapters start as PEFT initialises them (A random, B zero), so the wrapped model
    computes exactly what the base did until the first update. The A init draws from torch's
    global RNG: seed it first for a reproducible run.
    """
    import peft

    targets = targets_of(model, cfg)
    check_targets(model, targets)
    wrapped = peft.get_peft_model(model, peft_config(cfg, targets))
    return wrapped


def is_lora(model: torch.nn.Module) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, a shared (tied) tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def save_adapter(model, out_dir: str | Path) -> Path:
    """Write the adapter in PEFT's format: adapter_config.json + adapter_model.safetensors.

    `base_model_name_or_path` in adapter_config.json is left to the caller (see
    `lmlab.train.sft`, which writes a `base.json` pointer next to the adapter directory).
    """
    out = Path(out_dir)
    model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card template: nothing lmlab-specific in it
    return out


def load_adapter(base: torch.nn.Module, adapter_dir: str | Path, trainable: bool = False):
    """base Transformer + a PEFT adapter directory -> PeftModel (frozen unless `trainable`)."""
    import peft

    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise UserError(f"{d / 'adapter_config.json'} is missing; {d} is not a PEFT adapter directory")
    try:
        targets = json.loads((d / "adapter_config.json").read_text()).get("target_modules") or []
    except (OSError, ValueError) as e:
        raise UserError(f"{d / 'adapter_config.json'} cannot be read ({e}); the adapter is damaged") from None
    check_targets(base, list(targets))
    try:
        return peft.PeftModel.from_pretrained(base, str(d), is_trainable=trainable)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load the adapter in {d} onto its base model ({str(e).splitlines()[0]}); "
                        f"was it trained on a different base?") from None


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[torch.nn.Module]:
    """Inside the block the model computes as its frozen base (DPO's reference model).

    A plain (non-LoRA) model is yielded unchanged, so callers need no special case.
    """
    if not is_lora(model):
        yield model
        return
    with model.disable_adapter():
        yield model


def merge_lora(model, copy_first: bool = True) -> torch.nn.Module:
    """A plain Transformer with every adapter folded into its base weight.

    copy_first=True leaves `model` (and its adapters) untouched; False merges in place,
    which saves the memory of a copy when the wrapped model is not needed any more.
    """
    if not is_lora(model):
        return model
    target = copy.deepcopy(model) if copy_first else model
    merged = target.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)  # a plain model again: trainable like any other
    return merged
