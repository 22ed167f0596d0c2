"""The compression pass: each stage's config and parameter count, the stage transforms on a
micro model, the export (names, layouts, a fresh-process reload), the whole pass and its
argument checks."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import ringmoe_14b, ringmoe_1b, tiny
from ringmoe.compress import merging, pruning, stages, statistics
from ringmoe.compress.export import export
from ringmoe.compress.extraction import extract_modality, flat_params, unrolled
from ringmoe.compress.run import compress
from ringmoe.data.transform import ModalitySpec
from ringmoe.model.checkpoint import load_pretrained
from ringmoe.model.ffn import gelu
from ringmoe.model.ringmoe import create_model
from tests.small import encode, initial_run, micro_config
from tests.xla import FAST_COMPILE


def test_dry_run_of_the_14b_model_matches_the_reference_chain():
    counts = {s["name"]: s["params"] for s in stages.dry_run(ringmoe_14b.get_config(), "optical", 0.25)}
    assert list(counts) == list(stages.STAGES)
    assert counts["full"] == pytest.approx(14.74e9, rel=0.02)
    assert counts["extracted"] == pytest.approx(6.53e9, rel=0.02)
    assert 4.3e9 * 0.98 <= counts["pruned"] <= 4.5e9 * 1.02
    assert counts["dense"] == pytest.approx(1.06e9, rel=0.02)


def test_the_dense_stage_is_configs_ringmoe_1b():
    dense = stages.stage_configs(ringmoe_14b.get_config(), "optical", 0.25)["dense"].model.to_dict()
    target = ringmoe_1b.get_config().model.to_dict()
    dense["moe"].pop("num_collaborative_experts")   # unused once the model is dense
    target["moe"].pop("num_collaborative_experts")
    assert dense == target


def test_kept_experts_and_bad_arguments():
    assert [stages.kept_experts(4, k) for k in (0.25, 0.3, 0.5, 1.0, 0.01)] == [1, 2, 2, 4, 1]
    config = tiny.get_config()
    with pytest.raises(ValueError, match="unknown modality 'lidar'"):
        stages.stage_configs(config, "lidar", 0.25)
    for keep in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            stages.stage_configs(config, "optical", keep)
    with pytest.raises(ValueError, match="already dense"):
        stages.stage_configs(ringmoe_1b.get_config(), "optical", 0.25)
    sar = stages.stage_configs(config, "sar_l1", 0.5)
    assert list(sar["extracted"].model.modalities) == ["sar_l1"]
    assert sar["pruned"].model.moe.num_collaborative_experts == 1 and not sar["dense"].model.moe.enabled
    assert config.model.moe.enabled and len(config.model.modalities) == 4   # the input is not modified


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _micro():
    config = micro_config(("optical", "sar_l2"))
    config.data.mask_block_size = 16
    config.compress.calibration_images = 8
    return config


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """A synthetic data set and a run directory holding a micro model's initial state."""
    config = _micro()
    run, data_dir = initial_run(tmp_path_factory.mktemp("compress"), config, 16)
    return config, run, data_dir


def _pixels(n=3, channels=3, size=32, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, channels)).astype(np.float32)


def test_merge_keeps_a_full_width_expert_exactly_and_apportions_by_gate():
    rng = np.random.default_rng(0)
    d, f = 4, 8
    expert = ("shared", rng.normal(size=(d, f)), rng.normal(size=f), rng.normal(size=(f, d)), rng.normal(size=d), 1.0)
    dense, report = merging.merge_block([expert], f)
    x = rng.normal(size=(5, d))
    act = lambda h: np.asarray(gelu(h))  # noqa: E731  (the model's activation)
    reference = act(x @ expert[1] + expert[2]) @ expert[3] + expert[4]
    merged = act(x @ dense["fc1_kernel"] + dense["fc1_bias"]) @ dense["fc2_kernel"] + dense["fc2_bias"]
    np.testing.assert_allclose(merged, reference, rtol=1e-5, atol=1e-5)
    assert report == [{"group": "shared", "weight": 1.0, "rank": f, "energy_kept": 1.0}]
    # F / N units per group, split inside a group by mean gate; an unused expert gets none.
    assert merging.apportion(12, [1.0, 1.0, 1.0], [12] * 3) == [4, 4, 4]
    assert merging.apportion(4, [0.6, 0.2, 0.0], [8] * 3) == [3, 1, 0]
    assert merging.apportion(6, [0.9, 0.1], [2, 8]) == [2, 4]


