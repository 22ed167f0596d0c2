"""Routing and dispatch of the hierarchical MoE layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from ringmoe.model import dispatch
from ringmoe.model.bench import expert_rows
from ringmoe.model.experts import RoutedExperts
from ringmoe.model.moe import HierarchicalMoE, router_loss
from ringmoe.model.router import capacity, route, update_bias

MODALITIES = ("optical", "sar_l2", "sar_l1")


def moe_config(**overrides):
    base = dict(enabled=True, num_modal_experts=2, num_collaborative_experts=3, shared_expert=True,
                router="token_choice", top_k=1, capacity_factor=1.2, dispatch="sort",
                load_balance_weight=1e-3, z_loss_weight=1e-4, modal_experts_loop=False)
    return ConfigDict({**base, **overrides})


def make_layer(seed=0, **overrides):
    return HierarchicalMoE(16, 32, MODALITIES, moe_config(**overrides), rngs=nnx.Rngs(seed))


def tokens(seed=1, shape=(4, 4, 4, 16)):
    return jax.random.normal(jax.random.key(seed), shape)


# The layers run compiled: called eagerly, every operation compiles on its own, about ten
# times the time of one compiled call here (a layer's forward 5.7 s eager, 0.7 s jitted).
# apply(layer, x, modalities) for a HierarchicalMoE, apply(layer, x) for RoutedExperts;
# jit_route's plan holds its capacity as a 0-d array.
apply = nnx.jit(lambda layer, x, *modalities: layer(x, *modalities), static_argnums=2)
jit_route = jax.jit(route, static_argnames=("router", "top_k", "capacity_factor"))


def grads(layer, x, modality):
    graphdef, params = nnx.split(layer, nnx.Param)

    @jax.jit
    def grad(params, x):
        return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, (modality,))[0] ** 2))(params)

    return grad(params, x)


def every_path(layer, x, router, top_k, capacity_factor):
    """(plan, stats, [output of each dispatch.PATHS]) of RoutedExperts `layer` on x, one program."""
    @nnx.jit
    def run(layer, x):
        plan, stats = route(layer.router(x), router=router, top_k=top_k, capacity_factor=capacity_factor)
        return plan, stats, [dispatch.run(p, layer.experts.weights(), x, plan) for p in dispatch.PATHS]

    return run(layer, x)


def test_modality_reaches_only_its_own_modal_experts():
    layer = make_layer()
    x = tokens()
    g = grads(layer, x, "sar_l2")
    for m in MODALITIES:
        norm = sum(float(jnp.sum(jnp.abs(leaf))) for leaf in jax.tree.leaves(g["modal_experts"][m]))
        assert (norm > 0) == (m == "sar_l2"), (m, norm)
    # Changing another modality's experts leaves this modality's output unchanged.
    before, _ = apply(layer, x, ("sar_l2",))
    other = layer.modal_experts["optical"].experts
    other.w_in[...] = other.w_in[...] + 1.0
    after, _ = apply(layer, x, ("sar_l2",))
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("loop", [False, True], ids=["vmapped", "looped"])
@pytest.mark.parametrize("router", ["dropless", "loss_free_bias"])
def test_a_mixed_batch_equals_each_modality_alone(router, loop):
    """Three modalities interleaved in one batch (the modal experts vmapped or looped over the
    modality axis, `route_by_modality`) give each modality's images the output and statistics
    they get alone, with every modality's router its own, its selection bias included (set
    unequal here, so a bias applied to the wrong modality's images would change the routing)."""
    layer = make_layer(router=router, modal_experts_loop=loop)
    if router == "loss_free_bias":
        for i, m in enumerate(MODALITIES):
            bias = layer.modal_experts[m].router.bias
            bias[...] = jnp.asarray([0.3, -0.3]) * (i - 1)
    x = tokens(shape=(6, 4, 4, 16))
    mixed, stats = apply(layer, x, MODALITIES)
    for i, m in enumerate(MODALITIES):
        alone, stats_alone = apply(layer, x[i::3], (m,))
        np.testing.assert_allclose(mixed[i::3], alone, rtol=1e-6, atol=1e-6)
        for group in ("modal", "collaborative"):
            for name, value in stats[m][group].items():
                np.testing.assert_allclose(value, stats_alone[m][group][name], rtol=1e-6, atol=1e-7)


