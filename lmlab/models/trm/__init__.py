"""TRM, the tiny recursive reasoning model, as a model family (`family: trm` in model.json).

    config.py     TRMConfig: shapes, cycles, halting (the official field names, lower case)
    layers.py     init, RMSNorm without gain, RoPE, bidirectional attention, SwiGLU, post-norm block
    embedding.py  the puzzle-embedding table trained by sparse sign-SGD
    model.py      TRM: the recursion and the ACT carry across supervision steps

A TRM is a puzzle model, not a language model: it fills a whole grid at once and has no
cache or chat template. Its contract (`PuzzleModel` in lmlab.models.family) is
`initial_carry(batch_size)` and `forward(carry, batch) -> (carry, outputs)`, one supervision
step per call. Stages that need a language model refuse it with a message.
"""

from lmlab.models.trm.config import TRMConfig, resolve_trm_config
from lmlab.models.trm.model import TRM, Carry

__all__ = ["TRM", "TRMConfig", "Carry", "resolve_trm_config"]
