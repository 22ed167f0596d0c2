"""RS-MoE as a task of the one trainer (`config.task = "rsmoe"`, `ringmoe.training.tasks`).

Two stages, two configs of the same loop (configs/rsmoe_tiny.py):
  stage 1  `vlm.num_experts = 1`: one dense LM tuned on every sub-task, on the encoder
           read from `vlm.encoder` (a pretraining run or saved model; frozen by default);
  stage 2  `vlm.num_experts = K`, `vlm.init_from` = the stage-1 run: its final state's
           parameters start this run, the LM copied into every expert and the router's
           per-expert prompt tables likewise (`upcycled`), the router's gate fresh; a fresh
           optimiser and data stream (as `tools.upcycle` starts an upcycled vision MoE).
A checkpoint of the run itself always wins: a resumed stage 2 continues, never re-upcycles.

The tokenizer: `vlm.tokenizer` (an imported LM's tokenizer.json), else the workdir's own
tokenizer.json, else the stage-1 run's, else a byte-level BPE of `vlm.lm.vocab_size` tokens
trained on the data set's text (grounded captions and questions of every labelled record,
stored captions and questions) and saved in the workdir; a run and its resumptions read
one file.
"""
from __future__ import annotations

import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringmoe import flops
from ringmoe.data import grounding, schema, shards
from ringmoe.data.pipeline import Pipeline
from ringmoe.text import tokenizer as tokenizers
from ringmoe.vlm import examples
from ringmoe.vlm.model import TEXT_INPUTS, VisionLanguageModel

log = logging.getLogger("ringmoe.vlm")
CORPUS_RECORDS = 4096      # records whose text trains a tokenizer (the first ones of the data set)
CORPUS_PHRASINGS = 4       # captions drawn per labelled record for it (the templates' words)


