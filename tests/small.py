"""The smallest useful RingMoE config for tests (tiny shrunk to 32 px, two stages of one block),
and a run directory holding a model's initial state."""
import json

import jax
from flax import nnx

from configs import tiny
from ringmoe.data import synthetic


# RingMoE.encode(pixels, modality), compiled: an eager call compiles each operation on its own
# (tests/conftest.py).
encode = nnx.jit(lambda model, pixels, modality: model.encode(pixels, modality), static_argnums=2)


def micro_config(modalities):
    """configs/tiny.py at 32 px, depths (1, 1), embed 16, keeping only `modalities`; no PNGs
    (`pictures`: tests/test_train.py checks them)."""
    config = tiny.get_config()
    config.pictures = False
    m = config.model
    m.image_size, m.depths, m.num_heads, m.embed_dim = 32, (1, 1), (1, 2), 16
    for name in list(m.modalities.keys()):
        if name not in modalities:
            del m.modalities[name]
    return config


def initial_run(root, config, examples: int) -> tuple[str, str]:
    """(run dir, data dir) under `root`: `examples` labelled 32 px synthetic scenes and a
    run directory whose one checkpoint (step 1) holds `config`'s initial state."""
    from ringmoe import sharding
    from ringmoe.training.checkpoint import Checkpointer
    from ringmoe.training.state import create_state
    data_dir = str(root / "data")
    synthetic.write(data_dir, examples, 32, 0, labeled=True)
    config.data_dir = data_dir
    _, state, _ = create_state(config, sharding.make_mesh({}, jax.devices()[:1]))
    checkpointer = Checkpointer(str(root / "run"), keep=1, save_every=1)
    checkpointer.save(1, state, {}, {"config": json.loads(config.to_json()), "step": 1}, force=True)
    checkpointer.close()
    return str(root / "run"), data_dir


def poison_steps(monkeypatch, trainer, nan_steps) -> None:
    """`trainer` (the module pretrain.train) runs its steps with NaN input pixels at the (1-based)
    steps in `nan_steps`: its compiled step is wrapped where the trainer receives it."""
    from concurrent.futures import Future

    import jax.numpy as jnp

    from ringmoe.training.step import compile_ahead as real   # not the trainer's: it may be poisoned already

    def ahead(*args, **kwargs):
        step_fn, calls = real(*args, **kwargs).result(), iter(range(1, 1 << 30))

        def run(state, batch):
            if next(calls) in nan_steps:
                batch = {m: {**b, "pixels": b["pixels"] * jnp.nan} for m, b in batch.items()}
            return step_fn(state, batch)
        poisoned = Future()
        poisoned.set_result(run)
        return poisoned
    monkeypatch.setattr(trainer, "compile_ahead", ahead)
