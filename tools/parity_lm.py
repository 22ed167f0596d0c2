"""Parity of the Llama-layout language model with Hugging Face transformers (`make parity`).

    python -m tools.parity_lm --torch-python .venv-torch/bin/python [--workdir parity_out/lm]

The PyTorch side (tests/parity/hf_side.py, in .venv-torch) builds three small random
models with transformers, no download: a Llama (untied, GQA, explicit head_dim), a
Qwen2 (q/k/v biases, tied, saved in shards with an index) and a SmolLM-style Llama
(tied, GQA 3:1, rope_theta 100000, llama3 rope scaling), saves each with
`save_pretrained` and a tokenizer.json, and computes the logits of a left-padded batch
of prompts of different lengths and a greedy continuation of --new-tokens tokens per
prompt. This side imports every directory through ringmoe.text.hf and computes the
same with `ringmoe.text.generate.generate(method="greedy")`.

Per architecture: the relative error ||ours - theirs|| / ||theirs|| of the logits over
the real (unpadded) positions, float32, and the fraction of prompts whose greedy tokens
are identical. Passed: every error <= --tolerance and every continuation identical.
Last line: JSON with each architecture's figures and `passed`; exit status 1 when not
passed.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time

from absl import flags

from ringmoe import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHITECTURES = ("llama", "qwen2", "smollm")
_TORCH_PYTHON = flags.DEFINE_string("torch-python", os.path.join(REPO, ".venv-torch", "bin", "python"),
                                    "Python of the parity environment (torch, transformers, tokenizers).")
_WORKDIR = flags.DEFINE_string("workdir", os.path.join("parity_out", "lm"),
                               "Directory for the checkpoints and results (replaced).")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-5, "Largest relative error of the logits that passes.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the models and prompts.")
_NEW_TOKENS = flags.DEFINE_integer("new-tokens", 32, "Greedy tokens per prompt.", lower_bound=1)
_LENGTHS = flags.DEFINE_list("prompt-lengths", ["7", "1", "16", "11"], "Prompt lengths (one prompt each).")


def main(argv) -> None:
    cli.no_arguments(argv)
    cli.setup_logging(absl_level=logging.ERROR)
    if not os.access(_TORCH_PYTHON.value, os.X_OK):
        raise FileNotFoundError(2, "no parity Python (make parity creates .venv-torch)", _TORCH_PYTHON.value)
    try:
        lengths = [int(n) for n in _LENGTHS.value]
    except ValueError:
        raise cli.UsageError(f"--prompt-lengths: not integers: {','.join(_LENGTHS.value)}") from None
    if not lengths or min(lengths) < 1:
        raise cli.UsageError("--prompt-lengths: every length must be >= 1")
    import shutil

    import numpy as np

    from ringmoe.text.generate import generate
    from ringmoe.text.hf import load_hf

    start = time.perf_counter()
    workdir = os.path.abspath(_WORKDIR.value)
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    rng = np.random.default_rng(_SEED.value)
    vocab = 256                                             # hf_side.py's SHAPE
    prompts = [rng.integers(1, vocab, n).tolist() for n in lengths]
    with open(os.path.join(workdir, "lm_cases.json"), "w") as f:
        json.dump({"prompts": prompts, "new_tokens": _NEW_TOKENS.value, "seed": _SEED.value,
                   "architectures": list(ARCHITECTURES)}, f)
    subprocess.run([_TORCH_PYTHON.value, os.path.join(REPO, "tests", "parity", "hf_side.py"), workdir], check=True)
    hf_side = json.load(open(os.path.join(workdir, "hf_results.json")))

    width = max(lengths)
    real = np.zeros((len(prompts), width), bool)
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, prompt in enumerate(prompts):
        real[i, width - len(prompt):] = True
        tokens[i, width - len(prompt):] = prompt
    results = {}
    print(f"{'architecture':<13}{'model_type':<11}{'parameters':>11}  {'logits rel. error':>17}  "
          f"{'greedy match':>12}  {'min margin':>10}  files")
    for case in hf_side["cases"]:
        name = case["name"]
        model, tokenizer, info = load_hf(case["directory"])
        ours = np.asarray(model(tokens, valid=real))
        theirs = np.load(case["logits"])
        difference = ours[real].astype(np.float64) - theirs[real]
        error = float(np.linalg.norm(difference) / np.linalg.norm(theirs[real].astype(np.float64)))
        greedy = generate(model, prompts, _NEW_TOKENS.value, method="greedy")
        matches = [list(a) == list(b) for a, b in zip(greedy, case["greedy"])]
        first_difference = [next((t for t, (a, b) in enumerate(zip(x, y)) if a != b), None)
                            for x, y in zip(greedy, case["greedy"])]
        sharded = any(f.endswith(".index.json") for f in case["files"])
        results[name] = {
            "model_type": info["model_type"], "parameters": info["parameters"],
            "hf_parameters": case["parameters"], "logits_rel_error": error,
            "logits_max_abs_error": float(np.abs(difference).max()),
            "greedy_match": sum(matches) / len(matches), "greedy_first_difference": first_difference,
            "greedy_min_margin": case["greedy_min_margin"], "sharded": sharded,
            "tokenizer": tokenizer is not None, "attn_implementation": case["attn_implementation"],
            "rope_scaling": dict(info["spec"].rope_scaling) or None,
            "passed": error <= _TOLERANCE.value and all(matches) and info["parameters"] == case["parameters"],
        }
        print(f"{name:<13}{info['model_type']:<11}{info['parameters']:>11,}  {error:>17.2e}  "
              f"{sum(matches):>5}/{len(matches):<6}  {case['greedy_min_margin']:>10.2e}  "
              f"{'sharded' if sharded else 'single'}{', tokenizer' if tokenizer is not None else ''}", flush=True)

    passed = all(r["passed"] for r in results.values())
    print(json.dumps({"architectures": results, "prompt_lengths": lengths, "new_tokens": _NEW_TOKENS.value,
                      "tolerance": _TOLERANCE.value, "max_logits_rel_error": max(r["logits_rel_error"]
                                                                                 for r in results.values()),
                      "passed": passed, "versions": hf_side["versions"],
                      "seconds": round(time.perf_counter() - start, 1)}))
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    cli.run_absl("tools.parity_lm", main)
