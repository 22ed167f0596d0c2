"""`make demo`: configs/tiny.py pretrained for 150 steps on 256 synthetic scenes.

    python -m tools.demo [--out demo_out] [--config.total_steps=150] [--examples 256]

The demo's figures (README, "The demo"): its linear probe over the four
modalities beats the same model at random initialisation by about 7 points with
disjoint 95 % intervals, and matches (does not beat) the raw band statistics.
"""
from configs import tiny


def get_config():
    c = tiny.get_config()
    c.total_steps = 150
    c.eval_every = 50
    c.log_every = 10
    c.checkpoint_every = 150
    return c
