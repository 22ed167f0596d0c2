"""RingMoE giant, the reference model (DESIGN.md s.2): SwinV2 embed 448,
depths 2/2/18/2, heads 14/28/56/112, window 12, patch 4, 192 px; hierarchical
MoE in all 24 blocks: 4 modal experts per modality, 4 collaborative, 1 shared.
Expected: 14.74B parameters in all, 6.53B per modality, about 2.4B active per token.

    python -m tools.params --config configs/ringmoe_14b.py
"""
from configs.common import base_config, modality


def get_config():
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
    m.modalities.multispectral = modality(4)   # 4 bands in the reference
    m.modalities.sar_l2 = modality(3)          # amplitude copied to 3 channels (ref)
    m.modalities.sar_l1 = modality(8, power_head=4)          # Re/Im of HH, HV, VH, VV
    m.moe.num_modal_experts = 4
    m.moe.num_collaborative_experts = 4
    m.moe.shared_expert = True
    m.moe.top_k = 1
    m.moe.capacity_factor = 1.2
    return c
