"""Shared set-up of the PyTorch halves of `make parity` (timm_side.py, hf_side.py): run by
.venv-torch's Python before timm or transformers is imported."""
import importlib
import sys

import torch


def torchvision_without_its_kernels() -> None:
    """timm and transformers import torchvision, and the only torchvision wheels this machine's
    package index holds are CUDA builds: their compiled operators cannot load beside the CPU torch,
    and torchvision 0.28 then fails on import, registering fake (meta) kernels for two of them.
    Declaring those two operators' schemas lets it import. Nothing here runs them: neither SwinV2
    nor the language models use a torchvision operator. Where torchvision imports as it is, this
    does nothing."""
    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    torchvision_without_its_kernels.library = library   # keep the definitions alive
    importlib.import_module("torchvision")
