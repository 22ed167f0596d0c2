"""What the trainer reports can be trusted: the logged learning rate after a skipped update,
the non-finite check of the last steps."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ringmoe.data import synthetic
from ringmoe.model.ringmoe import create_model
from ringmoe.training.state import TrainState, learning_rate, make_optimizer
from ringmoe.training.step import make_train_step
from ringmoe.visualize import read_jsonl
from tests.small import micro_config, poison_steps


def applied_count(opt_state) -> int:
    """The count optax's learning-rate schedule is indexed by (updates it has applied)."""
    counts = [v for path, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
              if path[-1].tuple_name == "ScaleByScheduleState"]
    assert len(counts) == 1
    return int(counts[0])


def test_weight_decay_reaches_weight_matrices_only():
    """AdamW's decay shrinks linear maps' weights and nothing else, however a parameter is
    stacked: with a rank rule, per-head q/v biases (H, K), expert biases (E, F) and every norm
    of a scanned stage (layers, D) were decayed."""
    config = micro_config(("optical",))
    config.optimizer.update(init_lr=1e-2, lr=1e-2, weight_decay=0.5)
    params = jax.tree.map(jnp.ones_like, nnx.state(create_model(config.model, seed=0), nnx.Param))
    tx = make_optimizer(config)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    decayed = {}
    for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        decayed.setdefault(name, set()).add(bool(jnp.any(update != 0)))
    assert decayed == {"kernel": {True}, "qkv": {True}, "w_in": {True}, "w_out": {True}, "bias": {False},
                       "scale": {False}, "q_bias": {False}, "v_bias": {False}, "b_in": {False}, "b_out": {False},
                       "logit_scale": {False}, "mask_token": {False}}


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
        before = jax.tree.map(np.asarray, (state.params, state.opt_state))
        state, metrics = step(state, {"scale": jnp.float32(float("nan") if i == 2 else 1.0)})
        assert float(metrics["finite"]) == (0.0 if i == 2 else 1.0)
        after = jax.tree.map(np.asarray, (state.params, state.opt_state))
        kept = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
        assert kept == (i == 2), f"step {i + 1}: a skipped update keeps parameters and moments, an applied one moves them"
        assert float(metrics["lr"]) == pytest.approx(float(schedule(count)), rel=1e-6), f"step {i + 1}"
    assert int(state.step) == 6 and int(state.nonfinite) == 1 and applied_count(state.opt_state) == 5


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    synthetic.write(str(root / "data"), 24, 32, seed=0)
    return str(root / "data")


def small_run_config(data_dir, total_steps):
    config = micro_config(("optical",))
    config.data_dir, config.batch_size, config.data.prefetch = data_dir, 8, 0
    config.total_steps, config.log_every, config.checkpoint_every = total_steps, 1000, 1000
    config.eval_every, config.image_every, config.keep_checkpoints = 0, 0, 1
    return config


def poisoned_steps(monkeypatch, nan_steps):
    """train() runs with NaN input pixels at the (1-based) steps in `nan_steps`."""
    from pretrain import train as trainer
    poison_steps(monkeypatch, trainer, nan_steps)
    return trainer


def test_non_finite_last_steps_stop_the_run_at_the_last_step(data_dir, tmp_path, monkeypatch):
    trainer = poisoned_steps(monkeypatch, {3, 4})
    config = small_run_config(data_dir, 4)
    config.max_nonfinite_steps = 2
    with pytest.raises(trainer.NonFiniteError, match=r"2 consecutive non-finite updates up to step 4: .*optical"):
        trainer.train(config, str(tmp_path), devices=jax.devices()[:1])
    logged = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert logged[-1]["step"] == 4 and logged[-1]["finite"] == 0.0  # the failing step's metrics are written
    assert not (tmp_path / "checkpoints" / "4").exists()  # but it is not saved as a finished run


