"""`make demo`: configs/tiny.py pretrained for 150 steps on 256 synthetic scenes.

    python -m tools.demo [--out demo_out] [--config.total_steps=150] [--examples 256]

The demo's figures (README, "The commands"; the same last line from two bare clones of
affb3dd): the linear probe (maps chosen on validation records), mean over the four
modalities, 400 test records each, 95 % intervals: pretrained 0.713 [0.690, 0.735],
random init 0.659 [0.635, 0.682], raw band statistics 0.648 [0.624, 0.671]. Over
pretraining seeds 0, 1, 2 (the same code) the gain over random init is +5.4, -1.1, +3.3
points: this budget does not show it; at 22c283d, 600 steps gave +3.8, +1.4, +3.6 and
2000 steps +5.9, +2.8, +3.2 (configs/ablations/pretraining_budget.py, README "Why the
demo makes no claim").
"""
from configs import tiny


def get_config():
    c = tiny.get_config()
    c.total_steps = 150
    c.eval_every = 50
    c.log_every = 10
    c.checkpoint_every = 150
    return c
