"""Tiny RingMoE: CPU-sized, all four modalities, MoE in every block.

    python -m tools.make_synthetic --out /tmp/syn64 --examples 256 --image-size 64 --seed 0 --labeled
    python -m pretrain.train --config configs/tiny.py --workdir /tmp/tiny --config.data_dir=/tmp/syn64

Expected (this 2-core CPU): ~0.9 s/step, every modality's masked reconstruction
loss well below its step-0 value after 300 steps.
"""
from configs.common import S2_L2A_BANDS, base_config, modality


def get_config():
    c = base_config()
    m = c.model
    m.image_size = 64
    m.patch_size = 4
    m.window_size = 4
    m.embed_dim = 32
    m.depths = (2, 2, 2, 2)
    m.num_heads = (2, 4, 8, 16)
    m.cpb_hidden = 64
    m.modalities.optical = modality(3)
    m.modalities.multispectral = modality(12, "wavelength", S2_L2A_BANDS)  # Sentinel-2 L2A
    m.modalities.sar_l2 = modality(2)   # Sentinel-1 VV, VH
    m.modalities.sar_l1 = modality(8)   # Re/Im of HH, HV, VH, VV
    m.moe.num_modal_experts = 2
    m.moe.num_collaborative_experts = 2
    # Data: 64 px crops hold 4 x 4 mask blocks of 16 px.
    c.batch_size = 16
    c.data.mask_block_size = 16
    # A CPU-sized schedule: a few hundred steps of 16 images.
    c.total_steps = 300
    c.log_every = 10
    c.checkpoint_every = 100
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.end_lr = 1e-5
    return c
