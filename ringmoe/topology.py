"""Target machines to compile for ahead of time: device count, memory and peak per device.

`tools.aot` compiles the real train step for one of these. A TPU target
carries the arguments of `jax.experimental.topologies.get_topology_desc` (the
slice's chip grid, as MaxText names it), which gives compile-only TPU devices
where libtpu is installed; a GPU target has none, and both fall back to fake CPU
devices of the same count (`--xla_force_host_platform_device_count` /
`jax_num_cpu_devices`) elsewhere.

Memory is the vendor's per-device figure in decimal GB (80 GB H100, 95 GB v5p,
16 GB v5e): a little below what the hardware holds (80 GiB, 95 GiB, 16 GiB), so
`fits` errs on the safe side. Peaks are the dense bf16 figures of
`ringmoe.flops.PEAK_FLOPS`. `processes` is how many JAX processes the slice
runs (one per TPU VM host of 4 chips, one per 8-GPU node): the data pipeline
splits `batch_size` per process first, so the global batch shapes depend on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ringmoe.flops import PEAK_FLOPS


@dataclass(frozen=True)
class Topology:
    name: str
    devices: int
    processes: int
    memory_bytes: int            # per device
    peak_key: str                # ringmoe.flops.PEAK_FLOPS entry
    platform: str                # "gpu" | "tpu": what the MoE dispatch "auto" resolves for
    tpu_topology: dict = field(default_factory=dict)   # get_topology_desc kwargs; empty: none

    @property
    def peak_flops(self) -> float:
        """Dense bf16 peak FLOP/s of one device."""
        return PEAK_FLOPS[self.peak_key]["bfloat16"]

    def describe(self) -> str:
        return (f"{self.name}: {self.devices} x {self.peak_key} ({self.memory_bytes / 1e9:.0f} GB, "
                f"{self.peak_flops / 1e12:.0f} bf16 TFLOP/s each), {self.processes} processes")


TOPOLOGIES: dict[str, Topology] = {t.name: t for t in (
    Topology("h100-64", devices=64, processes=8, memory_bytes=80 * 10**9, peak_key="H100 SXM", platform="gpu"),
    Topology("v5p-128", devices=64, processes=16, memory_bytes=95 * 10**9, peak_key="TPU v5p", platform="tpu",
             tpu_topology={"topology_name": "v5:4x4x4", "chip_config_name": "megacore",
                           "chips_per_host_bounds": (2, 2, 1), "num_slices": 1, "wrap": (True, True, True)}),
    Topology("v5e-256", devices=256, processes=64, memory_bytes=16 * 10**9, peak_key="TPU v5e", platform="tpu",
             tpu_topology={"topology_name": "v5e:16x16", "chip_config_name": "default",
                           "chips_per_host_bounds": (2, 2, 1), "num_slices": 1, "wrap": (True, True, False)}),
    # A single 8-device machine (e.g. this CPU with 8 fake devices): quick checks of the tool itself.
    Topology("h100-8", devices=8, processes=1, memory_bytes=80 * 10**9, peak_key="H100 SXM", platform="gpu"),
)}


def get(name: str) -> Topology:
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]
