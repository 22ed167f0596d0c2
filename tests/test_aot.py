"""tools.aot on the smallest config: compiles the real step for 8 fake devices, reports
per-device memory and FLOPs, and fails clearly (naming the largest buffers) when it
cannot fit. The buffer-assignment shortcut gives the bytes of a full compile's
memory_analysis(). In subprocesses, so the tool sets up its own device count."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = '''
from tests.small import micro_config


def get_config():
    c = micro_config(("optical",))
    c.mesh.update({"data": 2, "fsdp": 2, "expert": 2})
    c.batch_size = 16
    c.model.remat = "block"
    return c
'''


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "config.py"
    path.write_text(CONFIG)
    return path


def aot(config_file, *extra):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)   # the tool picks the device count from the topology
    out = subprocess.run([sys.executable, "-m", "tools.aot", f"--config={config_file}", "--topology=h100-8", *extra],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return out.returncode, json.loads(out.stdout.strip().splitlines()[-1]), out


@pytest.fixture(scope="module")
def shortcut(config_file):
    return aot(config_file)


def test_aot_reports_memory_flops_and_fits(shortcut):
    rc, result, out = shortcut
    assert rc == 0, out.stderr[-2000:]
    assert result["topology"] == "h100-8" and result["devices"] == 8
    assert result["compiled_for"] == "cpu-fake-devices" and "fake" in out.stdout
    assert result["mesh"] == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
    assert result["global_batch"] == {"optical": 16}
    assert result["per_device_bytes"] == (result["argument_bytes"] + result["output_bytes"]
                                          + result["temp_bytes"] - result["alias_bytes"])
    # The donated state comes back in place: aliased bytes are the state's own.
    assert result["alias_bytes"] == result["state_bytes_per_device"] > 0
    assert result["fits"] and result["per_device_bytes"] < result["device_memory_bytes"]
    assert result["model_flops_per_step"] > 0 and result["xla_flops_per_step"] > result["model_flops_per_step"] / 2
    assert result["step_s_at_50pct_mfu"] == pytest.approx(2 * result["step_s_at_peak"])
    assert "compiling" in out.stdout and "lowering" in out.stdout
    assert result["memory_source"].startswith("buffer assignment")


def test_full_compile_agrees_and_too_big_is_a_clear_failure(config_file, shortcut):
    rc, result, out = aot(config_file, "--full_compile", "--memory_bytes=1000000")
    assert result["memory_source"] == "compiled.memory_analysis()"
    keys = ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "per_device_bytes")
    assert {k: result[k] for k in keys} == {k: shortcut[1][k] for k in keys}
    assert rc == 1 and result["fits"] is False
    assert "exceeds the 0.00 GB of a device" in out.stderr
    assert "largest state buffers per device: .params[" in out.stderr


def test_14b_pod_targets_feed_one_image_per_modality_per_device():
    """configs/ringmoe_14b.py:TARGET names a topology, and its batch splits evenly over the
    target's processes and devices (the token batch is split over every device)."""
    from configs import ringmoe_14b
    from ringmoe import topology
    from ringmoe.data.pipeline import process_batch_sizes, served_modalities

    for name in ringmoe_14b.BATCH_SIZE:
        config, target = ringmoe_14b.get_config(name), topology.get(name)
        rows = process_batch_sizes(config, served_modalities(config), target.processes)
        assert {m: b * target.processes for m, b in rows.items()} == {m: target.devices for m in rows}, name
    with pytest.raises(ValueError, match="unknown target 'v4-8'"):
        ringmoe_14b.get_config("v4-8")
