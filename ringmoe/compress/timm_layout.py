"""timm's SwinTransformerV2 layout of a dense encoder, both ways: one name map for export and import.

Every exported tensor is one entry (timm name, our parameter path, layout). A
layout turns our array into timm's (PyTorch conventions: Linear (out, in), Conv2d
(out, in, kh, kw)) and back, exactly (reshapes and transposes only), so export then
import gives the parameters back bit for bit.

    patch_embed.proj.{weight,bias}, patch_embed.norm.{weight,bias}
    layers.i.blocks.j.attn.qkv.weight (3D, D)      layers.i.blocks.j.attn.{q_bias,v_bias} (D,)
    layers.i.blocks.j.attn.logit_scale (H, 1, 1)   layers.i.blocks.j.attn.proj.{weight,bias}
    layers.i.blocks.j.attn.cpb_mlp.0.{weight,bias} (512, 2), layers.i.blocks.j.attn.cpb_mlp.2.weight (H, 512)
    layers.i.blocks.j.norm1.{weight,bias}, ...norm2.{weight,bias}
    layers.i.blocks.j.mlp.fc1.{weight,bias} (F, D), ...mlp.fc2.{weight,bias} (D, F)
    layers.i.downsample.reduction.weight (2D, 4D), layers.i.downsample.norm.{weight,bias}
    norm.{weight,bias}

(i = stage, j = block.) The patch merging is written where the original SwinV2
(Microsoft's checkpoints) has it, ending stage i as ours does; timm's modules hold
it at the start of stage i + 1, and timm's loader (`checkpoint_filter_fn`, which
`timm.create_model(..., pretrained=True)` runs) moves it there for any checkpoint
without a classifier `head.fc`. A headless checkpoint in timm's own layout would be
moved one stage too far by that loader, so the original layout is the one that
loads, strictly, both through `timm.create_model("local-dir:...")` and through
`model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)`. Import
reads either layout. A wavelength-conditioned embedding exports as the plain convolution
it computes for the modality's configured bands (kernel_c / C, bias sum_c b_c / C);
it cannot be imported back (its generator is not in the file), so an import target
gives the modality a plain patch embedding.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import jax
import numpy as np

from safetensors.numpy import load_file

from ringmoe.compress.extraction import Path, build, flat_params
from ringmoe.model.embed import WavelengthPatchEmbed
from ringmoe.model.ringmoe import RingMoE, create_model

MOE_PARTS = ("modal_experts", "collaborative_experts", "shared_expert")   # parameter path names of a MoE FFN


@dataclasses.dataclass(frozen=True)
class Layout:
    """Ours -> timm's (`to_timm(a)`), and timm's -> ours given our shape (`from_timm(t, shape)`)."""
    to_timm: Callable[[np.ndarray], np.ndarray]
    from_timm: Callable[[np.ndarray, tuple], np.ndarray]


SAME = Layout(lambda a: a, lambda t, shape: t)                                  # vectors
FLAT = Layout(lambda a: a.reshape(-1), lambda t, shape: t.reshape(shape))        # (H, hd) <-> (D,) heads-major
PER_HEAD = Layout(lambda a: a.reshape(-1, 1, 1), lambda t, shape: t.reshape(shape))   # (H,) <-> (H, 1, 1)
LINEAR = Layout(lambda a: a.T, lambda t, shape: t.T)                             # (in, out) <-> (out, in)
QKV = Layout(lambda a: a.reshape(a.shape[0], -1).T,                              # (D, 3, H, hd) <-> (3D, D)
             lambda t, shape: t.T.reshape(shape))
HEADS_IN = Layout(lambda a: a.reshape(-1, a.shape[-1]).T,                        # (H, hd, D) <-> (D, H*hd)
                  lambda t, shape: t.T.reshape(shape))


def conv(patch: int) -> Layout:
    """A patch embedding's kernel (p*p*C, D), rows in (row, column, channel) order <-> (D, C, p, p)."""
    return Layout(lambda a: a.reshape(patch, patch, -1, a.shape[-1]).transpose(3, 2, 0, 1),
                  lambda t, shape: t.transpose(2, 3, 1, 0).reshape(shape))


