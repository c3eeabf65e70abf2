"""The kernels on a multi-device mesh: one ``jax.shard_map`` around any of them.

A ``pallas_call`` has no partitioning rule, so under ``jax.jit`` on a mesh XLA would
gather its inputs onto every device. :func:`shard` runs the kernel on each device's
blocks instead, laid out by the rule table of :mod:`kvcomm_jax.scale.sharding`; each
kernel describes its arguments with a :class:`Layout` of the logical axes below.

* KV heads (``kv_heads``) go over ``model`` and anchors (``anchors``) over ``data``, each
  only when the mesh axis divides the dimension, else replicated. Tokens, layers, head dim,
  positions, ``inv_freq`` and ``num_valid`` are replicated: the kernels compare token
  indices with ``num_valid`` and read ``inv_freq`` by layer, so they need whole axes.
* A mesh axis that splits an argument but not the output (``data``, when the anchors are
  split) is a sum. Every kernel is ``f(base + sum_a w[a] * deltas[a])`` with ``f`` linear
  (the identity or a rotation), so each shard runs the kernel in float32 on its anchors,
  with the base on the first shard and zeros on the others, and the partial results are
  ``psum``-ed, then cast to the base's dtype once. An all-reduce may turn a ``-0.0`` into
  ``0.0``, so what the kernel returns as the base, bit for bit (layer 0 of a correction,
  padded tokens), is then taken from the base again (``Layout.keep``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from kvcomm_jax.scale import sharding

SEGMENT = ("layers", "kv_heads", "tokens", "head_dim")  # base / keys [L, H, T, D]
ANCHOR_STACK = ("anchors", "layers", "kv_heads", "tokens", "head_dim")  # deltas, weights
ANCHORS = ("anchors",)  # anchor_valid [A]
TOKENS = ("tokens",)  # amounts / positions [T]
FREQUENCIES = ("layers", "head_dim")  # inv_freq [L, D/2]
SCALAR = ()  # num_valid


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a kernel's arguments lie on a mesh.

    axes: the logical axis names of each argument; the first argument is the
      ``[L, H, T, D]`` base (or keys), whose shape, dtype and layout the output has.
    keep: ``keep(out, *args)``, ``out [L, H, T, D]`` with what the kernel returns as the
      base taken from it again; run after a sum over anchors (``None``: no anchors).
    """

    axes: tuple[tuple[str, ...], ...]
    keep: Callable[..., jax.Array] | None = None


def shard(kernel: Callable, args: Sequence[jax.Array], layout: Layout, mesh: Mesh) -> jax.Array:
    """``kernel(*args)`` run per device of a ``(data, model)`` ``mesh`` under ``jax.shard_map``.

    ``kernel``: a kernel whose arguments ``layout`` describes and whose output has the
    base's shape and dtype. Returns ``[L, H, T, D]`` in the base's dtype, laid out like
    the base.
    """
    in_specs = tuple(
        sharding.logical_spec(names, jnp.shape(x), mesh)
        for names, x in zip(layout.axes, args, strict=True)
    )
    out_spec = in_specs[0]
    summed = tuple(
        axis for axis in mesh.axis_names
        if mesh.shape[axis] > 1
        and axis not in out_spec
        and any(axis in spec for spec in in_specs)
    )

    def body(base, *rest):  # this device's blocks: base [L, H_local, T, D]
        if not summed:
            return kernel(base, *rest)
        first = jax.lax.axis_index(summed) == 0
        own = jnp.where(first, base.astype(jnp.float32), 0.0)  # [L, H_local, T, D] float32
        out = jax.lax.psum(kernel(own, *rest), summed).astype(base.dtype)  # [L, H_local, T, D]
        return layout.keep(out, base, *rest)

    # check_vma=False: a pallas_call's out_shape carries no varying-axes type.
    return jax.shard_map(
        body, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False
    )(*args)
