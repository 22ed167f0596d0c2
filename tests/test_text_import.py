"""Hugging Face-format checkpoints into the Llama-layout LM (ringmoe/text/hf.py), the project's saved
LM (ringmoe/text/saved.py) and tools.import_lm. No torch here: the checkpoints are written by hand
(safetensors.numpy + a config.json dict) from a random model of ours, under Hugging Face's names and
layouts (`to_hf` below, the inverse of the importer's mapping written out independently)."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from ringmoe.text import hf, llama, saved

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SPEC = llama.LMSpec(vocab_size=48, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=12, rope_theta=5000.0, rms_norm_eps=1e-5, tie_embeddings=False, attention_bias=True,
                    max_positions=128)


def hf_config(spec: llama.LMSpec, model_type: str = "qwen2", **extra) -> dict:
    """A config.json as transformers 5 writes one for `spec` (rope_parameters holding theta)."""
    config = {"model_type": model_type, "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
              "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
              "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
              "head_dim": spec.head_size, "hidden_act": "silu", "rms_norm_eps": spec.rms_norm_eps,
              "tie_word_embeddings": spec.tie_embeddings, "max_position_embeddings": spec.max_positions,
              "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta, **dict(spec.rope_scaling)}}
    if model_type == "llama":
        config.update(attention_bias=spec.attention_bias, mlp_bias=False)
    return {**config, **extra}


def to_hf(model: llama.LanguageModel) -> dict[str, np.ndarray]:
    """The model's parameters under Hugging Face's names, Linear weights (out, in)."""
    spec, p = model.spec, saved.flat_params(model)
    e = spec.hidden_size
    tensors = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["norm.scale"]}
    if not spec.tie_embeddings:
        tensors["lm_head.weight"] = p["lm_head"].T
    for i in range(spec.num_layers):
        at, ours = f"model.layers.{i}.", f"layers.{i}."
        tensors[at + "input_layernorm.weight"] = p[ours + "attention_norm.scale"]
        tensors[at + "post_attention_layernorm.weight"] = p[ours + "mlp_norm.scale"]
        for name in "qkv":
            w = p[ours + f"attention.{name}"]                                   # (E, heads, D)
            tensors[at + f"self_attn.{name}_proj.weight"] = w.reshape(e, -1).T   # (heads * D, E)
            if spec.attention_bias:
                tensors[at + f"self_attn.{name}_proj.bias"] = p[ours + f"attention.{name}_bias"].reshape(-1)
        tensors[at + "self_attn.o_proj.weight"] = p[ours + "attention.o"].reshape(-1, e).T
        for name in ("gate", "up", "down"):
            tensors[at + f"mlp.{name}_proj.weight"] = p[ours + f"mlp.{name}"].T
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def random_model(spec: llama.LMSpec = SPEC, seed: int = 0) -> llama.LanguageModel:
    """A model with every parameter random (biases and norm scales off their zeros and ones)."""
    model = llama.build(spec, seed)
    rng = np.random.default_rng(seed)
    for name, value in saved.flat_params(model).items():
        moved = value + rng.normal(0, 0.3 if "bias" in name or "scale" in name else 0.05, value.shape)
        hf.parameter(model, tuple(int(s) if s.isdigit() else s for s in name.split("."))).set_value(
            jnp.asarray(moved, value.dtype))
    return model


def write_checkpoint(directory, model, config: dict, *, shards: int = 1, tokenizer: bool = False,
                     extra: dict | None = None) -> str:
    os.makedirs(directory, exist_ok=True)
    tensors = {**to_hf(model), **(extra or {})}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    if shards == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"))
    else:
        names, weight_map = sorted(tensors), {}
        for s in range(shards):
            shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s::shards]
            save_file({n: tensors[n] for n in part}, os.path.join(directory, shard))
            weight_map.update({n: shard for n in part})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(model.spec.vocab_size)}, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.save(os.path.join(directory, "tokenizer.json"))
    return str(directory)


TOKENS = np.array([[0, 0, 5, 7, 9, 11], [3, 1, 4, 1, 5, 9]], np.int32)
VALID = TOKENS != 0
VALID[1] = True


def logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(TOKENS), valid=jnp.asarray(VALID)))


@pytest.fixture(scope="module")
def source():
    model = random_model()
    return model, logits(model)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_round_trip_gives_the_same_logits(tmp_path, source, model_type):
    model, expected = source
    directory = write_checkpoint(tmp_path / "ckpt", model, hf_config(SPEC, model_type), tokenizer=True)
    imported, tokenizer, info = hf.load_hf(directory)
    assert info["spec"] == SPEC and info["model_type"] == model_type
    assert info["parameters"] == sum(v.size for v in saved.flat_params(model).values())
    assert tokenizer is not None and tokenizer.encode("t3 t5").ids == [3, 5]
    np.testing.assert_array_equal(logits(imported), expected)


def test_sharded_checkpoint_and_tied_embeddings(tmp_path):
    """Three shards through the index; tied embeddings, where an lm_head.weight in the file is ignored."""
    spec = llama.LMSpec(**{**SPEC.__dict__, "tie_embeddings": True, "attention_bias": False, "head_dim": None,
                           "rope_scaling": (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                            ("original_max_position_embeddings", 32), ("rope_type", "llama3"))})
    model = random_model(spec, seed=1)
    config = hf_config(spec, "llama")
    del config["head_dim"]                                   # hidden_size / heads
    head = {"lm_head.weight": np.ones((spec.vocab_size, spec.hidden_size), np.float32)}
    directory = write_checkpoint(tmp_path / "ckpt", model, config, shards=3, extra=head)
    imported, tokenizer, info = hf.load_hf(directory)
    assert info["spec"] == spec and tokenizer is None and not hasattr(imported, "lm_head")
    np.testing.assert_array_equal(logits(imported), logits(model))


def test_bfloat16_checkpoint(tmp_path, source):
    """bfloat16 tensors (how SmolLM and Qwen2 ship) arrive as float32 parameters of the same values."""
    import ml_dtypes
    model = source[0]
    directory = write_checkpoint(tmp_path / "ckpt", model, hf_config(SPEC))
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in to_hf(model).items()}
    save_file(bf16, os.path.join(directory, "model.safetensors"))
    params = hf.read_tensors(directory, SPEC)
    q = params[("layers", 1, "attention", "q")]
    assert q.dtype == np.float32
    np.testing.assert_array_equal(q, saved.flat_params(model)["layers.1.attention.q"].astype(ml_dtypes.bfloat16)
                                  .astype(np.float32))


def test_older_config_keys(tmp_path, source):
    """transformers 4's rope_theta / rope_scaling {"type": ...} keys map as rope_parameters do."""
    config = hf_config(SPEC, "llama")
    del config["rope_parameters"]
    config.update(rope_theta=SPEC.rope_theta, rope_scaling={"type": "linear", "factor": 2.0})
    spec = hf.spec_from_config(config)
    assert spec.rope_theta == SPEC.rope_theta and dict(spec.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
    config["rope_scaling"] = None
    assert hf.spec_from_config(config) == SPEC


def _broken(tmp_path, source, *, config=None, tensors=None):
    model = source[0]
    directory = write_checkpoint(tmp_path / "bad", model, config or hf_config(SPEC))
    if tensors is not None:
        save_file(tensors(to_hf(model)), os.path.join(directory, "model.safetensors"))
    return directory


def test_missing_tensor_is_named(tmp_path, source):
    directory = _broken(tmp_path, source, tensors=lambda t: {k: v for k, v in t.items()
                                                             if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.1\.mlp\.up_proj\.weight is "
                                         r"missing"):
        hf.load_hf(directory)


def test_wrong_shape_names_both_shapes(tmp_path, source):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:12]
        return t
    directory = _broken(tmp_path, source, tensors=shrink)
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape "
                                         r"\(12, 32\), config\.json expects \(24, 32\)"):
        hf.load_hf(directory)


