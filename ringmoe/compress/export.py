"""Export of the dense model: a directory timm loads, plus our own checkpoint.

    <out>/model.safetensors  the encoder under timm's SwinTransformerV2 names and
                             PyTorch layouts (Linear (out, in), Conv2d (out, in, kh, kw))
    <out>/config.json        timm's model config (architecture, model_args,
                             pretrained_cfg with input size and per-band mean / std):
                             `timm.create_model("local-dir:<out>", pretrained=True)`
    <out>/model.json         what a remote-sensing user needs: the modality, every band
                             with its physics (wavelength / bandwidth in nm, or radar
                             frequency in GHz and polarisation), the pixels' physical
                             unit, the normalisation, every tensor's shape, our config
    <out>/checkpoint/        Orbax (`ringmoe.model.checkpoint.save_model`): loads with
                             `load_pretrained` / `tools.evaluate --checkpoint`
All files are written readable by everyone (0644).

The names and layouts: ringmoe/compress/timm_layout.py (one map, used both ways).
The encoder computes what timm's computes (exact GELU, LayerNorm eps 1e-5, a
512-wide position-bias MLP, mask value -100): `make parity` checks it in PyTorch.
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from ringmoe.compress.timm_layout import to_timm
from ringmoe.model.checkpoint import save_model
from ringmoe.model.ringmoe import RingMoE

FORMAT = "ringmoe-swinv2-export"


def timm_arguments(config, modality: str) -> dict:
    """Keyword arguments of timm's SwinTransformerV2 that this state dict loads into."""
    m = config.model
    return {"img_size": m.image_size, "patch_size": m.patch_size, "in_chans": m.modalities[modality].channels,
            "embed_dim": m.embed_dim, "depths": list(m.depths), "num_heads": list(m.num_heads),
            "window_size": m.window_size, "mlp_ratio": m.mlp_ratio, "num_classes": 0}


# A registered timm SwinV2 whose builder takes every size from `model_args` (timm merges
# the entry point's defaults under them), so any of our configs is expressed exactly.
TIMM_ARCHITECTURE = "swinv2_tiny_window8_256"


def timm_config(config, modality: str, spec) -> dict:
    """timm's config.json: architecture, model_args and pretrained_cfg (input size, per-band
    mean / std in the data's physical units, no classifier, no first-conv adaptation)."""
    m = config.model
    return {"architecture": TIMM_ARCHITECTURE, "num_classes": 0,
            "num_features": m.embed_dim * 2 ** (len(m.depths) - 1),
            "model_args": timm_arguments(config, modality),
            "pretrained_cfg": {"input_size": [spec.channels, m.image_size, m.image_size], "fixed_input_size": True,
                               "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
                               "mean": [float(v) for v in spec.mean], "std": [float(v) for v in spec.std],
                               "num_classes": 0, "first_conv": None, "classifier": None,
                               "description": f"RingMoE dense SwinV2 encoder for {modality} "
                                              f"({spec.unit or 'unitless'} pixels, normalised per band)"}}


def band_metadata(config, modality: str, spec) -> list[dict]:
    """Every band with its physics (the data set's manifest; the config's wavelengths for a
    spectral modality the manifest lacks them for): names, wavelength / bandwidth in nm,
    radar frequency in GHz, polarisation."""
    configured = {b[0]: {"wavelength_nm": b[1], "bandwidth_nm": b[2]}
                  for b in config.model.modalities[modality].get("bands", ()) or ()}
    known = {b["name"]: b for b in spec.band_metadata}
    return [{"name": name, **configured.get(name, {}), **known.get(name, {})} for name in spec.bands]


UNITS = {"wavelength_nm": "nm", "bandwidth_nm": "nm", "frequency_ghz": "GHz",
         "reflectance": "surface or top-of-atmosphere reflectance, unitless, typically in [0, 1]",
         "db": "backscatter sigma0 in dB, 10 log10 of linear power",
         "complex": "scattering-matrix element, Re and Im as separate bands, linear amplitude"}


def _write_json(path: str, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=1)
    os.chmod(path, 0o644)


def export(directory: str, model: RingMoE, config, modality: str, spec, extra: dict | None = None) -> dict:
    """Writes the four artefacts of the dense `model` under `directory`; returns their paths.

    `spec` is the modality's `ModalitySpec` (bands with their physics, the unit,
    normalisation mean / std) of the data the model was trained on.
    """
    os.makedirs(directory, exist_ok=True)
    tensors = to_timm(model, modality)
    sidecar = {
        "format": FORMAT,
        "architecture": "SwinV2 (timm SwinTransformerV2 parameter names, PyTorch layouts)",
        "modality": modality,
        "timm_arguments": timm_arguments(config, modality),
        "unit": spec.unit,
        "bands": band_metadata(config, modality, spec),
        "units": {k: v for k, v in UNITS.items() if k in ("wavelength_nm", "bandwidth_nm", "frequency_ghz")
                  or k == spec.unit},
        "normalization": {"mean": np.asarray(spec.mean).tolist(), "std": np.asarray(spec.std).tolist(),
                          "formula": "(pixel - mean) / std per band, pixel in the unit above"},
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "parameters": int(sum(v.size for v in tensors.values())),
        "not_exported": ["mask_token (SimMIM)", "decoders (SimMIM)", "power_decoders"],
        **(extra or {}),
    }
    paths = {"safetensors": os.path.join(directory, "model.safetensors"),
             "timm_config": os.path.join(directory, "config.json"),
             "sidecar": os.path.join(directory, "model.json")}
    save_file(tensors, paths["safetensors"], metadata={"format": FORMAT, "modality": modality})
    os.chmod(paths["safetensors"], 0o644)   # safetensors writes 0600
    _write_json(paths["timm_config"], timm_config(config, modality, spec))
    _write_json(paths["sidecar"], {**sidecar, "config": json.loads(config.to_json())})
    paths["checkpoint"] = save_model(os.path.join(directory, "checkpoint"), config, model,
                                     {k: v for k, v in sidecar.items() if k not in ("tensors", "format")})
    return paths
