"""Griffin / RecurrentGemma (De et al. 2024; Google DeepMind's recurrentgemma): the `griffin` family."""

from lmlab.models.griffin.config import PRESETS, GriffinConfig, resolve_griffin_config
from lmlab.models.griffin.model import Griffin

__all__ = ["Griffin", "GriffinConfig", "PRESETS", "resolve_griffin_config"]
