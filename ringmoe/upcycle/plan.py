"""Where every parameter of the upcycled MoE comes from, decided from shapes alone.

Parameters are named by their '/'-joined path in the model's state, in the layout the
configs store (a scanned stage's block parameters carry a leading layers axis; source and
target must use the same layout). Each target parameter gets one `Entry`, by kind:

  copied   the same path in the dense source, same shape: attention, norms, patch merging,
           patch embeddings and decoders of the modalities the source has;
  expert   a routed expert's stacked weight (modal or collaborative): E copies of the dense
           FFN's matching weight (fc1 -> w_in, b_in; fc2 -> w_out, b_out), the expert axis
           inserted where `Experts` stores it;
  shared   the shared expert: the dense FFN;
  router   a router of the MoE: nothing in a dense model to copy (`routers.py` starts it);
  fresh    nothing in the source at all (another modality's embedding or decoder, a power
           decoder): the target's own initial value, listed by the tool.

A source parameter that fits its target's path but not its shape is an error naming every
such path, raised before anything is built or written; so is an MoE source (there is
no dense FFN to copy). Source parameters no target entry uses (a modality the target lacks)
are listed as `unused`.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import NamedTuple

from ringmoe import cli

# A routed expert's stacked weight -> the dense FFN weight it copies, and how many trailing
# axes that weight has (the expert axis goes right before them).
EXPERT_SOURCE = {"w_in": ("fc1/kernel", 2), "b_in": ("fc1/bias", 1), "w_out": ("fc2/kernel", 2),
                 "b_out": ("fc2/bias", 1)}
ROUTED = {"modal_experts": "modal", "collaborative_experts": "collaborative"}
KINDS = ("copied", "expert", "shared", "router", "fresh")
SHOWN = 8   # mismatched shapes named in an error (then a count)


@cli.reported
class UpcycleError(ValueError):
    """A source that cannot fill the target: the message names the paths and shapes."""


class Entry(NamedTuple):
    kind: str                  # one of KINDS
    source: str | None         # the source path it copies (copied, expert, shared)
    group: str | None = None   # expert/shared/router: 'modal' | 'collaborative' | 'shared'
    weight: str | None = None  # expert: w_in | b_in | w_out | b_out; shared: fc1/kernel, ...
    unit: str | None = None    # expert: the path of its expert group (one set of hidden-unit draws)


class Plan(NamedTuple):
    entries: dict[str, Entry]          # target path -> entry, in the target's order
    unused: tuple[str, ...]            # source paths no entry copies

    def count(self, target_shapes: Mapping[str, tuple]) -> dict[str, int]:
        """Parameters per kind."""
        out = Counter({k: 0 for k in KINDS})
        for path, entry in self.entries.items():
            out[entry.kind] += math.prod(target_shapes[path])
        return dict(out)

    def fresh_parts(self) -> list[str]:
        """The modules left fresh, by name ('embeddings/sar_l1', ...), each once."""
        parts = []
        for path, entry in self.entries.items():
            if entry.kind == "fresh":
                part = _module(path)
                if part not in parts:
                    parts.append(part)
        return parts


def _module(path: str) -> str:
    """'decoders/sar_l1/conv/kernel' -> 'decoders/sar_l1'; a block parameter -> its path less the leaf."""
    parts = path.split("/")
    return "/".join(parts[:2]) if parts[0] in ("embeddings", "decoders", "power_decoders") else "/".join(parts[:-1])


def _entry(path: str, source: Mapping[str, tuple]) -> Entry:
    """The entry of target `path` (shapes are checked by `make_plan`)."""
    if "/ffn/" not in path:
        return Entry("copied", path) if path in source else Entry("fresh", None)
    prefix, rest = path.split("/ffn/", 1)
    head, *tail = rest.split("/")
    dense = f"{prefix}/ffn/ffn/"
    if head == "ffn":                                   # a dense target block
        return Entry("copied", path) if path in source else Entry("fresh", None)
    if head == "shared_expert":
        return Entry("shared", dense + "/".join(tail), "shared", "/".join(tail))
    group = ROUTED[head]
    unit = f"{prefix}/ffn/{head}" + (f"/{tail[0]}" if head == "modal_experts" else "")
    part, leaf = tail[-2], tail[-1]
    if part == "router":
        return Entry("router", None, group, leaf, unit)
    return Entry("expert", dense + EXPERT_SOURCE[leaf][0], group, leaf, unit)


def make_plan(source: Mapping[str, tuple], target: Mapping[str, tuple]) -> Plan:
    """The plan filling `target` {path: shape} from the dense `source` {path: shape}.

    UpcycleError if the source is an MoE, or names every source parameter whose shape cannot
    fill its target.
    """
    moe = [p for p in source if any(f"/ffn/{h}/" in p for h in (*ROUTED, "shared_expert"))]
    if moe:
        raise UpcycleError(f"the source is a Mixture of Experts ({moe[0]}, ...): upcycling starts from a dense "
                           "model (model.moe.enabled = False)")
    entries, problems = {}, []
    for path, shape in target.items():
        entry = _entry(path, source)
        if entry.source is not None:
            if entry.source not in source:
                entry = Entry("fresh", None)
            else:
                want = _source_shape(entry, shape)
                if tuple(source[entry.source]) != want:
                    problems.append(f"{path} {tuple(shape)} needs {entry.source} of shape {want}, the source has "
                                    f"{tuple(source[entry.source])}")
        entries[path] = entry
    if problems:
        more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise UpcycleError(f"the source cannot fill {len(problems)} parameter(s) of the target: "
                           + "; ".join(problems[:SHOWN]) + more)
    used = {e.source for e in entries.values()}
    return Plan(entries, tuple(p for p in source if p not in used))


def _source_shape(entry: Entry, target_shape: tuple) -> tuple:
    """The source shape `entry` needs: the target's less the expert axis for an expert weight."""
    if entry.kind != "expert":
        return tuple(target_shape)
    trailing = EXPERT_SOURCE[entry.weight][1]
    at = len(target_shape) - trailing - 1
    return tuple(target_shape[:at]) + tuple(target_shape[at + 1:])
