"""Device meshes and shardings for the JAX trainers: data parallel and FSDP-style parameter sharding.

    mesh = make_mesh("data:2,fsdp:4")        # 8 devices; None: ("data",) over every device
    params = place(params, param_shardings(params, mesh))
    batch = jax.device_put(batch, rows_sharding(mesh))

A mesh has up to two axes, in this order: `data` (replicas: each holds the whole model) and
`fsdp` (each parameter, and so its gradient and optimizer state, split along one dimension
over the axis's devices, as ZeRO-3 / FSDP does). A batch's rows are split over both axes, so
every device computes on its own rows; XLA's SPMD partitioner inserts the all-gathers of the
sharded parameters and the reduce-scatters of their gradients from the shardings alone, so
the model code (Flax modules) knows nothing of parallelism.

Which dimension a parameter is split along (`fsdp_spec`): its largest one that the fsdp axis
divides, as MaxText's and t5x's rules do; a parameter with none (a bias of odd width, a scalar)
stays replicated, which costs little memory.
"""

from __future__ import annotations

import numpy as np

from lmlab.errors import UserError

AXES = ("data", "fsdp")


def parse_mesh(spec: str | None, devices: int) -> dict[str, int]:
    """"data:2,fsdp:4" -> {"data": 2, "fsdp": 4}, checked against the device count (one size may
    be -1: the rest). None -> {"data": devices}."""
    if not spec:
        return {"data": devices}
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, _, size = part.strip().partition(":")
        if name not in AXES or name in sizes:
            raise UserError(f"parallel.mesh={spec}: '{name}' is not a mesh axis (or is given twice); use "
                            f"{' and '.join(AXES)}, e.g. parallel.mesh=data:{max(devices // 2, 1)},fsdp:2")
        try:
            sizes[name] = int(size)
        except ValueError:
            raise UserError(f"parallel.mesh={spec}: the size of '{name}' is '{size}', not a whole number") from None
    rest = [k for k, v in sizes.items() if v == -1]
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    if len(rest) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise UserError(f"parallel.mesh={spec}: sizes are positive, and at most one is -1 (the remaining devices)")
    if rest:
        if devices % known:
            raise UserError(f"parallel.mesh={spec}: {known} does not divide the {devices} devices")
        sizes[rest[0]] = devices // known
    if int(np.prod(list(sizes.values()))) != devices:
        options = ", ".join(f"data:{devices // f},fsdp:{f}" for f in range(1, devices + 1) if devices % f == 0)
        raise UserError(f"parallel.mesh={spec} is {int(np.prod(list(sizes.values())))} devices, but this run has "
                        f"{devices}; the sizes multiply to the device count ({options})")
    return {k: sizes[k] for k in AXES if k in sizes}


def make_mesh(spec: str | None = None):
    """The mesh over every device JAX sees (all hosts'), shaped by `spec`."""
    import jax
    from jax.sharding import Mesh

    sizes = parse_mesh(spec, jax.device_count())
    return Mesh(np.array(jax.devices()).reshape(tuple(sizes.values())), tuple(sizes))


def row_axes(mesh) -> tuple[str, ...]:
    """The axes a batch's rows are split over: all of them."""
    return tuple(mesh.axis_names)


def shards(mesh) -> int:
    """How many slices a batch's rows are cut into (every device gets one)."""
    return int(mesh.devices.size)


def rows_sharding(mesh):
    from jax.sharding import NamedSharding, PartitionSpec as P

    return NamedSharding(mesh, P(row_axes(mesh)))


def fsdp_spec(shape: tuple[int, ...], size: int):
    """PartitionSpec splitting the largest dimension `size` divides over "fsdp" (none: replicated)."""
    from jax.sharding import PartitionSpec as P

    if size <= 1:
        return P()
    fits = [(n, -i) for i, n in enumerate(shape) if n % size == 0 and n >= size]
    if not fits:
        return P()
    dim = -max(fits)[1]  # the largest; the first of equal ones
    return P(*[("fsdp" if i == dim else None) for i in range(len(shape))])


def param_shardings(tree, mesh):
    """A NamedSharding per array of `tree`: split over "fsdp" where the mesh has one, else replicated."""
    import jax
    from jax.sharding import NamedSharding

    size = dict(zip(mesh.axis_names, mesh.devices.shape)).get("fsdp", 1)
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), size)), tree)


def place(tree, shardings):
    """Host arrays (the same on every process) as global arrays with the given shardings."""
    import jax

    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree_util.tree_map(one, tree, shardings)


def serial_dispatch() -> bool:
    """Whether each program must finish before the next is dispatched: CPU devices of several
    processes. XLA's CPU client runs dispatched programs concurrently, and two programs' gloo
    all-reduces could then meet in a different order on each host and wait for each other
    forever (seen: about 1 two-process run in 15). TPUs and GPUs order programs per device."""
    import jax

    return jax.process_count() > 1 and jax.devices()[0].platform == "cpu"


def local_rows(tree, sharding):
    """This process's rows (its slice of the global batch) as global arrays split by rows."""
    import jax

    n = jax.process_count()
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(
        sharding, np.asarray(x), (x.shape[0] * n,) + x.shape[1:]), tree)


def describe(mesh, params=None) -> str:
    """"mesh data:2 x fsdp:4" and, with `params`, how many of their arrays fsdp splits."""
    import jax

    text = "mesh " + " x ".join(f"{k}:{n}" for k, n in zip(mesh.axis_names, mesh.devices.shape))
    if params is not None and "fsdp" in mesh.axis_names:
        leaves = jax.tree_util.tree_leaves(params)
        split = sum("fsdp" in jax.tree_util.tree_leaves(tuple(x.sharding.spec)) for x in leaves)
        text += f" ({split} of {len(leaves)} parameter arrays split over fsdp)"
    return text


def stats(mesh, hosts: int) -> dict:
    """The manifest's `parallel` entry of a JAX run."""
    return {"strategy": "jax fsdp" if "fsdp" in mesh.axis_names else "jax data parallel",
            "mesh": dict(zip(mesh.axis_names, map(int, mesh.devices.shape))), "world_size": int(mesh.devices.size),
            "hosts": hosts, "backend": "jax"}
