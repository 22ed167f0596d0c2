"""Model FLOPs: the analytic count against the model's own matmuls and XLA's count; peaks; MFU.

Tolerances: the analytic count is matmul work only. Against the dot_general
ops of the traced forward it must agree exactly (dense) or to 0.5 % (MoE, where
the sort path adds a small gate-combine contraction). XLA's cost analysis also
counts elementwise work (LayerNorm, softmax, cosine normalisation, GELU,
biases), about 3-7 % at these small widths and less at real ones, so there
the analytic count must be 90-101 % of XLA's.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from ringmoe import flops
from ringmoe.model.params import abstract_model


def small(moe=False, modalities=("optical",), **overrides):
    c = tiny.get_config().model
    c.image_size, c.depths, c.num_heads, c.embed_dim = 32, (2, 2), (2, 4), 64
    for m in list(c.modalities.keys()):
        if m not in modalities:
            del c.modalities[m]
    c.moe.enabled = moe
    c.moe.update(overrides)
    return c


def forward_fn(config, modality, batch):
    graphdef, state = nnx.split(abstract_model(config))
    pixels = jax.ShapeDtypeStruct((batch, config.image_size, config.image_size,
                                   config.modalities[modality].channels), jnp.float32)

    def fwd(state, pixels):
        return nnx.merge(graphdef, state)({modality: {"pixels": pixels}})[modality]["reconstruction"]
    return fwd, state, pixels


def dot_flops(jaxpr) -> int:
    """2 * output size * contracted size of every dot_general, sub-jaxprs included (a scan's
    body once per iteration: scanned blocks)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in contract]))
        repeats = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += repeats * dot_flops(inner)
    return total


def traced_dot_flops(config, modality, batch=2) -> int:
    fwd, state, pixels = forward_fn(config, modality, batch)
    return dot_flops(jax.make_jaxpr(fwd)(state, pixels).jaxpr)


def test_dense_matches_traced_matmuls_for_every_embedding():
    config = small(modalities=("optical", "multispectral", "sar_l2", "sar_l1"))
    for m in config.modalities.keys():  # multispectral: wavelength hypernetwork included
        analytic = sum(flops.forward_flops(config, m, 2).values())
        assert analytic == pytest.approx(traced_dot_flops(config, m), rel=1e-9), m


def test_dense_within_xla_cost_analysis():
    config = small()
    config.scan_layers = False   # XLA's cost analysis counts a loop body once, not once per iteration
    fwd, state, pixels = forward_fn(config, "optical", 2)
    cost = jax.jit(fwd).lower(state, pixels).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ratio = sum(flops.forward_flops(config, "optical", 2).values()) / cost["flops"]
    # The analytic count is matmuls only; XLA also counts elementwise work, here mostly the
    # exact GELU's erf polynomial over every hidden unit (0.88 at this width; over 0.90 with the
    # tanh approximation it replaced), a share that shrinks as the width grows.
    assert 0.85 <= ratio <= 1.01, ratio


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_counts_active_experts_like_the_model(top_k):
    # capacity_factor 1 with the sort path fills every buffer slot: computed == active work.
    config = small(moe=True, top_k=top_k, capacity_factor=1.0, dispatch="sort")
    analytic = sum(flops.forward_flops(config, "optical", 2).values())
    assert analytic == pytest.approx(traced_dot_flops(config, "optical"), rel=5e-3)


def test_active_counting_scales_with_top_k_not_with_expert_count():
    dense = flops.forward_flops(small(), "optical", 4)
    base = flops.forward_flops(small(moe=True), "optical", 4)
    more = flops.forward_flops(small(moe=True, num_modal_experts=8, num_collaborative_experts=8), "optical", 4)
    top2 = flops.forward_flops(small(moe=True, top_k=2), "optical", 4)
    assert base["ffn"] == pytest.approx(3 * dense["ffn"])        # modal + collaborative + shared
    assert more["ffn"] == base["ffn"]                              # more experts: same active work
    assert more["router"] == pytest.approx(4 * base["router"])     # only the router grows (2+2 -> 8+8)
    assert top2["ffn"] == pytest.approx(5 / 3 * base["ffn"])       # 2 + 2 + 1 FFNs per token
    no_shared = flops.forward_flops(small(moe=True, shared_expert=False), "optical", 4)
    assert no_shared["ffn"] == pytest.approx(2 * dense["ffn"])
    for key in ("attention", "scores", "embed", "merging", "decoder"):
        assert base[key] == dense[key] == top2[key]
    # expert choice: every slot is a real token, cf * k assignments per token on average
    ec = small(moe=True, router="expert_choice", capacity_factor=2.0)
    assert flops.active_ffns_per_token(ec, 64) == pytest.approx(2.0 + 2.0 + 1.0)


def test_step_flops_sum_modalities_and_triple_for_training():
    config = small(moe=True, modalities=("optical", "sar_l2"))
    fwd = {m: sum(flops.forward_flops(config, m, b).values()) for m, b in (("optical", 3), ("sar_l2", 5))}
    batch = {"optical": 3, "sar_l2": 5}
    assert flops.model_flops_per_step(config, batch, training=False) == pytest.approx(sum(fwd.values()))
    assert flops.model_flops_per_step(config, batch) == pytest.approx(3 * sum(fwd.values()))
    assert flops.model_flops_per_step(config, {"optical": 3, "sar_l2": 0}, training=False) == pytest.approx(
        fwd["optical"])
    assert flops.forward_flops(config, "optical", 6)["ffn"] == pytest.approx(
        2 * flops.forward_flops(config, "optical", 3)["ffn"])
    with pytest.raises(ValueError, match="not in the model config"):
        flops.model_flops_per_step(config, {"sar_l1": 1})
    assert "GFLOP" in flops.describe(config, batch)


def fake_device(kind, platform="gpu"):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


def test_peak_table_lookup():
    cases = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12, "TPU v4": 275e12,
             "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "NVIDIA H100 PCIe": 756e12}
    for kind, expected in cases.items():
        peak, source = flops.device_peak_flops(fake_device(kind, "tpu" if "TPU" in kind else "gpu"), "bfloat16")
        assert peak == expected, kind
        assert "table" in source
    assert flops.device_peak_flops(fake_device("NVIDIA H100 80GB HBM3"), jnp.float32)[0] == 494.5e12
    peak, source = flops.device_peak_flops(fake_device("Mystery Accelerator 3000"), "bfloat16")
    assert peak is None and "unknown accelerator" in source and "Mystery" in source
    assert flops.device_peak_flops(fake_device("TPU v4", "tpu"), "float16")[0] is None


def test_cpu_peak_is_measured_cached_and_shared_by_fake_devices():
    host = flops.measure_cpu_peak("float32")
    assert 1e8 < host < 1e14                    # 0.1 GFLOP/s .. 100 TFLOP/s: a real measurement
    assert flops.measure_cpu_peak(np.float32) == host  # cached, same key for dtype objects
    device = jax.devices("cpu")[0]
    peak, source = flops.device_peak_flops(device, "float32")
    assert "measured" in source
    assert peak * len(jax.local_devices(backend="cpu")) == pytest.approx(host)


def test_mfu():
    assert flops.mfu(1e12, 0.5, 4, 1e12) == pytest.approx(0.5)
    assert flops.mfu(1e12, 0.5, 4, None) is None
    assert flops.mfu(1e12, 0.0, 4, 1e12) is None
