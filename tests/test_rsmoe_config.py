"""configs/rsmoe_1b.py is about 1B parameters in all (jax.eval_shape), tools.params breaks an
RS-MoE config into encoder / query transformer / router / experts, and tools.aot compiles an
RS-MoE train step (configs/rsmoe_tiny.py on 8 fake devices, in a subprocess so the tool sets
up its own device count)."""
import json
import math
import os
import subprocess
import sys

import jax
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_135M = 134_515_008   # configs/lm.py


def run_tool(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)   # tools.aot picks the device count from the topology
    out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out


def test_rsmoe_1b_is_about_1b_parameters():
    """The docstring's band: encoder + query transformer + router + 4 SmolLM2-135M experts."""
    from configs import rsmoe_1b
    from ringmoe.model.ringmoe import ParamKeys
    from ringmoe.training.tasks import build_model

    config = rsmoe_1b.get_config()
    params = jax.eval_shape(lambda: nnx.state(build_model(config, ParamKeys(0)), nnx.Param))
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    assert 0.9e9 <= total <= 1.0e9, total
    assert config.vlm.num_experts == 4 and config.vlm.top_k == 2 and config.vlm.lm.vocab_size == 49152
    assert config.mesh.expert == 4 and config.vlm.tokenizer == ""


def test_params_json_breaks_rsmoe_into_components():
    result, out = run_tool("tools.params", "--config=configs/rsmoe_1b.py")
    encoder, rsmoe = result["encoder"], result["rsmoe"]
    assert 0.9e9 <= result["total"] <= 1.0e9
    assert result["total"] == encoder["total"] + rsmoe["total"]
    assert rsmoe["total"] == rsmoe["query_transformer"] + rsmoe["router"] + rsmoe["experts"]
    assert rsmoe["per_expert"] == SMOLLM2_135M and rsmoe["experts"] == 4 * SMOLLM2_135M
    assert rsmoe["num_experts"] == 4 and rsmoe["top_k"] == 2
    assert sum(result["per_expert_components"].values()) == SMOLLM2_135M
    assert result["active_per_answer"] == rsmoe["query_transformer"] + rsmoe["router"] + SMOLLM2_135M
    assert result["active_per_subtask"] == result["active_per_answer"] + SMOLLM2_135M   # top-2 in training
    assert result["active_per_subtask_with_encoder"] == result["active_per_subtask"] + encoder["active_per_token"]
    assert set(encoder["per_modality"]) == {"optical", "multispectral", "sar_l2", "sar_l1"}
    assert 0 < encoder["active_per_token"] < encoder["total"] < rsmoe["total"]
    assert "rsmoe/query_transformer" in out.stdout and "active per sub-task" in out.stdout


def test_aot_compiles_the_rsmoe_step_with_its_text_batch():
    """The tiny RS-MoE step through tools.aot on h100-8 (8 fake CPU devices): the batch carries the
    text arrays and only the task's input keys reach the device."""
    from configs import rsmoe_tiny
    from ringmoe.data.pipeline import batch_spec
    from ringmoe.training import tasks
    from ringmoe.vlm.examples import text_shapes   # not tools.aot: importing it defines absl flags here

    # One modality served (8 rows: one per device) keeps the compile to one backbone pass.
    overrides = ("--config.mesh.data=4", "--config.mesh.fsdp=2", "--config.batch_size=8",
                 *(f"--config.data.modality_weights.{m}=0" for m in ("multispectral", "sar_l2", "sar_l1")))
    result, out = run_tool("tools.aot", "--config=configs/rsmoe_tiny.py:sparse", "--topology=h100-8", *overrides)
    assert result["task"] == "rsmoe" and result["fits"] and result["compiled_for"] == "cpu-fake-devices"
    assert result["global_batch"] == {"optical": 8}
    assert result["alias_bytes"] == result["state_bytes_per_device"] > 0
    assert result["model_flops_per_step"] > 0 and result["xla_flops_per_step"] > 0
    assert "the rsmoe task's flops_per_step" in out.stdout

    config = rsmoe_tiny.get_config("sparse")
    v = config.vlm
    spec = batch_spec(config, result["global_batch"],
                      text_shapes(v.subtasks_per_image, v.instruction_length, v.answer_length))
    inputs = tasks.for_run(config).inputs
    assert {"instruction", "answer_valid", "kind"} <= set(inputs)
    expected = sum(math.prod(shape) * (4 if dtype == "int64" else jax.numpy.dtype(dtype).itemsize)
                   for arrays in spec.values() for k, (shape, dtype) in arrays.items() if k in inputs) // 8
    assert result["batch_bytes_per_device"] == expected
