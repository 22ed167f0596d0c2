"""Parity with timm's SwinTransformerV2 in PyTorch, both ways (`make parity`).

    make parity      # creates .venv-torch (requirements-parity.txt) on first use
    python -m tools.parity --torch-python .venv-torch/bin/python [--workdir parity_out] \
        [--export demo_out/compressed/export]

Cases: the tiny config's dense multispectral encoder (its wavelength-conditioned
embedding exports as a plain convolution) and a base-sized dense optical one
(configs/base.py's backbone), each with every parameter moved off its initial value
(SwinV2 starts the residual post-norms at zero: a fresh model's blocks are
identities, and a comparison of them blind), plus any --export directory (the
demo's). For each:
  JAX -> timm   export (ringmoe/compress/export.py), load in timm with strict=True and
                through timm.create_model("local-dir:..."), compare forward_features;
  timm -> JAX   a timm-initialised SwinV2 of the same shape, its parameters moved
                likewise, imported (tools.import_swinv2) and compared;
  round trip    export -> import -> export gives every tensor back bit for bit.
Errors are relative: ||ours - timm's|| / ||timm's|| over the feature maps (float32).
Last line: JSON with each case's figures, the largest error and `passed` (every
error <= --tolerance, every load strict, every round trip exact); exit status 1
when not passed.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time

from absl import flags

from ringmoe import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_PYTHON = flags.DEFINE_string("torch-python", os.path.join(REPO, ".venv-torch", "bin", "python"),
                                    "Python of the parity environment (torch, timm, safetensors).")
_WORKDIR = flags.DEFINE_string("workdir", "parity_out", "Directory for the exports and results (replaced).")
_EXPORTS = flags.DEFINE_multi_string("export", [], "Also check this export directory of ours (repeatable).")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-5, "Largest relative error that passes.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the parameters and inputs.")
_IMAGES = flags.DEFINE_integer("images", 2, "Images per case.", lower_bound=1)


def _dense(name: str, modality: str):
    """The dense one-modality stage config of configs/NAME.py (what compression exports)."""
    import importlib

    from ringmoe.compress import stages
    config = stages.dense_config(stages.extracted_config(importlib.import_module(f"configs.{name}").get_config(),
                                                         modality))
    return config


def _plain(config, modality: str):
    """`config` with `modality` given a plain patch embedding (what an import fills)."""
    config = config.copy_and_resolve_references()
    config.model.modalities[modality].embed, config.model.modalities[modality].bands = "patch", ()
    return config


def _moved(config, seed: int):
    """The dense model of `config` with every parameter moved by N(0, 0.05^2) noise."""
    import numpy as np

    from ringmoe.compress.extraction import build, flat_params
    from ringmoe.model.ringmoe import create_model
    rng = np.random.default_rng(seed)
    params = flat_params(create_model(config.model, seed=seed))
    return build(config, {p: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype) for p, v in params.items()})


def _relative_error(a, b) -> float:
    import numpy as np
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def main(argv) -> None:
    cli.no_arguments(argv)
    cli.setup_logging(absl_level=logging.ERROR)
    if not os.access(_TORCH_PYTHON.value, os.X_OK):
        raise FileNotFoundError(2, "no parity Python (make parity creates .venv-torch)", _TORCH_PYTHON.value)
    import shutil

    import numpy as np
    from safetensors.numpy import load_file

    from ringmoe.compress.export import export
    from ringmoe.compress.timm_layout import import_swinv2, to_timm
    from ringmoe.data.transform import ModalitySpec
    from ringmoe.model.checkpoint import load_pretrained

    start = time.perf_counter()
    workdir = os.path.abspath(_WORKDIR.value)
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    rng = np.random.default_rng(_SEED.value)
    cases, models = [], {}
    built = [("tiny_multispectral", _dense("tiny", "multispectral"), "multispectral"),
             ("base_optical", _dense("base", "optical"), "optical")]
    for name, config, modality in built:
        model = _moved(config, _SEED.value)
        channels = config.model.modalities[modality].channels
        spec = ModalitySpec(bands=tuple(f"band{i}" for i in range(channels)), mean=np.zeros(channels, np.float32),
                            std=np.ones(channels, np.float32))
        directory = os.path.join(workdir, name)
        export(directory, model, config, modality, spec)
        models[name] = (config, model, modality, directory)
    for directory in _EXPORTS.value:
        config, model, _ = load_pretrained(os.path.join(directory, "checkpoint"))
        modality = next(iter(config.model.modalities))
        models[os.path.basename(os.path.normpath(os.path.dirname(directory))) or "export"] = (
            config, model, modality, os.path.abspath(directory))
    for i, (name, (config, model, modality, directory)) in enumerate(models.items()):
        size, channels = config.model.image_size, config.model.modalities[modality].channels
        inputs = rng.standard_normal((_IMAGES.value, size, size, channels)).astype(np.float32)
        np.save(os.path.join(workdir, f"{name}_inputs.npy"), inputs)
        np.save(os.path.join(workdir, f"{name}_features.npy"), np.asarray(model.encode(inputs, modality).features))
        cases.append({"name": name, "export": directory, "inputs": os.path.join(workdir, f"{name}_inputs.npy"),
                      "features": os.path.join(workdir, f"{name}_features.npy"), "seed": _SEED.value + i})
    with open(os.path.join(workdir, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)

    subprocess.run([_TORCH_PYTHON.value, os.path.join(REPO, "tests", "parity", "timm_side.py"), workdir], check=True)
    timm_side = json.load(open(os.path.join(workdir, "timm_results.json")))

    results = []
    for case, result in zip(cases, timm_side["cases"]):
        config, model, modality, directory = models[case["name"]]
        target = _plain(config, modality)
        inputs = np.load(case["inputs"])
        imported, _ = import_swinv2(os.path.join(result["timm_random"], "model.safetensors"), target, modality)
        result["timm_to_jax_relative_error"] = _relative_error(
            np.asarray(imported.encode(inputs, modality).features), np.load(os.path.join(result["timm_random"],
                                                                                          "features.npy")))
        exported = load_file(os.path.join(directory, "model.safetensors"))
        back, _ = import_swinv2(os.path.join(directory, "model.safetensors"), target, modality)
        again = to_timm(back, modality)
        result["round_trip_bit_exact"] = exported.keys() == again.keys() and all(
            np.array_equal(exported[k], again[k]) for k in exported)
        del result["timm_random"]
        results.append(result)
        print(f"{case['name']}: JAX->timm {result['jax_to_timm_relative_error']:.2e}, local-dir "
              f"{result['local_dir_relative_error']:.2e}, timm->JAX {result['timm_to_jax_relative_error']:.2e}, "
              f"round trip {'exact' if result['round_trip_bit_exact'] else 'NOT exact'}", flush=True)

    errors = [r[k] for r in results for k in ("jax_to_timm_relative_error", "local_dir_relative_error",
                                              "timm_to_jax_relative_error")]
    passed = max(errors) <= _TOLERANCE.value and all(
        r["strict_load"] and r["local_dir_tensors_unchanged"] and r["round_trip_bit_exact"] for r in results)
    print(json.dumps({"cases": results, "max_relative_error": max(errors), "tolerance": _TOLERANCE.value,
                      "passed": passed, "versions": timm_side["versions"],
                      "seconds": round(time.perf_counter() - start, 1)}))
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    cli.run_absl("tools.parity", main)