def test_unexpected_tensor_is_named(tmp_path, source):
    directory = _broken(tmp_path, source, tensors=lambda t: {**t, "model.layers.0.mlp.gate_proj.bias":
                                                             np.zeros(40, np.float32)})
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.bias has no place"):
        hf.load_hf(directory)


def test_missing_shard_is_named(tmp_path, source):
    directory = write_checkpoint(tmp_path / "bad", source[0], hf_config(SPEC), shards=2)
    os.remove(os.path.join(directory, "model-00002-of-00002.safetensors"))
    with pytest.raises(ValueError, match=r"index\.json: shard model-00002-of-00002\.safetensors .* is missing"):
        hf.load_hf(directory)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, r"model_type 'mistral' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     r"rope_parameters\.rope_type 'yarn' is not supported"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     r"rope_scaling\.rope_type 'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
     r"rope_parameters\.low_freq_factor must be a positive number"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ({"use_sliding_window": True}, r"use_sliding_window true is not supported"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, r"layer_types layer 1 is 'sliding_attention'"),
    ({"num_key_value_heads": 3}, r"num_heads 4 is not a multiple of num_kv_heads 3"),
    ({"vocab_size": None}, r"vocab_size must be a positive integer"),
])
def test_unsupported_config_is_refused_by_key(tmp_path, source, change, message):
    directory = _broken(tmp_path, source, config={**hf_config(SPEC), **change})
    with pytest.raises(ValueError, match=r"config\.json: " + message):
        hf.load_hf(directory)


