"""`lmlab export`: a model run as a Hugging Face directory or as one GGUF file.

    lmlab export runs/model out=runs/hf_model dtype=bfloat16       # transformers (lmlab.models.hf)
    lmlab export runs/model out=runs/model.gguf dtype=q8_0         # llama.cpp / Ollama (lmlab.models.gguf)
    lmlab export runs/griffin out=runs/rg_flax format=orbax        # DeepMind's Flax checkpoint (a Griffin)

The stage only picks the format (`format`, or with format=auto the suffix of `out`) and hands
the config to the writer; each writer fingerprints, checks `out` and writes atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from lmlab.config import Strict

POSITIONAL = ("model", "the model run directory to export (written by `lmlab pretrain`)")


class Config(Strict):
    model: str = Field("", description="model run directory to export (model.safetensors, model.json, tokenizer/)")
    out: str = Field("", description="output Hugging Face directory, or .gguf file with format=gguf "
                                     "(replaced atomically)")
    format: Literal["auto", "hf", "gguf", "orbax"] = Field(
        "auto", description="hf: a Hugging Face directory; gguf: one GGUF file for llama.cpp / Ollama "
                            "(lmlab.models.gguf); orbax: a Griffin as DeepMind's Flax/Orbax checkpoint "
                            "(recurrentgemma.jax; the jax extra); auto: gguf when out ends in .gguf, else hf")
    dtype: Literal["float32", "bfloat16", "float16", "f32", "f16", "bf16", "q8_0"] = Field(
        "float32", description="dtype of the exported weights: float32 | bfloat16 | float16 (f32 | bf16 | f16 are "
                               "the same); q8_0 (8-bit blocks) with format=gguf only")


def export_format(cfg: Config) -> str:
    """'hf', 'gguf' or 'orbax': `format`, or with format=auto the suffix of `out`."""
    if cfg.format != "auto":
        return cfg.format
    return "gguf" if cfg.out.lower().endswith(".gguf") else "hf"

def run(cfg: Config) -> Path:
    if export_format(cfg) == "orbax":
        from lmlab.models.griffin.orbax import export_orbax
        return export_orbax(cfg)
    if export_format(cfg) == "gguf":
        from lmlab.models.gguf import export_gguf
        return export_gguf(cfg)
    from lmlab.models.hf import export_hf
    return export_hf(cfg)
