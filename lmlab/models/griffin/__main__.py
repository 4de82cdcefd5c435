"""`python -m lmlab.models.griffin`: the presets' parameter counts."""

import torch

from lmlab.models.griffin.config import PRESETS, resolve_griffin_config
from lmlab.models.griffin.model import Griffin

print(f"{'preset':<8}{'params':>16}{'non-emb':>16}  (vocab 32768; 2b/9b at 256000)")
for name in PRESETS:
    c = resolve_griffin_config({"preset": name}, vocab_size=None if name in ("2b", "9b") else 32768)
    with torch.device("meta"):
        m = Griffin(c)
    print(f"{name:<8}{m.num_params():>16,}{m.num_params(non_embedding=True):>16,}")
