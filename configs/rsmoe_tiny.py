"""RS-MoE at CPU size: the tiny RingMoE encoder (configs/tiny.py, frozen), tiny LM experts.

    python -m tools.make_synthetic --out /tmp/syn64 --examples 256 --image-size 64 --seed 0 --labeled
    python -m tools.make_synthetic --out /tmp/syn64_4k --examples 4096 --image-size 64 --seed 7 --labeled
    python -m pretrain.train --config configs/demo.py --workdir /tmp/enc --config.data_dir=/tmp/syn64
    # stage 1: one dense LM on every sub-task
    python -m pretrain.train --config configs/rsmoe_tiny.py:dense --workdir /tmp/rs1 \\
        --config.data_dir=/tmp/syn64_4k --config.vlm.encoder=/tmp/enc
    # stage 2: upcycled into 3 experts + the instruction router
    python -m pretrain.train --config configs/rsmoe_tiny.py:upcycled --workdir /tmp/rs2 \\
        --config.data_dir=/tmp/syn64_4k --config.vlm.encoder=/tmp/enc --config.vlm.init_from=/tmp/rs1
    python -m tools.caption --checkpoint /tmp/rs2 --data /tmp/syn64_test

2000 updates (about 6 minutes per dense stage on this 2-core CPU): the model reads the
image only after about that many on 4096 scenes; at 600 updates on 256 scenes every arm
answered each question type's prior (README, RS-MoE, for the figures of both).

Variants (`:NAME`), the three arms of the comparison (tools.rsmoe_compare):
    dense     1 expert (stage 1, and the dense baseline with the same active parameters)
    sparse    3 experts, top-2 in training, trained from scratch
    upcycled  3 experts, top-2 in training, started from a dense run (`vlm.init_from`, stage 2)
Top-2, because only then do the answers train the gate (at top-1 the renormalised gate is 1:
`InstructionRouter`); generation uses each row's top expert alone, so every arm answers with
one LM's parameters. The gate and the experts' prompts read the instruction alone
(`vlm.router_input`, `vlm.prompt_input`).
The encoder sees whole 64 px scenes (no random crop: captions state proportions of the
whole scene) with flips (the text is derived after them, so "north-west" stays true).
"""
from configs import tiny

VARIANTS = {"dense": (1, 1), "sparse": (3, 2), "upcycled": (3, 2)}   # (experts, top-k in training)


def get_config(variant: str = "dense"):
    if variant not in VARIANTS:
        raise ValueError(f"configs/rsmoe_tiny.py: unknown variant {variant!r} (known: {sorted(VARIANTS)})")
    c = tiny.get_config()
    c.task = "rsmoe"
    c.data.modality_weights = {"optical": 1.0, "multispectral": 1.0, "sar_l2": 1.0, "sar_l1": 1.0}
    c.data.crop_scale = (1.0, 1.0)
    c.data.crop_ratio = (1.0, 1.0)
    c.batch_size = 16                   # images per step (4 per modality) x 4 sub-tasks = 64 rows
    v = c.vlm
    v.num_experts, v.top_k = VARIANTS[variant]
    v.vision_stages = (2, 3)            # 4 x 4 + 2 x 2 tokens: the last stage alone is 2 x 2
    v.num_queries = 8
    v.query_layers = 1
    v.prompt_length = 4
    v.subtasks_per_image = 4
    v.instruction_length = 32               # the caption instructions are 21-26 tokens
    v.answer_length = 40
    c.total_steps = 2000
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.end_lr = 1e-5
    c.optimizer.weight_decay = 0.01
    return c
