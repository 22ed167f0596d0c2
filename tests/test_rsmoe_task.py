"""RS-MoE through the one trainer (`config.task = "rsmoe"`): text sub-tasks in the Grain pipeline,
the encoder read and frozen, stage 2 upcycled from stage 1, and what the task refuses."""
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
from flax import nnx

from configs import rsmoe_tiny
from pretrain.train import train
from ringmoe import sharding
from ringmoe.data import schema, shards
from ringmoe.model.checkpoint import load_pretrained
from ringmoe.training import tasks
from ringmoe.training.state import create_state
from ringmoe.vlm import examples
from ringmoe.vlm.task import named, upcycled
from tests.small import initial_run, micro_config


def micro_rsmoe(variant: str, encoder: str, data_dir: str):
    """configs/rsmoe_tiny.py on the micro encoder (32 px, optical only): one-layer LM experts."""
    config = rsmoe_tiny.get_config(variant)
    config.model = micro_config(("optical",)).model
    config.data.modality_weights = {"optical": 1.0}
    config.data_dir, config.vlm.encoder = data_dir, encoder
    v = config.vlm
    v.lm.num_layers, v.lm.vocab_size = 1, 384
    v.num_queries, v.prompt_length, v.subtasks_per_image, v.vision_stages = 4, 2, 2, (0, 1)
    config.batch_size, config.total_steps, config.log_every, config.eval_every = 4, 2, 1, 0
    config.checkpoint_every = 2
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pretraining run (its initial state) as the encoder, and a 2-step stage-1 run on it."""
    root = tmp_path_factory.mktemp("rsmoe")
    encoder, data_dir = initial_run(root, micro_config(("optical",)), examples=12)
    stage1 = micro_rsmoe("dense", encoder, data_dir)
    last = train(stage1, str(root / "stage1"), jax.devices()[:2])
    return {"root": root, "encoder": encoder, "data": data_dir, "stage1": str(root / "stage1"), "last": last}


def test_text_rows_are_the_subtasks_of_the_crop_the_model_sees(runs):
    config = micro_rsmoe("dense", runs["encoder"], runs["data"])
    config.data.crop_scale, config.data.crop_ratio = (0.3, 0.6), (0.75, 1.33)   # a crop: other facts than the scene's
    task = tasks.for_run(config, runs["stage1"])
    text = task.text_tasks(runs["data"], config.seed)
    manifest = shards.read_manifest(runs["data"])
    import grain
    source = grain.sources.ArrayRecordDataSource(shards.checked_shard_paths(runs["data"], manifest))
    with task.pipeline(config, num_workers=0) as pipeline:
        batch = next(pipeline)["optical"]
    assert batch["instruction"].shape == (4, 2, config.vlm.instruction_length)
    for row, index in enumerate(batch["record_index"]):
        record = schema.decode(source[int(index)], "test")
        expected = text(record, batch["label_map"][row], 0, int(index))
        for key in ("instruction", "instruction_valid", "answer", "answer_valid", "kind"):
            np.testing.assert_array_equal(batch[key][row], expected[key], err_msg=f"row {row} {key}")
    assert (batch["answer_valid"].sum(-1) > 1).all() and (batch["kind"] < len(examples.KINDS)).all()


def test_stage_one_trains_the_language_side_and_leaves_the_loaded_encoder_exactly(runs):
    assert np.isfinite(runs["last"]["loss"]) and runs["last"]["expert_load/e0"] == 1.0
    _, encoder, _ = load_pretrained(runs["encoder"])
    config, model, step = load_pretrained(runs["stage1"])
    assert step == 2 and config.task == "rsmoe"
    for path, value in named(nnx.state(encoder, nnx.Param)).items():
        np.testing.assert_array_equal(named(nnx.state(model.encoder, nnx.Param))[path], value, err_msg=path)
    fresh = micro_rsmoe("dense", runs["encoder"], runs["data"])
    _, initial, _ = create_state(fresh, sharding.make_mesh({}, jax.devices()[:1]))
    before = named(initial.params)["rsmoe/experts/layers/0/mlp/up"]
    assert not np.allclose(named(nnx.state(model, nnx.Param))["rsmoe/experts/layers/0/mlp/up"], before)


def test_the_initialiser_leaves_the_encoder_it_will_load_undrawn_and_draws_the_rest_as_before(runs):
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    _, loading, _ = create_state(micro_rsmoe("dense", runs["encoder"], runs["data"]), mesh)
    _, drawn, _ = create_state(micro_rsmoe("dense", "", runs["data"]), mesh)   # no encoder to load
    loading, drawn = named(loading.params), named(drawn.params)
    encoder = [k for k in loading if k.startswith("encoder/")]
    assert encoder and not any(loading[k].any() for k in encoder) and any(drawn[k].any() for k in encoder)
    for path in set(loading) - set(encoder):
        np.testing.assert_array_equal(loading[path], drawn[path], err_msg=path)


def test_stage_two_starts_from_stage_one_with_its_lm_in_every_expert_and_trains_on_a_thread(runs):
    config = micro_rsmoe("upcycled", runs["encoder"], runs["data"])
    config.vlm.init_from = runs["stage1"]
    _, source, _ = load_pretrained(runs["stage1"])
    source = named(nnx.state(source, nnx.Param))
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    _, state, _ = create_state(config, mesh)
    with jax.set_mesh(mesh):
        started = named(tasks.for_run(config).start(state, mesh).params)
    for path, value in started.items():
        if path.startswith(("rsmoe/experts/", "rsmoe/router/base", "rsmoe/router/film")):
            assert value.shape[0] == 3
            for k in range(3):
                np.testing.assert_array_equal(value[k], source[path][0], err_msg=path)
        elif path != "rsmoe/router/gate":
            np.testing.assert_array_equal(value, source[path], err_msg=path)
    assert started["rsmoe/router/gate"].shape[-1] == 3 and source["rsmoe/router/gate"].shape[-1] == 1
    with ThreadPoolExecutor(1) as pool:   # as tools.demo runs it: on a thread, beside the probes
        last = pool.submit(train, config, str(runs["root"] / "stage2"), jax.devices()[:2]).result()
    # expert_load: the share of rows choosing each expert, so over the experts it sums to top_k
    assert np.isfinite(last["loss"]) and sum(last[f"expert_load/e{k}"] for k in range(3)) == pytest.approx(
        config.vlm.top_k)


def test_upcycling_names_every_parameter_stage_one_cannot_fill():
    source = {"rsmoe/experts/embed": np.zeros((2, 5, 4)), "encoder/norm/scale": np.zeros(4)}
    target = {"rsmoe/experts/embed": np.zeros((3, 5, 4)), "encoder/norm/scale": np.zeros(8),
              "rsmoe/queries/queries": np.zeros((2, 4))}
    with pytest.raises(ValueError) as e:
        upcycled(source, target, 3)
    for fragment in ("rsmoe/experts/embed: stage 1 has (2, 5, 4)", "encoder/norm/scale", "rsmoe/queries/queries: not in"):
        assert fragment in str(e.value)


def test_the_task_refuses_a_pretraining_run_as_stage_one_and_a_mismatched_encoder(runs):
    config = micro_rsmoe("upcycled", runs["encoder"], runs["data"])
    config.vlm.init_from = runs["encoder"]
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    _, state, _ = create_state(config, mesh)
    with pytest.raises(ValueError, match="not an RS-MoE one"):
        tasks.for_run(config).start(state, mesh)
    config = micro_rsmoe("dense", runs["encoder"], runs["data"])
    config.model.embed_dim = 24
    _, state, _ = create_state(config, mesh)
    with pytest.raises(ValueError, match=r"differs from config.model in \['embed_dim'\]"):
        tasks.for_run(config).start(state, mesh)
