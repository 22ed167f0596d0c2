"""RS-MoE inference: each sub-task answered by its top expert, and what an evaluation asks of a record.

    rows, top = answer(model, vision_tokens, instruction, instruction_valid, max_new_tokens=40,
                       end_id=end, pad_id=pad)

A row (one sub-task of one image) is routed as in training (`RSMoE.route`); its
top expert k = argmax of the router's probabilities reads [visual queries |
its soft prompt k | the instruction in its own embedding table] (`RSMoE.expert_inputs`,
the answer part empty) and writes the answer greedily until the end token
(`text.generate.generate_from_embeddings`). Rows are grouped by expert on the
host and each group runs on that expert alone (`expert_model`: the stacked
state's k-th slice as one `LanguageModel`), so each row costs one LM, as top-1
training does. Row counts are padded to powers of two so the compiled programs
are reused across batches (a handful of shapes, not one per batch).

Evaluation sub-tasks of a whole-image record:
  captions   the three aspects (`grounding.ASPECTS`, instructions `examples.CAPTION`),
             the caption their answers joined in that order; references: the
             record's stored captions, else `REFERENCE_PHRASINGS` grounded
             captions of its label map (distinct phrasings, seeded by record);
  questions  `grounding.questions` of its label map at full resolution, and its
             stored questions not among them (as training's `examples.subtasks`).
`encoded_images` yields a data set's records with their vision tokens (whole image,
`eval.features.image_batches`), `RouterCounts` tallies which expert took which kind.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringmoe.data import grounding, schema, shards
from ringmoe.text.generate import generate_from_embeddings
from ringmoe.text.llama import LanguageModel
from ringmoe.vlm import examples

REFERENCE_PHRASINGS = 5    # grounded reference captions per record without stored ones


# ---- a run ---------------------------------------------------------------------------------------
def load_run(checkpoint: str):
    """(config, model, step, tokenizer, pad_id, end_id) of an RS-MoE training run (`load_pretrained`:
    its newest readable step) and its tokenizer (`run_tokenizer`)."""
    from ringmoe.model.checkpoint import load_pretrained
    from ringmoe.text import tokenizer as tokenizers
    config, model, step = load_pretrained(checkpoint)
    if config.get("task", "pretrain") != "rsmoe":
        raise ValueError(f"{checkpoint}: a {config.get('task', 'pretrain')!r} run, not an RS-MoE one (task 'rsmoe')")
    tokenizer = run_tokenizer(checkpoint, config)
    pad_id, end_id = tokenizers.special_ids(tokenizer)
    return config, model, step, tokenizer, pad_id, end_id


def run_tokenizer(checkpoint: str, config):
    """The run's tokenizer: RUN_DIR/tokenizer.json (RUN_DIR also when `checkpoint` is its
    checkpoints/ directory), else `config.vlm.tokenizer`; ValueError naming where it looked."""
    from ringmoe.text import tokenizer as tokenizers
    directory = os.path.abspath(checkpoint)
    places = [os.path.join(directory, tokenizers.TOKENIZER_FILE)]
    if os.path.basename(directory) == "checkpoints":
        places.append(os.path.join(os.path.dirname(directory), tokenizers.TOKENIZER_FILE))
    if config.vlm.get("tokenizer"):
        places.append(config.vlm.tokenizer)
    found = next((p for p in places if os.path.exists(p)), None)
    if found is None:
        raise ValueError(f"{checkpoint}: no tokenizer (looked for {', '.join(places)})")
    return tokenizers.load_tokenizer(found)


def served_modalities(config, model, data_dir: str) -> list[str]:
    """The encoder's modalities that `data_dir` holds (and the run served), in model order."""
    from ringmoe.eval.features import available_modalities
    return available_modalities(config, model.encoder, shards.read_manifest(data_dir), data_dir)


