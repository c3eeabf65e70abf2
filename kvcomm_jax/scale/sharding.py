"""Declarative sharding: a ``(data, model)`` mesh, one table of logical-axis rules, sharded jits.

Every array the engine holds gets a tuple of *logical* axis names (below), and
:data:`LOGICAL_RULES` maps each logical name to a mesh axis or to ``None``
(replicated). Params, KV caches, segments and anchor pools all derive their
``NamedSharding`` from that one table, so changing a layout is a one-line edit.

Rules and fallback:

* a dimension whose logical axis maps to a mesh axis is split over it only when
  the mesh axis divides it; otherwise that dimension is replicated (so a batch of
  1 on ``data=2``, or 9 KV heads on ``model=4``, still runs, just less spread);
* the fused ``heads * head_dim`` output of the q/k/v projections (and the input of
  ``o_proj``) is split only when the mesh axis divides the *head count*, so every
  device holds whole heads;
* a mesh axis is used at most once per array (the first dimension that claims it);
* the ``[V]`` bookkeeping of an anchor pool (lengths, valid, activations, ages) is
  replicated on purpose: the host reads it on every call (slot choice, usability),
  which needs every process to hold all of it.

The jitted wrappers at the end (:func:`forward`, :func:`correct_segments`,
:func:`record_deltas`) run the existing functions under
``jax.jit(in_shardings=..., out_shardings=...)`` so results stay spread over the
mesh instead of being gathered to one device; :func:`insert_anchor` keeps the
pool's own jitted write (the slot choice happens on the host) and re-lays out
the grown result. JAX caches the compiled program per
(function, shapes, shardings), so calling a wrapper again does not recompile.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from kvcomm_jax.kvcomm import anchor_pool, reuse
from kvcomm_jax.kvcomm.anchor_pool import AnchorPool
from kvcomm_jax.kvcomm.reuse import PlaceholderInputs
from kvcomm_jax.kvcomm.segments import SegmentKV
from kvcomm_jax.model import transformer as model_lib
from kvcomm_jax.model.config import ModelConfig, param_shapes
from kvcomm_jax.model.kv_cache import KVCache

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
    "anchor_slots": None,  # [V] pool bookkeeping, read on the host
}

# Logical axes of every params leaf, by path (see model_config.param_shapes).
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed/embedding": ("vocab", "embed"),
    "lm_head/kernel": ("embed", "vocab"),
    "final_norm/scale": ("embed",),
    "layers/attn_norm/scale": ("layers", "embed"),
    "layers/mlp_norm/scale": ("layers", "embed"),
    "layers/attn/q_proj/kernel": ("layers", "embed", "heads"),
    "layers/attn/q_proj/bias": ("layers", "heads"),
    "layers/attn/k_proj/kernel": ("layers", "embed", "kv_heads"),
    "layers/attn/k_proj/bias": ("layers", "kv_heads"),
    "layers/attn/v_proj/kernel": ("layers", "embed", "kv_heads"),
    "layers/attn/v_proj/bias": ("layers", "kv_heads"),
    "layers/attn/o_proj/kernel": ("layers", "heads", "embed"),
    "layers/attn/q_norm/scale": ("layers", "head_dim"),
    "layers/attn/k_norm/scale": ("layers", "head_dim"),
    "layers/mlp/gate_proj/kernel": ("layers", "embed", "mlp"),
    "layers/mlp/up_proj/kernel": ("layers", "embed", "mlp"),
    "layers/mlp/down_proj/kernel": ("layers", "mlp", "embed"),
}
KV_AXES = ("layers", "batch", "kv_heads", "tokens", "head_dim")  # KVCache keys/values
SEGMENT_AXES = ("layers", "kv_heads", "tokens", "head_dim")  # SegmentKV keys/values
ANCHOR_AXES = ("anchors", "layers", "kv_heads", "tokens", "head_dim")  # pool / delta stacks
SLOT_AXES = ("anchor_slots",)  # [V] pool bookkeeping


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
    """Every device holds the whole array (scalars, ``inv_freq``, small tables)."""
    return NamedSharding(mesh, PartitionSpec())


def params_shardings(config: ModelConfig, mesh: Mesh) -> dict:
    """Shardings of the params pytree (same structure as ``param_shapes(config)``)."""
    units = {"heads": config.head_dim, "kv_heads": config.head_dim}

    def leaf(path, shape):
        key = "/".join(p.key for p in path)
        if key not in PARAM_AXES:
            raise KeyError(f"no logical axes for parameter {key!r}; add it to sharding.PARAM_AXES")
        return logical_sharding(PARAM_AXES[key], shape, mesh, units)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))


def cache_shardings(cache: KVCache | tuple[int, ...], mesh: Mesh) -> KVCache:
    """A :class:`KVCache` of shardings for ``cache`` (a KVCache of arrays or ShapeDtypeStructs, or its ``(L, B, H, S, D)``)."""
    shape = tuple(cache) if isinstance(cache, tuple) else cache.keys.shape
    kv = logical_sharding(KV_AXES, shape, mesh)
    batch, capacity = shape[1], shape[3]
    return KVCache(
        keys=kv,
        values=kv,
        positions=logical_sharding(("batch", "tokens"), (batch, capacity), mesh),
        lengths=logical_sharding(("batch",), (batch,), mesh),
    )


def segment_shardings(segment: SegmentKV, mesh: Mesh) -> SegmentKV:
    """A :class:`SegmentKV` of shardings: ``[L, H, T, D]`` KV heads over ``model``."""
    kv = logical_sharding(SEGMENT_AXES, segment.keys.shape, mesh)
    return SegmentKV(keys=kv, values=kv, length=replicated(mesh))


def _stack(x, mesh: Mesh) -> NamedSharding:
    return logical_sharding(ANCHOR_AXES, x.shape, mesh)


def _slots(x, mesh: Mesh) -> NamedSharding:
    return logical_sharding(SLOT_AXES, x.shape, mesh)


def pool_shardings(pool: AnchorPool, mesh: Mesh) -> AnchorPool:
    """An :class:`AnchorPool` of shardings: anchor stacks ``[V, L, H, T, D]`` over ``data`` x ``model``, ``[V]`` replicated."""
    consumers = {
        key: c.replace(
            placeholder_keys=_stack(c.placeholder_keys, mesh),
            placeholder_values=_stack(c.placeholder_values, mesh),
            prefix_keys=_stack(c.prefix_keys, mesh),
            prefix_values=_stack(c.prefix_values, mesh),
            present=_slots(c.present, mesh),
        )
        for key, c in pool.consumers.items()
    }
    return pool.replace(  # keeps the pool's static fields
        keys=_stack(pool.keys, mesh),
        values=_stack(pool.values, mesh),
        lengths=_slots(pool.lengths, mesh),
        valid=_slots(pool.valid, mesh),
        activations=_slots(pool.activations, mesh),
        ages=_slots(pool.ages, mesh),
        next_age=replicated(mesh),
        consumers=consumers,
    )


def placeholder_shardings(inputs: PlaceholderInputs, mesh: Mesh) -> PlaceholderInputs:
    """A :class:`~kvcomm_jax.kvcomm.reuse.PlaceholderInputs` of shardings (segments, anchor stacks, ``[V]`` masks)."""
    rep = replicated(mesh)
    return PlaceholderInputs(
        content=segment_shardings(inputs.content, mesh),
        prefix=segment_shardings(inputs.prefix, mesh),
        content_start=rep,
        prefix_start=rep,
        anchor_keys=_stack(inputs.anchor_keys, mesh),
        anchor_values=_stack(inputs.anchor_values, mesh),
        anchor_lengths=_slots(inputs.anchor_lengths, mesh),
        usable=_slots(inputs.usable, mesh),
        ph_keys=_stack(inputs.ph_keys, mesh),
        ph_values=_stack(inputs.ph_values, mesh),
        pf_keys=_stack(inputs.pf_keys, mesh),
        pf_values=_stack(inputs.pf_values, mesh),
    )


def shard(tree, shardings):
    """``jax.device_put(tree, shardings)``: place every leaf (also across processes; values must agree there)."""
    return jax.device_put(tree, shardings)


def bytes_per_device(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs) laid out by ``shardings``."""
    leaves, shards = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    return sum(
        math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x, s in zip(leaves, shards, strict=True)
    )


