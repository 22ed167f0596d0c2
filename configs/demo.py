"""`make demo`: configs/tiny.py pretrained for 150 steps on 256 synthetic scenes.

    python -m tools.demo [--out demo_out] [--config.total_steps=150] [--examples 256]

The demo's figures (README, "The commands"): the linear probe (maps chosen on
validation records) over the four modalities, on the checkpoint this config made:
pretrained 0.688 [0.664, 0.710], random init 0.659 [0.636, 0.682], raw band
statistics 0.649 [0.626, 0.672] (95 % intervals; 400 test records per modality).
"""
from configs import tiny


def get_config():
    c = tiny.get_config()
    c.total_steps = 150
    c.eval_every = 50
    c.log_every = 10
    c.checkpoint_every = 150
    return c
