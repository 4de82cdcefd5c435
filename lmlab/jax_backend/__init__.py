"""lmlab's JAX backend (the optional `jax` extra: `pip install 'lmlab[jax]'`), for the two
families our users train on TPUs: TRM (lmlab.jax_backend.trm) and, later, Griffin.

The core install never imports this package. `require_jax()` is what a stage calls first: a
missing extra is one clear error naming the pip command, not an ImportError traceback.
The PyTorch side stays the reference: the same configs (lmlab.models.trm.config), weights
convertible both ways, parity tests against the torch model (tests/test_jax_trm.py).
"""

from __future__ import annotations

from lmlab.errors import UserError

PACKAGES = ("jax", "flax", "optax")
INSTALL = "pip install 'lmlab[jax]'  (jax, flax, optax, orbax-checkpoint; on TPU: pip install 'jax[tpu]')"


def require_jax() -> None:
    """UserError naming the pip command unless jax, flax and optax import."""
    import importlib.util

    missing = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(f"backend=jax needs {', '.join(missing)}, which are not installed; {INSTALL}")
