"""Test session setup: 8 fake CPU devices, so sharding tests need no accelerator, and XLA's
fast-compile flag (tests/xla.py).

Compiling is most of the suite's time. Call models and losses compiled (`nnx.jit`, `jax.jit`),
not eagerly: an eager call compiles each of its operations on its own, which made
tests/test_moe.py take 106 s instead of 42 s.

XLA reads the flag when JAX initialises its backend, so it is set here, before
any test module imports JAX.
"""
import os

from tests.xla import xla_flags

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Identical programs compiled by several tests (the same model initialiser, the
# same train step) are compiled once per machine.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
