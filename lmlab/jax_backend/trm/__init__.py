"""TRM in JAX: the network and ACT step (model), its loss (losses), optimizers (optim), torch <-> JAX
weights (convert). Its trainer is lmlab.train.trm_jax."""
