"""RS-MoE's model core (ringmoe/vlm/rsmoe.py): shapes, the router's choice and losses, the
experts stacked on the `expert` axis, and gradients reaching what they should."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm
from ringmoe import sharding
from ringmoe.text.llama import LMSpec
from ringmoe.text.llama import LanguageModel
from ringmoe.vlm.rsmoe import RSMoE, RSMoESpec, dispatch


def tiny(num_experts=2, top_k=1, capacity_factor=2.0, router_input="instruction", prompt_input="instruction"):
    spec = RSMoESpec(lm=LMSpec.from_config({**dict(lm.get_config("tiny").lm), "num_layers": 1}), vision_dim=24,
                     num_experts=num_experts, top_k=top_k, num_queries=4, query_layers=1, prompt_length=2,
                     capacity_factor=capacity_factor, router_input=router_input, prompt_input=prompt_input)
    return spec, RSMoE(spec, rngs=nnx.Rngs(0))


def batch(spec, b=2, n=3):
    """b images of n sub-tasks each: left-padded instructions, right-padded answers."""
    keys = jax.random.split(jax.random.key(1), 3)
    vision = jax.random.normal(keys[0], (b, 16, spec.vision_dim))
    instruction = jax.random.randint(keys[1], (b, n, 5), 3, spec.lm.vocab_size)
    answer = jax.random.randint(keys[2], (b, n, 6), 3, spec.lm.vocab_size)
    starts = jnp.arange(b * n).reshape(b, n, 1) % 3
    instruction_valid = jnp.arange(5)[None, None] >= starts
    answer_valid = jnp.arange(6)[None, None] < 6 - 2 * starts
    return vision, instruction, instruction_valid, answer, answer_valid


def test_dispatch_fills_each_experts_slots_in_row_order_and_drops_over_capacity():
    # rows 0, 1, 3 choose expert 0 and row 2 expert 1; capacity 2: row 3 is dropped for expert 0.
    gates = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    slots, kept = dispatch(gates, 2)
    assert [tuple(i) for i in np.argwhere(np.asarray(slots))] == [(0, 0, 0), (1, 0, 1), (2, 1, 0)]
    np.testing.assert_array_equal(np.asarray(kept), [[1, 0], [1, 0], [0, 1], [0, 0]])


def test_rsmoe_loss_is_each_rows_gate_weighted_top_k_answer_nll():
    """The dispatched loss equals the loss computed by running every expert on every row and
    weighting by the gates (capacity large enough that nothing is dropped)."""
    spec, model = tiny(num_experts=3, top_k=2)
    data = batch(spec)
    # Jitted: the same arithmetic, one compile instead of an eager dispatch per operation.
    loss, metrics = nnx.jit(lambda m, d: m.loss(*d, balance_weight=0.0, z_weight=0.0))(model, data)
    assert float(metrics["dropped"]) == 0.0

    def route(model, data):
        visual, routing = model.route(*data)
        return visual, routing.prompts, routing.gates
    visual, prompts, gates = nnx.jit(route)(model, data[:3])
    rows = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    instruction, instruction_valid, answer, answer_valid = map(rows, data[1:])
    graphdef, state = nnx.split(model.experts)
    one_graphdef = nnx.graphdef(LanguageModel(spec.lm, rngs=nnx.Rngs(0)))

    @jax.jit
    def expert_nll(lm_state, prompts):
        """Expert lm_state's mean answer NLL on every row."""
        lm = nnx.merge(one_graphdef, lm_state)
        x, valid = model.expert_inputs(lm, visual, prompts, instruction, instruction_valid, answer, answer_valid)
        logits = lm.forward_embeddings(x, valid=valid)[:, -answer.shape[1] - 1:-1]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), answer[..., None], -1)[..., 0]
        return (nll * answer_valid).sum(-1) / answer_valid.sum(-1)

    expected = np.zeros(instruction.shape[0])
    for k in range(3):
        per_row = expert_nll(jax.tree.map(lambda x: x[k], state), prompts[:, k])
        expected += np.asarray(gates[:, k] * per_row)
    np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics["expert_load"]).sum(), 2.0)
    assert ((np.asarray(gates) > 0).sum(-1) == 2).all()


def test_rsmoe_gradients_reach_the_router_queries_and_the_chosen_experts_only():
    spec, model = tiny(num_experts=3, top_k=1)
    data = batch(spec)
    _, routing = model.route(*data[:3])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return nnx.merge(graphdef, p, rest).loss(*data)[0]
    grads = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(grads["router"]["gate"][...]).sum()) > 0
    assert float(jnp.abs(grads["queries"]["queries"][...]).sum()) > 0
    used = np.asarray(routing.gates).sum(0) > 0
    assert not used.all(), "the test needs an expert no row chose"
    mlp = np.abs(np.asarray(grads["experts"]["layers"][0]["mlp"]["up"][...])).sum((1, 2))
    assert ((mlp > 0) == used).all(), (mlp, used)


