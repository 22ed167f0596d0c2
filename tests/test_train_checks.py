"""What the trainer reports can be trusted: the logged learning rate after a skipped update."""
import jax
import jax.numpy as jnp
import optax
import pytest

from pretrain.state import TrainState, learning_rate, make_optimizer
from pretrain.step import make_train_step
from tests.small import micro_config


def applied_count(opt_state) -> int:
    """The count optax's learning-rate schedule is indexed by (updates it has applied)."""
    counts = [v for path, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
              if path[-1].tuple_name == "ScaleByScheduleState"]
    assert len(counts) == 1
    return int(counts[0])


def test_logged_lr_is_the_applied_rate_after_a_skipped_update():
    config = micro_config(("optical",))
    config.total_steps, config.optimizer.warmup_steps, config.optimizer.lr = 8, 4, 1e-2

    def loss_fn(params, batch):  # a NaN scale makes loss and gradient non-finite
        return jnp.sum(params["w"] ** 2) * batch["scale"], ({}, {})

    step = jax.jit(make_train_step(None, config, {}, loss_fn=loss_fn))
    params = {"w": jnp.ones((2, 2))}
    state = TrainState(params, make_optimizer(config).init(params), jnp.zeros((), jnp.int32),
                       jnp.zeros((2,), jnp.uint32), jnp.zeros((), jnp.int32))
    schedule = learning_rate(config)
    for i in range(6):
        count = applied_count(state.opt_state)
        state, metrics = step(state, {"scale": jnp.float32(float("nan") if i == 2 else 1.0)})
        assert float(metrics["finite"]) == (0.0 if i == 2 else 1.0)
        assert float(metrics["lr"]) == pytest.approx(float(schedule(count)), rel=1e-6), f"step {i + 1}"
    assert int(state.step) == 6 and int(state.nonfinite) == 1 and applied_count(state.opt_state) == 5