# ------------------------------------------------------------------------------ sharded jits


def _forward(params, tokens, positions, cache, num_new, config):
    return model_lib.forward(params, tokens, positions, cache, config, num_new)


def forward(params, tokens, positions, cache: KVCache, config: ModelConfig, mesh: Mesh, num_new=None):
    """:func:`kvcomm_jax.model.transformer.forward` with params, tokens ``[B, T]``, cache and logits laid out on ``mesh``.

    Returns ``(logits [B, T, V] float32, cache)``; logits are split over batch
    (``data``) and vocabulary (``model``), the cache keeps :func:`cache_shardings`.
    Inputs not yet on the mesh are moved there by the jit.
    """
    B, T = tokens.shape
    if num_new is None:
        num_new = jnp.full((B,), T, jnp.int32)
    cache_sh = cache_shardings(cache, mesh)
    rows = logical_sharding(("batch", "tokens"), (B, T), mesh)
    logits = logical_sharding(("batch", "tokens", "vocab"), (B, T, config.vocab_size), mesh)
    fn = jax.jit(
        _forward,
        static_argnums=5,
        in_shardings=(params_shardings(config, mesh), rows, rows, cache_sh, cache_sh.lengths),
        out_shardings=(logits, cache_sh),
    )
    return fn(params, tokens, positions, cache, num_new, config)


