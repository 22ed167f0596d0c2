"""The dispatch registry: what `auto` picks (from measurements), paths that cannot run, and
tokamax's grouped matmul against `sort` in the GPU path's dtype."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from ringmoe.model import dispatch
from ringmoe.model.experts import RoutedExperts
from ringmoe.model.router import route


def test_auto_picks_the_fastest_measured_path(monkeypatch):
    monkeypatch.setitem(dispatch.MEASURED, "gpu", dispatch.Measurement(
        ratios={"sort": 1.4, "ragged": 3.0, "tokamax": 1.1}, source="a test"))
    assert dispatch.default_path("gpu") == "tokamax"
    assert dispatch.default_path("cpu") == dispatch.MEASURED["cpu"].fastest
    assert set(dispatch.MEASURED["cpu"].ratios) <= set(dispatch.PATHS)


def test_auto_on_an_unmeasured_backend_says_so(monkeypatch, caplog):
    monkeypatch.delitem(dispatch.MEASURED, "tpu", raising=False)
    dispatch._warn_unmeasured.cache_clear()
    with caplog.at_level(logging.WARNING):
        assert dispatch.default_path("tpu") == dispatch.UNMEASURED_PATH
    assert "no measurement for backend 'tpu'" in caplog.text


def test_a_path_whose_library_is_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(dispatch._NEEDS, "tokamax", ("no_such_module_for_this_test",))
    why = dispatch.unavailable("tokamax")
    assert "no_such_module_for_this_test does not import" in why
    with pytest.raises(ValueError, match="'tokamax' cannot run here"):
        dispatch.run("tokamax", None, None, None)
    with pytest.raises(ValueError, match="unknown MoE dispatch 'fast'"):
        dispatch.run("fast", None, None, None)


@pytest.mark.skipif(dispatch.unavailable("tokamax") is not None, reason=str(dispatch.unavailable("tokamax")))
@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_tokamax_matches_sort_in_bfloat16_with_gradients(router):
    # On the CPU tokamax runs its XLA fallback; the GPU's Mosaic / Triton kernels are checked
    # by tools/gpu_check.sh. bfloat16 keeps ~3 significant digits: compared at that level.
    cfg = ConfigDict(dict(router=router, top_k=1, capacity_factor=1.0, dispatch="sort"))
    layer = RoutedExperts(4, 16, 32, cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 24, 16), jnp.bfloat16)
    plan, _ = route(layer.router(x), router=router, top_k=1, capacity_factor=1.0)
    weights = layer.experts.weights()

    def loss(path, weights, x):
        return jnp.sum(dispatch.run(path, weights, x, plan).astype(jnp.float32) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2)), static_argnums=0)  # eager: op by op
    (got, got_grads), (want, want_grads) = (value_and_grad(p, weights, x) for p in ("tokamax", "sort"))
    np.testing.assert_allclose(got, want, rtol=2e-2)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, rtol=5e-2, atol=5e-2 * np.abs(w).max())