@dataclasses.dataclass(frozen=True)
class Entry:
    timm: str
    path: Path
    layout: Layout


def name_map(model: RingMoE, modality: str) -> list[Entry]:
    """Every (timm name, our path, layout) of the dense encoder `model` for `modality`."""
    depths = [stage.depth for stage in model.stages]
    embed = ("embeddings", modality)
    entries = [Entry("patch_embed.proj.weight", embed + ("proj", "kernel"), conv(model.patch_size)),
               Entry("patch_embed.proj.bias", embed + ("proj", "bias"), SAME),
               Entry("patch_embed.norm.weight", embed + ("norm", "scale"), SAME),
               Entry("patch_embed.norm.bias", embed + ("norm", "bias"), SAME)]
    for i, depth in enumerate(depths):
        for j in range(depth):
            path, name = ("stages", i, "blocks", j), f"layers.{i}.blocks.{j}"
            attn = path + ("attn",)
            entries += [Entry(f"{name}.attn.qkv.weight", attn + ("qkv",), QKV),
                        Entry(f"{name}.attn.q_bias", attn + ("q_bias",), FLAT),
                        Entry(f"{name}.attn.v_bias", attn + ("v_bias",), FLAT),
                        Entry(f"{name}.attn.logit_scale", attn + ("logit_scale",), PER_HEAD),
                        Entry(f"{name}.attn.proj.weight", attn + ("proj", "kernel"), HEADS_IN),
                        Entry(f"{name}.attn.proj.bias", attn + ("proj", "bias"), SAME),
                        Entry(f"{name}.attn.cpb_mlp.0.weight", attn + ("cpb_fc1", "kernel"), LINEAR),
                        Entry(f"{name}.attn.cpb_mlp.0.bias", attn + ("cpb_fc1", "bias"), SAME),
                        Entry(f"{name}.attn.cpb_mlp.2.weight", attn + ("cpb_fc2", "kernel"), LINEAR)]
            for norm in ("norm1", "norm2"):
                entries += [Entry(f"{name}.{norm}.weight", path + (norm, "scale"), SAME),
                            Entry(f"{name}.{norm}.bias", path + (norm, "bias"), SAME)]
            for fc in ("fc1", "fc2"):
                entries += [Entry(f"{name}.mlp.{fc}.weight", path + ("ffn", "ffn", fc, "kernel"), LINEAR),
                            Entry(f"{name}.mlp.{fc}.bias", path + ("ffn", "ffn", fc, "bias"), SAME)]
        if i + 1 < len(depths):
            merging, name = ("stages", i, "merging"), f"layers.{i}.downsample"
            entries += [Entry(f"{name}.reduction.weight", merging + ("reduction", "kernel"), LINEAR),
                        Entry(f"{name}.norm.weight", merging + ("norm", "scale"), SAME),
                        Entry(f"{name}.norm.bias", merging + ("norm", "bias"), SAME)]
    return entries + [Entry("norm.weight", ("norm", "scale"), SAME), Entry("norm.bias", ("norm", "bias"), SAME)]


def to_timm(model: RingMoE, modality: str) -> dict[str, np.ndarray]:
    """The dense encoder's parameters as {timm SwinV2 name: float32 array in PyTorch layout}."""
    params = flat_params(model)
    if any(key in MOE_PARTS for path in params for key in path):
        raise ValueError("export: the model still has MoE layers; only the dense stage exports to SwinV2")
    embedding = model.embeddings[modality]
    if isinstance(embedding, WavelengthPatchEmbed):   # the convolution it computes for these bands
        kernels, biases = jax.device_get(embedding.generate(*model.spectra(modality)))   # (C, p*p, D), (C, D)
        channels = kernels.shape[0]
        kernel = kernels.reshape(channels, model.patch_size, model.patch_size, -1).transpose(1, 2, 0, 3)
        params[("embeddings", modality, "proj", "kernel")] = kernel.reshape(-1, kernel.shape[-1]) / channels
        params[("embeddings", modality, "proj", "bias")] = biases.sum(0) / channels
    return {e.timm: np.ascontiguousarray(e.layout.to_timm(params[e.path]), np.float32)
            for e in name_map(model, modality)}


