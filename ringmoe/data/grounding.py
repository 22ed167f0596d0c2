"""Grounded text from a land-cover map: the facts a caption or an answer may state, and the
captions and RSVQA-LR-style questions built from them (RS-MoE's synthetic supervision).

A label map (H, W) of class ids (0 = unlabelled, names by id as in a data set's
manifest) defines the truth, so every sentence made here can be checked against
the pixels. `facts` measures:

  composition  each class's share of the labelled pixels, the dominant class;
  layout       where each class of at least `MIN_SHARE` lies: a quadrant
               (north-west ...), a half (north ...), the centre, or throughout
               (row 0 is north);
  objects      connected water bodies and fields (4-connected components of at
               least `MIN_OBJECT` of the pixels), a river (a water body of at most
               `RIVER_SHARE` touching two opposite edges) and the class it crosses (the most frequent
               class along its banks), the share of built-up land (urban /
               rural: RSVQA-LR's threshold idea, here `URBAN_SHARE` of the pixels).

A caption is three sentences, one per aspect (composition, layout, objects), the
aspects RS-MoE's instruction router hands to different experts; each has several
phrasings, drawn with a seeded generator. Questions follow RSVQA-LR's types
(presence, comparison, rural_urban, count, majority) with exact answers.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

MIN_SHARE = 0.05      # a class below this share of the scene is not placed or compared
MIN_OBJECT = 0.005    # a connected region below this share of the scene is not counted
URBAN_SHARE = 0.10    # built-up share from which a scene is "urban"
RIVER_SHARE = 0.30    # a water body larger than this is a lake or the sea, not a river
BUILT = ("urban", "built area")
COUNTED = {"water": "water bodies", "cropland": "fields", "crops": "fields"}
ASPECTS = ("composition", "layout", "objects")
QUESTION_TYPES = ("presence", "comparison", "rural_urban", "count", "majority")


@dataclasses.dataclass(frozen=True)
class Facts:
    shares: dict[str, float]          # class -> share of labelled pixels (descending)
    places: dict[str, str]            # class -> where it lies
    counts: dict[str, int]            # "water bodies" / "fields" -> connected regions
    river: str | None                 # the class a river crosses, "" for none in particular; None: no river
    built_share: float

    @property
    def dominant(self) -> str:
        return next(iter(self.shares))

    @property
    def urban(self) -> bool:
        return self.built_share >= URBAN_SHARE


def facts(label_map: np.ndarray, names: tuple[str, ...]) -> Facts:
    """The measurable content of `label_map` (class ids indexing `names`; 0 unlabelled)."""
    labelled = label_map > 0
    total = int(labelled.sum())
    if total == 0:
        raise ValueError("the label map has no labelled pixel")
    counts = np.bincount(label_map[labelled].ravel(), minlength=len(names))
    if len(counts) > len(names):
        raise ValueError(f"class id {len(counts) - 1} has no name (names: {list(names)})")
    order = [i for i in np.argsort(-counts, kind="stable") if i > 0 and counts[i] > 0]
    shares = {names[i]: float(counts[i] / total) for i in order}
    places = {names[i]: place(label_map == i) for i in order if shares[names[i]] >= MIN_SHARE}
    objects, river = {}, None
    for i, name in enumerate(names):
        if name in COUNTED:
            regions, n = ndimage.label(label_map == i)
            sizes = np.bincount(regions.ravel())[1:]
            objects[COUNTED[name]] = objects.get(COUNTED[name], 0) + int((sizes >= MIN_OBJECT * label_map.size).sum())
            if name == "water":
                river = _river(label_map, regions, sizes, names)
    built = sum(shares.get(b, 0.0) for b in BUILT)
    return Facts(shares, places, objects, river, built)


def place(mask: np.ndarray) -> str:
    """Where the True pixels of `mask` lie: a quadrant, a half, the centre or throughout."""
    h, w = mask.shape
    n = mask.sum()
    rows, cols = slice(h // 4, h - h // 4), slice(w // 4, w - w // 4)
    if mask[rows, cols].sum() >= 0.6 * n and mask[rows, cols].mean() >= 0.5:
        return "centre"
    north, west = mask[: h // 2].sum() / n, mask[:, : w // 2].sum() / n
    quadrants = {"north-west": mask[: h // 2, : w // 2], "north-east": mask[: h // 2, w // 2:],
                 "south-west": mask[h // 2:, : w // 2], "south-east": mask[h // 2:, w // 2:]}
    best = max(quadrants, key=lambda q: quadrants[q].sum())
    if quadrants[best].sum() >= 0.6 * n:
        return best
    for half, share in (("north", north), ("south", 1 - north), ("west", west), ("east", 1 - west)):
        if share >= 0.75:
            return half
    return "throughout"


def _river(label_map, regions, sizes, names) -> str | None:
    """The class along the banks of the largest water body that touches two opposite edges."""
    edges = (regions[0], regions[-1], regions[:, 0], regions[:, -1])
    crossing = [r for r in np.argsort(-sizes) + 1 if sizes[r - 1] <= RIVER_SHARE * label_map.size
                and ((r in edges[0] and r in edges[1]) or (r in edges[2] and r in edges[3]))]
    if not crossing:
        return None
    water = regions == crossing[0]
    banks = ndimage.binary_dilation(water) & ~water & (label_map > 0)
    beside = np.bincount(label_map[banks].ravel(), minlength=len(names))
    beside[names.index("water")] = 0
    return names[int(beside.argmax())] if beside.any() else ""


def _percent(share: float) -> str:
    return f"{round(100 * share)} %"


COMPOSITION = (
    lambda f, top: f"The scene is mostly {top[0][0]} ({_percent(top[0][1])})"
    + "".join(f", with {name} ({_percent(s)})" for name, s in top[1:]) + ".",
    lambda f, top: f"{top[0][0].capitalize()} covers {_percent(top[0][1])} of the area"
    + (", followed by " + " and ".join(f"{name} ({_percent(s)})" for name, s in top[1:]) if top[1:] else "") + ".",
    lambda f, top: f"{'An urban' if f.urban else 'A rural'} scene dominated by {top[0][0]}"
    + (" and " + " and ".join(name for name, _ in top[1:]) if top[1:] else "") + ".",
)
LAYOUT = (
    lambda places: " ".join(f"{name.capitalize()} lies {_where(p)}." for name, p in places),
    lambda places: "; ".join(f"{_where(p)} there is {name}" for name, p in places).capitalize() + ".",
)
OBJECTS = (
    lambda f: _objects(f, ("There are no {what}", "There is one {what}", "There are {n} {what}"),
                       "A river crosses the {beside}"),
    lambda f: _objects(f, ("No {what} can be seen", "One {what} can be counted", "{n} {what} can be counted"),
                       "A river runs through the {beside}"),
)


def _where(p: str) -> str:
    return {"centre": "in the centre", "throughout": "throughout the scene"}.get(p, f"in the {p}")


def _objects(f: Facts, count: tuple[str, str, str], river: str) -> str:
    """count: the phrasing for none, one and n objects."""
    parts = [count[min(n, 2)].format(n=n, what=what if n != 1 else what.replace("bodies", "body").rstrip("s"))
             for what, n in f.counts.items()]
    if f.river is not None:
        parts.append(river.format(beside=f.river or "scene"))
    parts.append(f"built-up land covers {_percent(f.built_share)}" if f.built_share else "there is no built-up land")
    return ". ".join(p[0].upper() + p[1:] for p in parts) + "."


def caption_parts(f: Facts, rng: np.random.Generator) -> dict[str, str]:
    """One sentence per aspect (composition, layout, objects), each in a phrasing drawn from `rng`."""
    top = [(n, s) for n, s in f.shares.items() if s >= MIN_SHARE][:3] or [next(iter(f.shares.items()))]
    return {"composition": COMPOSITION[rng.integers(len(COMPOSITION))](f, top),
            "layout": LAYOUT[rng.integers(len(LAYOUT))](list(f.places.items())),
            "objects": OBJECTS[rng.integers(len(OBJECTS))](f)}


def caption(f: Facts, rng: np.random.Generator) -> str:
    parts = caption_parts(f, rng)
    return " ".join(parts[a] for a in ASPECTS)


def questions(f: Facts, names: tuple[str, ...]) -> list[dict]:
    """RSVQA-LR-style questions with exact answers: {"type", "question", "answer"}."""
    out = [{"type": "presence", "question": f"Is there {n} in the image?",
            "answer": "yes" if f.shares.get(n, 0.0) > 0 else "no"} for n in names[1:]]
    present = [(n, s) for n, s in f.shares.items() if s >= MIN_SHARE]
    for (a, sa), (b, sb) in zip(present, present[1:]):
        if sa - sb < MIN_SHARE / 2:   # too close to call from the pixels' own rounding
            continue
        out.append({"type": "comparison", "question": f"Is there more {b} than {a}?", "answer": "no"})
        out.append({"type": "comparison", "question": f"Is there more {a} than {b}?", "answer": "yes"})
    out.append({"type": "rural_urban", "question": "Is it a rural or an urban area?",
                "answer": "urban" if f.urban else "rural"})
    out += [{"type": "count", "question": f"How many {what} are there?", "answer": str(n)}
            for what, n in f.counts.items()]
    out.append({"type": "majority", "question": "What is the most common land cover?", "answer": f.dominant})
    return out


def annotate(record, names: tuple[str, ...], rng: np.random.Generator, captions: int = 5):
    """`record` with `captions` grounded captions (distinct phrasings where the templates allow)
    and every question of its label map; unchanged when it has no labelled pixel."""
    if record.label_map is None or not (record.label_map > 0).any():
        return record
    f = facts(record.label_map, names)
    texts = list(dict.fromkeys(caption(f, rng) for _ in range(4 * captions)))[:captions]
    return dataclasses.replace(record, captions=tuple(texts), questions=tuple(questions(f, names)))