def _correct_segments(inputs, inv_freq, apply_offsets, impl):
    return reuse.correct_segments(inputs, inv_freq, apply_offsets=apply_offsets, impl=impl)


def correct_segments(inputs: tuple[PlaceholderInputs, ...], inv_freq, mesh: Mesh, *, apply_offsets: bool, impl: str = "auto"):
    """:func:`kvcomm_jax.kvcomm.reuse.correct_segments` with anchors over ``data`` and KV heads over ``model``.

    Returns one ``(content, prefix)`` pair of :class:`SegmentKV` per placeholder,
    each laid out by :func:`segment_shardings`. The Pallas kernels have no
    partitioning rule, so on a multi-device mesh use ``impl="reference"`` (with
    ``"pallas"`` XLA would gather the kernels' inputs).
    """
    in_sh = tuple(placeholder_shardings(p, mesh) for p in inputs)
    out_sh = tuple((segment_shardings(p.content, mesh), segment_shardings(p.prefix, mesh)) for p in inputs)
    fn = jax.jit(_correct_segments, static_argnums=(2, 3), in_shardings=(in_sh, replicated(mesh)), out_shardings=out_sh)
    return fn(inputs, inv_freq, apply_offsets, impl)


def insert_anchor(pool: AnchorPool, keys0, values, length: int, window: int, mesh: Mesh) -> tuple[AnchorPool, int]:
    """:func:`kvcomm_jax.kvcomm.anchor_pool.insert_anchor` on a pool laid out on ``mesh``. Returns ``(pool, slot)``.

    The slot is chosen on the host from the replicated ``[V]`` bookkeeping, and the
    pool's own jitted write runs on the devices holding its shards (the layout
    propagates through the update). Growing the slot or token axis changes shapes,
    so the result is put back on the rules' layout for its new shape (a no-op when
    it already is).
    """
    pool, slot = anchor_pool.insert_anchor(pool, keys0, values, length, window)
    return shard(pool, pool_shardings(pool, mesh)), slot


def record_deltas(pool: AnchorPool, slot: int, consumer: int, ph_keys, ph_values, pf_keys, pf_values, mesh: Mesh) -> AnchorPool:
    """:func:`kvcomm_jax.kvcomm.anchor_pool.record_deltas` under a jit that takes and returns the pool on ``mesh``.

    The pool is donated. A new consumer's delta stacks are created inside the jit,
    directly in their sharded layout (never whole on one device); the output
    layout is derived from the output's shapes by the same rules.
    """
    args = (pool, jnp.int32(slot), consumer, ph_keys, ph_values, pf_keys, pf_values)
    out = jax.jit(anchor_pool.record_deltas, static_argnums=2).eval_shape(*args)
    return jax.jit(
        anchor_pool.record_deltas,
        static_argnums=2,
        in_shardings=(pool_shardings(pool, mesh), None, None, None, None, None),
        out_shardings=pool_shardings(out, mesh),
        donate_argnums=0,
    )(*args)
