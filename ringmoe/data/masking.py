"""SimMIM mask generation on the host.

The image is tiled into square blocks of `block_size` pixels (reference 32 px);
exactly round(ratio * n_blocks) blocks are masked (reference ratio 0.6), chosen
uniformly without replacement, and the block mask is expanded to the patch grid
the encoder sees (patch_size px per token). True = masked. Generating masks in
the input pipeline keeps the train step free of host randomness and shapes fixed.
"""
from __future__ import annotations

import numpy as np


def check_geometry(image_size: int, patch_size: int, block_size: int, ratio: float) -> None:
    """Raises ValueError unless blocks tile the image and hold whole patches."""
    if image_size % block_size:
        raise ValueError(f"mask_block_size {block_size} must divide image_size {image_size}")
    if block_size % patch_size:
        raise ValueError(f"mask_block_size {block_size} must be a multiple of patch_size {patch_size}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {ratio}")


def num_masked_blocks(image_size: int, block_size: int, ratio: float) -> int:
    n = (image_size // block_size) ** 2
    return int(round(ratio * n))


def simmim_mask(rng: np.random.Generator, image_size: int, patch_size: int, block_size: int,
                ratio: float) -> np.ndarray:
    """bool (image_size / patch_size,) * 2 token mask; True = masked."""
    grid = image_size // block_size
    blocks = np.zeros(grid * grid, dtype=bool)
    blocks[rng.permutation(grid * grid)[:num_masked_blocks(image_size, block_size, ratio)]] = True
    k = block_size // patch_size
    return np.repeat(np.repeat(blocks.reshape(grid, grid), k, 0), k, 1)
