"""Each physics-informed objective on and off, SimMIM and the router losses always on.

    python -m tools.ablate --grid configs/ablations/physics_terms.py --workdir /tmp/abl_phys \
        --grid.data_dir=/tmp/syn64 --grid.probe_data_dir=/tmp/probe_set

Points: every term at its configured weight; SimMIM alone (the plain reference
minus its span target); then each term switched off on its own.
"""
from configs.ablations.common import grid
from ringmoe.objectives import registry

# Every registered physics term (ringmoe/objectives/terms.py): span, pauli, speckle_nll,
# xpol_ratio, sam, index.
TERMS = tuple(o.name for o in registry.registered().values() if o.physical)


def get_config():
    points = [("all_terms", {}), ("simmim_only", {f"objectives.{t}": 0.0 for t in TERMS})]
    points += [(f"no_{t}", {f"objectives.{t}": 0.0}) for t in TERMS]
    return grid(points)
