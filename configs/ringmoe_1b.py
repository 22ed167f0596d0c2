"""RingMoE 1B: the compression target. The giant backbone of ringmoe_14b.py
(448, 2/2/18/2, heads 14/28/56/112, window 12, 192 px) with one dense FFN per
block and one modality (optical) kept: a plain SwinV2 of about 1.06B parameters.

    python -m tools.params --config configs/ringmoe_1b.py
"""
from ml_collections import ConfigDict

from configs import ringmoe_14b


def get_config():
    c = ringmoe_14b.get_config()
    c.model.moe.enabled = False
    c.model.modalities = ConfigDict({"optical": c.model.modalities.optical})
    return c
