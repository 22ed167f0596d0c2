"""Hugging Face-format language-model checkpoints (Llama, SmolLM, Qwen2) into `ringmoe.text.llama`.

    model, tokenizer, info = load_hf("path/to/SmolLM2-135M")   # config.json + safetensors [+ tokenizer.json]

A checkpoint directory holds `config.json`, the weights as one `model.safetensors` or as
shards listed by `model.safetensors.index.json`, and optionally `tokenizer.json`.

The config maps onto `LMSpec` (`spec_from_config`): both the older rotary keys
(`rope_theta`, `rope_scaling` with "type" or "rope_type") and transformers 5's
`rope_parameters` (theta inside); `head_dim` given or hidden_size / heads; tied
embeddings; q/k/v biases (Llama's `attention_bias`, always on for Qwen2). Anything
that would make our numbers differ from Hugging Face's is refused with a ValueError
naming the key: another model_type or activation, an MLP bias, sliding-window
attention, a rotary scaling other than default / linear / llama3, a partial rotary
factor, a quantized checkpoint.

Tensor names map one to one (`hf_name`): Hugging Face's Linear weights are (out, in)
and ours (in, heads, head_dim) or (heads, head_dim, out), so q/k/v/o and the MLP are
transposed and reshaped. The rotary embedding uses the same "rotate half" pairing, so
no permutation of q/k rows is needed. `lm_head.weight` is ignored when the embeddings
are tied (Hugging Face ties it after loading too); rotary `inv_freq` buffers that old
checkpoints saved are ignored (they follow from the config). A missing, unexpected or
misshapen tensor, or a shard the index names but the directory lacks, is a one-line
ValueError naming the tensor and the file.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from ringmoe.text.llama import LMSpec, LanguageModel, build
from ringmoe.text.tokenizer import TOKENIZER_FILE, load_tokenizer

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MODEL_TYPES = {"llama": 2048, "qwen2": 32768}   # model_type -> transformers' default max_position_embeddings
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
# Llama's `attention_bias` also gives o_proj a bias, which the model has no place for: read only when all zero.
ZERO_ONLY = re.compile(r"^model\.layers\.\d+\.self_attn\.o_proj\.bias$")


def read_json(path: str, missing: str):
    """The JSON document at `path`: FileNotFoundError with `missing` (what the file's absence
    means) or a one-line ValueError if it is not JSON."""
    if not os.path.isfile(path):
        raise FileNotFoundError(2, missing, path)
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_config(directory: str) -> dict:
    """The checkpoint's config.json as a dict (a one-line error if it is missing or not JSON)."""
    path = os.path.join(directory, CONFIG)
    config = read_json(path, "no config.json (not a Hugging Face checkpoint directory)")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def spec_from_config(config: dict, *, dtype: str = "float32", source: str = CONFIG) -> LMSpec:
    """The `LMSpec` of a Hugging Face config dict; a ValueError naming the key for what it cannot
    compute exactly as transformers does."""
    def fail(key: str, problem: str):
        raise ValueError(f"{source}: {key} {problem}")

    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        fail("model_type", f"{model_type!r} is not supported (supported: {list(MODEL_TYPES)})")

    def required(key: str, default=None) -> int:
        value = config.get(key)
        value = default if value is None and default is not None else value
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            fail(key, f"must be a positive integer, not {value!r}")
        return value

    activation = config.get("hidden_act", "silu")
    if activation != "silu":
        fail("hidden_act", f"{activation!r} is not supported (only 'silu': the SwiGLU MLP)")
    if config.get("mlp_bias", False):
        fail("mlp_bias", "true is not supported (the MLP has no biases)")
    if config.get("quantization_config"):
        fail("quantization_config", "is set: quantized checkpoints are not supported")
    if model_type == "qwen2":
        if config.get("use_sliding_window", False):
            fail("use_sliding_window", "true is not supported (every layer attends over the full context)")
        sliding = [i for i, t in enumerate(config.get("layer_types") or []) if t != "full_attention"]
        if sliding:
            fail("layer_types", f"layer {sliding[0]} is {config['layer_types'][sliding[0]]!r}: only "
                 "'full_attention' is supported")
        attention_bias = True                      # Qwen2's q/k/v projections always have biases
    else:
        attention_bias = config.get("attention_bias", False)
        if not isinstance(attention_bias, bool):
            fail("attention_bias", f"must be true or false, not {attention_bias!r}")

    heads = required("num_attention_heads")
    hidden = required("hidden_size")
    kv_heads = required("num_key_value_heads", heads)
    head_dim = required("head_dim") if config.get("head_dim") is not None else None
    max_positions = required("max_position_embeddings", MODEL_TYPES[model_type])
    if head_dim is None and hidden % heads:
        fail("hidden_size", f"{hidden} is not a multiple of num_attention_heads {heads} (and no head_dim is given)")

    theta, scaling = _rope(config, fail)
    eps = config.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        fail("rms_norm_eps", f"must be a positive number, not {eps!r}")
    tie = config.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        fail("tie_word_embeddings", f"must be true or false, not {tie!r}")
    values = dict(vocab_size=required("vocab_size"), hidden_size=hidden,
                  intermediate_size=required("intermediate_size"), num_layers=required("num_hidden_layers"),
                  num_heads=heads, num_kv_heads=kv_heads,
                  head_dim=None if head_dim == (None if hidden % heads else hidden // heads) else head_dim,
                  rope_theta=theta, rope_scaling=scaling or None, rms_norm_eps=float(eps), tie_embeddings=tie,
                  attention_bias=attention_bias,
                  max_positions=max_positions, dtype=dtype)
    try:
        return LMSpec.from_config(values)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _rope(config: dict, fail) -> tuple[float, dict]:
    """(theta, scaling dict with rope_type and the keys that type uses; {} for plain RoPE)."""
    if config.get("rope_parameters") is not None:
        key, rope = "rope_parameters", config["rope_parameters"]
    else:
        key, rope = "rope_scaling", config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        fail(key, f"must be an object, not {rope!r}")
    if rope and all(isinstance(v, dict) for v in rope.values()):
        fail(key, f"per layer type ({sorted(rope)}) is not supported")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        fail("rope_theta", f"must be a positive number, not {theta!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_KEYS:
        fail(f"{key}.rope_type", f"{kind!r} is not supported (supported: {list(ROPE_KEYS)})")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        fail("partial_rotary_factor", f"{partial!r} is not supported (rotary over the whole head only)")
    scaling = {}
    if kind == "llama3":     # transformers: a top-level original_max_position_embeddings wins, then max positions
        rope = {**rope, "original_max_position_embeddings": config.get(
            "original_max_position_embeddings", rope.get("original_max_position_embeddings",
                                                         config.get("max_position_embeddings")))}
    for name in ROPE_KEYS[kind]:
        value = rope.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            fail(f"{key}.{name}", f"must be a positive number for rope_type {kind!r}, not {value!r}")
        scaling[name] = value
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        fail(f"{key}.high_freq_factor", "must be larger than low_freq_factor")
    return float(theta), ({"rope_type": kind, **scaling} if kind != "default" else {})


# --- tensors ------------------------------------------------------------------------------------

def hf_names(spec: LMSpec) -> dict[str, tuple]:
    """Hugging Face tensor name -> (our parameter path, Hugging Face shape), for every tensor a
    checkpoint of `spec` holds (lm_head only when untied)."""
    e, f, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    h, k, d = spec.num_heads, spec.num_kv_heads, spec.head_size
    names = {"model.embed_tokens.weight": (("embed",), (v, e)), "model.norm.weight": (("norm", "scale"), (e,))}
    if not spec.tie_embeddings:
        names["lm_head.weight"] = (("lm_head",), (v, e))
    for i in range(spec.num_layers):
        at, ours = f"model.layers.{i}.", ("layers", i)
        names[at + "input_layernorm.weight"] = (ours + ("attention_norm", "scale"), (e,))
        names[at + "post_attention_layernorm.weight"] = (ours + ("mlp_norm", "scale"), (e,))
        for name, heads in (("q", h), ("k", k), ("v", k)):
            names[at + f"self_attn.{name}_proj.weight"] = (ours + ("attention", name), (heads * d, e))
            if spec.attention_bias:
                names[at + f"self_attn.{name}_proj.bias"] = (ours + ("attention", f"{name}_bias"), (heads * d,))
        names[at + "self_attn.o_proj.weight"] = (ours + ("attention", "o"), (e, h * d))
        names[at + "mlp.gate_proj.weight"] = (ours + ("mlp", "gate"), (f, e))
        names[at + "mlp.up_proj.weight"] = (ours + ("mlp", "up"), (f, e))
        names[at + "mlp.down_proj.weight"] = (ours + ("mlp", "down"), (e, f))
    return names


def to_ours(path: tuple, value: np.ndarray, spec: LMSpec) -> np.ndarray:
    """A Hugging Face tensor (already checked to have its expected shape) in our parameter's layout."""
    h, k, d, e = spec.num_heads, spec.num_kv_heads, spec.head_size, spec.hidden_size
    last = path[-1]
    if last in ("q", "k", "v"):                      # (heads * d, e) -> (e, heads, d)
        return value.T.reshape(e, h if last == "q" else k, d)
    if last in ("q_bias", "k_bias", "v_bias"):       # (heads * d,) -> (heads, d)
        return value.reshape(-1, d)
    if last == "o":                                  # (e, h * d) -> (h, d, e)
        return value.T.reshape(h, d, e)
    if last in ("gate", "up", "down", "lm_head"):    # (out, in) -> (in, out)
        return value.T
    return value                                     # embed (V, E), norm scales (E,)


def checkpoint_files(directory: str) -> dict[str, str]:
    """Tensor name -> safetensors file that holds it: the one model.safetensors, or the shards
    model.safetensors.index.json lists (each of which must exist)."""
    single, index = os.path.join(directory, SINGLE), os.path.join(directory, INDEX)
    from safetensors import safe_open
    if os.path.isfile(single):
        return {name: single for name in _keys(single, safe_open)}
    if not os.path.isfile(index):
        raise FileNotFoundError(2, f"no {SINGLE} and no {INDEX}", directory)
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index (a JSON object with a 'weight_map' of tensor "
                         f"name -> shard file){f': {e}' if isinstance(e, json.JSONDecodeError) else ''}") from None
    files = {}
    for name, shard in weight_map.items():
        path = os.path.join(directory, shard)
        if path not in files.values() and not os.path.isfile(path):
            raise ValueError(f"{index}: shard {shard} (holding {name}) is missing from {directory}")
        files[name] = path
    held = {path: set(_keys(path, safe_open)) for path in set(files.values())}
    for name, path in files.items():
        if name not in held[path]:
            raise ValueError(f"{path}: tensor {name} is missing (the index {INDEX} places it in this shard)")
    return files


def _keys(path: str, safe_open) -> list[str]:
    try:
        with safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own SafetensorError for a bad file
        raise ValueError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def read_tensors(directory: str, spec: LMSpec) -> dict[tuple, np.ndarray]:
    """Our parameter path -> array (our layout, float32) for every tensor of `spec`, from the
    checkpoint in `directory`; errors name the tensor and its file."""
    from safetensors import safe_open
    files = checkpoint_files(directory)
    expected = hf_names(spec)
    ignored = {"lm_head.weight"} if spec.tie_embeddings else set()
    zero_only = sorted(n for n in files if ZERO_ONLY.match(n) and spec.attention_bias)
    unexpected = sorted(n for n in files if n not in expected and n not in ignored and n not in zero_only
                        and not IGNORED.match(n))
    if unexpected:
        raise ValueError(f"{files[unexpected[0]]}: tensor {unexpected[0]} has no place in the model "
                         f"({len(unexpected)} unexpected tensor{'s' if len(unexpected) > 1 else ''})")
    missing = [n for n in expected if n not in files]
    if missing:
        where = os.path.join(directory, INDEX if os.path.isfile(os.path.join(directory, INDEX))
                             and not os.path.isfile(os.path.join(directory, SINGLE)) else SINGLE)
        raise ValueError(f"{where}: tensor {missing[0]} is missing (config.json expects it)"
                         + (f" ({len(missing)} missing)" if len(missing) > 1 else ""))
    params = {}
    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="numpy") as f:
            for name in names:
                ours, shape = expected[name]
                value = f.get_tensor(name)
                if tuple(value.shape) != shape:
                    raise ValueError(f"{path}: tensor {name} has shape {tuple(value.shape)}, config.json "
                                     f"expects {shape}")
                if not np.issubdtype(value.dtype, np.floating) and value.dtype.name not in ("bfloat16",):
                    raise ValueError(f"{path}: tensor {name} has dtype {value.dtype}, not a floating type")
                params[ours] = np.ascontiguousarray(to_ours(ours, value.astype(np.float32), spec))
    for name in zero_only:
        with safe_open(files[name], framework="numpy") as f:
            if np.any(f.get_tensor(name)):
                raise ValueError(f"{files[name]}: tensor {name} is not zero: an output-projection bias "
                                 "(Llama's attention_bias) is not supported")
    return params


def set_params(model: LanguageModel, params: dict[tuple, np.ndarray]) -> LanguageModel:
    """Writes every array of `params` (our path -> array of the parameter's shape) into `model`."""
    import jax.numpy as jnp
    for path, value in params.items():
        variable = parameter(model, path)
        current = variable.get_value()
        if tuple(current.shape) != tuple(value.shape):
            raise ValueError(f"parameter {'.'.join(map(str, path))} has shape {tuple(current.shape)}, "
                             f"not {tuple(value.shape)}")
        variable.set_value(jnp.asarray(value, current.dtype))
    return model


def parameter(model, path: tuple):
    """The nnx.Param at `path` (attribute names and layer indices) of `model`."""
    node = model
    for step in path:
        node = node[step] if isinstance(step, int) else getattr(node, step)
    return node


def load_hf(directory: str, *, dtype: str = "float32", seed: int = 0):
    """(model, tokenizer or None, info) of the Hugging Face checkpoint in `directory`. info:
    model_type, spec, parameters (count), tokenizer (its path or None), config (the dict)."""
    directory = os.path.abspath(directory)
    config = read_config(directory)
    spec = spec_from_config(config, dtype=dtype, source=os.path.join(directory, CONFIG))
    params = read_tensors(directory, spec)
    model = set_params(build(spec, seed), params)
    tokenizer_path = os.path.join(directory, TOKENIZER_FILE)
    tokenizer = None
    if os.path.isfile(tokenizer_path):
        tokenizer = load_tokenizer(tokenizer_path)
    info = {"model_type": config["model_type"], "spec": spec,
            "parameters": int(sum(v.size for v in params.values())),
            "tokenizer": tokenizer_path if tokenizer is not None else None, "config": config}
    return model, tokenizer, info