def saved_run(workdir, config):
    """A workdir whose one checkpoint (step 1) holds `config`'s initial state, its data state and config."""
    import json

    from ringmoe import sharding
    from ringmoe.data.pipeline import Pipeline
    from ringmoe.training.checkpoint import Checkpointer
    from ringmoe.training.state import create_state
    _, state, _ = create_state(config, sharding.make_mesh({}, jax.devices()[:1]))
    with Pipeline(config) as pipeline:
        data_state = {"processes": [pipeline.get_state()]}
    checkpointer = Checkpointer(str(workdir), keep=1, save_every=1)
    checkpointer.save(1, state, data_state, {"config": json.loads(config.to_json()), "step": 1}, force=True)
    checkpointer.close()


def test_resume_refuses_a_changed_model_data_or_objective_and_allows_logging_changes(data_dir, tmp_path, caplog):
    from pretrain.train import train
    saved = small_run_config(data_dir, 1)
    saved_run(tmp_path, saved)
    one = jax.devices()[:1]

    changed = small_run_config(data_dir, 1)
    changed.objectives.simmim, changed.data.mask_ratio = 0.5, 0.4
    with pytest.raises(ValueError, match=r"checkpoint 1 .*data.mask_ratio: 0.6 in the checkpoint, 0.4 now; "
                                         r"objectives.simmim: 1.0 in the checkpoint, 0.5 now"):
        train(changed, str(tmp_path), devices=one)
    changed = small_run_config(data_dir, 1)
    changed.model.embed_dim = 32
    with pytest.raises(ValueError, match="model.embed_dim: 16 in the checkpoint, 32 now"):
        train(changed, str(tmp_path), devices=one)
    assert (tmp_path / "checkpoints" / "1").is_dir()  # refused, not mistaken for a damaged checkpoint

    allowed = small_run_config(data_dir, 1)
    allowed.log_every, allowed.mesh.data, allowed.max_nonfinite_steps = 7, 1, 9
    with caplog.at_level("WARNING", logger="ringmoe.train"):
        assert train(allowed, str(tmp_path), devices=one) == {}  # resumed at its last step: nothing to do
    assert "log_every: 1000 in the checkpoint, 7 now" in caplog.text


def test_loss_free_bias_moves_with_each_applied_update_outside_the_optimiser(data_dir):
    """A `loss_free_bias` router's selection bias gets no gradient and no AdamW update: one
    train step moves each entry by exactly +-bias_update_rate (0 where an expert's load is
    the mean), the sign of that block's load error, while the router kernels train."""
    from ringmoe import sharding
    from ringmoe.data.pipeline import Pipeline
    from ringmoe.training.state import create_state
    from ringmoe.training.step import batch_shardings, jit_train_step, to_device
    config = small_run_config(data_dir, 10)
    config.model.moe.update(router="loss_free_bias", load_balance_weight=0.0, bias_update_rate=0.01)
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    with Pipeline(config, num_workers=0) as pipeline:
        norm = {m: {"mean": s.mean, "std": s.std, "bands": s.bands} for m, s in pipeline.specs.items()}
        layout = batch_shardings(pipeline.batch_spec(), mesh)
        batch = to_device(next(pipeline), layout)
    graphdef, state, shardings = create_state(config, mesh)
    before = jax.tree.map(lambda a: a.copy(), state.params)
    state, metrics = jit_train_step(graphdef, config, norm, shardings, layout)(state, batch)
    assert float(metrics["finite"]) == 1.0
    moved = {}
    for (path, new), old in zip(jax.tree_util.tree_flatten_with_path(state.params)[0], jax.tree.leaves(before)):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if "router" in names:
            moved.setdefault(names[-1], []).append(jnp.abs(new - old))
    biases = jnp.concatenate([m.reshape(-1) for m in moved["bias"]])
    assert len(moved["bias"]) == 2 * len(config.model.depths)   # modal + collaborative router per stage
    assert bool(jnp.all(jnp.isclose(biases, 0.01) | (biases == 0))) and bool(jnp.any(biases > 0))
    assert all(bool(jnp.any(k > 0)) for k in moved["kernel"])
