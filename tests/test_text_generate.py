"""ringmoe.text.generate: the cache against full forward passes, left padding, stop tokens, the three
methods, one compile per generation shape, and the argument checks. Tiny random model, CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.lm import get_config
from ringmoe.text import generate as gen
from ringmoe.text.llama import LMSpec, build, init_cache

PROMPTS = [[5, 17, 300, 42, 9, 11], [7, 8], [100, 200, 300, 400]]


@pytest.fixture(scope="module")
def model():
    return build(LMSpec.from_config(get_config("tiny").lm), seed=3)


@nnx.jit
def forward(model, *args):
    """The model called without a cache (jitted: eager calls compile op by op, seconds each)."""
    return model(*args)


def log_prob(model, prompt, new) -> float:
    """Sum of log p(new token | all before) from one full forward pass."""
    logp = jax.nn.log_softmax(forward(model, jnp.asarray([prompt + new], jnp.int32)), -1)[0]
    return float(sum(logp[len(prompt) - 1 + i, token] for i, token in enumerate(new)))


def test_cache_matches_full_forward(model):
    """Prefill 5 slots of a left-padded batch, then decode the rest one token at a time."""
    rng = np.random.default_rng(0)
    tokens, positions, valid = gen.left_pad([rng.integers(1, 512, 12).tolist(), rng.integers(1, 512, 9).tolist()], 0)
    full = forward(model, tokens, positions, valid)
    cache = init_cache(model.spec, 2, 12)
    logits, cache = forward(model, tokens[:, :5], positions[:, :5], valid[:, :5], cache)
    steps = [logits]
    for i in range(5, 12):
        logits, cache = forward(model, tokens[:, i:i + 1], positions[:, i:i + 1], valid[:, i:i + 1], cache)
        steps.append(logits)
    cached = jnp.concatenate(steps, 1)
    np.testing.assert_allclose(np.asarray(cached)[valid], np.asarray(full)[valid], atol=1e-5)
    assert int(cache["index"]) == 12


def test_left_padded_batch_equals_each_prompt_alone(model):
    batch = gen.generate(model, PROMPTS, 8)
    alone = [gen.generate(model, [p], 8)[0] for p in PROMPTS]
    assert batch == alone and all(len(row) == 8 for row in batch)
    # The same logits: each padded row's real slots against the sequence run alone.
    sequences = [p + new for p, new in zip(PROMPTS, batch)]
    tokens, positions, valid = gen.left_pad(sequences, 0)
    padded = np.asarray(forward(model, tokens, positions, valid))
    for i, seq in enumerate(sequences):
        own = np.asarray(forward(model, jnp.asarray([seq], jnp.int32)))[0]
        np.testing.assert_allclose(padded[i, tokens.shape[1] - len(seq):], own, atol=1e-5)


def test_stop_token_ends_a_row_and_is_kept(model):
    free = gen.generate(model, PROMPTS, 8)
    stop = free[0][3]
    first = free[0].index(stop)                # greedy may emit it before step 3 too
    rows = gen.generate(model, PROMPTS, 8, stop_tokens=(stop,))
    assert rows[0] == free[0][:first + 1]
    for row, unconstrained in zip(rows[1:], free[1:]):   # the other rows stop only if they emit it
        cut = unconstrained.index(stop) + 1 if stop in unconstrained else 8
        assert row == unconstrained[:cut]


def test_beam_search(model):
    """One beam is greedy; four find a sequence at least as probable as greedy's (usual, not a
    theorem: beams can prune greedy's path; it holds for this model and these prompts)."""
    greedy = gen.generate(model, PROMPTS, 8)
    assert gen.generate(model, PROMPTS, 8, method="beam", num_beams=1) == greedy
    beams = gen.generate(model, PROMPTS, 8, method="beam", num_beams=4)
    assert beams != greedy
    for prompt, g, b in zip(PROMPTS, greedy, beams):
        assert len(b) == 8
        assert log_prob(model, prompt, b) >= log_prob(model, prompt, g) - 1e-5


def test_beam_search_stops(model):
    """A hypothesis that emits the stop token ends there, the stop token kept. With
    length_penalty 0 (raw summed log-probs) the short finished one beats every longer one."""
    best = gen.generate(model, PROMPTS, 8, method="beam", num_beams=4)
    stop = best[0][2]
    rows = gen.generate(model, PROMPTS, 8, method="beam", num_beams=4, stop_tokens=(stop,), length_penalty=0.0)
    assert rows[0] == best[0][:3]
    for row in rows[1:]:
        assert stop not in row[:-1]


def test_sampling(model):
    first = gen.generate(model, PROMPTS, 8, method="sample", seed=1)
    assert gen.generate(model, PROMPTS, 8, method="sample", seed=1) == first
    assert gen.generate(model, PROMPTS, 8, method="sample", seed=2) != first
    assert gen.generate(model, PROMPTS, 8, method="sample", top_p=1e-6, temperature=0.7) == \
        gen.generate(model, PROMPTS, 8)


def test_one_compile_per_generation_shape(model):
    """A 10-token generation traces the prefill and the decode step once each; so does a second
    generation of the same shape (none)."""
    gen.TRACES.clear()
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [3, 4]]        # a shape no other test uses
    gen.generate(model, prompts, 10)
    assert dict(gen.TRACES) == {"prefill": 1, "step": 1}
    gen.generate(model, [[9, 8, 7, 6, 5, 4, 3, 2, 1], [30, 40, 50]], 10)
    assert dict(gen.TRACES) == {"prefill": 1, "step": 1}


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="nucleus"), "unknown generation method 'nucleus' (known: ['beam', 'greedy', 'sample'])"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=0.0), "temperature"),
    (dict(num_beams=0), "num_beams"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(max_new_tokens=510), "exceeds the model's max_positions 512"),
])
def test_bad_arguments(model, kwargs, message):
    kwargs = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        gen.generate(model, kwargs.pop("prompts"), kwargs.pop("max_new_tokens"), **kwargs)
