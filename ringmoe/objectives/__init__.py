"""Pretraining objectives: SimMIM reconstruction and physics-informed terms."""
