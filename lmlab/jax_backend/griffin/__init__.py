"""Griffin / RecurrentGemma in JAX: Google DeepMind's own `recurrentgemma.jax` model (the
reference implementation, with its scan), configured from lmlab's GriffinConfig, with weights
converted to and from lmlab's PyTorch Griffin and DeepMind's Orbax checkpoints read
(lmlab.jax_backend.griffin.model, .convert)."""
