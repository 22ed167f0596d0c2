"""`make demo`: configs/tiny.py pretrained for 150 steps on 256 synthetic scenes.

    python -m tools.demo [--out demo_out] [--config.total_steps=150] [--examples 256]

The demo's figures (README, "The commands"; the same last line from three bare clones of
3df47cb and 6c82ce6): the linear probe (maps chosen on validation records), mean over the
four modalities, 400 test records each, 95 % intervals: pretrained 0.690 [0.667, 0.712],
random init 0.659 [0.635, 0.682], raw band statistics 0.648 [0.624, 0.671]. Over
pretraining seeds 0, 1, 2 (commit 22c283d) the gain over random init is +5.3, -0.1, +0.9
points: this budget does not show it; 600 steps give +3.8, +1.4, +3.6 and 2000 steps
+5.9, +2.8, +3.2 (configs/ablations/pretraining_budget.py, README "The commands").
"""
from configs import tiny


def get_config():
    c = tiny.get_config()
    c.total_steps = 150
    c.eval_every = 50
    c.log_every = 10
    c.checkpoint_every = 150
    return c
