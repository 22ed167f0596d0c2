"""The PyTorch half of the language-model parity check (run by .venv-torch's Python: torch,
transformers, tokenizers, numpy; `python -m tools.parity_lm` drives it).

    .venv-torch/bin/python tests/parity/hf_side.py WORKDIR

WORKDIR/lm_cases.json (written by tools.parity_lm) lists the prompts (token ids, of
different lengths), the number of new tokens and the seed. For each architecture this
script builds a small random model with transformers, no download:
  llama    untied embeddings, GQA 4:2, an explicit head_dim (not hidden / heads);
  qwen2    q/k/v biases, tied embeddings, sharded on save (the index path);
  smollm   a SmolLM-style Llama: tied embeddings, GQA 3:1, rope_theta 100000, llama3 rope scaling;
each `Config(...)` + `AutoModelForCausalLM.from_config` under a fixed torch seed,
float32, with the RMSNorm scales and biases moved off their initial ones and zeros (a
swapped norm or a dropped bias would otherwise go unseen), saved with
`save_pretrained` beside a small WordLevel tokenizer.json. Then, on the left-padded
batch of prompts (attention_mask, position ids counted over the real tokens), the
logits and a greedy continuation (`generate(do_sample=False)`, no end token: every
row runs the full length), with the smallest top-1 / top-2 margin met on the way.
Writes WORKDIR/hf_results.json. Nothing here imports JAX.
"""
import json
import os
import sys

import numpy as np
import torch
from torch_env import torchvision_without_its_kernels

torchvision_without_its_kernels()
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config  # noqa: E402

transformers.utils.logging.disable_progress_bar()

SHAPE = dict(vocab_size=256, num_hidden_layers=2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
             initializer_range=0.2, rms_norm_eps=1e-5, max_position_embeddings=256)
ARCHITECTURES = {
    "llama": (LlamaConfig, dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=24, tie_word_embeddings=False, rope_theta=10000.0), None),
    "qwen2": (Qwen2Config, dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                                tie_word_embeddings=True, rope_theta=1000000.0), "40KB"),
    "smollm": (LlamaConfig, dict(hidden_size=96, intermediate_size=256, num_attention_heads=6, num_key_value_heads=2,
                                 tie_word_embeddings=True, rope_theta=100000.0,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
               None),
}


def tokenizer_json(path: str, vocab_size: int) -> None:
    """A word-level tokenizer over "t0" .. "t{V-1}" (only needs to exist and load)."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(vocab_size)},
                                                                 unk_token="t0"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.save(path)


def build(name: str, seed: int):
    config_class, shape, _ = ARCHITECTURES[name]
    config = config_class(**SHAPE, **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for parameter_name, p in model.named_parameters():
            if parameter_name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif parameter_name.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
    return model


def left_padded(prompts: list[list[int]], pad_id: int = 0):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    return ids, mask


def run(name: str, cases: dict, workdir: str) -> dict:
    model = build(name, cases["seed"])
    directory = os.path.join(workdir, name)
    shard = ARCHITECTURES[name][2]
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    tokenizer_json(os.path.join(directory, "tokenizer.json"), model.config.vocab_size)
    files = sorted(os.listdir(directory))

    ids, mask = left_padded(cases["prompts"])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float().numpy()
    np.save(os.path.join(workdir, f"{name}_logits.npy"), logits)

    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    n = cases["new_tokens"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, pad_token_id=0,
                             eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    new = out.sequences[:, ids.shape[1]:]
    if new.shape[1] != n:
        raise SystemExit(f"hf_side: {name}: generate stopped after {new.shape[1]} of {n} tokens")
    scores = torch.stack(out.scores, 1)                                       # (B, n, V)
    top2 = scores.topk(2, -1).values
    return {"name": name, "directory": directory, "files": files, "model_type": model.config.model_type,
            "attn_implementation": model.config._attn_implementation,
            "parameters": sum(p.numel() for p in model.parameters()),
            "logits": os.path.join(workdir, f"{name}_logits.npy"), "greedy": new.tolist(),
            "greedy_min_margin": float((top2[..., 0] - top2[..., 1]).min())}


def main(workdir: str) -> None:
    cases = json.load(open(os.path.join(workdir, "lm_cases.json")))
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    results = [run(name, cases, workdir) for name in cases["architectures"]]
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__}
    with open(os.path.join(workdir, "hf_results.json"), "w") as f:
        json.dump({"versions": versions, "cases": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
