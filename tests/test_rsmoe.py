"""RS-MoE's model core (ringmoe/vlm/rsmoe.py): shapes, the router's choice and losses, the
experts stacked on the `expert` axis, and gradients reaching what they should."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import lm
from ringmoe import sharding
from ringmoe.text.llama import LMSpec
from ringmoe.vlm.rsmoe import RSMoE, RSMoESpec


def tiny(num_experts=2, top_k=1):
    spec = RSMoESpec(lm=LMSpec.from_config({**dict(lm.get_config("tiny").lm), "num_layers": 1}), vision_dim=24,
                     num_experts=num_experts, top_k=top_k, num_queries=4, query_layers=1, prompt_length=2)
    return spec, RSMoE(spec, rngs=nnx.Rngs(0))


def batch(spec, b=3):
    keys = jax.random.split(jax.random.key(1), 3)
    vision = jax.random.normal(keys[0], (b, 16, spec.vision_dim))
    instruction = jax.random.randint(keys[1], (b, 5), 3, spec.lm.vocab_size)
    answer = jax.random.randint(keys[2], (b, 6), 3, spec.lm.vocab_size)
    instruction_valid = jnp.arange(5)[None] >= jnp.array([[0], [1], [2]])   # left-padded instructions
    answer_valid = jnp.arange(6)[None] < jnp.array([[6], [4], [2]])          # right-padded answers
    return vision, instruction, instruction_valid, answer, answer_valid


def test_rsmoe_routes_each_row_to_its_top_experts_and_scores_every_expert():
    spec, model = tiny(num_experts=3, top_k=2)
    logits, routing = model.logits(*batch(spec))
    assert logits.shape == (3, 3, 6, spec.lm.vocab_size)
    assert routing.prompts.shape == (3, 3, 2, spec.lm.hidden_size)
    np.testing.assert_allclose(routing.gates.sum(-1), 1.0, rtol=1e-6)
    assert ((routing.gates > 0).sum(-1) == 2).all()
    chosen = np.argsort(-np.asarray(routing.probs), -1)[:, :2]
    assert all(set(np.flatnonzero(g)) == set(c) for g, c in zip(np.asarray(routing.gates), chosen))
    loss, metrics = model.loss(*batch(spec))
    assert np.isfinite(loss) and metrics["expert_load"].shape == (3,)
    np.testing.assert_allclose(metrics["expert_load"].sum(), 2.0)


def test_rsmoe_gradients_reach_the_router_queries_and_the_chosen_experts_only():
    spec, model = tiny(num_experts=2, top_k=1)
    data = batch(spec)
    _, routing = model.logits(*data)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return nnx.merge(graphdef, p, rest).loss(*data)[0]
    grads = jax.grad(loss)(params)
    assert float(jnp.abs(grads["router"]["gate"][...]).sum()) > 0
    assert float(jnp.abs(grads["queries"]["queries"][...]).sum()) > 0
    used = np.asarray(routing.gates).sum(0) > 0
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
