"""Export of the dense model: Orbax checkpoint, safetensors with standard SwinV2 names, JSON sidecar.

    <out>/checkpoint/        Orbax (`ringmoe.model.checkpoint.save_model`): loads with
                             `load_pretrained` / `tools.evaluate --checkpoint`
    <out>/model.safetensors  the encoder under timm's SwinTransformerV2 names and
                             PyTorch layouts (Linear (out, in), Conv2d (out, in, kh, kw))
    <out>/model.json         config, modality, bands with wavelengths, normalisation
                             statistics, timm constructor arguments, every tensor's shape

Name map (i = stage, j = block; our patch merging ends stage i, timm's
`downsample` starts stage i + 1):

    patch_embed.proj.{weight,bias}, patch_embed.norm.{weight,bias}
    layers.i.blocks.j.attn.qkv.weight (3D, D)      layers.i.blocks.j.attn.{q_bias,v_bias} (D,)
    layers.i.blocks.j.attn.logit_scale (H, 1, 1)   layers.i.blocks.j.attn.proj.{weight,bias}
    layers.i.blocks.j.attn.cpb_mlp.0.{weight,bias} (cpb, 2), layers.i.blocks.j.attn.cpb_mlp.2.weight (H, cpb)
    layers.i.blocks.j.norm1.{weight,bias}, ...norm2.{weight,bias}
    layers.i.blocks.j.mlp.fc1.{weight,bias} (F, D), ...mlp.fc2.{weight,bias} (D, F)
    layers.{i+1}.downsample.reduction.weight (2D, 4D), layers.{i+1}.downsample.norm.{weight,bias}
    norm.{weight,bias}

A wavelength-conditioned embedding is exported as the plain convolution it computes
for the modality's configured bands (kernel_c / C, bias sum_c b_c / C). Not in
the safetensors file (pretraining-only): the SimMIM mask token and decoders. One
numerical difference from timm: our shifted-window mask is -1e4, timm's -100.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from safetensors.numpy import save_file

from ringmoe.compress.extraction import flat_params
from ringmoe.model.checkpoint import save_model
from ringmoe.model.embed import WavelengthPatchEmbed
from ringmoe.model.ringmoe import RingMoE

FORMAT = "ringmoe-swinv2-export"
MOE_PARTS = ("modal_experts", "collaborative_experts", "shared_expert")   # parameter path names of a MoE FFN


def _patch_embedding(model: RingMoE, modality: str, params) -> dict[str, np.ndarray]:
    p = model.patch_size
    embedding = model.embeddings[modality]
    prefix = ("embeddings", modality)
    if isinstance(embedding, WavelengthPatchEmbed):
        kernels, biases = jax.device_get(embedding.generate(*model.spectra(modality)))   # (C, p*p, D), (C, D)
        channels = kernels.shape[0]
        weight = (kernels.reshape(channels, p, p, -1).transpose(3, 0, 1, 2) / channels)
        bias = biases.sum(0) / channels
    else:
        kernel = params[prefix + ("proj", "kernel")]                                   # (p*p*C, D)
        weight = kernel.reshape(p, p, -1, kernel.shape[-1]).transpose(3, 2, 0, 1)
        bias = params[prefix + ("proj", "bias")]
    return {"patch_embed.proj.weight": weight, "patch_embed.proj.bias": bias,
            "patch_embed.norm.weight": params[prefix + ("norm", "scale")],
            "patch_embed.norm.bias": params[prefix + ("norm", "bias")]}


def _norm(params, path, name) -> dict[str, np.ndarray]:
    return {f"{name}.weight": params[path + ("scale",)], f"{name}.bias": params[path + ("bias",)]}


def _linear(params, path, name, bias=True) -> dict[str, np.ndarray]:
    out = {f"{name}.weight": params[path + ("kernel",)].T}
    if bias:
        out[f"{name}.bias"] = params[path + ("bias",)]
    return out


def swinv2_state_dict(model: RingMoE, modality: str) -> dict[str, np.ndarray]:
    """The dense encoder's parameters as {timm SwinV2 name: float32 array in PyTorch layout}."""
    params = flat_params(model)
    if any(key in MOE_PARTS for path in params for key in path):
        raise ValueError("export: the model still has MoE layers; only the dense stage exports to SwinV2")
    out = _patch_embedding(model, modality, params)
    for i, stage in enumerate(model.stages):
        for j in range(stage.depth):
            path, name = ("stages", i, "blocks", j), f"layers.{i}.blocks.{j}"
            attn = path + ("attn",)
            qkv = params[attn + ("qkv",)]                                             # (D, 3, H, hd)
            heads = qkv.shape[2]
            out[f"{name}.attn.qkv.weight"] = qkv.reshape(qkv.shape[0], -1).T
            out[f"{name}.attn.q_bias"] = params[attn + ("q_bias",)].reshape(-1)
            out[f"{name}.attn.v_bias"] = params[attn + ("v_bias",)].reshape(-1)
            out[f"{name}.attn.logit_scale"] = params[attn + ("logit_scale",)].reshape(heads, 1, 1)
            proj = params[attn + ("proj", "kernel")]                                  # (H, hd, D)
            out[f"{name}.attn.proj.weight"] = proj.reshape(-1, proj.shape[-1]).T
            out[f"{name}.attn.proj.bias"] = params[attn + ("proj", "bias")]
            out.update(_linear(params, attn + ("cpb_fc1",), f"{name}.attn.cpb_mlp.0"))
            out.update(_linear(params, attn + ("cpb_fc2",), f"{name}.attn.cpb_mlp.2", bias=False))
            out.update(_norm(params, path + ("norm1",), f"{name}.norm1"))
            out.update(_linear(params, path + ("ffn", "ffn", "fc1"), f"{name}.mlp.fc1"))
            out.update(_linear(params, path + ("ffn", "ffn", "fc2"), f"{name}.mlp.fc2"))
            out.update(_norm(params, path + ("norm2",), f"{name}.norm2"))
        if stage.merging is not None:
            merging, name = ("stages", i, "merging"), f"layers.{i + 1}.downsample"
            out.update(_linear(params, merging + ("reduction",), f"{name}.reduction", bias=False))
            out.update(_norm(params, merging + ("norm",), f"{name}.norm"))
    out.update(_norm(params, ("norm",), "norm"))
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def timm_arguments(config, modality: str) -> dict:
    """Keyword arguments of timm's SwinTransformerV2 that this state dict loads into."""
    m = config.model
    return {"img_size": m.image_size, "patch_size": m.patch_size, "in_chans": m.modalities[modality].channels,
            "embed_dim": m.embed_dim, "depths": list(m.depths), "num_heads": list(m.num_heads),
            "window_size": m.window_size, "mlp_ratio": m.mlp_ratio, "num_classes": 0}


