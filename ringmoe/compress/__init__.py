"""The compression pass: 14.7B hierarchical MoE -> one modality -> pruned -> dense SwinV2."""
