"""Sharded forward+backward on 8 fake CPU devices matches one device.

conftest.py forces 8 host devices before JAX is imported.
"""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from ringmoe import sharding
from ringmoe.model.ringmoe import create_model
from ringmoe.model.moe import router_loss
from ringmoe.objectives.common import pixel_mask
from ringmoe.objectives.simmim import masked_l1
from tests.test_model import random_batch, small_config


def loss_and_grads(model, batch, moe_config):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params):
        out = nnx.merge(graphdef, params)(batch)
        total = router_loss({m: o["encoded"].router_stats for m, o in out.items()}, moe_config)["total"]
        for m, o in out.items():
            total += masked_l1(o["reconstruction"], batch[m]["pixels"], pixel_mask(batch[m]["mask"], 4))
        return total

    return jax.jit(jax.value_and_grad(loss_fn))(params)


def shard_batch(batch, mesh):
    spec = lambda x: NamedSharding(mesh, sharding.logical_to_mesh(("batch",) + (None,) * (x.ndim - 1)))  # noqa: E731
    return jax.tree.map(lambda x: jax.device_put(x, spec(x)), batch)


@pytest.mark.parametrize("dispatch", ["sort", "einsum"])
def test_data2_expert4_matches_single_device(dispatch):
    assert jax.device_count() == 8
    config = small_config(num_modal_experts=4, num_collaborative_experts=4, dispatch=dispatch,
                          capacity_factor=2.0, z_loss_weight=1e-3)
    config.depths = (1, 1)   # one block per stage: the layout under test, at half the compile
    batch = random_batch(config, batch=8)

    single = create_model(config, seed=0)
    ref_loss, ref_grads = loss_and_grads(single, batch, config.moe)

    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    with jax.set_mesh(mesh):
        model = create_model(config, seed=0, mesh=mesh)
        loss, grads = loss_and_grads(model, shard_batch(batch, mesh), config.moe)

    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))

    # Expert weights really live split along the expert axis: one expert per device column.
    # (A scanned stage stacks its blocks' weights on a leading, unsharded layers axis.)
    w_in = model.stages[0].blocks.ffn.modal_experts["optical"].experts.w_in[...]
    assert w_in.sharding.spec[:2] == (None, "expert")
    assert {s.data.shape[:2] for s in w_in.addressable_shards} == {(config.depths[0], 1)}
    shared = model.stages[0].blocks.ffn.shared_expert.fc1.kernel[...]
    assert {s.data.shape for s in shared.addressable_shards} == {shared.shape}  # replicated


def test_mesh_axis_inference_and_errors():
    assert sharding.mesh_shape({"data": -1, "expert": 4}, 8) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.mesh_shape({"data": -1, "expert": -1}, 8)
    with pytest.raises(ValueError, match="need 6 devices"):
        sharding.mesh_shape({"data": 2, "expert": 3}, 8)
    assert sharding.logical_to_mesh(("act_expert", "batch", None)) == jax.sharding.PartitionSpec(
        "expert", ("data", "fsdp"), None)