def original_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A SwinV2 state dict in the original layout (the one `name_map` writes), its buffers
    (relative position index and coordinates table, attention masks) and classifier head
    dropped. A checkpoint in timm's native layout, whose `layers.i.downsample` starts stage i,
    is moved back one stage; it is told apart by having no `layers.0.downsample` (stage 0
    of the original layout always merges when there is more than one stage)."""
    native = not any(k.startswith("layers.0.downsample.") for k in tensors)
    out = {}
    for k, v in tensors.items():
        if any(n in k for n in ("relative_position_index", "relative_coords_table", "attn_mask")) or \
                k.startswith("head."):
            continue
        if native:
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k] = v
    return out


def from_timm(tensors: Mapping[str, np.ndarray], model: RingMoE, modality: str,
              source: str = "checkpoint") -> dict[Path, np.ndarray]:
    """{our path: array} for every parameter the name map covers, taken from an original-layout
    SwinV2 state dict (`original_names`) and checked against `model` (a dense one-modality RingMoE with a plain
    patch embedding). A missing, unexpected or misshapen tensor is a ValueError naming it
    (and both shapes)."""
    if isinstance(model.embeddings[modality], WavelengthPatchEmbed):
        raise ValueError(f"import: modality {modality!r} of the target config has a wavelength-conditioned "
                         "embedding, which a SwinV2 checkpoint cannot fill; give it a plain patch embedding "
                         "(no 'bands' in model.modalities)")
    params = flat_params(model)
    if any(key in MOE_PARTS for path in params for key in path):
        raise ValueError("import: the target config has MoE layers; import into a dense config "
                         "(model.moe.enabled = False)")
    entries = name_map(model, modality)
    unexpected = sorted(set(tensors) - {e.timm for e in entries})
    if unexpected:
        raise ValueError(f"import: {source}: tensor {unexpected[0]} has no place in the target config "
                         f"({len(unexpected)} such tensors; a deeper model than the config?)")
    out = {}
    for e in entries:
        if e.timm not in tensors:
            raise ValueError(f"import: {source}: tensor {e.timm} is missing (the config expects it)")
        ours = params[e.path].shape
        expected = e.layout.to_timm(np.empty(ours, np.float32)).shape
        value = np.asarray(tensors[e.timm])
        if value.shape != expected:
            raise ValueError(f"import: {source}: tensor {e.timm} has shape {tuple(value.shape)}, the config "
                             f"needs {tuple(expected)}")
        out[e.path] = e.layout.from_timm(value, ours).astype(params[e.path].dtype)
    return out


def import_swinv2(path: str, config, modality: str | None = None) -> tuple[RingMoE, dict]:
    """The dense model of `config` with the encoder read from a SwinV2 safetensors file under
    timm's names (timm's native or the original layout). The pretraining-only parameters a
    SwinV2 checkpoint does not hold (SimMIM mask token and decoders) keep their initial
    values from `config.seed`; the report lists them. Returns (model, report)."""
    modalities = list(config.model.modalities)
    modality = modality or (modalities[0] if len(modalities) == 1 else None)
    if modality not in modalities:
        raise ValueError(f"import: name the modality to import into (--modality): the config has "
                         f"{', '.join(modalities)}")
    tensors = original_names(load_file(path))
    model = create_model(config.model, seed=config.seed)
    params = flat_params(model)
    imported = from_timm(tensors, model, modality, source=path)
    params.update(imported)
    kept = sorted("/".join(map(str, p)) for p in params if p not in imported)
    return build(config, params), {"safetensors": path, "modality": modality, "tensors": len(tensors),
                                   "parameters": int(sum(v.size for v in imported.values())),
                                   "initialised_not_imported": kept}
