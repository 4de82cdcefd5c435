"""TRM in JAX: the network and ACT step (model), its loss (losses), torch <-> JAX weights (convert)."""
