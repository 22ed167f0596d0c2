"""Model FLOPs per step (active experts only), device peaks and MFU.

Model FLOPs are counted analytically from the model config, the way MFU is
usually defined (PaLM appendix B, MaxText): only the matmul work the model
needs, 2 FLOPs per multiply-add, with

* only the ACTIVE experts: each token runs top_k modal + top_k collaborative
  expert FFNs plus the shared one (one dense FFN when `moe.enabled` is False).
  Capacity padding, dropped tokens and dispatch/combine overhead are not
  counted: they are implementation cost, not model work. Under expert choice
  a token gets E * C / S assignments on average (every buffer slot is filled),
  and that is what is counted;
* elementwise work (LayerNorm, softmax, GELU, biases, masks) left out: it is a
  few percent of the total at real widths (tests/test_flops.py checks the
  matmul part against XLA's own count);
* a training step = 3 x forward (forward, and a backward of twice the
  forward's matmuls: gradients for activations and for weights).

Per modality m with B_m images (grid g = image/patch, stage i: width d_i,
tokens T_i = B_m * (g / 2^i)^2, window n = w^2 tokens, w clipped to the
stage resolution as the blocks do):

    embed      2 T_0 (p^2 C) D  (+ the wavelength hypernetwork, once per call)
    attention  qkv 6 T d^2 + proj 2 T d^2 ; scores q.k 2 T n d + attn.v 2 T n d
    cpb        the position-bias MLP over (2w-1)^2 offsets, once per block
    ffn        active FFNs per token x 4 T d (mlp_ratio d)
    router     2 T d E per routed group
    merging    2 (T/4) (4d) (2d)
    decoder    2 B h w D_last (stride^2 (C + power_head))

Peaks: `PEAK_FLOPS` holds vendor dense (no sparsity) peaks; the CPU has no
honest table entry, so its peak is measured on this host (`measure_cpu_peak`).
"""
from __future__ import annotations

import inspect
import math
import time

import jax
import jax.numpy as jnp

from ringmoe.model.embed import NUM_FREQS, WavelengthPatchEmbed, projected_channels
from ringmoe.model.router import capacity
from ringmoe.model.swin import CPB_HIDDEN

# Vendor dense peaks in FLOP/s per chip, by compute dtype. float32 is what a
# float32 matmul runs at under JAX's DEFAULT precision: TF32 tensor cores on
# Ampere/Hopper GPUs, one bfloat16 pass on TPU (docs.jax.dev, "Matmul precision").
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12},
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6e": {"bfloat16": 918e12, "float32": 918e12},
}

# (substrings that must all appear in the lower-cased device_kind, table key), first match wins.
# JAX names v5e 'TPU v5 lite' and v5p 'TPU v5'; NVL variants have other clocks and are left out.
_KINDS = (
    (("h100", "pcie"), "H100 PCIe"),
    (("h100", "nvl"), None),
    (("h100",), "H100 SXM"),
    (("h200", "nvl"), None),
    (("h200",), "H200"),
    (("a100",), "A100"),
    (("v5 lite",), "TPU v5e"),
    (("v5e",), "TPU v5e"),
    (("v5p",), "TPU v5p"),
    (("v5",), "TPU v5p"),
    (("v6 lite",), "TPU v6e"),
    (("v6e",), "TPU v6e"),
    (("v4",), "TPU v4"),
)

# Hidden width of the wavelength embedding's hypernetwork: read from the module itself.
_HYPER_HIDDEN = inspect.signature(WavelengthPatchEmbed.__init__).parameters["hidden"].default
_CPU_PEAK: dict[str, tuple[float, int]] = {}


def _matmul(m: float, k: float, n: float) -> float:
    return 2.0 * m * k * n


def active_ffns_per_token(model_config, tokens_per_group: int) -> float:
    """FFNs a token runs in one block: top_k modal + top_k collaborative + shared (dense: 1)."""
    moe = model_config.moe
    if not moe.enabled:
        return 1.0

    def routed(num_experts: int) -> float:
        if not num_experts:
            return 0.0
        k = min(moe.top_k, num_experts)
        if moe.router == "expert_choice":
            return num_experts * capacity(tokens_per_group, num_experts, k, moe.capacity_factor) / tokens_per_group
        return float(k)

    return routed(moe.num_modal_experts) + routed(moe.num_collaborative_experts) + float(bool(moe.shared_expert))