def pick_modalities(available: list[str], wanted: str | None, data_dir: str) -> list[str]:
    """The modalities to evaluate: `wanted`, each available one for 'all', else the first available."""
    if not available:
        raise ValueError(f"{data_dir}: holds none of the model's modalities")
    if wanted == "all":
        return available
    if wanted is None:
        return available[:1]
    if wanted not in available:
        raise ValueError(f"unknown modality {wanted!r} for this model and data set (available: {', '.join(available)})")
    return [wanted]


def default_out(checkpoint: str, tool: str, data_dir: str, modality: str) -> str:
    """RUN_DIR/TOOL/<data set name>/MODALITY: where an evaluation tool writes by default."""
    run = os.path.abspath(checkpoint)
    run = os.path.dirname(run) if os.path.basename(run) == "checkpoints" else run
    return os.path.join(run, tool, os.path.basename(os.path.abspath(data_dir)), modality)


# ---- the experts -------------------------------------------------------------------------------
def expert_model(rsmoe, k: int) -> LanguageModel:
    """Expert k of `rsmoe` (RSMoE) as a standalone LanguageModel: the k-th slice of every stacked
    variable, on a graph built for one LM (so no variable keeps the `expert` axis's metadata)."""
    experts = rsmoe.spec.num_experts
    if not 0 <= k < experts:
        raise ValueError(f"expert {k} out of range: the model has {experts}")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LanguageModel(rsmoe.spec.lm, rngs=nnx.Rngs(0))))
    stacked = nnx.to_pure_dict(nnx.state(rsmoe.experts))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: x[k], stacked))
    return nnx.merge(graphdef, state)


def split_experts(rsmoe) -> list[LanguageModel]:
    """Every expert of `rsmoe` as its own LanguageModel (`expert_model`); pass to `answer` to slice once."""
    return [expert_model(rsmoe, k) for k in range(rsmoe.spec.num_experts)]


@nnx.jit
def _route(rsmoe, vision_tokens, instruction, instruction_valid):
    visual, routing = rsmoe.route(vision_tokens, instruction, instruction_valid)
    return visual, routing.probs, routing.prompts


@nnx.jit
def _prefix(rsmoe, lm, visual, prompt, instruction, instruction_valid):
    empty = jnp.zeros((instruction.shape[0], 0), jnp.int32)
    return rsmoe.expert_inputs(lm, visual, prompt, instruction, instruction_valid, empty, empty.astype(bool))


