"""RingMoE 1B: the compression target, the giant backbone with one dense FFN per
block and one modality (optical) kept: a plain SwinV2 of about 1.06B parameters.

    python -m tools.params --config configs/ringmoe_1b.py
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
    m.modalities.optical = modality(3)
    m.moe.enabled = False
    return c
