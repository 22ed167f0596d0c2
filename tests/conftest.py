"""Test session setup: 8 fake CPU devices, so sharding tests need no accelerator.

XLA reads the flag when JAX initialises its backend, so it is set here, before
any test module imports JAX.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Identical programs compiled by several tests (the same model initialiser, the
# same train step) are compiled once per machine.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
