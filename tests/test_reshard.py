"""Resharding restore: a checkpoint saved under one mesh restores under other mesh shapes
and on one device with identical parameters (Orbax sharded restore onto the target layout)."""
import jax
import numpy as np

from ringmoe import sharding
from ringmoe.training.checkpoint import Checkpointer, abstract_with_shardings
from ringmoe.training.state import abstract_state, create_state
from tests.small import micro_config


def small_config():
    c = micro_config(("optical", "sar_l1"))
    c.model.moe.num_modal_experts = c.model.moe.num_collaborative_experts = 4
    return c


def restore(workdir, config, mesh):
    _, abstract, shardings = abstract_state(config, mesh)
    checkpointer = Checkpointer(workdir, keep=1, save_every=1)
    try:
        with jax.set_mesh(mesh):
            return checkpointer.restore_latest(abstract_with_shardings(abstract, shardings))
    finally:
        checkpointer.close()


def expert_weight(state):
    """A collaborative expert's stacked input weight (layers, E, D, F): E is sharded over `expert`."""
    flat = dict(jax.tree_util.tree_leaves_with_path(state.params))
    return next(v for k, v in flat.items() if "collaborative_experts" in jax.tree_util.keystr(k)
                and "w_in" in jax.tree_util.keystr(k))


def test_checkpoint_restores_onto_other_meshes_and_one_device(tmp_path):
    config = small_config()
    saved_mesh = sharding.make_mesh({"data": 2, "expert": 4})
    with jax.set_mesh(saved_mesh):
        _, state, _ = create_state(config, saved_mesh)
    checkpointer = Checkpointer(str(tmp_path), keep=1, save_every=1)
    checkpointer.save(7, state, {"note": "data state"}, {"mesh": dict(saved_mesh.shape)}, force=True)
    checkpointer.close()
    assert expert_weight(state).sharding.shard_shape(expert_weight(state).shape)[1] == 1   # 4 experts / 4
    reference = jax.device_get(state)

    targets = {"data=4 x expert=2": sharding.make_mesh({"data": 4, "expert": 2}),
               "fsdp=8": sharding.make_mesh({"data": 1, "fsdp": 8}),
               "one device": sharding.make_mesh({}, jax.devices()[:1])}
    for name, mesh in targets.items():
        step, restored, data_state, meta = restore(str(tmp_path), config, mesh)
        assert step == 7 and data_state == {"note": "data state"} and meta["mesh"]["expert"] == 4, name
        weight = expert_weight(restored)
        assert weight.sharding.mesh.shape == mesh.shape, name
        assert len(weight.sharding.device_set) == mesh.size, name
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(jax.device_get(restored))):
            np.testing.assert_array_equal(a, b, err_msg=name)
    experts_on_one_device = expert_weight(restored)
    assert experts_on_one_device.sharding.shard_shape(experts_on_one_device.shape)[1] == 4