def forward_flops(model_config, modality: str, batch_size: int) -> dict[str, float]:
    """Forward matmul FLOPs of `batch_size` images of `modality`, by part (see module doc)."""
    if modality not in model_config.modalities:
        raise ValueError(f"modality {modality!r} is not in the model config "
                         f"({', '.join(model_config.modalities.keys())})")
    mc = model_config.modalities[modality]
    b, p, dim = batch_size, model_config.patch_size, model_config.embed_dim
    channels = mc.channels
    grid = model_config.image_size // p
    out = dict.fromkeys(("embed", "attention", "scores", "cpb", "ffn", "router", "merging", "decoder"), 0.0)

    out["embed"] = _matmul(b * grid * grid, p * p * projected_channels(mc.embed, channels), dim)
    if mc.embed == "wavelength":  # per-band kernel generator, once per call
        h = _HYPER_HIDDEN
        out["embed"] += (_matmul(channels, 2 * (1 + 2 * NUM_FREQS), h) + _matmul(channels, h, h)
                         + _matmul(channels, h, p * p * dim) + _matmul(channels, h, dim))

    moe = model_config.moe
    routed_experts = [e for e in (moe.num_modal_experts, moe.num_collaborative_experts) if e] if moe.enabled else []
    num_stages = len(model_config.depths)
    for i, (depth, heads) in enumerate(zip(model_config.depths, model_config.num_heads)):
        d = dim * 2 ** i
        res = grid // 2 ** i
        window = min(model_config.window_size, res)
        n = window * window
        tokens = b * res * res
        hidden = int(d * model_config.mlp_ratio)
        table = (2 * window - 1) ** 2
        per_block = {
            "attention": _matmul(tokens, d, 3 * d) + _matmul(tokens, d, d),
            "scores": 2 * _matmul(tokens, n, d),
            "cpb": _matmul(table, 2, CPB_HIDDEN) + _matmul(table, CPB_HIDDEN, heads),
            "ffn": active_ffns_per_token(model_config, res * res) * 2 * _matmul(tokens, d, hidden),
            "router": sum(_matmul(tokens, d, e) for e in routed_experts),
        }
        for key, value in per_block.items():
            out[key] += depth * value
        if i < num_stages - 1:
            out["merging"] += _matmul(tokens // 4, 4 * d, 2 * d)

    last = dim * 2 ** (num_stages - 1)
    stride = p * 2 ** (num_stages - 1)
    side = model_config.image_size // stride
    decoded = channels + mc.get("power_head", 0)  # pixels, plus the power decoder's maps
    out["decoder"] = _matmul(b * side * side, last, stride * stride * decoded)
    return out


def model_flops_per_step(model_config, batch_sizes: dict[str, int], training: bool = True) -> float:
    """Model FLOPs of one step over all modalities' rows (batch_sizes[m] = B_m, global or
    per process, whichever the caller wants MFU over); training = 3 x forward."""
    forward = sum(sum(forward_flops(model_config, m, int(bm)).values())
                  for m, bm in batch_sizes.items() if bm)
    return (3.0 if training else 1.0) * forward


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def measure_cpu_peak(dtype="float32", *, size: int = 2048, budget_s: float = 1.0) -> float:
    """FLOP/s of one large square matmul on this host's first CPU device (best of a few runs).

    Cached per dtype for the life of the process; stops early once `budget_s`
    seconds of timed runs are spent, so a slow dtype (bf16 on CPU) stays bounded.
    """
    name = _dtype_name(dtype)
    if name in _CPU_PEAK:
        return _CPU_PEAK[name][0]
    cpu = jax.local_devices(backend="cpu")[0]  # this process's own: others cannot be written to
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(ka, (size, size), jnp.float32).astype(name), cpu)
    b = jax.device_put(jax.random.normal(kb, (size, size), jnp.float32).astype(name), cpu)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))  # compile + warm up
    best, spent = math.inf, 0.0
    for _ in range(8):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget_s:
            break
    _CPU_PEAK[name] = (_matmul(size, size, size) / best, size)
    return _CPU_PEAK[name][0]


def peak_entry(device_kind: str) -> str | None:
    """The `PEAK_FLOPS` key for a device_kind string, or None if it is not in the table."""
    kind = device_kind.lower()
    for needles, key in _KINDS:
        if all(s in kind for s in needles):
            return key
    return None


def device_peak_flops(device, dtype="bfloat16") -> tuple[float | None, str]:
    """(peak FLOP/s of one device for matmuls in `dtype`, where the number came from).

    CPU: the host's measured matmul rate divided by the number of local CPU
    devices (fake devices from --xla_force_host_platform_device_count share the
    same cores), so mfu(..., num_devices=len(devices), peak) stays honest.
    An accelerator not in `PEAK_FLOPS` gives None: no number is invented.
    """
    name = _dtype_name(dtype)
    if device.platform == "cpu":
        host = measure_cpu_peak(name)
        shared = max(1, len(jax.local_devices(backend="cpu")))
        size = _CPU_PEAK[name][1]
        return host / shared, (f"measured: {size}x{size} {name} matmul on this host, {host / 1e9:.1f} GFLOP/s"
                               + (f", shared by {shared} CPU devices" if shared > 1 else ""))
    key = peak_entry(device.device_kind)
    if key is None:
        return None, f"unknown accelerator {device.device_kind!r} ({device.platform}): no peak in flops.PEAK_FLOPS"
    if name not in PEAK_FLOPS[key]:
        return None, f"{key}: no {name} peak in flops.PEAK_FLOPS"
    return PEAK_FLOPS[key][name], f"table: {key} {name} dense peak (vendor spec)"


def mfu(model_flops: float, step_seconds: float, num_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: model_flops / (step_seconds * num_devices * peak per device).

    None when the peak is unknown or the step time is not positive.
    """
    if peak is None or not peak > 0 or not step_seconds > 0 or num_devices < 1:
        return None
    return float(model_flops / (step_seconds * num_devices * peak))


def describe(model_config, batch_sizes: dict[str, int]) -> str:
    """A short table of forward GFLOPs per part and modality (for logs and tools)."""
    rows = []
    for m, bm in batch_sizes.items():
        parts = forward_flops(model_config, m, int(bm))
        total = sum(parts.values())
        shares = ", ".join(f"{k} {v / max(total, 1):.0%}" for k, v in parts.items() if v)
        rows.append(f"{m} x{bm}: {total / 1e9:,.2f} GFLOP forward ({shares})")
    rows.append(f"train step: {model_flops_per_step(model_config, batch_sizes) / 1e9:,.2f} GFLOP")
    return "\n".join(rows)


__all__ = ["PEAK_FLOPS", "active_ffns_per_token", "describe", "device_peak_flops", "forward_flops",
           "measure_cpu_peak", "mfu", "model_flops_per_step", "peak_entry"]
