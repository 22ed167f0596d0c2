"""RingMoE: hierarchical Mixture-of-Experts SwinV2 for multi-modal remote sensing.

The library never imports `pretrain/`, `configs/` or `tools/`; those are thin layers on top
(tests/test_layering.py).
"""
