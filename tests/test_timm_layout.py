"""timm's SwinV2 layout both ways (ringmoe/compress/timm_layout.py), the exported directory timm
reads, and the numerics that make our encoder compute what timm's computes. PyTorch itself is
in `make parity` (tools.parity); nothing here imports it."""
import json
import math
import os
import stat
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from ringmoe.compress import stages
from ringmoe.compress.export import export
from ringmoe.compress.extraction import build, flat_params
from ringmoe.compress.timm_layout import from_timm, import_swinv2, original_names, to_timm
from ringmoe.data.transform import ModalitySpec
from ringmoe.model import swin
from ringmoe.model.ffn import gelu
from ringmoe.model.ringmoe import create_model
from tests.small import micro_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dense(modality):
    return stages.dense_config(stages.extracted_config(micro_config((modality,)), modality))


def _moved(config, seed=0):
    """Every parameter off its initial value (zero post-norm scales would hide a wrong map)."""
    rng = np.random.default_rng(seed)
    params = flat_params(create_model(config.model, seed=seed))
    return build(config, {p: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype) for p, v in params.items()})


def _spec(bands, metadata=()):
    n = len(bands)
    return ModalitySpec(bands=tuple(bands), mean=np.full(n, 0.1, np.float32), std=np.full(n, 0.2, np.float32),
                        unit="reflectance", band_metadata=tuple(metadata))


@pytest.fixture(scope="module")
def optical(tmp_path_factory):
    config = _dense("optical")
    model = _moved(config)
    metadata = [{"name": "R", "wavelength_nm": 664.6, "bandwidth_nm": 31.0},
                {"name": "G", "wavelength_nm": 559.8, "bandwidth_nm": 36.0},
                {"name": "B", "wavelength_nm": 492.4, "bandwidth_nm": 66.0}]
    directory = str(tmp_path_factory.mktemp("export") / "optical")
    paths = export(directory, model, config, "optical", _spec("RGB", metadata))
    return config, model, paths


def test_export_then_import_gives_every_parameter_back_bit_for_bit(optical):
    config, model, paths = optical
    imported, report = import_swinv2(paths["safetensors"], config)
    ours, back = flat_params(model), flat_params(imported)
    exported = [p for p in ours if p[0] != "decoders" and p != ("mask_token",)]
    for path in exported:
        np.testing.assert_array_equal(back[path], ours[path], err_msg="/".join(map(str, path)))
    assert report["initialised_not_imported"] and all(
        k.startswith("decoders/") or k == "mask_token" for k in report["initialised_not_imported"])
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(imported.encode(x, "optical").features),
                                  np.asarray(model.encode(x, "optical").features))


def test_a_wavelength_embedding_exports_as_the_convolution_it_computes(tmp_path):
    config = _dense("multispectral")
    model = _moved(config)
    paths = export(str(tmp_path / "ms"), model, config, "multispectral", _spec([f"B{i}" for i in range(12)]))
    plain = config.copy_and_resolve_references()
    plain.model.modalities.multispectral.embed, plain.model.modalities.multispectral.bands = "patch", ()
    with pytest.raises(ValueError, match="wavelength-conditioned embedding, which a SwinV2 checkpoint cannot fill"):
        import_swinv2(paths["safetensors"], config)
    imported, _ = import_swinv2(paths["safetensors"], plain)
    again = to_timm(imported, "multispectral")
    exported = load_file(paths["safetensors"])
    assert again.keys() == exported.keys() and all(np.array_equal(again[k], exported[k]) for k in exported)
    x = np.random.default_rng(2).standard_normal((2, 32, 32, 12)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(imported.encode(x, "multispectral").features),
                               np.asarray(model.encode(x, "multispectral").features), rtol=1e-5, atol=1e-5)


