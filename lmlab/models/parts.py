"""Small pieces every model family shares, kept apart from the family registry and the
checkpoint mappings (lmlab.models.family and lmlab.models.hf import the families; the
families import these): the vocabulary of a config, a cache's left padding, reading a Hugging
Face directory's safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from lmlab.errors import UserError


def fill_vocab(fields: dict, vocab_size: Optional[int]) -> None:
    """Put the tokenizer's vocabulary into a config being resolved (`fields`), or check it fits."""
    if "vocab_size" not in fields:
        if vocab_size is None:
            raise UserError("model.vocab_size is not set and no tokenizer gave one; set model.vocab_size=N")
        fields["vocab_size"] = vocab_size
    elif vocab_size is not None and fields["vocab_size"] < vocab_size:
        raise UserError(f"model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's vocabulary "
                        f"({vocab_size}); set model.vocab_size>={vocab_size} or leave it unset")


def left_pad_tensor(left_pad: Optional[Sequence[int]], batch: int, device) -> Optional[torch.Tensor]:
    """A cache's `left_pad` argument as a (batch,) tensor, or None when no row is padded."""
    if left_pad is None or not any(int(n) for n in left_pad):
        return None
    if len(left_pad) != batch:
        raise ValueError(f"left_pad has {len(left_pad)} entries for a batch of {batch}")
    return torch.as_tensor(list(left_pad), dtype=torch.long, device=device)


def read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict = {}
        for f in files:
            state.update(load_file(str(d / f)))
        return state
    raise UserError(f"{d} holds no model.safetensors (or sharded index); import_hf reads safetensors checkpoints only")
