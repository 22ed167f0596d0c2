"""The Llama-layout language model (ringmoe/text/llama.py): shapes of public small LMs, the spec's
refusals, sharding on a mesh, and the tokenizer trained here."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm
from ringmoe import sharding
from ringmoe.text import llama
from ringmoe.text.tokenizer import load_tokenizer, train_tokenizer


@pytest.mark.parametrize("shape, total", [("smollm2_135m", 134_515_008), ("smollm2_360m", 361_821_120),
                                          ("qwen25_05b", 494_032_768)])
def test_shapes_count_the_public_models_parameters(shape, total):
    """The published sizes (the checkpoints' safetensors hold exactly these counts)."""
    assert llama.parameter_counts(llama.LMSpec.from_config(lm.get_config(shape).lm))["total"] == total


def test_spec_refuses_what_it_cannot_compute():
    base = dict(lm.get_config("tiny").lm)
    with pytest.raises(ValueError, match="unknown language-model config keys \\['sliding_window'\\]"):
        llama.LMSpec.from_config({**base, "sliding_window": 4})
    with pytest.raises(ValueError, match="rope_scaling.rope_type 'yarn' is not supported"):
        llama.LMSpec.from_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        llama.LMSpec.from_config({**base, "num_kv_heads": 3})


def test_rotary_embedding_rotates_pairs_by_position():
    """Each (i, i + D/2) pair turns by position * inv_freq[i]: norms kept, and the dot product of
    two rotated vectors depends only on their distance in positions."""
    spec = llama.LMSpec.from_config(lm.get_config("tiny").lm)
    inv = llama.rope_frequencies(spec)
    x = jax.random.normal(jax.random.key(0), (1, 1, 1, spec.head_size))
    at = lambda p: llama.apply_rope(x, jnp.array([[p]]), inv)[0, 0, 0]  # noqa: E731
    np.testing.assert_allclose(jnp.linalg.norm(at(7)), jnp.linalg.norm(x), rtol=1e-6)
    np.testing.assert_allclose(at(3) @ at(5), at(10) @ at(12), rtol=1e-5)
    half = spec.head_size // 2
    angle = 3 * inv[1]
    expected = x[0, 0, 0, 1] * np.cos(angle) - x[0, 0, 0, half + 1] * np.sin(angle)
    np.testing.assert_allclose(at(3)[1], expected, rtol=1e-5)


def test_the_model_shards_on_a_mesh_and_computes_the_same_logits():
    """Parameters carry logical names (vocab, embed, heads, kv_heads, mlp): on a fsdp 2 x tensor 2
    mesh they are split, and the logits equal one device's."""
    spec = llama.LMSpec.from_config(lm.get_config("tiny").lm)
    model = llama.build(spec)
    tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, spec.vocab_size)
    expected = model(tokens)
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
    graphdef, state = nnx.split(model)
    shardings = sharding.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    q = state["layers"][0]["attention"]["q"]
    assert q[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert state["embed"][...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=1e-5)


def test_a_tokenizer_trained_here_saves_loads_and_round_trips(tmp_path):
    texts = ["a river crosses farmland north of the town", "dense forest on both banks of the river",
             "an airport with two runways", "Sentinel-2 sees 13 bands; SAR sees through clouds."] * 20
    path = str(tmp_path / "tokenizer.json")
    trained = train_tokenizer(texts, vocab_size=300, path=path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.get_vocab_size() == trained.get_vocab_size() <= 300
    assert [loaded.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")] == [0, 1, 2]
    for text in texts[:4] + ["unseen: ümlaut, 東京, tabs\tand newlines\n"]:
        ids = loaded.encode(text).ids
        assert loaded.decode(ids) == text
    assert len(loaded.encode(texts[0]).ids) < len(texts[0])   # merges were learnt
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a tokenizers tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
