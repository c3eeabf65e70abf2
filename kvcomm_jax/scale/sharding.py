"""Declarative sharding: a ``(data, model)`` mesh and one table of logical-axis rules.

Every pytree the library holds declares the *logical* axes of its arrays next to
its fields (a ``logical_axes`` class attribute: field name -> axis names; the
params take theirs from :func:`kvcomm_jax.model.params.param_logical_axes`).
:data:`LOGICAL_RULES` maps each logical name to a mesh axis or to ``None``
(replicated), and :func:`shardings_for` derives every ``NamedSharding`` from it,
so changing a layout is a one-line edit.

Rules and fallback:

* a dimension whose logical axis maps to a mesh axis is split over it only when
  the mesh axis divides it; otherwise that dimension is replicated (so a batch of
  1 on ``data=2``, or 9 KV heads on ``model=4``, still runs, just less spread);
* the fused ``heads * head_dim`` output of the q/k/v projections (and the input of
  ``o_proj``) is split only when the mesh axis divides the *head count*, so every
  device holds whole heads;
* a mesh axis is used at most once per array (the first dimension that claims it);
* the ``[V]`` bookkeeping of an anchor pool (lengths, valid, activations, ages) is
  replicated on purpose: it is written from the host's ``SlotBook``, the same on every process,
  and read back whole when a checkpoint is restored.

There is one code path with or without devices to spread over: "no mesh" is the
one-device mesh of :func:`single_device_mesh`. Arrays are placed once with
:func:`place`; jitted functions are plain ``jax.jit`` and computation follows the
data (XLA propagates the input layouts to the outputs), so each function is
jitted once and compiled once per (shapes, layouts).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from kvcomm_jax.model.config import ModelConfig
from kvcomm_jax.model.params import param_logical_axes, param_shapes

MESH_AXES = ("data", "model")

LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",
    "anchors": "data",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": "model",
    "layers": None,
    "embed": None,
    "tokens": None,
    "head_dim": None,
    "anchor_slots": None,  # [V] pool bookkeeping, written from the host's SlotBook
}


# ------------------------------------------------------------------------------ mesh


def parse_mesh_spec(spec: str, num_devices: int | None = None) -> dict[str, int]:
    """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}``; an omitted axis has size 1.

    Raises ValueError on malformed entries, unknown or repeated axis names,
    non-positive sizes, or a product different from ``num_devices`` (default: all
    devices, ``jax.device_count()``).
    """
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, sep, value = (part.strip() for part in entry.partition("="))
        if not sep or not name or not value:
            raise ValueError(f"mesh spec {spec!r}: entry {entry!r} is not of the form axis=size")
        if name not in sizes:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r} (known: {', '.join(MESH_AXES)})")
        if name in seen:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} is given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} is not an integer: {value!r}") from None
        if size < 1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be positive, got {size}")
        sizes[name] = size
        seen.add(name)
    num_devices = jax.device_count() if num_devices is None else num_devices
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh spec {spec!r}: {' x '.join(f'{k}={v}' for k, v in sizes.items())} = "
            f"{math.prod(sizes.values())} devices, but there are {num_devices}"
        )
    return sizes


def make_mesh(spec: str | Mapping[str, int], devices: Sequence | None = None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "model")`` over ``devices`` (default: all, across processes).

    ``spec`` is a string for :func:`parse_mesh_spec` or a dict of axis sizes. Axes
    are ``AxisType.Auto``: the compiler propagates shardings between the ones
    given at ``jax.jit`` boundaries.
    """
    devices = jax.devices() if devices is None else list(devices)
    if isinstance(spec, str):
        sizes = parse_mesh_spec(spec, len(devices))
    else:
        sizes = parse_mesh_spec(",".join(f"{k}={v}" for k, v in spec.items()), len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def single_device_mesh() -> Mesh:
    """The one-device mesh (``data=1, model=1`` over this process's first device): "no mesh"."""
    return make_mesh({"data": 1, "model": 1}, jax.local_devices()[:1])


# ------------------------------------------------------------------------------ rules


def logical_spec(names: Sequence[str], shape: Sequence[int], mesh: Mesh, units: Mapping[str, int] | None = None) -> PartitionSpec:
    """The ``PartitionSpec`` of an array of ``shape`` whose dimensions are the logical ``names``.

    ``units[name]`` is the size of one indivisible unit along that logical axis
    (``head_dim`` for a fused ``heads * head_dim`` dimension): the mesh axis must
    divide the number of units, else the dimension is replicated.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    units = units or {}
    used, spec = set(), []
    for name, size in zip(names, shape):
        axis = LOGICAL_RULES[name]
        unit = units.get(name, 1)
        if axis is None or axis in used or size % unit or (size // unit) % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec)


def logical_sharding(names, shape, mesh: Mesh, units=None) -> NamedSharding:
    """``NamedSharding`` of :func:`logical_spec`."""
    return NamedSharding(mesh, logical_spec(names, shape, mesh, units))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, RoPE tables, small tables)."""
    return NamedSharding(mesh, PartitionSpec())


def shardings_for(tree, mesh: Mesh):
    """A tree of ``NamedSharding`` with the structure of ``tree`` (arrays or ShapeDtypeStructs).

    Dataclass nodes with a ``logical_axes`` table give their array fields those axes;
    fields without an entry, and arrays outside such nodes, are replicated. Dicts,
    tuples and lists are walked.
    """

    def visit(node, axes=None):
        table = getattr(type(node), "logical_axes", None)
        if table is not None and dataclasses.is_dataclass(node):
            fields = [f.name for f in dataclasses.fields(node) if f.metadata.get("pytree_node", True)]
            return node.replace(**{name: visit(getattr(node, name), table.get(name)) for name in fields})
        if isinstance(node, dict):
            return {key: visit(value) for key, value in node.items()}
        if isinstance(node, (tuple, list)):
            return type(node)(visit(value) for value in node)
        shape = node.shape if hasattr(node, "shape") else np.shape(node)
        if axes is None or not shape:
            return replicated(mesh)
        return logical_sharding(axes, shape, mesh)

    return visit(tree)


def params_shardings(config: ModelConfig, mesh: Mesh) -> dict:
    """Shardings of the params pytree, from the parameter table's logical axes."""
    units = {"heads": config.head_dim, "kv_heads": config.head_dim}
    return jax.tree.map(
        lambda names, shape: logical_sharding(names, shape, mesh, units),
        param_logical_axes(config), param_shapes(config), is_leaf=lambda x: isinstance(x, tuple),
    )


def place(tree, mesh: Mesh, shardings=None):
    """Put every leaf of ``tree`` on ``mesh`` by the rules (or by ``shardings``); a no-op where it already is."""
    return jax.device_put(tree, shardings_for(tree, mesh) if shardings is None else shardings)


def bytes_per_device(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs) laid out by ``shardings``."""
    leaves, shards = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    return sum(
        math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x, s in zip(leaves, shards, strict=True)
    )
