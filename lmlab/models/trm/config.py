"""TRM's shape and recursion settings (model.json of a `family: trm` model).

Field names follow the official code's (SamsungSAILMontreal/TinyRecursiveModels,
config/arch/trm.yaml) in lower case, so a recipe there reads the same here: `h_cycles` is
the paper's T (outer cycles: all but the last run without gradients), `l_cycles` its n
(latent updates per cycle), `l_layers` the shared network's depth. `seq_len`, `vocab_size`
and `num_puzzle_identifiers` come from the puzzle set the model trains on.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from lmlab.config import Strict
from lmlab.errors import UserError


class TRMConfig(Strict):
    seq_len: int = Field(81, ge=1, description="cells per puzzle (set from the puzzle set)")
    vocab_size: int = Field(11, ge=2, description="token ids per cell (set from the puzzle set)")
    num_puzzle_identifiers: int = Field(1, ge=1, description="learned puzzle embeddings (set from the puzzle set)")
    hidden_size: int = Field(512, ge=8, description="width of z, y and the network")
    num_heads: int = Field(8, ge=1, description="attention heads (head_dim = hidden_size / num_heads)")
    expansion: float = Field(4.0, gt=0, description="SwiGLU width factor: inner = round(expansion * d * 2/3) up to a multiple of 256")
    l_layers: int = Field(2, ge=1, description="blocks in the one shared network")
    h_cycles: int = Field(3, ge=1, description="T: outer cycles per supervision step (only the last keeps gradients)")
    l_cycles: int = Field(6, ge=1, description="n: latent updates z <- f(z, y + x) per cycle, then one y <- f(y, z)")
    mlp_t: bool = Field(False, description="mix across positions with a SwiGLU over the sequence instead of attention "
                                           "(the paper's MLP variant, best on Sudoku)")
    pos_encodings: Literal["rope", "learned", "none"] = Field("rope", description="position information (none for mlp_t)")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    rms_norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon (no gain: post-norm without weights)")
    puzzle_emb_ndim: Optional[int] = Field(None, ge=0, description="width of a puzzle embedding (null = hidden_size; "
                                           "0 = none)")
    puzzle_emb_len: int = Field(16, ge=0, description="positions the puzzle embedding takes before the cells "
                                "(0 = ceil(puzzle_emb_ndim / hidden_size))")
    halt_max_steps: int = Field(16, ge=1, description="N_sup: supervision steps at most (evaluation runs them all)")
    halt_exploration_prob: float = Field(0.1, ge=0, le=1, description="share of rows given a random minimum of "
                                         "supervision steps in training")
    no_act_continue: bool = Field(True, description="halt on q_halt > 0 and train q_halt only (TRM); false: also the "
                                  "Q-continue head with a bootstrapped target from a second forward (HRM's Q-learning)")

    @model_validator(mode="after")
    def _shapes(self):
        if not self.mlp_t and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.pos_encodings == "rope" and not self.mlp_t and (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"RoPE needs an even head_dim; hidden_size/num_heads = {self.hidden_size // self.num_heads}")
        return self

    @property
    def emb_ndim(self) -> int:
        return self.hidden_size if self.puzzle_emb_ndim is None else self.puzzle_emb_ndim

    @property
    def prefix_len(self) -> int:
        """Positions before the cells taken by the puzzle embedding (the official puzzle_emb_len)."""
        if self.emb_ndim == 0:
            return 0
        return self.puzzle_emb_len or -(self.emb_ndim // -self.hidden_size)

    @property
    def total_len(self) -> int:
        return self.seq_len + self.prefix_len


def swiglu_width(d: int, expansion: float) -> int:
    """A SwiGLU's inner width: round(expansion * d * 2/3) rounded up to a multiple of 256 (the
    official code's; shared by the torch and JAX models)."""
    return -(round(expansion * d * 2 / 3) // -256) * 256


def resolve_trm_config(fields: dict | TRMConfig | None) -> TRMConfig:
    """model.json's fields (or a stage's `model:`) -> a validated TRMConfig."""
    if isinstance(fields, TRMConfig):
        return fields
    try:
        return TRMConfig(**(fields or {}))
    except ValueError as e:
        raise UserError(f"bad TRM model config: {e}".replace("\n", " ")) from None
