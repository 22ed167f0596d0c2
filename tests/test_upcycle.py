"""Sparse upcycling (ringmoe/upcycle): a dense model turned into the hierarchical MoE.

`pytest -k upcycl` selects these (and the upcycling grid's test in test_ablate.py).
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ringmoe.model.ringmoe import ParamKeys, RingMoE
from ringmoe.upcycle import build, plan, routers
from tests.small import encode, micro_config

MODALITIES = ("optical", "sar_l1")


def _config(moe: bool, *, depths=(2, 1), router="dropless", top_k=1, router_init="uniform", **upcycle):
    config = micro_config(MODALITIES)
    config.model.depths, config.model.num_heads = depths, (1, 2)[:len(depths)]
    config.model.moe.enabled = moe
    config.model.moe.router, config.model.moe.top_k = router, top_k
    config.upcycle.router_init = router_init
    for k, v in upcycle.items():
        config.upcycle[k] = v
    return config


def _dense_source(config, seed=3):
    """A dense model whose every parameter (biases included) is perturbed off its init, so that
    a copy that drops or mis-scales any of them shows."""
    model = RingMoE(config.model, rngs=ParamKeys(seed))
    params = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(tree, leaves))
    return model


def _upcycled(source_model, source_config, config, calibrated=None):
    source = {build.name(p): v[...] for p, v in nnx.to_flat_state(nnx.state(source_model, nnx.Param))}
    graphdef, abstract = jax.eval_shape(lambda: nnx.split(RingMoE(config.model, rngs=ParamKeys(0)), nnx.Param))
    the_plan = plan.make_plan(build.shapes(nnx.state(source_model, nnx.Param)), build.shapes(abstract))
    kernel = routers.router_init(config.upcycle.router_init).kernel_fn(calibrated or {})
    params = jax.jit(lambda s: build.upcycled_params(config, the_plan, s, kernel))(source)
    return the_plan, nnx.merge(graphdef, params)


def _features(model, modality, seed=0):
    channels = {"optical": 3, "sar_l1": 8}[modality]
    pixels = jax.random.normal(jax.random.key(seed), (4, 32, 32, channels))
    encoded = encode(model, pixels, modality)
    return [encoded.features, *encoded.stage_features]


def _distance(a, b):
    return max(float(jnp.linalg.norm(x - y) / jnp.linalg.norm(x)) for x, y in zip(a, b))


@pytest.mark.parametrize("router,top_k,router_init", [
    ("dropless", 1, "uniform"),          # top-1: exact when every logit is equal
    ("dropless", 2, "random"),           # top-2 renormalises its gates: exact with any router
    ("token_choice", 2, "random"),       # ... as long as capacity drops nothing (factor raised below)
])
def test_upcycling_is_exact_at_step_0(router, top_k, router_init):
    """y = modal + collaborative + shared of three copies of f, each group's output layer scaled
    to a third of f (build.py), gives the dense features to float tolerance, every stage."""
    dense_config = _config(False)
    config = _config(True, router=router, top_k=top_k, router_init=router_init)
    config.model.moe.capacity_factor = 4.0   # C = S: nothing dropped
    source = _dense_source(dense_config)
    _, moe = _upcycled(source, dense_config, config)
    for m in MODALITIES:
        assert _distance(_features(source, m), _features(moe, m)) < 2e-5, m


def test_upcycling_top1_random_router_starts_near_not_at_the_dense_model():
    """Top-1 keeps the gate p_max, not 1/E: a random router starts close (gates near 1/E), a
    router that drops tokens (capacity 1.2) further; neither is exact, and the tool reports it."""
    dense_config = _config(False)
    source = _dense_source(dense_config)
    near = []
    for router in ("dropless", "token_choice"):
        config = _config(True, router=router, router_init="random")
        _, moe = _upcycled(source, dense_config, config)
        near.append(_distance(_features(source, "optical"), _features(moe, "optical")))
    assert 1e-5 < near[0] < 0.05, near
    assert near[1] > near[0], near


def test_upcycling_output_scales_give_each_group_an_equal_share():
    config = _config(True)
    moe = config.model.moe
    moe.num_modal_experts, moe.num_collaborative_experts, moe.router = 4, 2, "token_choice"
    # three groups; top-1 gate sum 1/E: modal 1/(3 * 1/4), collaborative 1/(3 * 1/2), shared 1/3
    assert build.output_scales(moe) == pytest.approx({"modal": 4 / 3, "collaborative": 2 / 3, "shared": 1 / 3})
    moe.top_k, moe.shared_expert, moe.num_collaborative_experts = 2, False, 0
    # one group, top-2 renormalised (gate sum 1): the experts' sum is f itself
    assert build.output_scales(moe) == pytest.approx({"modal": 1.0, "shared": 1.0})


def test_upcycle_plan_copies_lists_fresh_parts_and_refuses_bad_sources():
    dense_config = _config(False)
    dense_config.model.modalities = {"optical": dense_config.model.modalities.optical}
    source = build.abstract_source(dense_config)
    config = _config(True)
    target = build.shapes(build.abstract_source(config))
    the_plan = plan.make_plan(build.shapes(source), target)
    # SAR-L1's patch embedding, decoder and power decoder are new; so is every router
    assert sorted(the_plan.fresh_parts()) == ["decoders/sar_l1", "embeddings/sar_l1", "power_decoders/sar_l1"]
    counts = the_plan.count(target)
    assert counts["router"] > 0 and counts["expert"] > 0 and counts["shared"] > 0 and counts["copied"] > 0
    kinds = {p: e.kind for p, e in the_plan.entries.items()}
    assert kinds["stages/0/blocks/ffn/modal_experts/optical/experts/w_in"] == "expert"
    assert kinds["stages/0/blocks/ffn/modal_experts/sar_l1/experts/w_in"] == "expert"   # the FFN serves every modality
    for shared in ("stages/0/blocks/attn/qkv", "stages/0/blocks/norm2/scale", "stages/0/merging/reduction/kernel",
                   "embeddings/optical/proj/kernel" if "embeddings/optical/proj/kernel" in kinds else "norm/scale"):
        assert kinds[shared] == "copied", shared
    assert kinds["stages/0/blocks/ffn/shared_expert/fc2/kernel"] == "shared"
    assert all(e.kind == "router" for p, e in the_plan.entries.items() if "/router/" in p)

    narrower = _config(False)
    narrower.model.mlp_ratio = 2.0     # a dense FFN of another width cannot be the experts
    with pytest.raises(plan.UpcycleError, match=r"stages/0/blocks/ffn/collaborative_experts/experts/b_in \(2, 2, 64\) "
                                                r"needs stages/0/blocks/ffn/ffn/fc1/bias of shape \(2, 64\), the source "
                                                r"has \(2, 32\)"):
        plan.make_plan(build.shapes(build.abstract_source(narrower)), target)
    wider = _config(False)
    wider.model.embed_dim = 24        # every parameter wrong: the first 8 named, then a count
    with pytest.raises(plan.UpcycleError, match=r"^the source cannot fill 67 parameter\(s\) .* and 59 more$"):
        plan.make_plan(build.shapes(build.abstract_source(wider)), target)
    with pytest.raises(plan.UpcycleError, match="the source is a Mixture of Experts"):
        plan.make_plan(target, target)


def test_drop_upcycling_redraws_that_share_of_each_experts_hidden_units():
    dense_config = _config(False)
    source = _dense_source(dense_config)
    config = _config(True, router_init="random", reinit_fraction=0.25)
    _, moe = _upcycled(source, dense_config, config)
    fc1 = source.stages[0].blocks.ffn.ffn.fc1.kernel[...]              # (L, D, F)
    experts = moe.stages[0].blocks.ffn.modal_experts["optical"].experts
    w_in, b_in, w_out = experts.w_in[...], experts.b_in[...], experts.w_out[...]
    hidden = fc1.shape[-1]
    changed = jnp.any(w_in != fc1[:, None], axis=-2)                   # (L, E, F)
    assert np.all(np.sum(changed, axis=-1) == round(0.25 * hidden))
    assert not np.all(changed[:, 0] == changed[:, 1])                  # each expert its own draw
    fc1_bias = source.stages[0].blocks.ffn.ffn.fc1.bias[...]
    assert np.array_equal(np.asarray(b_in != fc1_bias[:, None]), np.asarray(changed))   # same units in b_in
    scale = build.output_scales(config.model.moe)["modal"]
    fc2 = source.stages[0].blocks.ffn.ffn.fc2.kernel[...]
    rows_changed = jnp.any(~jnp.isclose(w_out, scale * fc2[:, None]), axis=-1)
    assert np.array_equal(np.asarray(rows_changed), np.asarray(changed))   # ... and in w_out's rows


def test_upcycling_noise_makes_identical_experts_differ_by_the_asked_amount():
    dense_config = _config(False)
    source = _dense_source(dense_config)
    config = _config(True, router_init="random", noise=0.1)
    _, moe = _upcycled(source, dense_config, config)
    fc1 = source.stages[0].blocks.ffn.ffn.fc1.kernel[...]
    w_in = moe.stages[0].blocks.ffn.collaborative_experts.experts.w_in[...]
    ratio = jnp.std(w_in - fc1[:, None], axis=(-2, -1)) / jnp.std(fc1, axis=(-2, -1))[:, None]
    assert np.allclose(ratio, 0.1, rtol=0.1), ratio
    assert float(jnp.max(jnp.abs(w_in[:, 0] - w_in[:, 1]))) > 0


def test_upcycling_kmeans_recovers_clusters_a_linear_router_reproduces():
    """Spherical k-means on four well-separated directions: each cluster is one centroid, and
    argmax <x, c_e> (what a bias-free router computes) assigns every token to its own cluster."""
    key = jax.random.key(0)
    centres = jnp.eye(8)[:4] * 5.0 + 1.0                               # a common offset, like real tokens
    labels = jnp.arange(400) % 4
    x = centres[labels] + 0.3 * jax.random.normal(key, (400, 8))
    x = x * jax.random.uniform(jax.random.key(1), (400, 1), minval=0.5, maxval=3.0)   # norms vary
    centroids = routers.spherical_kmeans(x, jax.random.key(2), 4, 25)
    assigned = jnp.argmax(x @ centroids.T, axis=-1)
    # every cluster maps to exactly one centroid
    table = np.zeros((4, 4), int)
    np.add.at(table, (np.asarray(labels), np.asarray(assigned)), 1)
    assert sorted(table.max(axis=1)) == [100] * 4 and len(set(table.argmax(axis=1))) == 4
    assert np.allclose(np.linalg.norm(np.asarray(centroids), axis=-1), 1.0, atol=1e-5)


def test_unknown_router_init_is_an_error():
    with pytest.raises(plan.UpcycleError, match="unknown upcycle.router_init 'kmean'"):
        routers.router_init("kmean")


def test_upcycling_dry_run_is_abstract_and_counts_bytes_per_device():
    from jax.sharding import AbstractMesh
    from ringmoe.sharding import MESH_AXES, mesh_shape
    dense_config = _config(False)
    config = _config(True)
    config.mesh.update({"data": 1, "fsdp": -1, "expert": 2, "tensor": 1})
    sizes = mesh_shape(config.mesh, 8)
    mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)
    report = build.dry_run(dense_config, config, mesh, routers.router_init("random").kernel_fn({}))
    assert report["devices"] == 8 and report["mesh"]["fsdp"] == 4
    assert sum(report["by_kind"].values()) == report["target_params"]
    per = report["per_device_bytes"]
    assert per["target_optimizer"] == pytest.approx(2 * per["target_params"], rel=0.01)   # Adam's mu and nu
    assert per["target_params"] < 4 * report["target_params"] / 2                         # sharded, not replicated
    json.dumps(report)
    assert math.isfinite(per["peak_estimate"])


def test_upcycled_checkpoint_resumes_at_step_0_and_trains(tmp_path):
    """tools.upcycle's library call on a dense run: k-means routers from the data set, a
    step-0 checkpoint the trainer resumes (same config) with the upcycled weights, a fresh
    optimiser and the data stream from its start; a second upcycle into it is refused."""
    from pretrain.train import train
    from ringmoe.model.checkpoint import load_pretrained
    from ringmoe.upcycle.run import upcycle
    from tests.small import initial_run

    dense_config = _config(False)
    run, data_dir = initial_run(tmp_path, dense_config, 16)
    config = _config(True, router="token_choice", router_init="kmeans", calibration_images=8, kmeans_tokens=256)
    config.data_dir, config.batch_size, config.total_steps = data_dir, 16, 2
    config.log_every = config.checkpoint_every = 1
    config.eval_every = 0
    out = str(tmp_path / "upcycled")
    report = upcycle(run, config, out)
    assert set(report["step0_feature_distance"]) == set(MODALITIES)
    # not 0: top-1 gates are p_max, not 1/E, and capacity 1.2 drops tokens of the larger clusters
    assert all(0 < d < 0.5 for d in report["step0_feature_distance"].values()), report["step0_feature_distance"]
    assert report["params"]["fresh"] == 0 and report["fresh_parts"] == []

    _, dense, _ = load_pretrained(run)
    _, upcycled, step = load_pretrained(out)
    assert step == 0
    fc1 = dense.stages[1].blocks.ffn.ffn.fc1.kernel[...]
    assert np.array_equal(upcycled.stages[1].blocks.ffn.collaborative_experts.experts.w_in[...][:, 1], fc1)
    kernel = upcycled.stages[0].blocks.ffn.modal_experts["optical"].router.kernel[...]   # (L, D, E)
    assert np.allclose(np.linalg.norm(kernel, axis=1), 0.02 * np.sqrt(kernel.shape[1]), rtol=1e-4)

    last = train(config, out)
    assert last["step"] == 2 and math.isfinite(last["loss"])
    with pytest.raises(plan.UpcycleError, match="already holds checkpoints"):
        upcycle(run, config, out)


def test_upcycling_builds_straight_into_the_training_shardings():
    """On an fsdp x expert mesh of the 8 test devices, every upcycled array carries the sharding
    training gives it (experts split over `expert`), with the values of an unsharded build."""
    from ringmoe import sharding
    dense_config = _config(False)
    source = _dense_source(dense_config)
    config = _config(True, router_init="random", reinit_fraction=0.5, noise=0.1)
    config.model.moe.num_modal_experts = config.model.moe.num_collaborative_experts = 2
    config.mesh.update({"data": 1, "fsdp": 4, "expert": 2, "tensor": 1})
    mesh = sharding.make_mesh(config.mesh)
    kernel = routers.router_init("random").kernel_fn({})
    with jax.set_mesh(mesh):
        _, _, state, shardings = build.upcycled_state(nnx.state(source, nnx.Param), dense_config, config, mesh, kernel)
    for array, expected in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert array.sharding.is_equivalent_to(expected, array.ndim)
    w_in = state.params["stages"][0]["blocks"]["ffn"]["collaborative_experts"]["experts"]["w_in"][...]
    assert w_in.sharding.spec[1] == "expert"                             # (L, E, D, F): E over `expert`
    _, alone = _upcycled(source, dense_config, config)
    # the same draws; the weight's std (noise, redraws) is a sharded reduction: equal to rounding
    np.testing.assert_allclose(np.asarray(w_in), alone.stages[0].blocks.ffn.collaborative_experts.experts.w_in[...],
                               rtol=1e-5, atol=1e-7)
    assert int(state.step) == 0 and float(jnp.sum(jnp.abs(state.opt_state[1][0].mu["stages"][0]["blocks"]["ffn"]
                                                        ["collaborative_experts"]["experts"]["w_in"][...]))) == 0


def test_upcycling_a_public_swinv2_through_import_and_the_cli(tmp_path):
    """A SwinV2 in timm's layout (here: our own export of a dense optical model) imported with
    tools.import_swinv2, then upcycled by the tools.upcycle command line into a two-modality
    MoE: SAR-L1's parts are fresh and named, every expert is the imported FFN."""
    import os
    import subprocess
    import sys

    from ringmoe.compress import stages
    from ringmoe.compress.export import export
    from ringmoe.data.transform import ModalitySpec
    from ringmoe.model.checkpoint import load_pretrained

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dense_config = stages.dense_config(stages.extracted_config(micro_config(("optical",)), "optical"))
    spec = ModalitySpec(bands=tuple("RGB"), mean=np.full(3, 0.1, np.float32), std=np.full(3, 0.2, np.float32),
                        unit="reflectance")
    paths = export(str(tmp_path / "export"), _dense_source(dense_config), dense_config, "optical", spec)
    files = {}
    for name, body in (("dense", "stages.dense_config(stages.extracted_config(micro_config(('optical',)), "
                                 "'optical'))"),
                       ("moe", "micro_config(('optical', 'sar_l1'))")):
        files[name] = tmp_path / f"{name}.py"
        files[name].write_text("from ringmoe.compress import stages\nfrom tests.small import micro_config\n\n"
                               f"def get_config():\n    return {body}\n")

    def tool(*args):
        proc = subprocess.run([sys.executable, "-m", *args], cwd=repo, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    imported = tool("tools.import_swinv2", "--safetensors", paths["safetensors"], "--config", str(files["dense"]),
                    "--out", str(tmp_path / "imported"))["out"]
    report = tool("tools.upcycle", "--from", imported, "--config", str(files["moe"]), "--out",
                  str(tmp_path / "moe"), "--router-init", "random", "--noise", "0.0")
    assert sorted(report["fresh_parts"]) == ["decoders/sar_l1", "embeddings/sar_l1", "power_decoders/sar_l1"]
    assert report["step0_feature_distance"] == {}          # no data set given: nothing to measure on
    _, dense, _ = load_pretrained(imported)
    config, moe, step = load_pretrained(str(tmp_path / "moe"))
    assert step == 0 and config.upcycle.router_init == "random" and set(moe.embeddings) == {"optical", "sar_l1"}
    fc1 = dense.stages[0].blocks.ffn.ffn.fc1.kernel[...]
    for experts in (moe.stages[0].blocks.ffn.modal_experts["sar_l1"].experts,
                    moe.stages[0].blocks.ffn.collaborative_experts.experts):
        assert all(np.array_equal(experts.w_in[...][:, e], fc1) for e in range(experts.w_in.shape[1]))
    np.testing.assert_array_equal(moe.embeddings["optical"].proj.kernel[...], dense.embeddings["optical"].proj.kernel[...])
