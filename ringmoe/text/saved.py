"""The project's saved language model: a directory that `load_lm` reads back, nothing pickled.

    DIR/lm.json            {"format": "ringmoe-lm", "version": 1, "spec": {LMSpec fields}, **meta}
    DIR/model.safetensors  every parameter under its flat name ("embed", "layers.0.attention.q", ...)
    DIR/tokenizer.json     the tokenizer, when there is one (a copy of the `tokenizers` file)

`spec.rope_scaling` is written as an object (or null); the parameters in their own
dtype and layout (ringmoe/text/llama.py). A missing or garbled lm.json, another
format or version, or a tensor that is missing, unexpected or of another shape is
a one-line ValueError naming the file and the key or tensor.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
from flax import nnx

from ringmoe.text.hf import read_json
from ringmoe.text.llama import LMSpec, LanguageModel, build
from ringmoe.text.tokenizer import TOKENIZER_FILE, load_tokenizer

FORMAT = "ringmoe-lm"
VERSION = 1
META = "lm.json"
WEIGHTS = "model.safetensors"
RESERVED = ("format", "version", "spec")


def spec_dict(spec: LMSpec) -> dict:
    """The spec's fields as JSON-ready values (rope_scaling an object or None)."""
    values = dataclasses.asdict(spec)
    values["rope_scaling"] = dict(spec.rope_scaling) or None
    return values


def flat_params(model: LanguageModel) -> dict[str, np.ndarray]:
    """Flat parameter name ("layers.0.attention.q") -> numpy array, for every nnx.Param of `model`."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, path)): np.asarray(variable.get_value()) for path, variable in flat}


def save_lm(directory: str, model: LanguageModel, tokenizer_json: str | None = None,
            meta: dict | None = None) -> str:
    """Writes `model` (and a copy of the tokenizer.json file `tokenizer_json`) to `directory`, new
    or empty, with `meta` (JSON-ready; not "format", "version" or "spec") in lm.json. Returns the
    directory's absolute path."""
    from safetensors.numpy import save_file
    directory = os.path.abspath(directory)
    meta = dict(meta or {})
    clash = sorted(set(meta) & set(RESERVED))
    if clash:
        raise ValueError(f"save_lm: meta key {clash[0]!r} is reserved ({', '.join(RESERVED)})")
    if tokenizer_json is not None and not os.path.isfile(tokenizer_json):
        raise FileNotFoundError(2, "no such tokenizer.json", tokenizer_json)
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise FileExistsError(17, "the output directory exists and is not empty", directory)
    os.makedirs(directory, exist_ok=True)
    save_file(flat_params(model), os.path.join(directory, WEIGHTS), metadata={"format": FORMAT})
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, os.path.join(directory, TOKENIZER_FILE))
    document = {"format": FORMAT, "version": VERSION, "spec": spec_dict(model.spec), **meta}
    with open(os.path.join(directory, META), "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    return directory


def read_meta(directory: str) -> dict:
    """lm.json of a saved model, checked: its format and version, and a spec object."""
    path = os.path.join(directory, META)
    document = read_json(path, "no lm.json (not a saved language model; tools.import_lm writes one)")
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise ValueError(f"{path}: format is {found!r}, not {FORMAT!r}")
    if document.get("version") != VERSION:
        raise ValueError(f"{path}: version {document.get('version')!r} is not supported (this code reads "
                         f"version {VERSION})")
    if not isinstance(document.get("spec"), dict):
        raise ValueError(f"{path}: spec is missing or not an object")
    return document


def load_lm(directory: str, *, seed: int = 0):
    """(model, tokenizer or None) of a directory `save_lm` wrote."""
    from safetensors import safe_open

    from ringmoe.text.hf import parameter
    directory = os.path.abspath(directory)
    document = read_meta(directory)
    meta_path, weights = os.path.join(directory, META), os.path.join(directory, WEIGHTS)
    try:
        spec = LMSpec.from_config(document["spec"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: spec: {e}") from None
    if not os.path.isfile(weights):
        raise FileNotFoundError(2, "no model.safetensors beside lm.json", weights)
    model = build(spec, seed)
    expected = {".".join(map(str, path)): path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    try:
        handle = safe_open(weights, framework="numpy")
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own SafetensorError for a bad file
        raise ValueError(f"{weights}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    with handle as f:
        names = set(f.keys())
        unexpected = sorted(names - set(expected))
        if unexpected:
            raise ValueError(f"{weights}: tensor {unexpected[0]} has no place in the model lm.json describes")
        missing = [n for n in expected if n not in names]
        if missing:
            raise ValueError(f"{weights}: tensor {missing[0]} is missing (lm.json's spec has it)")
        import jax.numpy as jnp
        for name, path in expected.items():
            variable = parameter(model, path)
            value, current = f.get_tensor(name), variable.get_value()
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(f"{weights}: tensor {name} has shape {tuple(value.shape)}, lm.json's spec "
                                 f"expects {tuple(current.shape)}")
            variable.set_value(jnp.asarray(value, current.dtype))
    tokenizer = None
    if os.path.isfile(os.path.join(directory, TOKENIZER_FILE)):
        tokenizer = load_tokenizer(os.path.join(directory, TOKENIZER_FILE))
    return model, tokenizer
