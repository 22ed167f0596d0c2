"""The RingMoE encoder: SwinV2 backbone, hierarchical MoE FFNs, SimMIM decoders."""
