"""lmlab.jax_backend.mesh: the `parallel.mesh` specs a run accepts and the ones it names as wrong,
and which dimension FSDP splits (pure functions: no devices needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("jax", reason="the jax extra is not installed (pip install 'lmlab[jax]')")

from lmlab.errors import UserError
from lmlab.jax_backend.mesh import fsdp_spec, parse_mesh


def test_mesh_specs():
    assert parse_mesh(None, 8) == {"data": 8}
    assert parse_mesh("data:2,fsdp:4", 8) == {"data": 2, "fsdp": 4}
    assert parse_mesh("fsdp:4,data:-1", 8) == {"data": 2, "fsdp": 4}  # axes in mesh order
    assert parse_mesh("fsdp:-1", 8) == {"fsdp": 8}
    with pytest.raises(UserError, match=r"data:3,fsdp:2 is 6 devices, but this run has 8; .*data:4,fsdp:2"):
        parse_mesh("data:3,fsdp:2", 8)
    with pytest.raises(UserError, match=r"'model' is not a mesh axis"):
        parse_mesh("model:8", 8)
    with pytest.raises(UserError, match=r"3 does not divide the 8 devices"):
        parse_mesh("data:3,fsdp:-1", 8)
    with pytest.raises(UserError, match=r"not a whole number"):
        parse_mesh("data:two", 8)


def test_fsdp_splits_the_largest_dimension_it_divides():
    from jax.sharding import PartitionSpec as P

    assert fsdp_spec((256, 64), 4) == P("fsdp", None)
    assert fsdp_spec((64, 256), 4) == P(None, "fsdp")
    assert fsdp_spec((6, 7), 4) == P()  # nothing divides: replicated
    assert fsdp_spec((2, 64, 192), 4) == P(None, None, "fsdp")
    assert fsdp_spec((128,), 1) == P()


def test_a_mesh_on_a_torch_run_is_refused():
    from lmlab import dist as lmdist
    from lmlab.train.parallel_config import ParallelConfig
    from lmlab.train.parallelize import resolve_strategy

    with pytest.raises(UserError, match=r"parallel.mesh=data:2 shapes the JAX device mesh: it takes backend=jax"):
        resolve_strategy(ParallelConfig(mesh="data:2"), lmdist.read_env({}))
