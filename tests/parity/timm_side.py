"""The PyTorch half of `make parity` (run by .venv-torch's Python; torch, timm, safetensors, numpy).

    .venv-torch/bin/python tests/parity/timm_side.py WORKDIR

WORKDIR/cases.json (written by `python -m tools.parity`) lists cases: an export
directory of ours, the normalised inputs (N, H, W, C) it was run on and the
features (N, h, w, D) our JAX encoder computed. For each case this script
  (a) builds timm's SwinTransformerV2 from the export's `model_args`, loads
      model.safetensors through timm's checkpoint filter with strict=True and
      compares `forward_features`;
  (b) loads the directory with timm.create_model("local-dir:...", pretrained=True),
      checks every tensor arrived unchanged and compares its features;
  (c) builds a timm-initialised SwinV2 of the same shape, moves every parameter off
      its initial value (timm starts the residual post-norms at zero, which would make
      every block an identity and the comparison blind), saves it as safetensors with
      its features on the same inputs, for the JAX side to import and compare.
Writes WORKDIR/timm_results.json. Nothing here imports JAX.
"""
import json
import os
import sys

import numpy as np
import safetensors.torch
import torch
from torch_env import torchvision_without_its_kernels

torchvision_without_its_kernels()
import timm  # noqa: E402
from timm.models.swin_transformer_v2 import checkpoint_filter_fn  # noqa: E402


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def features(model, inputs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.forward_features(torch.from_numpy(inputs).permute(0, 3, 1, 2).contiguous()).numpy()


def run_case(case: dict, workdir: str) -> dict:
    export = case["export"]
    config = json.load(open(os.path.join(export, "config.json")))
    inputs = np.load(case["inputs"])
    expected = np.load(case["features"])
    result = {"name": case["name"], "architecture": config["architecture"], "model_args": config["model_args"]}

    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    # The file is in the original SwinV2 layout; timm's loader (what pretrained=True runs) moves
    # each patch merging to timm's modules. strict=True: every tensor used, none missing.
    state = checkpoint_filter_fn(safetensors.torch.load_file(os.path.join(export, "model.safetensors")), model)
    model.load_state_dict(state, strict=True)
    result["strict_load"] = True
    result["jax_to_timm_relative_error"] = relative_error(features(model, inputs), expected)

    local = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    loaded = local.state_dict()
    result["local_dir_tensors_unchanged"] = all(
        k in loaded and torch.equal(loaded[k], v) for k, v in state.items())
    result["local_dir_relative_error"] = relative_error(features(local, inputs), expected)
    result["local_dir_pretrained_cfg"] = {k: local.pretrained_cfg.get(k) for k in ("input_size", "mean", "std")}

    torch.manual_seed(case["seed"])
    fresh = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = os.path.join(workdir, case["name"] + "_timm")
    os.makedirs(directory, exist_ok=True)
    timm_state = {k: v.contiguous() for k, v in fresh.state_dict().items()
                  if not any(b in k for b in ("relative_position_index", "relative_coords_table", "attn_mask"))}
    safetensors.torch.save_file(timm_state, os.path.join(directory, "model.safetensors"))
    np.save(os.path.join(directory, "features.npy"), features(fresh, inputs))
    result["timm_random"] = directory
    return result


def main(workdir: str) -> None:
    cases = json.load(open(os.path.join(workdir, "cases.json")))
    results = [run_case(case, workdir) for case in cases]
    versions = {"torch": torch.__version__, "timm": timm.__version__}
    with open(os.path.join(workdir, "timm_results.json"), "w") as f:
        json.dump({"versions": versions, "cases": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
