"""Google DeepMind's recurrentgemma torch model, imported without its JAX half.

`recurrentgemma/__init__.py` imports `recurrentgemma.jax` (and so jax), which lmlab's test
environment does not install. Its torch part needs only torch, einops and jaxtyping, so the
package is registered here as a bare namespace (its __init__ not run) and the torch modules
imported from it. The package itself is installed without its dependencies (it pins an
older numpy): `pip install --no-deps recurrentgemma==1.0.1 jaxtyping einops`
(scripts/setup_env.sh does this).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def recurrentgemma_torch():
    """-> (recurrentgemma.common, recurrentgemma.torch.griffin), or None when not installed."""
    if "recurrentgemma" not in sys.modules:
        spec = importlib.util.find_spec("recurrentgemma")
        if spec is None or not spec.submodule_search_locations:
            return None
        pkg = types.ModuleType("recurrentgemma")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["recurrentgemma"] = pkg
        torch_pkg = types.ModuleType("recurrentgemma.torch")  # its __init__ imports the sampler too
        torch_pkg.__path__ = [p + "/torch" for p in pkg.__path__]
        sys.modules["recurrentgemma.torch"] = torch_pkg
    try:
        common = importlib.import_module("recurrentgemma.common")
        griffin = importlib.import_module("recurrentgemma.torch.griffin")
    except ImportError:
        return None
    return common, griffin
