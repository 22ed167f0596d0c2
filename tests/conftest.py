"""Test session setup: 8 fake CPU devices, so sharding tests need no accelerator.

XLA reads the flag when JAX initialises its backend, so it is set here, before
any test module imports JAX.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
