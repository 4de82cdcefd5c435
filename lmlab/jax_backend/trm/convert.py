"""TRM weights between lmlab's PyTorch model and the JAX one (lmlab.jax_backend.trm.model).

    params, consts, table = from_torch_state(torch_model.state_dict(), cfg)
    state = to_torch_state(params, consts, table)      # torch_model.load_state_dict(state)

torch `a.b.weight` (out, in) is flax `a/b/kernel` (in, out); `blocks.i.` is `blocks_i/`. The
token embedding and the learned positions keep their layout. The fixed initial states go to
`consts` and the puzzle-embedding table (trained by sign-SGD, not autograd) to `table`.
The model.safetensors a JAX run writes is `to_torch_state`'s, so every torch stage reads it.
"""

from __future__ import annotations

import numpy as np

from lmlab.models.trm.config import TRMConfig

CONSTS = ("y_init", "z_init")
TABLE = "puzzle_emb.weight"


def _np(t) -> np.ndarray:
    """A float32 copy (never a view of the torch tensor's memory, which its optimizer changes in place)."""
    return np.array(t.detach().cpu().float().numpy() if hasattr(t, "detach") else t, dtype=np.float32, copy=True)


def from_torch_state(state: dict, cfg: TRMConfig) -> tuple[dict, dict, np.ndarray | None]:
    """(flax params, consts, puzzle table or None) from a torch TRM state_dict (tensors or arrays)."""
    import jax.numpy as jnp

    params: dict = {}
    for key, value in state.items():
        if key in CONSTS or key == TABLE:
            continue
        a = _np(value)
        parts = key.split(".")
        if parts[0] == "blocks":
            parts = [f"blocks_{parts[1]}"] + parts[2:]
        if parts[-1] == "weight":
            parts[-1], a = "kernel", a.T
        node = params
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = jnp.asarray(a)
    consts = {k: jnp.asarray(_np(state[k])) for k in CONSTS}
    table = _np(state[TABLE]) if TABLE in state else None
    if (table is None) != (cfg.prefix_len == 0):
        raise ValueError(f"the state dict {'lacks' if table is None else 'has'} a puzzle-embedding table, but the "
                         f"config's puzzle_emb_ndim is {cfg.emb_ndim}")
    return params, consts, table


def to_torch_state(params: dict, consts: dict, table=None) -> dict:
    """A torch TRM state_dict (torch tensors, float32) from flax params, consts and the table."""
    import torch

    state = {}

    def walk(node, path):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, path + [k])
                continue
            parts = path + [k]
            a = np.asarray(v, dtype=np.float32)
            if parts[-1] == "kernel":
                parts[-1], a = "weight", a.T
            if parts[0].startswith("blocks_"):
                parts = ["blocks", parts[0].split("_", 1)[1]] + parts[1:]
            state[".".join(parts)] = torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy

    walk(params, [])
    for k in CONSTS:
        state[k] = torch.from_numpy(np.asarray(consts[k], dtype=np.float32).copy())
    if table is not None:
        state[TABLE] = torch.from_numpy(np.asarray(table, dtype=np.float32).copy())
    return state
