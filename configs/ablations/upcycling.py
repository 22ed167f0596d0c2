"""Sparse upcycling vs training the MoE from scratch vs staying dense, at one total step count.

    python -m tools.ablate --grid configs/ablations/upcycling.py --workdir /tmp/abl_upcycling \
        --grid.data_dir=/tmp/syn64 --grid.probe_data_dir=/tmp/probe_set

Every point trains 100 steps in all (configs/tiny.py, 3 seeds):

  moe_scratch       the hierarchical MoE from its random init, 100 steps;
  dense             the dense SwinV2 (configs/tiny.py, MoE off), 100 steps;
  dense_first_stage the dense SwinV2, 50 steps: the first stage of the two below;
  upcycled_random   dense_first_stage's final checkpoint upcycled (every expert a copy of
                    its FFN, ringmoe/upcycle), fresh random routers, 50 MoE steps;
  upcycled_kmeans   the same with k-means routers from the data set's FFN inputs.

The second stage starts a new schedule (warm-up, cosine) and a fresh optimiser, as
`tools.upcycle` + `pretrain.train` do. Measured on this 2-core CPU (README, "Sparse
upcycling"; linear probe mean over the four modalities, mean +- sd over 3 seeds):
moe_scratch 0.625 +- 0.021, dense 0.629 +- 0.007, dense_first_stage 0.622 +- 0.009,
upcycled_random 0.642 +- 0.008, upcycled_kmeans 0.626 +- 0.012: upcycling with random
routers leads by 1.3-1.7 points, about two standard errors against dense; not established.
"""
from configs.ablations.common import grid

FIRST, SECOND = 50, 50


def get_config():
    dense = {"model.moe.enabled": False}
    return grid((
        ("moe_scratch", {"total_steps": FIRST + SECOND}),
        ("dense", {**dense, "total_steps": FIRST + SECOND}),
        ("dense_first_stage", {**dense, "total_steps": FIRST}),
        ("upcycled_random", {"total_steps": SECOND, "upcycle.router_init": "random"}, "dense_first_stage"),
        ("upcycled_kmeans", {"total_steps": SECOND, "upcycle.router_init": "kmeans"}, "dense_first_stage"),
    ))
