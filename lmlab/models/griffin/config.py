"""Griffin's shape: the config, its presets (RecurrentGemma 2B / 9B and small CPU sizes) and
their resolution.

Field names follow Google DeepMind's `recurrentgemma.GriffinConfig` (width, mlp_expanded_width,
num_heads, lru_width, attention_window_size, logits_soft_cap, embeddings_scale_by_sqrt_dim),
with `n_layer` + `block_pattern` for its `block_types` (the pattern repeats: recurrent,
recurrent, attention, ... as in the reference's presets and transformers' `block_types`).
`max_seq_len` is the context the model is trained and evaluated on; the model itself is not
bounded by it (a recurrence plus local attention), so generation can run past it.

Print the presets' sizes with `python -m lmlab.models.griffin`.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from lmlab.config import Strict
from lmlab.errors import UserError
from lmlab.models.parts import fill_vocab

BlockType = Literal["recurrent", "attention"]
GRIFFIN_PATTERN = ["recurrent", "recurrent", "attention"]


class GriffinConfig(Strict):
    """Shape of a Griffin model. Fields left unset (None) take the preset's value."""

    family: Literal["griffin"] = Field("griffin", description="model family: griffin (this) or transformer")
    preset: str = Field("tiny", description="size preset filling every unset field: micro, tiny, small, 2b, 9b")
    vocab_size: Optional[int] = Field(None, ge=2, description="vocabulary size; unset = the tokenizer's vocab size")
    width: Optional[int] = Field(None, ge=8, description="width of the residual stream")
    n_layer: Optional[int] = Field(None, ge=1, description="number of residual blocks")
    block_pattern: Optional[list[BlockType]] = Field(
        None, description="temporal-mixing block types, repeated over the layers (recurrent, recurrent, attention)")
    mlp_expanded_width: Optional[int] = Field(None, ge=1, description="hidden width of the gated GeLU MLP")
    num_heads: Optional[int] = Field(None, ge=1, description="attention query heads (one shared key/value head), "
                                                             "and the number of blocks of the RG-LRU's gates")
    lru_width: Optional[int] = Field(None, ge=1, description="width of the recurrent branch (RG-LRU); unset = width")
    conv1d_width: Optional[int] = Field(None, ge=1, description="temporal width of the recurrent block's causal conv")
    attention_window_size: Optional[int] = Field(None, ge=1, description="local attention: each token sees this many "
                                                                         "tokens before it, and itself")
    logits_soft_cap: Optional[float] = Field(None, ge=0, description="logits = cap * tanh(logits / cap); 0 = none")
    embeddings_scale_by_sqrt_dim: Optional[bool] = Field(None, description="multiply embeddings by sqrt(width), "
                                                                           "rounded to bfloat16 as the reference does")
    rope_theta: Optional[float] = Field(None, gt=0, description="RoPE base (on the first half of each head)")
    norm_eps: Optional[float] = Field(None, gt=0, description="RMSNorm epsilon")
    max_seq_len: Optional[int] = Field(None, ge=1, description="context the model is trained and evaluated on")

    @property
    def block_types(self) -> list[str]:
        pattern = self.block_pattern or GRIFFIN_PATTERN
        return [pattern[i % len(pattern)] for i in range(self.n_layer)]

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


_COMMON = dict(block_pattern=GRIFFIN_PATTERN, conv1d_width=4, logits_soft_cap=30.0,
               embeddings_scale_by_sqrt_dim=True, rope_theta=10000.0, norm_eps=1e-6)
PRESETS: dict[str, dict] = {
    # for tests: a few hundred thousand parameters plus the embeddings
    "micro": dict(width=64, n_layer=3, mlp_expanded_width=192, num_heads=4, lru_width=64,
                  attention_window_size=32, max_seq_len=256, **_COMMON),
    # the CPU sizes; their counts at vocab 32768 are in docs/griffin.md
    "tiny": dict(width=256, n_layer=6, mlp_expanded_width=768, num_heads=4, lru_width=256,
                 attention_window_size=512, max_seq_len=512, **_COMMON),
    "small": dict(width=512, n_layer=9, mlp_expanded_width=1536, num_heads=8, lru_width=512,
                  attention_window_size=1024, max_seq_len=1024, **_COMMON),
    # the published RecurrentGemma sizes (recurrentgemma.common.Preset.RECURRENT_GEMMA_*_V1)
    "2b": dict(vocab_size=256000, width=2560, n_layer=26, mlp_expanded_width=3 * 2560, num_heads=10,
               lru_width=2560, attention_window_size=2048, max_seq_len=8192, **_COMMON),
    "9b": dict(vocab_size=256000, width=4096, n_layer=38, mlp_expanded_width=3 * 4096, num_heads=16,
               lru_width=4096, attention_window_size=2048, max_seq_len=8192, **_COMMON),
}


def resolve_griffin_config(cfg: dict | GriffinConfig | None, vocab_size: int | None = None) -> GriffinConfig:
    """Fill every unset field from the preset (`vocab_size` when the config sets none) and
    check the shape, naming the field to change."""
    if cfg is None:
        cfg = {}
    if isinstance(cfg, GriffinConfig):
        cfg = cfg.model_dump()
    data = {k: v for k, v in dict(cfg).items() if v is not None}
    preset = data.get("preset", "tiny")
    if preset not in PRESETS:
        raise UserError(f"unknown griffin preset '{preset}'; valid presets: {', '.join(PRESETS)}")
    base = dict(PRESETS[preset])
    if "vocab_size" in base and vocab_size is not None and "vocab_size" not in data:
        base.pop("vocab_size")  # a tokenizer of another size: the published vocab is only a default
    out = {**base, **data, "preset": preset}
    if "lru_width" not in data and "width" in data and "lru_width" in base:
        out["lru_width"] = out["width"]
    fill_vocab(out, vocab_size)
    try:
        c = GriffinConfig(**out)
    except Exception as e:  # pydantic's message already names the field
        raise UserError(f"invalid griffin model config: {e}".replace("\n", " ")) from None
    if c.width % c.num_heads:
        raise UserError(f"model.width={c.width} is not divisible by model.num_heads={c.num_heads}")
    if c.lru_width % c.num_heads:
        raise UserError(f"model.lru_width={c.lru_width} is not divisible by model.num_heads={c.num_heads} "
                        f"(the RG-LRU gates are {c.num_heads} diagonal blocks)")
    if c.head_dim % 4:
        raise UserError(f"head_dim = width/num_heads = {c.head_dim} must be a multiple of 4 "
                        f"(RoPE turns pairs of the first half of each head)")
    if not c.block_pattern:
        raise UserError("model.block_pattern is empty; use e.g. [recurrent, recurrent, attention]")
    return c

