"""Tiny RingMoE: CPU-sized, all four modalities, MoE in every block.

    python -m tools.make_synthetic --out /tmp/syn64 --examples 256 --image-size 64 --seed 0 --labeled
    python -m pretrain.train --config configs/tiny.py --workdir /tmp/tiny --config.data_dir=/tmp/syn64

Measured on this 2-core CPU (256 synthetic scenes, the current scene model), mean
over 3 seeds (the `hierarchical` point of configs/ablations/moe_vs_dense.py, 100
steps): masked L1 on the fixed evaluation batches, step 0 -> 100: optical 0.840
-> 0.550, multispectral 0.813 -> 0.510, SAR-L2 0.731 -> 0.519, SAR-L1 raw Re/Im
0.705 -> 0.658; SAR-L1 span deviance 2.18 -> 1.44, Pauli 1.89 -> 0.91 (seed
spread of the step-100 values <= 0.03, span 0.13). Speed on this 2-core CPU, otherwise
idle (`python -m tools.bench step --config configs/tiny.py --data /tmp/syn64 --layouts
scanned`, commit 6c82ce6): 0.65-0.66 s/step; the first step (trace, compile, run) 41-43 s.
"""
from ringmoe.config import S2_L2A_BANDS, base_config, modality


def get_config():
    c = base_config()
    m = c.model
    m.image_size = 64
    m.patch_size = 4
    m.window_size = 4
    m.embed_dim = 32
    m.depths = (2, 2, 2, 2)
    m.num_heads = (2, 4, 8, 16)
    m.modalities.optical = modality(3)
    m.modalities.multispectral = modality(12, "wavelength", S2_L2A_BANDS)  # Sentinel-2 L2A
    m.modalities.sar_l2 = modality(2)   # Sentinel-1 VV, VH
    m.modalities.sar_l1 = modality(8, "complex", power_head=4)   # Re/Im of HH, HV, VH, VV (+ log powers)
    m.moe.num_modal_experts = 2
    m.moe.num_collaborative_experts = 2
    # Data: 16 images per modality per step (with 4 the SimMIM losses barely moved
    # in 300 steps). Mask blocks of 8 px (8 x 8 per 64 px crop): with 16 px blocks
    # (4 x 4) the masked L1 fell only 13-25 % in 300 steps; the reference's 32 px
    # blocks on 192 px crops stay in configs/base.py.
    c.batch_size = 64
    c.data.mask_block_size = 8
    # A CPU-sized schedule: a few hundred steps.
    c.total_steps = 300
    c.log_every = 10
    c.eval_every = 50
    c.checkpoint_every = 100
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.end_lr = 1e-5
    return c