def test_rsmoe_experts_shard_over_the_expert_axis():
    spec, model = tiny(num_experts=2)
    state = nnx.state(model, nnx.Param)
    mesh = sharding.make_mesh({"expert": 2, "tensor": 2}, jax.devices()[:4])
    shardings = sharding.state_shardings(state, mesh)
    q = shardings["experts"]["layers"][0]["attention"]["q"].get_value()
    assert q.spec == jax.sharding.PartitionSpec("expert", "fsdp", "tensor", None)
    assert shardings["router"]["base"].get_value().spec[0] == "expert"


def test_linear_projector_gives_the_experts_every_vision_token():
    spec = RSMoESpec(lm=LMSpec.from_config({**dict(lm.get_config("tiny").lm), "num_layers": 1}), vision_dim=24,
                     num_experts=2, num_queries=4, query_layers=1, prompt_length=2, projector="linear")
    model = RSMoE(spec, rngs=nnx.Rngs(0))
    data = batch(spec)
    visual = nnx.jit(lambda m, d: m.route(*d)[0])(model, data[:3])   # compiled: eager is op by op
    assert visual.shape == (6, 16, spec.lm.hidden_size)     # 2 images x 3 sub-tasks, all 16 vision tokens
    loss, _ = nnx.jit(lambda m, d: m.loss(*d))(model, data)
    assert np.isfinite(float(loss))
    with pytest.raises(ValueError, match="unknown vlm.projector 'mlp'"):
        RSMoE(RSMoESpec(lm=spec.lm, vision_dim=24, projector="mlp"), rngs=nnx.Rngs(0))


def test_router_weighs_instruction_and_image_alike_whatever_their_scale():
    """Each pooled input is brought to unit RMS: scaling the instruction embeddings (0.02 at
    initialisation) or the visual queries (~1 after their LayerNorm) changes no routing."""
    spec, model = tiny(num_experts=3, router_input="instruction_and_image")
    router = model.router
    keys = jax.random.split(jax.random.key(2), 2)
    instruction = 0.02 * jax.random.normal(keys[0], (4, 5, spec.lm.hidden_size))
    visual = jax.random.normal(keys[1], (4, 4, spec.lm.hidden_size))
    valid = jnp.ones((4, 5), bool)
    base = router(instruction, valid, visual).probs
    # Equal up to the normaliser's eps (1e-6 against a mean square of ~4e-4: 0.4 % at most).
    np.testing.assert_allclose(router(100.0 * instruction, valid, visual).probs, base, rtol=1e-2)
    np.testing.assert_allclose(router(instruction, valid, 0.01 * visual).probs, base, rtol=1e-2)
    unnormalised = jax.nn.softmax(jnp.concatenate([instruction.mean(1), visual.mean(1)], -1) @ router.gate[...], -1)
    assert not np.allclose(unnormalised, base, rtol=1e-2)   # what the normalisation changes


@pytest.mark.parametrize("router_input", ["instruction", "instruction_and_image"])
@pytest.mark.parametrize("prompt_input", ["instruction", "instruction_and_image"])
def test_the_gate_and_the_prompts_read_the_image_only_when_asked(router_input, prompt_input):
    """`vlm.router_input = "instruction"` (the paper's instruction router): other visual queries
    do not change the choice of experts; `vlm.prompt_input = "instruction"`: nor the prompts. With
    the image as their input they change."""
    spec, model = tiny(num_experts=3, router_input=router_input, prompt_input=prompt_input)
    keys = jax.random.split(jax.random.key(3), 3)
    instruction = jax.random.normal(keys[0], (4, 5, spec.lm.hidden_size))
    valid = jnp.ones((4, 5), bool)
    film = model.router.film
    film[...] = 0.1 * jax.random.normal(keys[1], film.shape)     # zero at initialisation: make it act
    one = model.router(instruction, valid, jax.random.normal(keys[1], (4, 4, spec.lm.hidden_size)))
    other = model.router(instruction, valid, jax.random.normal(keys[2], (4, 4, spec.lm.hidden_size)))
    assert np.allclose(one.probs, other.probs) == (router_input == "instruction")
    assert np.allclose(one.prompts, other.prompts) == (prompt_input == "instruction")
    for key in ("router_input", "prompt_input"):
        with pytest.raises(ValueError, match=f"unknown vlm.{key} 'scene'"):
            tiny(**{key: "scene"})


def test_the_answers_train_the_gate_only_when_a_row_has_experts_to_compare():
    """Without the router losses, the answer loss's gradient on the gate is nothing at top-1 (the
    renormalised gate of one expert is p / p = 1: only rounding is left, ~1e-5 here) and of order 1
    at top-2 (sum_k g_k nll_k with sum_k g_k = 1: weight moves to the better expert)."""
    def gate_gradient(top_k):
        spec, model = tiny(num_experts=3, top_k=top_k, capacity_factor=3.0)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            return nnx.merge(graphdef, p, rest).loss(*batch(spec), balance_weight=0.0, z_weight=0.0)[0]
        return float(np.abs(np.asarray(jax.jit(jax.grad(loss))(params)["router"]["gate"][...])).sum())
    top1, top2 = gate_gradient(1), gate_gradient(2)
    assert top2 > 0.1 and top1 < 1e-4 * top2, (top1, top2)