def test_statistics_extraction_and_pruning_on_a_micro_model(micro_run):
    config, _, data_dir = micro_run
    model = create_model(config.model, seed=0)
    stats = statistics.expert_statistics(model, config, data_dir, ["optical", "sar_l2"], max_images=5)
    layer = stats["modalities"]["optical"]["layers"][0]
    assert stats["modalities"]["optical"]["images"] == 5 and layer["tokens"] == 5 * 8 * 8
    for group in ("modal", "collaborative"):   # top-1: each token reaches at most one expert of a group
        assert 0 < sum(layer[group]["routed"]) <= layer["tokens"]
        assert 0 < sum(layer[group]["gate_mass"]) <= sum(layer[group]["routed"])

    configs = stages.stage_configs(config, "optical", 0.5)
    params = flat_params(model)
    extracted = extract_modality(params, configs["extracted"])
    x = _pixels()
    for path, value in flat_params(extracted).items():   # the same parameters, exactly
        np.testing.assert_array_equal(value, params[path], err_msg=str(path))
    # The same features, up to float32 rounding: a scanned stage carries every block parameter through
    # the loop, the other modality's experts too, so the two programs are compiled differently.
    np.testing.assert_allclose(np.asarray(encode(extracted, x, "optical").features),
                               np.asarray(encode(model, x, "optical").features), rtol=1e-5, atol=1e-5)
    assert extracted.modalities == ("optical",) and "sar_l2" not in extracted.embeddings

    # Keeping every expert is the identity; keeping one keeps the most-used per layer.
    whole, kept_all = pruning.prune_collaborative(params, stages.pruned_config(configs["extracted"], 1.0),
                                                  stats, "optical")
    assert kept_all == [[0, 1]] * 2
    np.testing.assert_array_equal(np.asarray(encode(whole, x, "optical").features),
                                  np.asarray(encode(model, x, "optical").features))
    _, kept = pruning.prune_collaborative(params, configs["pruned"], stats, "optical")
    routed = statistics.shares(stats, "optical", "collaborative", "routed")
    assert kept == [[int(np.argmax(row))] for row in routed]


def test_pruning_keeps_a_loss_free_routers_bias_with_its_experts(micro_run):
    """A `loss_free_bias` router's selection bias is cut to the kept experts, like its kernel."""
    config, _, data_dir = micro_run
    config = config.copy_and_resolve_references()
    config.model.moe.router = "loss_free_bias"
    model = create_model(config.model, seed=0)
    params = flat_params(model)
    biases = [path for path in params if path[-2:] == ("router", "bias") and "collaborative_experts" in path]
    for i, path in enumerate(biases):
        params[path] = np.arange(params[path].size, dtype=np.float32) + 10 * i
    stats = statistics.expert_statistics(model, config, data_dir, ["optical"], max_images=2)
    configs = stages.stage_configs(config, "optical", 0.5)
    pruned, kept = pruning.prune_collaborative(params, configs["pruned"], stats, "optical")
    pruned_params = flat_params(pruned)
    for i, (path, index) in enumerate(zip(biases, kept)):
        np.testing.assert_array_equal(pruned_params[path], np.asarray(index, np.float32) + 10 * i)


