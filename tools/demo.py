"""`make demo`: the tiny model end to end on this machine.

    python -m tools.demo

Prints the parameter table of configs/tiny.py, then runs one jitted forward and
backward pass of the SimMIM loss on random input of all four modalities, and
prints a JSON summary as its last line.
"""
import json
import time

import jax
import numpy as np
from flax import nnx

from configs import tiny
from ringmoe.model.moe import router_loss
from ringmoe.model.params import abstract_model, count, table
from ringmoe.model.ringmoe import create_model
from ringmoe.objectives.simmim import masked_l1


def random_batch(model_config, batch: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    size, grid = model_config.image_size, model_config.image_size // model_config.patch_size
    return {m: {"pixels": rng.normal(size=(batch, size, size, mc.channels)).astype(np.float32),
                "mask": rng.random((batch, grid, grid)) < 0.6}
            for m, mc in model_config.modalities.items()}


def main():
    start = time.perf_counter()
    config = tiny.get_config()
    counts = count(abstract_model(config.model), top_k=config.model.moe.top_k)
    print(table(counts), flush=True)

    print("\n[demo] initialising the tiny model ...", flush=True)
    model = create_model(config.model, seed=config.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    batch = random_batch(config.model, batch=4, seed=config.seed)

    @jax.jit
    def loss_and_grads(params, batch):
        def loss_fn(params):
            outputs = nnx.merge(graphdef, params)(batch)
            total = 0.0
            for m, out in outputs.items():
                total += masked_l1(out["reconstruction"], batch[m]["pixels"], batch[m]["mask"], config.model.patch_size)
                total += router_loss(out["encoded"].router_stats, config.model.moe)["total"]
            return total
        return jax.value_and_grad(loss_fn)(params)

    print("[demo] compiling and running one forward + backward pass ...", flush=True)
    t = time.perf_counter()
    loss, grads = jax.block_until_ready(loss_and_grads(params, batch))
    first = time.perf_counter() - t
    t = time.perf_counter()
    loss, grads = jax.block_until_ready(loss_and_grads(params, batch))
    step = time.perf_counter() - t
    grad_norm = float(np.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(grads))))
    print(f"[demo] loss {float(loss):.4f}  grad norm {grad_norm:.4f}  "
          f"compile+run {first:.1f}s  step {step * 1e3:.0f} ms")
    print(json.dumps({"total_params": counts["total"], "per_modality": counts["per_modality"],
                      "loss": float(loss), "grad_norm": grad_norm, "finite": bool(np.isfinite(grad_norm)),
                      "step_s": step, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
