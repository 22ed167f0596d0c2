"""The demo's recipe (configs/demo.py) at 150, 600 and 2000 pretraining steps: what the
linear probe's gain over random init needs (README, "The commands").

    python -m tools.demo --rsmoe-steps 0    # makes demo_out/synthetic and demo_out/probe_set
    python -m tools.ablate --grid configs/ablations/pretraining_budget.py --workdir /tmp/abl_budget \
        --grid.data_dir=demo_out/synthetic --grid.probe_data_dir=demo_out/probe_set \
        [--grid.only=steps2000 --grid.seeds=1]

About 2.5, 8 and 25 minutes per run on this 2-core machine. Measured (linear probe,
mean over the four modalities, 1600 test records; random init of seeds 0, 1, 2: 0.659,
0.684, 0.678): 150 steps 0.712, 0.683, 0.687 (the demo; gain +2.0 +- 2.8 points);
600 steps 0.698, 0.699, 0.713 (+2.9 +- 1.3); 2000 steps 0.718, 0.712, 0.709
(+3.9 +- 1.7).
"""
from configs.ablations.common import grid


def get_config():
    g = grid((
        ("steps150", {}),
        ("steps600", {"total_steps": 600}),
        ("steps2000", {"total_steps": 2000}),
    ))
    g.base = "configs/demo.py"
    g.budget.total_steps = 150
    return g
