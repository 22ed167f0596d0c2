"""RingMoE giant, the reference model (DESIGN.md s.2): SwinV2 embed 448,
depths 2/2/18/2, heads 14/28/56/112, window 12, patch 4, 192 px; hierarchical
MoE in all 24 blocks: 4 modal experts per modality, 4 collaborative, 1 shared.
Expected: 14.83B parameters in all (the paper: 14.74B; README "Configs" says where the
0.6 % comes from), 6.55-6.58B per modality, about 2.45B active per token.

    python -m tools.params --config configs/ringmoe_14b.py
    python -m tools.aot --config configs/ringmoe_14b.py:v5e-256 --topology v5e-256

The optional `:TARGET` picks the global batch for a pod (`BATCH_SIZE`; default
h100-64); everything else is the same on every target.
"""
from ringmoe.config import S2_L2A_BANDS, base_config, modality

# Global batch per target: one image per modality per device (the token batch is split
# over every device, so each modality's batch is a multiple of the device count).
BATCH_SIZE = {"h100-64": 256, "v5p-128": 256, "v5e-256": 1024}


def get_config(target: str = "h100-64"):
    if target not in BATCH_SIZE:
        raise ValueError(f"configs/ringmoe_14b.py: unknown target {target!r}; known: {', '.join(BATCH_SIZE)}")
    c = base_config()
    m = c.model
    m.image_size = 192
    m.patch_size = 4
    m.window_size = 12
    m.embed_dim = 448
    m.depths = (2, 2, 18, 2)
    m.num_heads = (14, 28, 56, 112)
    m.mlp_ratio = 4.0
    m.modalities.optical = modality(3)         # RGB
    # Multispectral: 4 bands in the reference, assumed blue, green, red, NIR (the usual 4-band
    # product, e.g. GF-2 PMS); declared as their Sentinel-2 counterparts B2, B3, B4, B8 (a
    # data set must name its bands so; other sensors' B/G/R/NIR lie within index_tolerance_nm
    # of these) so that the physics terms can find them. Patch embedding, as in the reference.
    m.modalities.multispectral = modality(4, bands=[b for b in S2_L2A_BANDS if b[0] in ("B2", "B3", "B4", "B8")])
    # SAR-L2: the reference copies one amplitude band to 3 channels. Here the channels hold
    # sigma0 in dB (the pipeline's SAR-L2 unit, which the speckle NLL reads as I = 10^(x/10),
    # with objectives.sar_looks = 4.4 for S1 GRD): one VV dB band copied to 3 channels.
    m.modalities.sar_l2 = modality(3, unit="db")
    # SAR-L1: Re/Im of HH, HV, VH, VV; the embedding adds their log powers (model/embed.py:
    # without them the backscatter level cannot pass the patch embedding's LayerNorm).
    m.modalities.sar_l1 = modality(8, "complex", power_head=4)
    m.moe.num_modal_experts = 4
    m.moe.num_collaborative_experts = 4
    m.moe.shared_expert = True
    m.moe.top_k = 1
    m.moe.capacity_factor = 1.2
    # Objectives: SimMIM everywhere; SAR-L1 span (ref) and Pauli; SAR-L2 speckle NLL;
    # multispectral SAM and the indices that B, G, R, NIR allow (NDVI, NDWI: NDBI and MNDWI
    # need SWIR). The SAR-L2 physics terms need each channel's polarisation: one (VV) dB band
    # in all three, so there is no cross-pol pair and no xpol_ratio term.
    c.objectives.indices = ("ndvi", "ndwi")
    c.objectives.sar_l2_polarizations = ("VV", "VV", "VV")
    c.objectives.xpol_ratio = 0.0
    # Pod settings (README "Running on a pod"; checked by `python -m tools.aot`):
    # bf16 compute with float32 master weights and AdamW state; each SwinV2 block
    # rematerialised (only block inputs kept for the backward pass); `sort` dispatch,
    # whose per-image expert buffers GSPMD keeps sharded and moves by all-to-all
    # (`ragged`, what `auto` picks on GPU/TPU, argsorts the whole global batch,
    # which GSPMD replicates on every device).
    m.dtype = "bfloat16"
    m.remat = "block"
    m.moe.dispatch = "sort"
    # The modal experts looped over modalities, one modality's experts gathered at a time:
    # h100-64 holds 6.00 GB of temporaries per device instead of 9.16 GB, and v5p-128
    # compiles in 4.6 minutes instead of 6.8 (vmapped, the default, is the faster step).
    m.moe.modal_experts_loop = True
    # Experts over `expert` (4 = the experts per group); parameters and AdamW state
    # FSDP-sharded over all remaining devices (16 on 64 devices, 64 on 256), so the
    # 206 GB of state is about 3.2 GB per device on 64. The token batch is split over
    # all of them (BATCH_SIZE).
    c.mesh.update({"data": 1, "fsdp": -1, "expert": 4, "tensor": 1})
    c.batch_size = BATCH_SIZE[target]
    return c