class VisionLanguage:
    inputs = ("pixels", "valid", "record_index", *TEXT_INPUTS, "kind")
    balances_routers = False   # the encoder's routers are frozen with it
    pictures = False

    def __init__(self, config, workdir: str | None = None):
        self.config, self.workdir = config, workdir
        self.frozen = ("encoder",) if config.vlm.freeze_encoder else ()
        self.loaded = ("encoder",) if config.vlm.encoder or config.vlm.init_from else ()   # start() reads it
        self._tokenizer = None

    @staticmethod
    def build(config, rngs) -> nnx.Module:
        return VisionLanguageModel(config, rngs=rngs)

    # ---- text ------------------------------------------------------------------------------
    def tokenizer_json(self, data_dir: str) -> str:
        """The run's tokenizer as JSON text (module doc for where it comes from)."""
        if self._tokenizer is None:
            self._tokenizer = self._resolve_tokenizer(data_dir)
            tok = tokenizers.Tokenizer.from_str(self._tokenizer)
            if tok.get_vocab_size() > self.config.vlm.lm.vocab_size:
                raise ValueError(f"the tokenizer has {tok.get_vocab_size()} tokens, more than config "
                                 f"vlm.lm.vocab_size = {self.config.vlm.lm.vocab_size}")
        return self._tokenizer

    def _resolve_tokenizer(self, data_dir: str) -> str:
        v = self.config.vlm
        own = os.path.join(self.workdir, tokenizers.TOKENIZER_FILE) if self.workdir else ""
        stage1 = os.path.join(v.init_from, tokenizers.TOKENIZER_FILE) if v.init_from else ""
        found = v.tokenizer or next((p for p in (own, stage1) if p and os.path.isfile(p)), "")
        if found:
            text = tokenizers.load_tokenizer(found).to_str()
        else:
            log.info("training a %d-token byte-level BPE on the text of %s", v.lm.vocab_size, data_dir)
            text = tokenizers.train_tokenizer(corpus(data_dir), v.lm.vocab_size).to_str()
        if own and not os.path.isfile(own) and jax.process_index() == 0:
            os.makedirs(self.workdir, exist_ok=True)
            with open(own, "w") as f:
                f.write(text)
        return text

    def text_tasks(self, data_dir: str, seed: int) -> examples.TextTasks:
        v = self.config.vlm
        text = self.tokenizer_json(data_dir)
        pad, end = tokenizers.special_ids(tokenizers.Tokenizer.from_str(text))
        names = tuple(shards.read_manifest(data_dir).get("label_names", ()))
        return examples.TextTasks(text, names, v.subtasks_per_image, v.instruction_length, v.answer_length, seed,
                                  pad_id=pad, end_id=end)

    def pipeline(self, config, **kwargs) -> Pipeline:
        data_dir = kwargs.get("data_dir") or config.data_dir
        seed = config.seed if kwargs.get("seed") is None else kwargs["seed"]
        return Pipeline(config, text=self.text_tasks(data_dir, seed), **kwargs)

    # ---- loss --------------------------------------------------------------------------------
    def loss_fn(self, graphdef, norm_stats: dict):
        v = self.config.vlm

        def loss_fn(params, batch):
            model = nnx.merge(graphdef, params)
            total, metrics = model.loss(batch, balance_weight=v.load_balance_weight, z_weight=v.z_loss_weight)
            kinds = jnp.concatenate([b["kind"] for b in batch.values()], 0).reshape(-1)
            return total, (scalar_terms(metrics, kinds), {})
        return loss_fn

    # ---- start -------------------------------------------------------------------------------
    def start(self, state, mesh):
        """The step-0 state: stage 1's parameters upcycled (`vlm.init_from`), or the encoder read
        from `vlm.encoder`; the optimiser's moments are zeros either way and stay valid."""
        from ringmoe.model.checkpoint import load_pretrained
        v = self.config.vlm
        if v.init_from:
            source_config, source, step = load_pretrained(v.init_from)
            if source_config.get("task") != "rsmoe":
                raise ValueError(f"vlm.init_from {v.init_from}: a {source_config.get('task', 'pretrain')!r} run, "
                                 "not an RS-MoE one")
            values = upcycled(named(nnx.state(source, nnx.Param)), named(state.params), v.num_experts)
            log.info("stage 2 from %s step %d: %d experts upcycled from its %d", v.init_from, step,
                     v.num_experts, source_config.vlm.num_experts)
        elif v.encoder:
            source_config, source, step = load_pretrained(v.encoder)
            if source_config.get("task", "pretrain") != "pretrain":
                raise ValueError(f"vlm.encoder {v.encoder}: not a RingMoE encoder (task {source_config.task!r})")
            saved, wanted = (json.loads(c.model.to_json()) for c in (source_config, self.config))
            differ = [k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
            if differ:
                raise ValueError(f"vlm.encoder {v.encoder}: its model differs from config.model in {differ}")
            values = {f"encoder/{k}": x for k, x in named(nnx.state(source, nnx.Param)).items()}
            log.info("encoder from %s step %d", v.encoder, step)
        else:
            log.warning("vlm.encoder is empty: the encoder is RANDOMLY initialised (tests only)")
            return state
        unfilled = [k for k in named(state.params) if k.split("/")[0] in self.loaded and k not in values]
        if unfilled:   # left at the initialiser's zeros otherwise
            raise ValueError(f"{v.init_from or v.encoder}: holds no {', '.join(unfilled[:5])}"
                             + (f" and {len(unfilled) - 5} more" if len(unfilled) > 5 else ""))
        return state._replace(params=replace(state.params, values))

    # ---- figures -----------------------------------------------------------------------------
    def flops_per_step(self, global_batch: dict) -> float:
        """The encoder's forward pass (frozen: no backward) plus 6 x the LM parameters each answer
        and prompt token passes through (top_k experts, the capacity's padding slots included);
        the query transformer and attention's quadratic term are left out (small at these lengths)."""
        v, images = self.config.vlm, sum(global_batch.values())
        encoder = flops.model_flops_per_step(self.config.model, global_batch, training=not v.freeze_encoder)
        from ringmoe.text.llama import LMSpec, parameter_counts
        lm = parameter_counts(LMSpec.from_config(v.lm))["total"]
        rows = images * v.subtasks_per_image
        slots = v.num_experts * min(rows, math.ceil(v.capacity_factor * rows * v.top_k / v.num_experts))
        return encoder + 6.0 * lm * slots * self.sequence_length()

    def sequence_length(self) -> int:
        """Tokens an expert reads per sub-task: the visual prefix (queries, or every vision token),
        the prompt, the instruction and the answer."""
        v, m = self.config.vlm, self.config.model
        grid, depth = m.image_size // m.patch_size, len(m.depths)
        stages = {stage % depth for stage in v.vision_stages}
        tokens = sum((grid // 2 ** stage) ** 2 for stage in stages)
        visual = v.num_queries if v.projector == "qformer" else tokens
        return visual + v.prompt_length + v.instruction_length + v.answer_length

    def tokens_per_step(self, global_batch: dict) -> int:
        return sum(global_batch.values()) * self.config.vlm.subtasks_per_image * self.sequence_length()


def scalar_terms(metrics: dict, kinds: jax.Array) -> dict:
    """RSMoE.loss metrics as scalars: the losses, `dropped`, `expert_load/e<j>` and, per sub-task kind,
    `route/<kind>/e<j>`: how many of the batch's rows of that kind have expert j on top (the
    counts `tools.caption` sums over a test set into which expert takes which aspect)."""
    out = {k: metrics[k] for k in ("answer_nll", "load_balance", "z_loss", "dropped")}
    experts = metrics["expert_load"].shape[0]
    out.update({f"expert_load/e{j}": metrics["expert_load"][j] for j in range(experts)})
    top = metrics["top_expert"]
    for i, kind in enumerate(examples.KINDS):
        for j in range(experts):
            out[f"route/{kind}/e{j}"] = ((kinds == i) & (top == j)).sum().astype(jnp.float32)
    return out


def corpus(data_dir: str, limit: int = CORPUS_RECORDS):
    """The text a tokenizer for `data_dir` learns from: the instructions, and for each of the first
    `limit` records its grounded captions (`CORPUS_PHRASINGS` draws) and questions, and stored text."""
    import grain
    manifest = shards.read_manifest(data_dir)
    names = tuple(manifest.get("label_names", ()))
    source = grain.sources.ArrayRecordDataSource(shards.checked_shard_paths(data_dir, manifest))
    yield from examples.CAPTION.values()
    for index in range(min(limit, len(source))):
        record = schema.decode(source[index], f"{data_dir} record {index}")
        if record.label_map is not None and (record.label_map > 0).any():
            facts = grounding.facts(record.label_map, names)
            rng = np.random.default_rng([0, index])
            yield from (grounding.caption(facts, rng) for _ in range(CORPUS_PHRASINGS))
            yield from (f"{q['question']} {q['answer']}" for q in grounding.questions(facts, names))
        yield from record.captions
        yield from (f"{q['question']} {q['answer']}" for q in record.questions)


def named(params) -> dict:
    """{'a/b/c': array} of a parameter state."""
    return {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(params)}


# Parameters with a leading expert axis that stage 2 fills with copies of stage 1's single entry.
EXPERT_STACKED = ("rsmoe/experts/", "rsmoe/router/base", "rsmoe/router/film")
FRESH = ("rsmoe/router/gate",)   # K columns where stage 1 had one: nothing to copy


def upcycled(source: dict, target: dict, experts: int) -> dict:
    """Target values from a stage-1 state (module doc): equal shapes copied, expert-stacked ones
    tiled from the source's one expert, the gate left fresh; ValueError naming every parameter
    that fits none of these."""
    out, problems = {}, []
    for path, value in target.items():
        if path.startswith(FRESH) and path in source and source[path].shape != value.shape:
            continue
        if path not in source:
            problems.append(f"{path}: not in the stage-1 run")
        elif source[path].shape == value.shape:
            out[path] = source[path]
        elif path.startswith(EXPERT_STACKED) and source[path].shape == (1, *value.shape[1:]):
            out[path] = np.repeat(np.asarray(source[path]), experts, 0)
        else:
            problems.append(f"{path}: stage 1 has {tuple(source[path].shape)}, this run {tuple(value.shape)}")
    if problems:
        raise ValueError("cannot upcycle the stage-1 run: " + "; ".join(problems[:8])
                         + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))
    return out


def replace(params, values: dict):
    """`params` (sharded) with the entries named in `values` replaced, each placed like the old one."""
    leaves = []
    for path, variable in nnx.to_flat_state(params):
        key = "/".join(map(str, path))
        old = variable[...]
        new = old if key not in values else jax.device_put(np.asarray(values[key], old.dtype), old.sharding)
        leaves.append((path, variable.replace(new)))
    return nnx.from_flat_state(leaves)
