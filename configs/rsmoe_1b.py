"""RS-MoE at about 1B parameters in all: the base RingMoE encoder (configs/base.py, frozen)
and 4 language-model experts of SmolLM2-135M's shape (configs/lm.py), top-2 in training (the
gate learns from the answers only at top-k >= 2), each answer written by its top expert, for one
8-GPU node.

    python -m tools.params --config configs/rsmoe_1b.py
    python -m tools.aot --config configs/rsmoe_1b.py --topology h100-8
    python -m tools.import_lm --from path/to/SmolLM2-135M --out /ckpt/smollm2   # its tokenizer.json
    python -m pretrain.train --config configs/rsmoe_1b.py --workdir /runs/rsmoe1b \\
        --config.data_dir=/data/shards --config.vlm.encoder=/runs/base \\
        --config.vlm.tokenizer=/ckpt/smollm2/tokenizer.json

Expected (tools.params, jax.eval_shape): 948,073,258 parameters in all (tests/test_rsmoe_config.py
holds the total to [0.9e9, 1.0e9]):
    encoder             396,246,250  configs/base.py as is: SwinV2-T (96, 2/2/6/2), 192 px, 4+4+1
                                     experts, all four modalities (0.40B, the README's table); frozen
    query transformer    11,101,248  32 queries, 2 layers, width 576 (reads 768-wide last-stage tokens)
    router                2,665,728  gate, per-expert soft prompts and FiLM (4 x 576 x 1152 of it), all
                                     from the pooled instruction (vlm.router_input, vlm.prompt_input)
    experts             538,060,032  4 x 134,515,008 (SmolLM2-135M: 576 wide, 30 layers, GQA 9:3,
                                     vocabulary 49152, tied embeddings)
    active per answer   148,281,984  query transformer + router + its top expert (generation)
    active per sub-task 282,796,992  in training: its top-2 experts (354,636,746 with the encoder's
                                     71.8M active per token, multispectral's)
The arithmetic that chose the shape: the compression target configs/ringmoe_1b.py is 1.07B
alone, no room for experts. The base encoder with one dense FFN per block is 51M (with 4
such experts 0.61B); with its MoE layout 396M, and then 4 SmolLM2-135M experts make 0.95B
(3 make 0.82B; SmolLM2-360M experts, 362M each, make 1.12B with only 2). K = 4 also equals
the `expert` mesh axis: one LM expert (and one of each group of the encoder's 4 modal and
4 collaborative experts) per device of an expert-parallel group.

Expected (tools.aot on h100-8: the CPU compiler for 8 fake devices, tools/aot.py's doc;
47 s and 1.9 GB of host memory on this 2-core machine (14 s lowering + 29 s compile)):
per device 43.08 GB of 80 GB, fits (54 %): train state 1.22 GB (parameters, and AdamW moments
for RS-MoE only), temporaries 41.8 GB, the largest of them float32 logits over the 49152-word
vocabulary at the 49 answer positions the loss reads (192 expert rows of a micro-batch x 49 x
49152 x 4 bytes = 1.85 GB each). Model FLOPs 1.36e14 per step (17 ms at peak, 34 ms at 50 %
MFU). Top-2 doubles the expert rows: without gradient accumulation the step needs 86.75 GB
per device and does not fit, hence 2 micro-batches of 64 images (`grad_accum_steps`; the
same 128 images per update).

The mesh: `expert` 4, `fsdp` the rest (2 on 8 GPUs): parameters and AdamW state are sharded
over both, a batch's rows over all 8 devices. Batch: 128 images per step (32 per modality, 4
per device) x 4 sub-tasks = 512 (instruction, answer) rows of 32 + 4 + 24 + 48 = 108 tokens;
ceil(1.5 x 256 x 2 / 4) = 192 rows per expert and micro-batch. Captioning fine-tunes of this
size (InstructBLIP, LLaVA's second stage) take 128-256 sequences per step.
The experts start from random weights: the trainer reads the imported tokenizer
(`vlm.tokenizer`) but has no option yet to copy the imported LM's weights into them.
"""
from ml_collections import ConfigDict

from configs import base
from configs.lm import SHAPES


def get_config():
    c = base.get_config()
    c.task = "rsmoe"
    m = c.model
    m.dtype = "bfloat16"                 # the frozen encoder's forward only: no remat needed
    # Whole scenes, flips only (captions state proportions of the whole scene; configs/rsmoe_tiny.py).
    c.data.crop_scale = (1.0, 1.0)
    c.data.crop_ratio = (1.0, 1.0)
    c.batch_size = 128                   # images per step, all four modalities (32 each) x 4 sub-tasks
    c.grad_accum_steps = 2               # top-2 rows of 128 images need 86.75 GB per device; 2 x 64 fit
    v = c.vlm
    v.tokenizer = ""                     # tokenizer.json of the imported SmolLM2 (49152 tokens): tools.import_lm
                                         # writes it next to the model; set --config.vlm.tokenizer=DIR/tokenizer.json
    v.lm = ConfigDict({**SHAPES["smollm2_135m"], "head_dim": None, "rope_scaling": None, "dtype": "bfloat16"})
    v.num_experts = 4
    v.top_k = 2                          # in training (the gate learns only at top-k >= 2); generation: top-1
    v.capacity_factor = 1.5
    v.num_queries = 32                   # InstructBLIP's
    v.query_layers = 2
    v.query_heads = 8                    # 576 / 8 = 72 per head
    v.prompt_length = 4
    v.subtasks_per_image = 4
    v.instruction_length = 24
    v.answer_length = 48
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "expert": 4, "tensor": 1})
    c.total_steps = 20_000
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 500
    c.optimizer.end_lr = 1e-6
    c.optimizer.weight_decay = 0.01
    return c
