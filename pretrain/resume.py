"""Which config changes a run may resume under, and the fingerprint of a run's config.

Every checkpoint holds the config it was trained under (meta 'config', the JSON of
`config.to_json()`). Resuming it under a config that changes the model, the data or
the objectives would silently mix two runs, so `check_resume` refuses that and names
each key with both values; the keys in `RESUME_ALLOWED` may change. `config_key` is a
hash of a config without the logging-only keys: `pretrain.ablate` keys each
finished point on it, so a changed grid or recipe trains the point again.
"""
from __future__ import annotations

import hashlib
import json
import os

# Dotted key paths whose change alters neither the trained weights nor any figure
# logged for a step: when (not what) is logged, evaluated, drawn or saved.
LOGGING_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "image_every", "pictures", "eval_every")

# The ONE list of keys a run may resume under with another value (a path covers every
# key below it). Everything else is refused, among it: data_dir (the pipeline's own
# check compares only the record count, not the records), eval_batches (eval/ losses would change
# meaning mid-curve), batch_size, grad_accum_steps, seed, optimizer.* and model.moe.dispatch.
RESUME_ALLOWED = LOGGING_KEYS + (
    "total_steps",            # a longer or shorter run; the cosine decay is re-laid over the new length (logged)
    "max_nonfinite_steps",    # guards: when a run stops, not what it computes
    "collective_timeout_s",
    "data.max_bad_records",
    "data.prefetch",          # buffering and read threads: the same batches in the same order
    "data.read_threads",
    "data.num_workers",       # like the process count: elastic resume, every record still read once per epoch
    "mesh",                   # checkpoints restore onto another mesh: the same numbers up to rounding
    "model.remat",            # what the backward pass recomputes: memory, not values
    "probe",                  # settings of later tools (evaluation, compression), unused here
    "compress",
    "upcycle",                # how tools.upcycle made the step-0 checkpoint: done before training starts
)

ABSENT = "<absent>"


class ConfigMismatchError(ValueError):
    """A checkpoint was trained under a config that differs in keys that may not change."""


def as_json(config) -> dict:
    """A ConfigDict as the JSON the checkpoint stores (tuples become lists)."""
    return json.loads(config.to_json())


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; an empty dict stays a leaf (so removing every entry shows)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def covered(path: str, keys: tuple[str, ...]) -> bool:
    return any(path == k or path.startswith(k + ".") for k in keys)


def differences(saved: dict, current: dict) -> dict[str, tuple]:
    """{dotted key: (saved value, current value)} for every key that differs (ABSENT if missing)."""
    a, b = flatten(saved), flatten(current)
    return {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, ABSENT) != b.get(k, ABSENT)}


def describe(diffs: dict[str, tuple]) -> str:
    return "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in diffs.items())


def check_resume(saved: dict, current: dict, where: str) -> dict[str, tuple]:
    """Returns the allowed differences between the checkpoint's config and this run's;
    ConfigMismatchError naming every other one. `where` names the checkpoint in the message."""
    diffs = differences(saved, current)
    refused = {k: v for k, v in diffs.items() if not covered(k, RESUME_ALLOWED)}
    if refused:
        raise ConfigMismatchError(
            f"{where} was trained under another config, and resuming it would mix two runs: {describe(refused)}. "
            "Use a new --workdir, or set these keys back (keys that may change on resume: "
            "pretrain/resume.py RESUME_ALLOWED)")
    return diffs


def config_key(config_json: dict) -> str:
    """SHA-256 of the canonical JSON of a config without its logging-only keys (LOGGING_KEYS)."""
    kept = {k: v for k, v in flatten(config_json).items() if not covered(k, LOGGING_KEYS)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def saved_config(workdir: str) -> dict | None:
    """The config of the newest readable checkpoint in `workdir`, or None (no checkpoints,
    or none that records its config)."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    from ringmoe.training.checkpoint import Checkpointer
    checkpointer = Checkpointer(workdir, keep=1, save_every=1)
    try:
        meta = checkpointer.latest_meta()
    finally:
        checkpointer.close()
    return None if meta is None else meta[1].get("config")
