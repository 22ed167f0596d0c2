"""Base RingMoE: a SwinV2-T backbone (embed 96, depths 2/2/6/2) with the full
reference expert layout (4 modal per modality, 4 collaborative, 1 shared);
about 0.4B parameters, for a single GPU.

    python -m tools.params --config configs/base.py
"""
from ringmoe.config import S2_L2A_BANDS, base_config, modality


def get_config():
    c = base_config()
    m = c.model
    m.embed_dim = 96
    m.depths = (2, 2, 6, 2)
    m.num_heads = (3, 6, 12, 24)
    # Unrolled blocks: at depth 6 the scan saves little of a ~1-minute compile and costs every
    # step 1.07-1.63x on CPU in one-process comparisons (its stacked residuals are zero-filled
    # and written per iteration; README "Benchmarks"). Scanning pays where compile takes minutes.
    m.scan_layers = False
    m.modalities.optical = modality(3)
    m.modalities.multispectral = modality(12, "wavelength", S2_L2A_BANDS)
    m.modalities.sar_l2 = modality(2)
    m.modalities.sar_l1 = modality(8, "complex", power_head=4)   # Re/Im of HH, HV, VH, VV (+ log powers)
    return c
