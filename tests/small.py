"""The smallest useful RingMoE config for tests: tiny shrunk to 32 px, two stages of one block."""
from configs import tiny


def micro_config(modalities):
    """configs/tiny.py at 32 px, depths (1, 1), embed 16, keeping only `modalities`."""
    config = tiny.get_config()
    m = config.model
    m.image_size, m.depths, m.num_heads, m.embed_dim, m.cpb_hidden = 32, (1, 1), (1, 2), 16, 16
    for name in list(m.modalities.keys()):
        if name not in modalities:
            del m.modalities[name]
    return config
