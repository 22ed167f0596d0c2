"""Hierarchical MoE vs a dense SwinV2 of equal active FLOPs vs its modal-only and
collaborative-only halves, all under one training budget.

    python -m tools.ablate --grid configs/ablations/moe_vs_dense.py --workdir /tmp/abl_moe \
        --grid.data_dir=/tmp/syn64 --grid.probe_data_dir=/tmp/probe_set
    # at scale: --grid.base=configs/base.py --grid.budget.total_steps=20000 ...

Active FFN FLOPs per token: hierarchical = modal top-1 + collaborative top-1 +
shared = 3 FFNs of width 4D; dense = one FFN of width 12D (the same FLOPs);
modal-only and collaborative-only drop one routed group (2 FFNs per token).
"""
from configs.ablations.common import grid


def get_config():
    return grid((
        ("hierarchical", {}),
        ("dense_equal_flops", {"model.moe.enabled": False, "model.mlp_ratio": 12.0}),
        ("modal_only", {"model.moe.num_collaborative_experts": 0}),
        ("collaborative_only", {"model.moe.num_modal_experts": 0}),
    ))
