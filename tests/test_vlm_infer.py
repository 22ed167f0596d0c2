"""RS-MoE inference (ringmoe/vlm/infer.py, text.generate.generate_from_embeddings) and the two
evaluation tools (tools.caption, tools.vqa) end to end on a tiny synthetic data set and run."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm
from ringmoe.text import generate as gen
from ringmoe.text.llama import LMSpec, build
from ringmoe.vlm import infer
from ringmoe.vlm.rsmoe import RSMoE, RSMoESpec, _expert_call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 17, 300, 42, 9, 11], [7, 8], [100, 200, 300, 400]]


def tiny_rsmoe(num_experts=3):
    spec = RSMoESpec(lm=LMSpec.from_config({**dict(lm.get_config("tiny").lm), "num_layers": 1}), vision_dim=24,
                     num_experts=num_experts, top_k=1, num_queries=4, query_layers=1, prompt_length=2)
    model = RSMoE(spec, rngs=nnx.Rngs(0))
    # Distinct experts and a router that spreads rows: random gate and expert weights.
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(7), 256))
    nnx.update(model, jax.tree.map(lambda x: x + 0.5 * jax.random.normal(next(keys), x.shape, x.dtype), state))
    return spec, model


def test_generate_from_embeddings_equals_generate_on_tokens():
    model = build(LMSpec.from_config(lm.get_config("tiny").lm), seed=3)
    tokens, _, valid = gen.left_pad(PROMPTS, 0)
    expected = gen.generate(model, PROMPTS, 8)
    got = gen.generate_from_embeddings(model, model.embed_tokens(jnp.asarray(tokens)), valid, 8)
    assert got == expected and all(len(row) == 8 for row in got)
    # Stop tokens and beams travel the same way.
    stop = (expected[0][2],)
    assert gen.generate_from_embeddings(model, model.embed_tokens(jnp.asarray(tokens)), valid, 8, stop_tokens=stop) \
        == gen.generate(model, PROMPTS, 8, stop_tokens=stop)
    assert gen.generate_from_embeddings(model, model.embed_tokens(jnp.asarray(tokens)), valid, 4, method="beam",
                                        num_beams=2) == gen.generate(model, PROMPTS, 4, method="beam", num_beams=2)
    with pytest.raises(ValueError, match="last slot"):
        gen.generate_from_embeddings(model, model.embed_tokens(jnp.asarray(tokens)), valid[:, ::-1], 4)


def test_expert_slice_matches_the_stacked_expert():
    spec, model = tiny_rsmoe()
    x = jax.random.normal(jax.random.key(2), (3, 2, 5, spec.lm.hidden_size))    # (K, rows, T, E)
    stacked = nnx.jit(lambda experts, x: _expert_call(experts, lambda one, inputs: one.forward_embeddings(inputs), x))
    forward = nnx.jit(lambda one, inputs: one.forward_embeddings(inputs))   # eager calls compile op by op
    expected = stacked(model.experts, x)
    for k in range(spec.num_experts):
        alone = infer.expert_model(model, k)
        assert isinstance(alone, infer.LanguageModel)
        np.testing.assert_allclose(np.asarray(forward(alone, x[k])), np.asarray(expected[k]), atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        infer.expert_model(model, spec.num_experts)


def test_answer_routes_each_row_to_its_top_expert():
    spec, model = tiny_rsmoe()
    b, n, length = 5, 2, 6
    rng = np.random.default_rng(0)
    vision = rng.normal(size=(b, 4, spec.vision_dim)).astype(np.float32)
    instruction = rng.integers(3, spec.lm.vocab_size, (b, n, length)).astype(np.int32)
    valid = np.arange(length)[None, None] >= rng.integers(0, length - 1, (b, n, 1))   # left-padded
    instruction = np.where(valid, instruction, 0)
    experts = infer.split_experts(model)
    tokens, top = infer.answer(model, vision, instruction, valid, max_new_tokens=5, end_id=2, pad_id=0,
                               experts=experts)
    _, routing = model.route(jnp.asarray(vision), jnp.asarray(instruction), jnp.asarray(valid))
    np.testing.assert_array_equal(top, np.asarray(routing.probs).argmax(-1))
    assert len(set(top.tolist())) > 1, "the test needs rows on more than one expert"
    assert len(tokens) == b * n and all(0 < len(t) <= 5 and 2 not in t for t in tokens)
    # Each row's answer is its top expert's greedy continuation of the row's prefix, written alone.
    visual, routing = model.route(jnp.asarray(vision), jnp.asarray(instruction), jnp.asarray(valid))
    flat, flat_valid = instruction.reshape(b * n, length), valid.reshape(b * n, length)
    for row in (0, 3, 7):
        k = int(top[row])
        empty = jnp.zeros((1, 0), jnp.int32)
        x, v = model.expert_inputs(experts[k], visual[row:row + 1], routing.prompts[row:row + 1, k],
                                   flat[row:row + 1], flat_valid[row:row + 1], empty, empty.astype(bool))
        alone = gen.generate_from_embeddings(experts[k], x, v, 5, stop_tokens=(2,))[0]
        assert tokens[row] == [t for t in alone if t != 2]


# ---- the tools, end to end ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny labelled data set with captions, and an RS-MoE "run" at its initialisation: the state the
    trainer would start from, saved by the trainer's own Checkpointer, with a tokenizer trained on the
    data's text (what a run's workdir holds; much cheaper than training steps)."""
    from configs import rsmoe_tiny
    from ringmoe.data import synthetic
    from ringmoe.model.checkpoint import one_device_mesh
    from ringmoe.text.tokenizer import TOKENIZER_FILE, train_tokenizer
    from ringmoe.training.checkpoint import Checkpointer
    from ringmoe.training.state import create_state
    from ringmoe.vlm.task import corpus
    root = tmp_path_factory.mktemp("vlm_infer")
    data, workdir = str(root / "data"), str(root / "run")
    synthetic.write(data, 8, 64, 0, paired_fraction=0.5, labeled=True, captions=2)
    config = rsmoe_tiny.get_config("sparse")
    config.data_dir = data
    os.makedirs(workdir)
    train_tokenizer(corpus(data), config.vlm.lm.vocab_size, os.path.join(workdir, TOKENIZER_FILE))
    _, state, _ = create_state(config, one_device_mesh())
    checkpointer = Checkpointer(workdir, keep=1, save_every=1)
    checkpointer.save(1, state, {}, {"config": json.loads(config.to_json()), "step": 1}, force=True)
    checkpointer.wait()
    checkpointer.close()
    return root, data, workdir


