"""The registry of per-modality objectives: a term is one function, registered by name.

    @objective("sam", "multispectral", settings=("sam_eps",))
    def sam(term: TermInputs) -> jax.Array: ...

`name` is the term's weight key in `config.objectives` and its name in the logs
("{modality}/{name}"); `modality` the one modality it serves (None: every one);
`settings` the other `config.objectives` keys it reads; `physical` whether it
works in physical units (then the loss needs the modality's band statistics to
de-normalise). The loss (`loss.pretraining_loss`) runs every registered term of a
modality whose weight is > 0, in registration order, and `loss.objective_keys()`
is the set of keys a config's `objectives` must hold. Adding a term is one
function here or in `terms.py` (the built-in ones) and its keys in
ringmoe/config.py; nothing in the loss changes (tests/test_objectives.py adds one).

A term that is asked for (weight > 0) but cannot run on the modality's channels
raises `TermInputs.cannot_run(...)`: an error naming the modality, the term and why.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping

import jax

from ringmoe.objectives.common import denormalize


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    modality: str | None
    fn: Callable[["TermInputs"], jax.Array]
    physical: bool
    settings: tuple[str, ...]


OBJECTIVES: dict[str, Objective] = {}
BUILT_IN = "ringmoe.objectives.terms"   # the module whose import registers the built-in terms


def objective(name: str, modality: str | None = None, *, physical: bool = True, settings: tuple[str, ...] = ()):
    """Registers `fn(term: TermInputs) -> scalar` as the objective `name` (see the module docstring)."""
    def register(fn):
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is registered twice")
        OBJECTIVES[name] = Objective(name, modality, fn, physical, tuple(settings))
        return fn
    return register


def registered() -> dict[str, Objective]:
    """Every registered objective, the built-in ones included, in registration order."""
    importlib.import_module(BUILT_IN)
    return OBJECTIVES


def objectives_of(modality: str) -> list[Objective]:
    """The registered objectives that serve `modality`, in registration order."""
    return [o for o in registered().values() if o.modality in (None, modality)]


class TermInputs:
    """What a term of one modality reads: `model`, `modality`, the model's `output` for it
    ('reconstruction', 'log_power'), the batch's `inputs` ('pixels', 'mask', ...), the loss
    `weights` (B, H, W) (masked pixels holding data), the objectives config `cfg` and the
    band statistics `stats`. `reconstruction` and `target` are both images in physical
    units; `memo` computes a value several terms share once per modality."""

    def __init__(self, model, modality: str, output: Mapping, inputs: Mapping, weights: jax.Array, cfg,
                 stats: Mapping | None):
        self.model, self.modality, self.output, self.inputs = model, modality, output, inputs
        self.weights, self.cfg, self.stats = weights, cfg, stats
        self._memo: dict[str, object] = {}

    @functools.cached_property
    def reconstruction(self) -> jax.Array:
        return denormalize(self.output["reconstruction"], self.stats)

    @functools.cached_property
    def target(self) -> jax.Array:
        return denormalize(self.inputs["pixels"], self.stats)

    @property
    def channels(self) -> int:
        return self.output["reconstruction"].shape[-1]

    @property
    def band_names(self):
        return self.stats.get("bands") if self.stats else None

    def setting(self, key: str) -> float:
        return float(self.cfg[key])

    def memo(self, key: str, compute: Callable[[], object]):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def cannot_run(self, term: str, why: str) -> ValueError:
        """The error of a term asked for (weight > 0) whose inputs the modality lacks."""
        return ValueError(f"{self.modality}: objectives.{term} = {float(self.cfg[term])} asks for the {term} term, "
                          f"but {why}; set objectives.{term} = 0 to train without it")