def _expected_swinv2_shapes(config, modality):
    """timm SwinTransformerV2's parameter names and shapes, from the config alone (timm's
    position-bias MLP is 512 wide, a constant of timm's, not of our config)."""
    m = config.model
    c, p, cpb = m.modalities[modality].channels, m.patch_size, 512
    shapes = {"patch_embed.proj.weight": (m.embed_dim, c, p, p), "patch_embed.proj.bias": (m.embed_dim,),
              "patch_embed.norm.weight": (m.embed_dim,), "patch_embed.norm.bias": (m.embed_dim,)}
    for i, (depth, heads) in enumerate(zip(m.depths, m.num_heads)):
        d = m.embed_dim * 2 ** i
        f = int(d * m.mlp_ratio)
        if i + 1 < len(m.depths):   # the original SwinV2 layout: stage i's merging ends it
            shapes.update({f"layers.{i}.downsample.reduction.weight": (2 * d, 4 * d),
                           f"layers.{i}.downsample.norm.weight": (2 * d,),
                           f"layers.{i}.downsample.norm.bias": (2 * d,)})
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}"
            shapes.update({
                f"{b}.attn.qkv.weight": (3 * d, d), f"{b}.attn.q_bias": (d,), f"{b}.attn.v_bias": (d,),
                f"{b}.attn.logit_scale": (heads, 1, 1), f"{b}.attn.proj.weight": (d, d), f"{b}.attn.proj.bias": (d,),
                f"{b}.attn.cpb_mlp.0.weight": (cpb, 2), f"{b}.attn.cpb_mlp.0.bias": (cpb,),
                f"{b}.attn.cpb_mlp.2.weight": (heads, cpb),
                f"{b}.norm1.weight": (d,), f"{b}.norm1.bias": (d,), f"{b}.norm2.weight": (d,), f"{b}.norm2.bias": (d,),
                f"{b}.mlp.fc1.weight": (f, d), f"{b}.mlp.fc1.bias": (f,), f"{b}.mlp.fc2.weight": (d, f),
                f"{b}.mlp.fc2.bias": (d,)})
    last = m.embed_dim * 2 ** (len(m.depths) - 1)
    shapes.update({"norm.weight": (last,), "norm.bias": (last,)})
    return shapes


def test_export_names_shapes_layouts_and_a_fresh_process_reload(tmp_path):
    config = stages.dense_config(stages.extracted_config(_micro(), "optical"))
    model = create_model(config.model, seed=3)
    spec = ModalitySpec(bands=("red", "green", "blue"), mean=np.zeros(3, np.float32), std=np.ones(3, np.float32))
    paths = export(str(tmp_path / "export"), model, config, "optical", spec)

    tensors = load_file(paths["safetensors"])
    assert {k: v.shape for k, v in tensors.items()} == _expected_swinv2_shapes(config, "optical")
    sidecar = json.load(open(paths["sidecar"]))
    assert sidecar["modality"] == "optical" and [b["name"] for b in sidecar["bands"]] == ["red", "green", "blue"]
    assert sidecar["timm_arguments"]["depths"] == [1, 1] and sidecar["parameters"] == sum(
        v.size for v in tensors.values())
    # Layouts, not just shapes: the PyTorch conv / linear conventions reproduce our computations.
    x = _pixels(1)
    w, bias = tensors["patch_embed.proj.weight"], tensors["patch_embed.proj.bias"]
    conv = np.einsum("hiwjc,dcij->hwd", x[0].reshape(8, 4, 8, 4, 3), w) + bias
    np.testing.assert_allclose(conv, np.asarray(model.embeddings["optical"].proj(
        x[0].reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4).reshape(8, 8, 48))), rtol=1e-4, atol=1e-5)
    tokens = np.random.default_rng(1).normal(size=(2, 16)).astype(np.float32)
    block = unrolled(config, model).stages[0].blocks[0]   # the export unstacks scanned blocks
    attn = block.attn
    qkv = np.einsum("nd,dthk->tnhk", tokens, np.asarray(attn.qkv[...])).reshape(3, 2, 16)
    np.testing.assert_allclose(tokens @ tensors["layers.0.blocks.0.attn.qkv.weight"].T, qkv.transpose(1, 0, 2)
                               .reshape(2, 48), rtol=1e-4, atol=1e-6)
    fc1 = block.ffn.ffn.fc1
    np.testing.assert_allclose(tokens @ tensors["layers.0.blocks.0.mlp.fc1.weight"].T, np.asarray(fc1(tokens)) -
                               np.asarray(fc1.bias[...]), rtol=1e-4, atol=1e-6)

    inputs = _pixels(2, seed=5)
    np.save(tmp_path / "x.npy", inputs)
    in_memory = np.asarray(encode(model, inputs, "optical").features)
    script = ("import sys, numpy as np\n"
              "from ringmoe.model.checkpoint import load_pretrained\n"
              "from tests.small import encode\n"
              "config, model, _ = load_pretrained(sys.argv[1])\n"
              "np.save(sys.argv[3], np.asarray(encode(model, np.load(sys.argv[2]), 'optical').features))\n")
    subprocess.run([sys.executable, "-c", script, paths["checkpoint"], str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npy")], check=True, cwd=REPO, env={**os.environ, "XLA_FLAGS": FAST_COMPILE})
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), in_memory)
    reloaded_config, _, _ = load_pretrained(paths["checkpoint"])
    assert reloaded_config.model.to_dict() == config.model.to_dict()