def export(directory: str, model: RingMoE, config, modality: str, spec, extra: dict | None = None) -> dict:
    """Writes the three artefacts of the dense `model` under `directory`; returns their paths.

    `spec` is the modality's `ModalitySpec` (band names, normalisation mean / std) of
    the data the model was trained on.
    """
    os.makedirs(directory, exist_ok=True)
    tensors = swinv2_state_dict(model, modality)
    configured = {b[0]: (b[1], b[2]) for b in config.model.modalities[modality].get("bands", ()) or ()}
    sidecar = {
        "format": FORMAT,
        "architecture": "SwinV2 (timm SwinTransformerV2 parameter names, PyTorch layouts)",
        "modality": modality,
        "timm_arguments": timm_arguments(config, modality),
        "bands": [{"name": name, "wavelength_nm": configured.get(name, (None, None))[0],
                   "bandwidth_nm": configured.get(name, (None, None))[1]} for name in spec.bands],
        "normalization": {"mean": np.asarray(spec.mean).tolist(), "std": np.asarray(spec.std).tolist(),
                          "formula": "(pixel - mean) / std per band, in the data set's physical units"},
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "parameters": int(sum(v.size for v in tensors.values())),
        "not_exported": ["mask_token (SimMIM)", "decoders (SimMIM)", "power_decoders"],
        **(extra or {}),
    }
    paths = {"safetensors": os.path.join(directory, "model.safetensors"),
             "sidecar": os.path.join(directory, "model.json")}
    save_file(tensors, paths["safetensors"], metadata={"format": FORMAT, "modality": modality})
    with open(paths["sidecar"], "w", encoding="utf-8") as f:
        json.dump({**sidecar, "config": json.loads(config.to_json())}, f, indent=1)
    paths["checkpoint"] = save_model(os.path.join(directory, "checkpoint"), config, model,
                                     {k: v for k, v in sidecar.items() if k not in ("tensors", "format")})
    return paths