def bucket(n: int) -> int:
    """The padded size of n rows: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


def _pad_rows(a: np.ndarray, size: int) -> np.ndarray:
    """`a` with its first row repeated up to `size` rows (real inputs: no all-pad row reaches a model)."""
    return a if len(a) == size else np.concatenate([a, np.repeat(a[:1], size - len(a), 0)])


def answer(model, vision_tokens, instruction, instruction_valid, *, max_new_tokens: int, end_id: int,
           pad_id: int, experts: Sequence[LanguageModel] | None = None) -> tuple[list[list[int]], np.ndarray]:
    """Greedy answers of every sub-task, each by its top expert (module doc).

    model: a VisionLanguageModel (its `rsmoe` is used) or an RSMoE; vision_tokens (B, S, D);
    instruction (B, N, I) int, instruction_valid (B, N, I) bool, LEFT-padded, each row with at
    least one token; `experts`: `split_experts(rsmoe)`, sliced here when not given.
    Returns (the answer tokens of each of the B*N rows, image-major, the end token removed;
    the top expert of each row (B*N,) int)."""
    rsmoe = getattr(model, "rsmoe", model)
    vision_tokens, instruction = np.asarray(vision_tokens), np.asarray(instruction, np.int32)
    instruction_valid = np.asarray(instruction_valid, bool)
    b, n, length = instruction.shape
    if vision_tokens.shape[0] != b or instruction_valid.shape != instruction.shape:
        raise ValueError(f"vision tokens {vision_tokens.shape[:1]} images, instruction {instruction.shape}, "
                         f"instruction_valid {instruction_valid.shape}: the shapes disagree")
    if not instruction_valid[:, :, -1].all():
        raise ValueError("every instruction must be left-padded and non-empty (its last slot valid)")
    size = bucket(b)
    visual, probs, prompts = _route(rsmoe, _pad_rows(vision_tokens, size), _pad_rows(instruction, size),
                                    _pad_rows(instruction_valid, size))
    rows = b * n
    visual, probs, prompts = visual[:rows], np.asarray(probs)[:rows], prompts[:rows]
    top = probs.argmax(-1)
    flat, flat_valid = instruction.reshape(rows, length), instruction_valid.reshape(rows, length)
    out: list[list[int]] = [[] for _ in range(rows)]
    for k in np.unique(top):
        lm = experts[k] if experts is not None else expert_model(rsmoe, int(k))
        mine = np.flatnonzero(top == k)
        take = _pad_rows(mine, bucket(len(mine)))
        x, valid = _prefix(rsmoe, lm, visual[take], prompts[take, k], flat[take], flat_valid[take])
        written = generate_from_embeddings(lm, x, valid, max_new_tokens, stop_tokens=(end_id,), pad_id=pad_id)
        for row, tokens in zip(mine, written):
            out[row] = tokens[:-1] if tokens and tokens[-1] == end_id else tokens
    return out, top


def instructions(texts: Sequence[str], tokenizer, length: int, *, pad_id: int, end_id: int):
    """(tokens (N, I) int32, valid (N, I) bool, truncated count) of instruction texts, left-padded as
    in training (`examples.encode`)."""
    encoded = examples.encode([examples.SubTask("", t, "") for t in texts], tokenizer, length, 1,
                              pad_id=pad_id, end_id=end_id)
    return encoded.instruction, encoded.instruction_valid, encoded.truncated


# ---- evaluation sub-tasks of a record ----------------------------------------------------------------
def labelled(record) -> bool:
    return record.label_map is not None and bool((record.label_map > 0).any())


def caption_references(record, names: tuple[str, ...], index: int, *, phrasings: int = REFERENCE_PHRASINGS,
                       seed: int = 0) -> list[str]:
    """The reference captions of `record` (data set index `index`): its stored captions, else up to
    `phrasings` distinct grounded captions of its label map; [] when it has neither."""
    if record.captions:
        return list(record.captions)
    if not labelled(record):
        return []
    facts = grounding.facts(record.label_map, names)
    rng = np.random.default_rng([seed, index])
    return list(dict.fromkeys(grounding.caption(facts, rng) for _ in range(4 * phrasings)))[:phrasings]


def record_questions(record, names: tuple[str, ...]) -> list[dict]:
    """{"type", "question", "answer"} of `record`: its label map's questions, then its stored ones
    not among them."""
    out = grounding.questions(grounding.facts(record.label_map, names), names) if labelled(record) else []
    known = {(q["question"], q["answer"]) for q in out}
    return out + [dict(q) for q in record.questions if (q["question"], q["answer"]) not in known]


# ---- a data set's images -------------------------------------------------------------------------
@dataclasses.dataclass
class Image:
    index: int               # the record's index in the data set
    record: schema.Record    # as stored (full resolution)
    vision: np.ndarray       # (S, D) the encoder's last-stage tokens of the whole image


@functools.partial(nnx.jit, static_argnames=("modality",))
def _vision_tokens(model, pixels, modality: str):
    return model.vision_tokens({modality: {"pixels": pixels}})[modality]


def encoded_images(model, config, data_dir: str, modality: str, *, batch_size: int = 32,
                   max_records: int | None = None) -> Iterator[list[Image]]:
    """The records of `data_dir` carrying `modality`, in record order, in batches of up to
    `batch_size`, with their vision tokens (`eval.features.image_batches`: whole image, resized and
    normalised as in training, one compiled encoder shape); at most `max_records` of them."""
    import grain
    from ringmoe.eval.features import image_batches
    source = grain.sources.ArrayRecordDataSource(shards.shard_paths(data_dir))
    seen = 0
    for pixels, n, rows in image_batches(config, data_dir, modality, batch_size):
        n = min(n, max_records - seen) if max_records is not None else n
        tokens = np.asarray(_vision_tokens(model, pixels, modality))
        images = []
        for i in range(n):
            index = int(rows["record_index"][i])
            where = f"{data_dir} record {index}"
            images.append(Image(index, schema.decode(source[index], where), tokens[i]))
        seen += n
        if images:
            yield images
        if max_records is not None and seen >= max_records:
            return


def records_with(manifest: dict, modality: str, max_records: int | None) -> int:
    """How many records an evaluation of `modality` visits (for progress and ETA)."""
    total = int(manifest["modalities"].get(modality, {}).get("records", manifest["records"]))
    return total if max_records is None else min(total, max_records)


class Progress:
    """'WHAT done/total (pct) | rate UNIT/s | ETA h:mm:ss' on stderr, at most every `every` seconds."""

    def __init__(self, what: str, total: int, unit: str = "images", every: float = 2.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.start = self.last = time.time()
        self.done = 0

    def update(self, count: int) -> None:
        self.done += count
        now = time.time()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        eta_text = "?" if not math.isfinite(eta) else str(datetime.timedelta(seconds=int(round(max(eta, 0)))))
        print(f"{self.what} {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%) | "
              f"{rate:.1f} {self.unit}/s | ETA {eta_text}", file=sys.stderr, flush=True)


# ---- router statistics ----------------------------------------------------------------------------
class RouterCounts:
    """Rows of each sub-task kind whose top expert was each expert."""

    def __init__(self, kinds: Sequence[str], experts: int):
        self.kinds, self.experts = list(kinds), experts
        self.counts = {k: np.zeros(experts, np.int64) for k in self.kinds}

    def add(self, kind: str, expert: int) -> None:
        if kind not in self.counts:
            self.kinds.append(kind)
            self.counts[kind] = np.zeros(self.experts, np.int64)
        self.counts[kind][int(expert)] += 1

    def shares(self) -> dict[str, list[float]]:
        """{kind: [share of its rows per expert]} for kinds with rows."""
        return {k: (c / c.sum()).round(4).tolist() for k, c in self.counts.items() if c.sum()}

    def information(self) -> float:
        """How much the expert tells about the kind: I(kind; expert) / H(kind) over the counted rows,
        1 when each kind has experts of its own (the experts specialise by kind), 0 when every kind
        is split over the experts in the same proportions (or one expert takes all)."""
        joint = np.array([c for c in self.counts.values() if c.sum()], np.float64)
        joint /= joint.sum()
        kind, expert = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        entropy = -np.sum(kind * np.log(kind))
        if entropy <= 0:
            return 0.0
        nz = joint > 0
        return float(np.sum(joint[nz] * np.log(joint[nz] / (kind * expert)[nz])) / entropy)

    def table(self) -> str:
        """A markdown table: one row per kind (its row count, then each expert's share)."""
        head = "| kind | rows | " + " | ".join(f"e{j}" for j in range(self.experts)) + " |"
        lines = [head, "|" + "---|" * (self.experts + 2)]
        for kind, c in self.counts.items():
            if c.sum():
                lines.append(f"| {kind} | {int(c.sum())} | " + " | ".join(f"{v / c.sum():.2f}" for v in c) + " |")
        return "\n".join(lines)

    def save_heatmap(self, path: str, title: str) -> str:
        """PNG: kinds x experts, colour = share of the kind's rows, each cell annotated."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        shares = self.shares()
        grid = np.array(list(shares.values()), np.float64).reshape(len(shares), self.experts)
        fig = Figure(figsize=(2.2 + 0.7 * self.experts, 1.2 + 0.45 * max(len(shares), 1)))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.08, pad=0.03, label="share of rows")
        ax.set_xticks(range(self.experts), [f"e{j}" for j in range(self.experts)], fontsize=8)
        ax.set_yticks(range(len(shares)), list(shares), fontsize=8)
        ax.set_xlabel("top expert", fontsize=8)
        ax.set_title(title, fontsize=9)
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.6 else "white")
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
        return path
