"""The `recurrentgemma.jax` Griffin an lmlab GriffinConfig describes.

    from lmlab.jax_backend.griffin.model import build
    net = build(cfg)                                   # a flax.linen module
    logits, _ = net.apply(params, tokens, segment_pos, return_cache=False)

`segment_pos` is each token's position in its document (0 at a document start, where the
recurrence and the convolution restart and attention stops looking back; -1 marks left
padding, as the reference's sampler does). lmlab's torch Griffin computes the same function
(parity: tests/test_jax_griffin.py).

recurrentgemma pins numpy < 2.4 and typeguard < 3, older than the rest of lmlab needs; its
code runs with lmlab's numpy, so it is installed without its dependencies
(`pip install --no-deps recurrentgemma==1.0.1` after `pip install 'lmlab[jax]'`, which brings
typeguard 2, jaxtyping and einops), as scripts/setup_env.sh does.
"""

from __future__ import annotations

from lmlab.errors import UserError
from lmlab.models.griffin.config import GriffinConfig

INSTALL = "pip install 'lmlab[jax]' && pip install --no-deps recurrentgemma==1.0.1"
# what the reference fixes and lmlab's config can change
FIXED = {"conv1d_width": 4, "rope_theta": 10000.0, "norm_eps": 1e-6}


def require_recurrentgemma():
    """-> the `recurrentgemma.jax` module, or a UserError naming the pip commands."""
    from lmlab.jax_backend import require_jax

    require_jax()
    try:
        import recurrentgemma.jax as rg
    except ImportError as e:
        raise UserError(f"Griffin with backend=jax runs Google DeepMind's recurrentgemma.jax, which does not import "
                        f"here ({e}); {INSTALL}") from None
    return rg


def reference_config(cfg: GriffinConfig):
    """recurrentgemma's GriffinConfig for `cfg`; a field the reference cannot change is refused."""
    from recurrentgemma import common

    off = {k: getattr(cfg, k) for k, v in FIXED.items() if getattr(cfg, k) != v}
    if off:
        raise UserError(f"recurrentgemma.jax fixes {', '.join(f'{k}={FIXED[k]:g}' for k in off)}; this model sets "
                        f"{', '.join(f'{k}={v:g}' for k, v in off.items())}: run it with backend=torch")
    kinds = {"recurrent": common.TemporalBlockType.RECURRENT, "attention": common.TemporalBlockType.ATTENTION}
    return common.GriffinConfig(vocab_size=cfg.vocab_size, width=cfg.width, mlp_expanded_width=cfg.mlp_expanded_width,
                                num_heads=cfg.num_heads, block_types=tuple(kinds[k] for k in cfg.block_types),
                                embeddings_scale_by_sqrt_dim=cfg.embeddings_scale_by_sqrt_dim,
                                attention_window_size=cfg.attention_window_size,
                                logits_soft_cap=cfg.logits_soft_cap or 0.0, lru_width=cfg.lru_width)


def scan_type(platform: str):
    """The RG-LRU scan for a platform: on TPUs the reference's default (its Pallas kernel); elsewhere
    the associative scan. The reference's default there, a `lax.scan` over time, is a while loop
    XLA's CPU compiler expands: a 256-token forward of one recurrent layer compiled in 8.6 s
    (a 10 MB program) against 1.3 s for the associative scan, which also ran faster
    (23 ms against 53 ms, batch 8) and computes the same recurrence."""
    from recurrentgemma import common

    return common.ScanType.AUTO if platform == "tpu" else common.ScanType.ASSOCIATIVE_NATIVE


def build(cfg: GriffinConfig, dtype=None, remat: bool = False):
    """The Flax module (parameters in float32; `dtype` the compute dtype, e.g. jnp.bfloat16;
    `remat`: recompute each residual block in the backward pass, to save memory)."""
    import jax

    rg = require_recurrentgemma()
    ref = reference_config(cfg)._replace(scan_type=scan_type(jax.devices()[0].platform))
    return rg.Griffin(ref, gradient_checkpointing=remat, dtype=dtype)
