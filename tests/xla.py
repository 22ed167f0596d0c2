"""XLA flags of every test process (conftest.py's, and the trainers the tests start).

The tests run tiny programs, so compiling is most of their time. XLA's CPU back end at
LLVM -O0 compiles the micro train step in 5.8 s instead of 10.2 s (one run each, this
2-core machine); the programs and their results are the same, only less optimised machine
code runs them. Benchmarks, the demo and users never see this flag.
"""
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """FAST_COMPILE, and `devices` fake CPU devices where asked."""
    return FAST_COMPILE + (f" --xla_force_host_platform_device_count={devices}" if devices else "")