def test_llama_mlp_bias_and_output_bias(tmp_path, source):
    with pytest.raises(ValueError, match=r"config\.json: mlp_bias true is not supported"):
        hf.spec_from_config(hf_config(SPEC, "llama", mlp_bias=True))
    o_bias = "model.layers.0.self_attn.o_proj.bias"
    directory = _broken(tmp_path, source, config=hf_config(SPEC, "llama"),
                        tensors=lambda t: {**t, o_bias: np.zeros(32, np.float32)})
    hf.load_hf(directory)                                    # an all-zero output bias changes nothing
    save_file({**to_hf(source[0]), o_bias: np.ones(32, np.float32)}, os.path.join(directory, "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.self_attn\.o_proj\.bias is not zero"):
        hf.load_hf(directory)


def test_save_and_load_lm(tmp_path, source):
    model, expected = source
    tokenizer_json = os.path.join(write_checkpoint(tmp_path / "ckpt", model, hf_config(SPEC), tokenizer=True),
                                  "tokenizer.json")
    out = saved.save_lm(tmp_path / "saved", model, tokenizer_json, {"note": "test"})
    document = json.load(open(os.path.join(out, "lm.json")))
    assert document["format"] == "ringmoe-lm" and document["version"] == 1 and document["note"] == "test"
    assert document["spec"]["head_dim"] == 12 and document["spec"]["rope_scaling"] is None
    loaded, tokenizer = saved.load_lm(out)
    assert loaded.spec == SPEC and tokenizer.encode("t7").ids == [7]
    np.testing.assert_array_equal(logits(loaded), expected)

    with pytest.raises(FileExistsError):
        saved.save_lm(out, model)
    with pytest.raises(ValueError, match="meta key 'spec' is reserved"):
        saved.save_lm(tmp_path / "other", model, None, {"spec": 1})
    with open(os.path.join(out, "lm.json"), "w") as f:
        f.write('{"format": "ringmoe-lm", "version": 1, "spec": {"vocab_size": ')
    with pytest.raises(ValueError, match=r"lm\.json: not valid JSON"):
        saved.load_lm(out)
    with open(os.path.join(out, "lm.json"), "w") as f:
        json.dump({**document, "spec": {**document["spec"], "intermediate_size": 41}}, f)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor layers\.0\.mlp\.down has shape \(40, 32\), "
                                         r"lm\.json's spec expects \(41, 32\)"):
        saved.load_lm(out)
    with open(os.path.join(out, "lm.json"), "w") as f:
        json.dump({**document, "format": "other"}, f)
    with pytest.raises(ValueError, match=r"lm\.json: format is 'other', not 'ringmoe-lm'"):
        saved.load_lm(out)
    os.remove(os.path.join(out, "lm.json"))
    with pytest.raises(FileNotFoundError, match="no lm.json"):
        saved.load_lm(out)


def test_import_lm_tool(tmp_path, source):
    model, expected = source
    directory = write_checkpoint(tmp_path / "ckpt", model, hf_config(SPEC, "llama"), shards=2, tokenizer=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "tools.import_lm", f"--from={directory}", f"--out={tmp_path / 'out'}"],
                         cwd=REPO, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["model_type"] == "llama" and result["tokenizer"] is True
    assert result["parameters"] == sum(v.size for v in saved.flat_params(model).values())
    assert result["spec"]["num_kv_heads"] == 2
    loaded, _ = saved.load_lm(result["out"])
    np.testing.assert_array_equal(logits(loaded), expected)

    bad = subprocess.run([sys.executable, "-m", "tools.import_lm", f"--from={tmp_path / 'nothing'}",
                          f"--out={tmp_path / 'out2'}"], cwd=REPO, capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("tools.import_lm: error: ")
    assert "config.json" in bad.stderr