def test_modal_experts_vmapped_and_looped_give_the_same_outputs_and_gradients():
    """`model.moe.modal_experts_loop` changes how the modal experts run, not what they compute."""
    x = tokens(shape=(6, 4, 4, 16))
    results = []
    for loop in (False, True):
        graphdef, params = nnx.split(make_layer(router="dropless", modal_experts_loop=loop), nnx.Param)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x, MODALITIES)[0] ** 2)  # noqa: E731
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (vmapped, g_vmapped), (looped, g_looped) = results
    np.testing.assert_allclose(vmapped, looped, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_vmapped), jax.tree.leaves(g_looped)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(float(jnp.sum(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(g_looped["modal_experts"]))


def test_in_a_mixed_batch_each_modality_reaches_only_its_own_modal_experts():
    """One pass of two modalities, images interleaved (optical, sar_l2, optical, ...):
    the sar_l2 images' output depends on no optical modal expert, and matches the
    sar_l2 images run alone (routing groups are images; dropless so capacity is per image)."""
    layer = make_layer(router="dropless")
    x = tokens()
    graphdef, params = nnx.split(layer, nnx.Param)

    def sar_rows(params):
        y, _ = nnx.merge(graphdef, params)(x, ("optical", "sar_l2"))
        return y[1::2]

    g = jax.jit(jax.grad(lambda p: jnp.sum(sar_rows(p) ** 2)))(params)
    assert sum(float(jnp.sum(jnp.abs(leaf))) for leaf in jax.tree.leaves(g["modal_experts"]["optical"])) == 0
    assert sum(float(jnp.sum(jnp.abs(leaf))) for leaf in jax.tree.leaves(g["modal_experts"]["sar_l2"])) > 0
    alone, stats_alone = apply(layer, x[1::2], ("sar_l2",))
    mixed, stats = apply(layer, x, ("optical", "sar_l2"))
    np.testing.assert_allclose(mixed[1::2], alone, rtol=1e-6, atol=1e-6)
    for group in ("modal", "collaborative"):
        for name, value in stats["sar_l2"][group].items():
            np.testing.assert_allclose(value, stats_alone["sar_l2"][group][name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("router,top_k,capacity_factor", [
    ("token_choice", 1, 3.0), ("token_choice", 2, 3.0), ("dropless", 1, 3.0), ("dropless", 2, 3.0),
    ("expert_choice", 1, 3.0), ("expert_choice", 1, 1.0), ("expert_choice", 2, 0.5)])
def test_dispatch_paths_agree(router, top_k, capacity_factor):
    # capacity_factor = E makes C = S: nothing can be dropped under token choice.
    # Expert choice with C < S leaves most (token, expert) pairs unchosen.
    cfg = moe_config(router=router, top_k=top_k, capacity_factor=capacity_factor)
    layer = RoutedExperts(3, 16, 32, cfg, rngs=nnx.Rngs(0))
    x = tokens(shape=(3, 20, 16))
    plan, stats, outputs = every_path(layer, x, router, top_k, capacity_factor)
    if router != "expert_choice":
        assert float(stats["dropped"]) == 0.0
    for out in outputs[1:]:
        np.testing.assert_allclose(out, outputs[0], rtol=1e-5, atol=1e-5)


def test_dispatch_paths_agree_when_tokens_are_dropped():
    layer = RoutedExperts(4, 16, 32, moe_config(capacity_factor=0.5), rngs=nnx.Rngs(0))
    x = tokens(shape=(2, 32, 16))
    plan, stats, outputs = every_path(layer, x, "token_choice", 1, 0.5)
    assert float(stats["dropped"]) > 0
    for out in outputs[1:]:
        np.testing.assert_allclose(out, outputs[0], rtol=1e-5, atol=1e-5)
    # A dropped token gets nothing from the experts (the residual carries it).
    dropped = np.asarray(plan.slot[..., 0] >= plan.capacity)
    np.testing.assert_array_equal(np.asarray(outputs[0])[dropped], 0.0)


@pytest.mark.parametrize("path", dispatch.PATHS)
@pytest.mark.parametrize("router,capacity_factor", [("expert_choice", 1.0), ("token_choice", 0.5)])
def test_experts_compute_only_the_chosen_rows(path, router, capacity_factor):
    # E=4, S=32, C=8 (expert choice) or 4 (token choice, half the tokens dropped):
    # every path must issue E*C rows per group to the experts, not S*E or S*K,
    # and all paths must agree on outputs and gradients.
    groups, seq, dim, num_experts = 2, 32, 16, 4
    cfg = moe_config(router=router, capacity_factor=capacity_factor, dispatch=path)
    layer = RoutedExperts(num_experts, dim, 64, cfg, rngs=nnx.Rngs(0))
    x = tokens(shape=(groups, seq, dim))
    cap = capacity(seq, num_experts, 1, capacity_factor)
    rows = expert_rows(jax.make_jaxpr(lambda x: layer(x)[0])(x).jaxpr, layer.experts.w_in.shape)
    assert rows == groups * num_experts * cap, f"{path} computes {rows} rows for {groups}x{num_experts}x{cap} slots"

    def loss(path):
        graphdef, params = nnx.split(layer, nnx.Param)

        def f(params, x):
            model = nnx.merge(graphdef, params)
            model.dispatch = path
            return jnp.sum(model(x)[0] ** 2)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)

    value, grad = loss(path)
    ref_value, ref_grad = loss("einsum")
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_capacity_is_respected_and_slots_are_unique():
    logits = jax.random.normal(jax.random.key(3), (2, 40, 4)) * 3
    plan, _ = jit_route(logits, router="token_choice", top_k=2, capacity_factor=1.0)
    cap = capacity(40, 4, 2, 1.0)
    assert plan.capacity == cap == 20
    for g in range(2):
        kept = np.asarray(plan.slot[g] < cap)
        pairs = set(zip(np.asarray(plan.expert_index[g])[kept], np.asarray(plan.slot[g])[kept]))
        assert len(pairs) == kept.sum()  # no two tokens share a slot
        for e in range(4):
            assert (np.asarray(plan.expert_index[g])[kept] == e).sum() <= cap


def test_expert_choice_fills_every_expert_to_capacity():
    logits = jax.random.normal(jax.random.key(4), (2, 24, 3))
    plan, stats = jit_route(logits, router="expert_choice", top_k=1, capacity_factor=1.0)
    per_expert = np.asarray(jnp.sum(plan.gate > 0, axis=1))
    np.testing.assert_array_equal(per_expert, plan.capacity)
    np.testing.assert_allclose(stats["load"], 1 / 3, rtol=1e-6)


def test_load_balance_loss_is_minimal_for_uniform_routing():
    num_experts = 4
    _, stats = jit_route(jnp.zeros((2, 64, num_experts)), router="token_choice", top_k=1, capacity_factor=1.0)
    assert float(stats["load_balance"]) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    for scale in (0.5, 2.0, 8.0):
        logits = jnp.asarray(rng.normal(size=(4, 64, num_experts)) * scale, jnp.float32)
        _, s = jit_route(logits, router="token_choice", top_k=1, capacity_factor=1.0)
        assert float(s["load_balance"]) >= 1.0 - 1e-6
    # All tokens on one expert: the worst case approaches E.
    skewed = jnp.zeros((1, 64, num_experts)).at[..., 0].set(10.0)
    _, s = jit_route(skewed, router="token_choice", top_k=1, capacity_factor=1.0)
    assert float(s["load_balance"]) > 3.9


def test_gradients_reach_every_expert_that_received_tokens():
    layer = make_layer(capacity_factor=2.0)
    x = tokens(shape=(4, 4, 4, 16))
    _, stats = apply(layer, x, ("optical",))
    stats = stats["optical"]
    g = grads(layer, x, "optical")
    for group, grad_tree in (("modal", g["modal_experts"]["optical"]), ("collaborative", g["collaborative_experts"])):
        load = np.asarray(stats[group]["load"])
        w_in = np.asarray(grad_tree["experts"]["w_in"][...])
        for e, fraction in enumerate(load):
            assert (np.abs(w_in[e]).sum() > 0) == (fraction > 0), (group, e, fraction)
        assert np.abs(np.asarray(grad_tree["router"]["kernel"][...])).sum() > 0
    assert np.abs(np.asarray(g["shared_expert"]["fc1"]["kernel"][...])).sum() > 0


def test_statistics_and_router_loss():
    layer = make_layer()
    _, stats = apply(layer, tokens(), ("sar_l1",))
    stats = stats["sar_l1"]
    assert set(stats) == {"modal", "collaborative"}
    assert stats["modal"]["load"].shape == (2,) and stats["collaborative"]["load"].shape == (3,)
    np.testing.assert_allclose(np.sum(stats["collaborative"]["load"]), 1.0, rtol=1e-6)
    assert 0.0 <= float(stats["modal"]["dropped"]) <= 1.0


# Router-loss golden values. Two modalities (optical, sar_l2), two MoE layers; the typed-in
# per-layer Switch (lb) and z-loss (z) values of each group:
#
#   images   group           lb layer 1, 2 -> mean    z layer 1, 2 -> mean
#   optical  modal           1.0, 1.4      -> 1.2     4, 6         -> 5
#   optical  collaborative   1.1, 1.3      -> 1.2     2, 2         -> 2
#   sar_l2   modal           2.0, 2.4      -> 2.2     8, 8         -> 8
#   sar_l2   collaborative   1.5, 2.5      -> 2.0     3, 5         -> 4
#
# modal:          mean over modalities            lb (1.2 + 2.2) / 2 = 1.7    z (5 + 8) / 2 = 6.5
# collaborative:  mean over the mixed batch's     lb (1.2 + 2.0) / 2 = 1.6    z (2 + 4) / 2 = 3
#                 images (2 + 2: equal weights)
# total = 1e-3 * (1.7 + 1.6) + 1e-4 * (6.5 + 3) = 3.3e-3 + 9.5e-4 = 4.25e-3: each group has the
# full weight 1e-3 (averaging the two groups together, 1e-3 * (1.7 + 1.6) / 2, would halve it).
# One group only: modal-only 1e-3 * 1.7 + 1e-4 * 6.5 = 2.35e-3; collaborative-only
# 1e-3 * 1.6 + 1e-4 * 3 = 1.9e-3: the same 1e-3 per group as with both.
# Unequal batches, optical 2 images, sar_l2 6: the collaborative loss of the mixed batch is the
# mean over its 8 images, (2 * 1.2 + 6 * 2.0) / 8 = 1.8; the modal one stays 1.7.
ROUTER_GOLDEN = {
    "optical": {"modal": ((1.0, 4.0), (1.4, 6.0)), "collaborative": ((1.1, 2.0), (1.3, 2.0))},
    "sar_l2": {"modal": ((2.0, 8.0), (2.4, 8.0)), "collaborative": ((1.5, 3.0), (2.5, 5.0))},
}


def golden_stats(groups):
    """{modality: per-layer stats} of ROUTER_GOLDEN restricted to `groups`."""
    return {m: [{g: {"load_balance": jnp.float32(per_group[g][layer][0]),
                     "z_loss": jnp.float32(per_group[g][layer][1])} for g in groups}
                for layer in range(2)]
            for m, per_group in ROUTER_GOLDEN.items()}


def test_router_loss_golden_values_give_each_group_the_full_weight():
    config = moe_config(load_balance_weight=1e-3, z_loss_weight=1e-4)
    both = router_loss(golden_stats(("modal", "collaborative")), config)
    assert set(both) == {"modal_load_balance", "modal_z_loss", "collaborative_load_balance",
                         "collaborative_z_loss", "total"}
    assert float(both["modal_load_balance"]) == pytest.approx(1.7, rel=1e-6)
    assert float(both["collaborative_load_balance"]) == pytest.approx(1.6, rel=1e-6)
    assert float(both["modal_z_loss"]) == pytest.approx(6.5, rel=1e-6)
    assert float(both["collaborative_z_loss"]) == pytest.approx(3.0, rel=1e-6)
    assert float(both["total"]) == pytest.approx(4.25e-3, rel=1e-6)

    modal_only = router_loss(golden_stats(("modal",)), config)
    assert set(modal_only) == {"modal_load_balance", "modal_z_loss", "total"}
    assert float(modal_only["total"]) == pytest.approx(2.35e-3, rel=1e-6)
    collaborative_only = router_loss(golden_stats(("collaborative",)), config)
    assert float(collaborative_only["total"]) == pytest.approx(1.9e-3, rel=1e-6)

    unequal = router_loss(golden_stats(("modal", "collaborative")), config, images={"optical": 2, "sar_l2": 6})
    assert float(unequal["modal_load_balance"]) == pytest.approx(1.7, rel=1e-6)
    assert float(unequal["collaborative_load_balance"]) == pytest.approx(1.8, rel=1e-6)

    dense = router_loss({"optical": [{}, {}], "sar_l2": [{}, {}]}, config)
    assert set(dense) == {"total"} and float(dense["total"]) == 0.0


def test_ablation_variants_and_errors():
    modal_only = make_layer(num_collaborative_experts=0, shared_expert=False)
    y, stats = apply(modal_only, tokens(), ("optical",))
    assert set(stats["optical"]) == {"modal"} and modal_only.collaborative_experts is None
    with pytest.raises(ValueError, match="no experts"):
        make_layer(num_modal_experts=0, num_collaborative_experts=0, shared_expert=False)
    with pytest.raises(TypeError, match="tuple of modalities"):
        modal_only(tokens(), "optical")
    with pytest.raises(ValueError, match="unknown router"):
        make_layer(router="random")(tokens(), ("optical",))
    with pytest.raises(ValueError, match="unknown MoE dispatch"):
        make_layer(dispatch="magic")(tokens(), ("optical",))


def test_loss_free_bias_balances_load_without_an_auxiliary_loss():
    """A router skewed towards expert 0 (its kernel column pushed along the tokens' mean):
    token choice keeps it skewed; `loss_free_bias`, updating only its selection bias by
    the sign rule (no gradient, no loss), brings every expert to the mean load, while the
    gates stay the unbiased probabilities."""
    experts = 4
    x = jax.random.normal(jax.random.key(3), (8, 64, 16)) + 0.5
    skew = jnp.zeros((16, experts)).at[:, 0].set(0.3)

    def layer(router):
        routed = RoutedExperts(experts, 16, 32, moe_config(router=router), rngs=nnx.Rngs(0))
        routed.router.kernel[...] = routed.router.kernel[...] + skew
        return routed

    plain, free = layer("token_choice"), layer("loss_free_bias")
    assert plain.router.bias is None and free.router.bias.shape == (experts,)
    (before,) = apply(free, x)[1]
    assert float(before["load"][0]) > 0.8          # skewed: expert 0 takes most tokens
    @nnx.jit
    def balance_step(routed):   # DeepSeek-V3's rate, 1e-3 per step
        (stats,) = routed(x)[1]
        routed.router.bias[...] = update_bias(routed.router.bias[...], stats["load"], 1e-3)

    for _ in range(700):       # the bias must open a gap of ~0.43 between expert 0 and the rest
        balance_step(free)
    (after,) = apply(free, x)[1]
    (skewed,) = apply(plain, x)[1]
    np.testing.assert_allclose(after["load"], 1 / experts, atol=0.03)
    assert float(skewed["load"][0]) > 0.8
    # Gates are the probabilities of the chosen experts, bias or not.
    logits = free.router(x)
    plan, _ = jit_route(logits, router="loss_free_bias", top_k=1, capacity_factor=8.0, bias=free.router.bias[...])
    probs = jax.nn.softmax(logits, axis=-1)
    np.testing.assert_allclose(plan.gate, jnp.take_along_axis(probs, plan.expert_index, axis=-1), rtol=1e-6)


@pytest.mark.parametrize("scanned", [True, False])
def test_balance_routers_moves_each_block_router_by_its_own_load(scanned):
    """The trainer's update (`balance_routers`): block j of a stage, scanned or not, moves by
    the sign of its own load error; the collaborative router by the image-weighted load."""
    from tests.test_model import small_config
    from ringmoe.model.balance import balance_routers
    from ringmoe.model.ringmoe import RingMoE
    config = small_config(router="loss_free_bias", num_modal_experts=2, num_collaborative_experts=2)
    config.scan_layers = scanned
    model = RingMoE(config, rngs=nnx.Rngs(0))
    blocks = sum(config.depths)
    load = {"optical": [jnp.array([0.9, 0.1]), jnp.array([0.2, 0.8])] * (blocks // 2),
            "multispectral": [jnp.array([0.6, 0.4]), jnp.array([0.5, 0.5])] * (blocks // 2)}
    stats = {m: [{"modal": {"load": ld}, "collaborative": {"load": ld}} for ld in loads] for m, loads in load.items()}
    balance_routers(model, stats, {"optical": 1, "multispectral": 3}, rate=0.5)

    def bias(stage, j, path):
        ffn = model.stages[stage].blocks.ffn if scanned else model.stages[stage].blocks[j].ffn
        value = path(ffn).router.bias[...]
        return value[j] if scanned else value

    for stage in range(len(config.depths)):
        for j in range(config.depths[stage]):
            k = sum(config.depths[:stage]) + j
            np.testing.assert_allclose(bias(stage, j, lambda f: f.modal_experts["optical"]),
                                       0.5 * np.sign(0.5 - np.asarray(load["optical"][k])))
            mixed = 0.25 * np.asarray(load["optical"][k]) + 0.75 * np.asarray(load["multispectral"][k])
            np.testing.assert_allclose(bias(stage, j, lambda f: f.collaborative_experts),
                                       0.5 * np.sign(0.5 - mixed))
