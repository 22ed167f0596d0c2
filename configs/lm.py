"""Language-model shapes (ringmoe/text/llama.py): a tiny one for CPU tests and the public small
LMs of the Llama layout whose checkpoints `tools.import_lm` reads.

    python -m tools.params --config configs/lm.py:smollm2_135m
    python -m tools.bench lm --config configs/lm.py:tiny

Expected parameter counts (tools.params, from jax.eval_shape; the published figures in brackets):
    tiny           158,272
    smollm2_135m   134,515,008  (SmolLM2-135M: 135M)
    smollm2_360m   361,821,120  (SmolLM2-360M: 360M)
    qwen25_05b     494,032,768  (Qwen2.5-0.5B: 0.49B)
The shapes are those of the models' config.json files (hidden size, MLP width, layers,
query / key-value heads, vocabulary, rotary theta, RMSNorm epsilon, tied embeddings, q/k/v
biases). An imported checkpoint brings its own shape; these entries are for counting,
benchmarking and training from scratch.
"""
from ml_collections import ConfigDict

SHAPES = {
    # CPU tests: every feature of the layout (GQA 4:2, biases, untied head) at a glance's size.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                 num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, tie_embeddings=False,
                 attention_bias=True, max_positions=512),
    "smollm2_135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, tie_embeddings=True,
                         attention_bias=False, max_positions=8192),
    "smollm2_360m": dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_layers=32, num_heads=15,
                         num_kv_heads=5, rope_theta=100000.0, rms_norm_eps=1e-5, tie_embeddings=True,
                         attention_bias=False, max_positions=8192),
    "qwen25_05b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                       num_kv_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_embeddings=True,
                       attention_bias=True, max_positions=32768),
}


def get_config(shape: str = "tiny"):
    if shape not in SHAPES:
        raise ValueError(f"configs/lm.py: unknown shape {shape!r} (known: {sorted(SHAPES)})")
    c = ConfigDict()
    c.seed = 0
    c.lm = ConfigDict({**SHAPES[shape], "head_dim": None, "rope_scaling": None, "dtype": "float32"})
    return c