def test_compress_runs_every_stage_and_saves_loadable_models(micro_run, tmp_path):
    config, checkpoint, data_dir = micro_run
    out = str(tmp_path / "out")
    report = compress(checkpoint, config, "optical", out, keep=0.5, distill_steps=2, data_dir=data_dir)
    names = [s["name"] for s in report["stages"]]
    assert names == ["full", "extracted", "pruned", "dense_refit", "dense"]   # the default merge: refit
    params = [s["params"] for s in report["stages"]]
    assert params == sorted(params, reverse=True) and params[3] == params[4]
    kept = report["kept_collaborative_experts"]
    assert len(kept) == 2 and all(len(k) == 1 and 0 <= k[0] < 2 for k in kept)   # 1 of 2 per block
    for s in report["stages"][1:]:
        loaded_config, model, _ = load_pretrained(s["path"])
        assert model.modalities == ("optical",)
    assert not loaded_config.model.moe.enabled
    for name in ("full.json", "full.png", "pruned.json", "pruned.png"):
        assert os.path.getsize(os.path.join(out, "statistics", name)) > 0
    assert os.path.exists(os.path.join(out, "distill", "loss_curves.png"))
    assert set(report["export"]) == {"safetensors", "timm_config", "sidecar", "checkpoint"}
    markdown = open(os.path.join(out, "report.md")).read()
    assert "| dense | " in markdown and "| block | tokens | rho | held-out error | SVD merge |" in markdown
    assert len(report["merge_fit"]) == len(report["merge_ranks"]) == 2
    assert all(np.isfinite(v) for v in report["distill_last"].values())


def test_compress_rejects_bad_arguments_before_any_work(micro_run, tmp_path):
    config, checkpoint, data_dir = micro_run
    out = str(tmp_path / "never")
    cases = [("lidar", 0.5, config, "unknown modality 'lidar'"), ("optical", 1.5, config, r"in \(0, 1\]"),
             ("optical", 0.0, config, r"in \(0, 1\]")]
    with pytest.raises(ValueError, match=r"probed scores given for \['dense'\], not stages of this pass"):
        compress(checkpoint, config, "optical", out, keep=0.5, distill_steps=0, data_dir=data_dir, probed={"dense": 1})
    other = _micro()
    other.model.embed_dim = 32
    cases.append(("optical", 0.5, other, "another model config: model.embed_dim: checkpoint 16, config 32"))
    for modality, keep, c, message in cases:
        with pytest.raises(ValueError, match=message):
            compress(checkpoint, c, modality, out, keep=keep, distill_steps=1, data_dir=data_dir)
    assert not os.path.exists(out)
