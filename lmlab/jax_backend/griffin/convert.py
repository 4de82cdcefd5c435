"""lmlab's PyTorch Griffin parameters <-> `recurrentgemma.jax` Flax parameters.

Through DeepMind's torch layout (lmlab.models.griffin.checkpoints maps it to ours) and its Flax
tree (lmlab.models.griffin.orbax, which also reads DeepMind's Orbax checkpoints):

    params = from_torch_state(model.state_dict(), model.cfg)
    model.load_state_dict(to_torch_state(params, model.cfg))
"""

from __future__ import annotations

import torch

from lmlab.models.griffin.checkpoints import from_deepmind_state_dict, to_deepmind_state_dict
from lmlab.models.griffin.config import GriffinConfig
from lmlab.models.griffin.orbax import deepmind_to_flax, flax_to_deepmind


def from_torch_state(sd: dict[str, torch.Tensor], cfg: GriffinConfig) -> dict:
    """lmlab's Griffin state_dict -> the Flax variables `{"params": ...}` (numpy arrays)."""
    return deepmind_to_flax(to_deepmind_state_dict(sd, cfg))


def to_torch_state(params: dict, cfg: GriffinConfig, source: str = "JAX parameters") -> dict[str, torch.Tensor]:
    """The Flax variables -> lmlab's Griffin state_dict (float32)."""
    return from_deepmind_state_dict(flax_to_deepmind(params), cfg, source)