def run_tool(tool: str, *args: str) -> dict:
    """Runs `python -m TOOL ARGS` and returns its last stdout line as JSON."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_caption_tool_end_to_end(run_dir):
    root, data, workdir = run_dir
    out = str(root / "caption")
    result = run_tool("tools.caption", "--checkpoint", workdir, "--data", data, "--out", out, "--batch_size", "4",
                      "--max_new_tokens", "6", "--gallery", "2", "--modality", "optical")
    for key in ("checkpoint", "step", "data", "modality", "records", "bleu_1", "bleu_2", "bleu_3", "bleu_4",
                "rouge_l", "cider", "meteor", "note", "experts_by_kind", "aspect_information", "out", "files"):
        assert key in result, key
    assert result["step"] == 1 and result["modality"] == "optical" and result["records"] >= 1
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"):
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    assert 0.0 <= result["cider"] <= 10.0
    assert result["meteor"] is None or 0.0 <= result["meteor"] <= 1.0
    assert set(result["experts_by_kind"]) == {"composition", "layout", "objects"}
    assert 0.0 <= result["aspect_information"] <= 1.0
    for shares in result["experts_by_kind"].values():
        assert len(shares) == 3 and abs(sum(shares) - 1.0) < 1e-3
    for name in ("experts.png", "gallery.png", "gallery.md", "captions.jsonl", "experts.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "captions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == result["records"]
    assert all(set(r["parts"]) == set(r["experts"]) == {"composition", "layout", "objects"} and r["references"]
               for r in rows)


def test_vqa_tool_end_to_end(run_dir):
    root, data, workdir = run_dir
    out = str(root / "vqa")
    result = run_tool("tools.vqa", "--checkpoint", workdir, "--data", data, "--out", out, "--batch_size", "4",
                      "--max_new_tokens", "3")
    for key in ("checkpoint", "step", "data", "modality", "records", "questions", "accuracy", "by_type",
                "experts_by_kind", "type_information", "out", "files"):
        assert key in result, key
    assert 0.0 <= result["type_information"] <= 1.0
    assert result["questions"] == result["accuracy"]["n_test"] >= result["records"] >= 1
    low, high = result["accuracy"]["ci"]
    assert 0.0 <= low <= result["accuracy"]["value"] <= high <= 1.0
    assert set(result["by_type"]) <= {"presence", "comparison", "rural_urban", "count", "majority"}
    assert set(result["experts_by_kind"]) == set(result["by_type"]) == set(result["question_only_by_type"])
    assert 0.0 < result["question_only"] <= 1.0   # some answer is the most frequent for each question
    for name in ("experts_vqa.png", "experts_vqa.md", "answers.jsonl"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name


def test_image_reliance_compares_own_and_other_scenes(run_dir):
    """Teacher-forced NLL with each row's own image vs another scene's: at initialisation the
    answers' logits already depend on the image, so the two differ (a pipeline that dropped the
    pixels, or rolled nothing, would make them equal)."""
    from ringmoe.vlm.evaluate import image_reliance
    _, data, workdir = run_dir
    result = image_reliance(workdir, data, batches=1)
    assert np.isfinite(result["nll"]) and np.isfinite(result["nll_other_images"])
    assert result["nll"] != result["nll_other_images"]


def test_router_information_is_one_for_experts_of_their_own_and_zero_for_the_same_split():
    """I(kind; expert) / H(kind), by hand: two kinds on disjoint experts -> 1; both split 50/50
    over the same two experts -> 0; one kind alone -> 0 (nothing to tell apart); kind a on e0,
    kind b half e0 half e1 (equal counts): H(kind) = ln 2, I = H(expert) - H(expert | kind)
    = H(3/4, 1/4) - 0.5 ln 2 = 0.5623 - 0.3466 = 0.2158 nats -> 0.3113."""
    def information(counts):
        router = infer.RouterCounts(list(counts), 2)
        for kind, per_expert in counts.items():
            for expert, n in enumerate(per_expert):
                for _ in range(n):
                    router.add(kind, expert)
        return router.information()
    assert information({"a": [4, 0], "b": [0, 4]}) == pytest.approx(1.0)
    assert information({"a": [2, 2], "b": [3, 3]}) == pytest.approx(0.0, abs=1e-12)
    assert information({"a": [2, 2]}) == 0.0
    assert information({"a": [4, 0], "b": [2, 2]}) == pytest.approx(0.3113, abs=1e-4)
