"""Sharding by names: a device Mesh with axes (data, fsdp, tensor) and one rules table.

Every parameter and key activation carries logical axis names (model.py);
the rules below map them to mesh axes. The mesh shape alone selects the
parallelism, from the same rules:

  data:-1                 pure data parallelism (the default): params replicated
  data:2,fsdp:4           batch over all 8 devices, params sharded on `embed` over fsdp
  data:2,tensor:4         heads, feed-forward width and vocabulary split over tensor

Model code never mentions a device count.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transformer.config import ConfigError, ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. Parameters use `embed` for FSDP; activations keep
# their `embed` axis whole (their batch axis already uses fsdp).
PARAM_RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
)
ACTIVATION_RULES = tuple((name, None if name == "embed" else axes) for name, axes in PARAM_RULES)


def parse_mesh(spec: str, device_count: int) -> dict[str, int]:
    """'data:-1,tensor:2' -> {'data': 4, 'fsdp': 1, 'tensor': 2} for 8 devices.

    One axis may be -1 (all remaining devices); unnamed axes have size 1.
    """
    sizes = mesh_spec(spec)
    wildcard = [name for name, size in sizes.items() if size == -1]
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if wildcard:
        if device_count % fixed:
            raise ConfigError(f"mesh {spec!r} does not divide the {device_count} devices")
        sizes[wildcard[0]] = device_count // fixed
    if math.prod(sizes.values()) != device_count:
        raise ConfigError(
            f"mesh {spec!r} has {math.prod(sizes.values())} devices but there are "
            f"{device_count}; use -1 for one axis to take the rest"
        )
    return sizes


def mesh_spec(spec: str) -> dict[str, int]:
    """The axis sizes a --mesh value asks for (-1: the rest), whatever the devices."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    if not re.fullmatch(r"\s*\w+:-?\d+(\s*,\s*\w+:-?\d+)*\s*", spec or ""):
        raise ConfigError(f"mesh must look like 'data:-1,fsdp:1,tensor:1', got {spec!r}")
    given = [part.split(":") for part in spec.replace(" ", "").split(",")]
    for name, size in given:
        if name not in MESH_AXES:
            raise ConfigError(f"mesh axis {name!r} unknown; use {', '.join(MESH_AXES)}")
        sizes[name] = int(size)
    wildcard = [name for name, size in sizes.items() if size == -1]
    if len(wildcard) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ConfigError(f"mesh sizes must be positive, with at most one -1; got {spec!r}")
    return sizes


def check_divisibility(sizes: dict[str, int], model: ModelConfig, batch_rows: int) -> None:
    """Every sharded dimension must split evenly; say which one does not."""
    checks = [
        ("batch rows", batch_rows, sizes["data"] * sizes["fsdp"], "data x fsdp"),
        ("d_model", model.d_model, sizes["fsdp"], "fsdp"),
        ("num_heads", model.num_heads, sizes["tensor"], "tensor"),
        ("d_ff", model.d_ff, sizes["tensor"], "tensor"),
        ("vocab_size", model.vocab_size, sizes["tensor"], "tensor"),
    ]
    for what, value, parts, axes in checks:
        if value % parts:
            raise ConfigError(
                f"{what} ({value}) is not divisible by the {axes} mesh size ({parts})"
            )
    rows, processes = sizes["data"] * sizes["fsdp"], jax.process_count()
    if rows % processes:
        # Each process reads its own rows of a batch (transformer/data/pipeline.py).
        raise ConfigError(
            f"the data x fsdp mesh size ({rows}) is not a multiple of the {processes} "
            "processes, which each read their own rows; keep tensor parallelism within a "
            "host's devices"
        )


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
    """A Mesh over all (global) devices with the axes of MESH_AXES."""
    devices = jax.devices() if devices is None else devices
    shape = tuple(sizes[name] for name in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - unusual topologies: fall back to device order
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_shardings(mesh: Mesh, logical_specs: Any, rules=PARAM_RULES) -> Any:
    """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch are split over the data and fsdp axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(
    mesh: Mesh, batch: dict[str, np.ndarray] | np.ndarray, *, process_local: bool = True
) -> dict[str, jax.Array] | jax.Array:
    """A batch (a dict of [R, ...] arrays, or one) -> global arrays, rows split over (data, fsdp).

    process_local=True (training): each process holds only its own rows, and
    the global batch is the processes' rows in process order. False (evaluation,
    translation): every process holds the same whole batch; each device takes
    its rows from it.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:  # the same arrays; one call moves every leaf (half the time)
        return jax.device_put(batch, sharding)

    def place(rows: np.ndarray) -> jax.Array:
        global_shape = None if process_local else rows.shape  # None: inferred from the mesh
        return jax.make_array_from_process_local_data(sharding, rows, global_shape)

    return jax.tree.map(place, batch)


def batch_placer(
    mesh: Mesh, *, process_local: bool = True
) -> Callable[[dict[str, np.ndarray]], Any]:
    """A host batch -> what the jitted training step is given.

    Global arrays on the devices (`global_batch`), put there while the previous
    step runs; on a single CPU process, the numpy arrays themselves: a CPU's
    devices are this host's memory, so there is no transfer to overlap, and the
    step's jit copies numpy arguments into their sharding in C++, which takes
    the host less time than a `device_put` (docs/performance.md). Whatever times
    the step for a run must give it batches the same way, or it compiles twice.
    """
    if jax.process_count() == 1 and mesh.devices.flat[0].platform == "cpu":
        return lambda batch: batch
    return functools.partial(global_batch, mesh, process_local=process_local)


def sharded_init(
    init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh
) -> tuple[Any, Any]:
    """Runs `init_fn(rng)` straight into its shardings; returns (tree, shardings).

    `init_fn` returns a pytree whose leaves may be nn.LogicallyPartitioned
    (boxed with logical names). The shapes come from jax.eval_shape, so
    nothing is materialized on one device first.
    """
    shardings = abstract_init(init_fn, rng, mesh)[1]
    return jit_init(init_fn, shardings)(rng), shardings


def jit_init(init_fn: Callable[[jax.Array], Any], shardings: Any) -> Callable[[jax.Array], Any]:
    """rng -> init_fn(rng) unboxed, made straight into `shardings` (compiled once)."""

    def initial(rng):
        return nn.unbox(init_fn(rng))

    jitted = jax.jit(initial, out_shardings=shardings)

    def init(rng: jax.Array) -> Any:
        with nn.logical_axis_rules(ACTIVATION_RULES):
            return jitted(rng)

    return init


def abstract_init(
    init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh
) -> tuple[Any, Any]:
    """What `init_fn(rng)` would make, allocating nothing: (ShapeDtypeStructs that
    carry their shardings, the shardings). The structs are what a checkpoint is
    restored into; leaves of `init_fn` may be boxed with logical names."""
    boxed = jax.eval_shape(init_fn, rng)
    shardings = logical_shardings(mesh, nn.get_partition_spec(boxed))
    shapes = jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
        boxed,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
    return abstract, shardings
