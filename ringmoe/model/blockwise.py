"""The encoder one piece at a time, for work done block by block on calibration images
(the compression refit, `ringmoe.compress.refit`; the k-means routers of upcycling,
`ringmoe.upcycle.routers`): each piece jitted on its own, so a caller keeps the token
stream between blocks (on the host, if it likes) and looks inside each block. The model
must have unrolled blocks (`ringmoe.compress.extraction.unrolled`)."""
from __future__ import annotations

import functools

from flax import nnx


@functools.partial(nnx.jit, static_argnames=("modality",))
def embed(model, pixels, modality: str):
    """Patch tokens of `pixels` (no mask)."""
    return model.embed(pixels, modality)


@nnx.jit
def ffn_input(block, x):
    """x + norm1(attn(x)): what the block's FFN reads."""
    return block.attend(x)


@functools.partial(nnx.jit, static_argnames=("modality",))
def block_output(block, h, modality: str):
    """The block's output from its FFN input h (one modality's images)."""
    y, _ = block.ffn(h, (modality,))
    return block.add_ffn(h, y)


@nnx.jit
def merge(merging, x):
    """A stage's patch merging."""
    return merging(x)
