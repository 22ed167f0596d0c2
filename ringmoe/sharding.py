"""One way to build a device mesh, and one table mapping logical axes to it.

Every parameter is created with logical axis names (`partitioned`), and large
activations are annotated with `constrain`. `LOGICAL_RULES` is the only place
that says which mesh axis a logical axis lives on, so changing the parallelism
layout never touches model code.

Mesh axes:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters sharded along their `embed` dim
  expert  expert parallelism: experts split across devices, tokens sent by all-to-all
  tensor  tensor parallelism over FFN hidden units and attention heads
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes). Unlisted names are replicated.
# The token batch is split over every data-like axis, including `expert`: the
# expert axis holds different tokens on each device until the MoE all-to-all.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_expert", "expert"),
)


def partitioned(init, *names: str | None):
    """Wraps a Flax initializer so the parameter carries logical axis names.

    Sharding is applied when the state is created under `jax.jit` with
    `state_shardings(...)` as `out_shardings`, never eagerly at construction, so
    the same module can be built abstractly with no mesh at all.
    """
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def logical_to_mesh(names: Sequence[str | None] | None, rules=LOGICAL_RULES) -> PartitionSpec:
    """Translates logical axis names to a mesh PartitionSpec.

    A mesh axis already used by an earlier dimension is dropped from later ones
    (e.g. the dispatched expert buffer (expert, batch, ...) keeps `expert` for the
    expert dim and splits the batch over the remaining data axes).
    """
    if names is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
    """Resolves the configured axis sizes; at most one may be -1 (inferred)."""
    sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
    unknown = [a for a, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {unknown}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices not divisible by fixed axes {sizes}")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh: axis sizes {sizes} need {math.prod(sizes.values())} devices, have {num_devices}")
    return sizes


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, expert, tensor) mesh described by `config.mesh`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def _variable_names(variable) -> tuple | None:
    metadata = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    return metadata.get("out_sharding", metadata.get("sharding_names"))


def state_shardings(state, mesh: Mesh) -> object:
    """NamedShardings for an nnx State (abstract or concrete), from its logical names.

    The result has the state's exact tree structure (each Variable keeps its place,
    holding a NamedSharding), so it can be zipped with the state or used as jit
    in/out shardings.
    """
    return jax.tree.map(
        lambda v: v.replace(NamedSharding(mesh, logical_to_mesh(_variable_names(v)))),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def cast_sharded(variable: nnx.Variable, dtype) -> jax.Array:
    """The variable's value in `dtype`, pinned to the variable's own sharding.

    Under FSDP a matmul needs the whole weight; pinning the cast copy to the
    parameter's layout makes GSPMD gather the (bfloat16) cast rather than the
    float32 master: half the bytes moved and held. Outside a mesh, or for a
    variable without logical names, a plain cast.
    """
    value = variable[...].astype(dtype)
    names = _variable_names(variable)
    return value if names is None else constrain(value, *names)


def stack_sharded(variables: Sequence[nnx.Variable], dtype) -> jax.Array:
    """`cast_sharded` of variables of one shape and layout, stacked on a new leading axis
    (unsharded): the cast copies are made and pinned as one array."""
    value = jnp.stack([v[...].astype(dtype) for v in variables])
    names = _variable_names(variables[0])
    return value if names is None else constrain(value, None, *names)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Annotates an activation with logical axes; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh(names))