def test_a_mismatched_checkpoint_names_the_tensor_and_both_shapes(optical, tmp_path):
    config, model, paths = optical
    tensors = load_file(paths["safetensors"])
    bad = dict(tensors, **{"layers.0.blocks.0.mlp.fc1.weight": np.zeros((7, 16), np.float32)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"tensor layers\.0\.blocks\.0\.mlp\.fc1\.weight has shape \(7, 16\), "
                                         r"the config needs \(64, 16\)"):
        import_swinv2(str(tmp_path / "bad.safetensors"), config)
    missing = {k: v for k, v in tensors.items() if k != "norm.bias"}
    with pytest.raises(ValueError, match=r"tensor norm\.bias is missing"):
        from_timm(missing, model, "optical")
    deeper = dict(tensors, **{"layers.1.blocks.1.norm1.weight": np.zeros(32, np.float32)})
    with pytest.raises(ValueError, match=r"tensor layers\.1\.blocks\.1\.norm1\.weight has no place"):
        from_timm(deeper, model, "optical")
    with pytest.raises(ValueError, match="target config has MoE layers"):
        moe_config = micro_config(("optical",))
        from_timm(tensors, create_model(moe_config.model, seed=0), "optical")


def test_timms_native_layout_reads_as_the_original_one(optical):
    """The file is in the original layout (patch merging ends stage i); a checkpoint saved from a
    timm model has it at the start of stage i + 1, a classifier head and buffers."""
    _, _, paths = optical
    original = load_file(paths["safetensors"])
    assert "layers.0.downsample.reduction.weight" in original and not any(
        k.startswith("layers.1.downsample") for k in original)
    native = {("layers.1.downsample" + k[len("layers.0.downsample"):] if k.startswith("layers.0.downsample")
               else k): v for k, v in original.items()}
    native["layers.0.blocks.0.attn.relative_position_index"] = np.zeros((16, 16), np.int64)
    native["head.fc.weight"] = np.zeros((10, 32), np.float32)
    assert original_names(native).keys() == original.keys()
    assert original_names(original).keys() == original.keys()


def test_the_export_directory_is_what_timm_and_a_remote_sensing_user_read(optical):
    config, _, paths = optical
    for key in ("safetensors", "timm_config", "sidecar"):
        assert stat.S_IMODE(os.stat(paths[key]).st_mode) == 0o644, key
    timm_config = json.load(open(paths["timm_config"]))
    assert timm_config["architecture"].startswith("swinv2_") and timm_config["num_classes"] == 0
    assert timm_config["model_args"] == {"img_size": 32, "patch_size": 4, "in_chans": 3, "embed_dim": 16,
                                         "depths": [1, 1], "num_heads": [1, 2], "window_size": 4,
                                         "mlp_ratio": config.model.mlp_ratio, "num_classes": 0}
    cfg = timm_config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["mean"] == pytest.approx([0.1] * 3)
    assert cfg["std"] == pytest.approx([0.2] * 3) and cfg["first_conv"] is None and cfg["num_classes"] == 0
    sidecar = json.load(open(paths["sidecar"]))
    assert sidecar["unit"] == "reflectance" and sidecar["units"]["wavelength_nm"] == "nm"
    assert sidecar["bands"][0] == {"name": "R", "wavelength_nm": 664.6, "bandwidth_nm": 31.0}


def test_import_tool_saves_a_model_evaluate_reads(optical, tmp_path):
    _, _, paths = optical
    config_file = tmp_path / "dense.py"
    config_file.write_text("from ringmoe.compress import stages\nfrom tests.small import micro_config\n\n"
                           "def get_config():\n    return stages.dense_config(stages.extracted_config("
                           "micro_config(('optical',)), 'optical'))\n")
    run = [sys.executable, "-m", "tools.import_swinv2", "--safetensors", paths["safetensors"], "--config",
           str(config_file), "--out", str(tmp_path / "imported")]
    proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["modality"] == "optical" and summary["tensors"] == len(load_file(paths["safetensors"]))
    from ringmoe.model.checkpoint import load_pretrained
    _, model, _ = load_pretrained(summary["out"])
    assert set(model.embeddings) == {"optical"}
    bad = dict(load_file(paths["safetensors"]), **{"norm.weight": np.zeros(5, np.float32)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    proc = subprocess.run(run[:4] + [str(tmp_path / "bad.safetensors")] + run[5:-1] + [str(tmp_path / "x")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"tools.import_swinv2: error: import: {tmp_path / 'bad.safetensors'}: tensor norm.weight has shape (5,), "
        "the config needs (32,)")


def test_the_encoder_uses_timms_numerics():
    """Exact GELU (jax.nn.gelu's default tanh form is up to ~5e-4 off), LayerNorm eps 1e-5
    everywhere, timm's mask value and position-bias width."""
    x = np.linspace(-6, 6, 1001).astype(np.float32)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x))), exact, rtol=0, atol=2e-6)
    model = create_model(_dense("optical").model, seed=0)
    norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.LayerNorm)]
    assert norms and {m.epsilon for m in norms} == {1e-5}
    assert swin.MASK_VALUE == -100.0 and swin.CPB_HIDDEN == 512
