"""Offset correction of a cache segment from anchor deltas (docs/design.md §7).

``out = base + sum_a w[a] * deltas[a, ..., :T, :]``, summed in float32 and cast once to
``base.dtype``. Weights are float32, per token ``[A, 1, 1, T, 1]`` (placeholder
matching) or per channel ``[A, L, H, 1, D]`` (prefix matching). Anchors with
``anchor_valid[a] == False`` contribute nothing, whatever their weights and deltas hold
(NaN included): they are dropped with ``where``, never multiplied by zero. Layer 0 is
never corrected: it comes back equal to ``base[0]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import Mesh

from pallas_kernels import dispatch, partitioned

# ----------------------------------------------------------------------------------------
# Reference (the spec)


def apply_correction_reference(base, deltas, weights, anchor_valid) -> jax.Array:
    """Reference ``apply_correction``: ``[L, H, T, D]`` in ``base.dtype``.

    The anchors are added one after another to a float32 copy of the base, in the
    kernel's order. The loop over the static A unrolls into one fused pass over the
    deltas; the same sum written as a reduction over the leading ``[A, ...]`` axis ran
    many times slower on a CPU (docs/benchmarks.md §1).
    """
    num_tokens = base.shape[2]
    out = base.astype(jnp.float32)  # [L, H, T, D]
    for a in range(deltas.shape[0]):
        d = deltas[a, :, :, :num_tokens, :].astype(jnp.float32)  # [L, H, T, D]
        out = out + jnp.where(anchor_valid[a], weights[a] * d, 0.0)  # weights[a]: [1, 1, T, 1] or [L, H, 1, D]
    return keep_layer0(out.astype(base.dtype), base)


def keep_layer0(out: jax.Array, base: jax.Array) -> jax.Array:
    """``out [L, H, T, D]`` with layer 0 taken from ``base``."""
    return out.at[0].set(base[0])


# ----------------------------------------------------------------------------------------
# Kernel pieces (shared with the fused kernel)


def correction_specs(
    blocking: dispatch.TokenBlocking, num_anchors: int, weights_shape, head_dim: int
) -> list[pl.BlockSpec]:
    """Block specs of ``correction_inputs`` for grid step (t, l, h).

    anchor_valid ``[A, 1, 1]`` whole; weights ``[A, bt, 1]`` (per token) or ``[A, 1, D]``
    (per channel); deltas ``[A, bt, D]``.
    """
    sq, bt = pl.squeezed, blocking.block
    if weights_shape[-1] == 1:
        weights = pl.BlockSpec((num_anchors, sq, sq, bt, 1), lambda t, l, h: (0, 0, 0, t, 0))
    else:
        weights = pl.BlockSpec(
            (num_anchors, sq, sq, 1, head_dim), lambda t, l, h: (0, l, h, 0, 0)
        )
    deltas = pl.BlockSpec(
        (num_anchors, sq, sq, bt, head_dim), lambda t, l, h: (0, l, h, t, 0)
    )
    return [dispatch.whole_spec((num_anchors, 1, 1)), weights, deltas]


def correction_inputs(deltas, weights, anchor_valid) -> list[jax.Array]:
    """Kernel inputs for a correction: ``[anchor_valid [A, 1, 1] int32, weights, deltas]``."""
    valid = anchor_valid.astype(jnp.int32)[:, None, None]  # [A, 1, 1]
    return [valid, weights, deltas]


def add_correction(accs, column_groups, correction_refs, row_mask):
    """Adds the anchors' weighted deltas to float32 accumulators of one block.

    ``accs``: one float32 ``[bt, C]`` array per entry of ``column_groups`` (static slices
    of the D columns). ``correction_refs`` are the refs of ``correction_inputs``. On layer
    0 (grid axis 1) the anchor loop runs zero times, so ``accs`` come back unchanged.
    """
    valid_ref, w_ref, d_ref = correction_refs
    per_token = w_ref.shape[-1] == 1
    num_anchors = jnp.minimum(pl.program_id(1), 1) * d_ref.shape[0]  # 0 on layer 0, else A

    def anchor(a, accs):
        keep = valid_ref[a] != 0  # [1, 1]
        if per_token:
            w_token = dispatch.load(w_ref.at[a], row_mask)  # [bt, 1]
        out = []
        for acc, cols in zip(accs, column_groups):
            d = dispatch.load(d_ref.at[a, :, cols], row_mask).astype(jnp.float32)  # [bt, C]
            w = w_token if per_token else w_ref[a, :, cols]  # [bt, 1] or [1, C]
            out.append(acc + jnp.where(keep, w * d, 0.0))
        return tuple(out)

    return jax.lax.fori_loop(0, num_anchors, anchor, tuple(accs))


def _correction_kernel(valid_ref, w_ref, d_ref, base_ref, o_ref, *, blocking):
    """One ``[bt, D]`` block of one (layer, head)."""
    _, row_mask = dispatch.block_rows(blocking)
    base = dispatch.load(base_ref, row_mask).astype(jnp.float32)  # [bt, D]
    (out,) = add_correction((base,), (slice(None),), (valid_ref, w_ref, d_ref), row_mask)
    dispatch.store(o_ref, out.astype(o_ref.dtype), row_mask)


def _apply_correction_pallas(base, deltas, weights, anchor_valid, *, target, block_tokens):
    """Pallas ``apply_correction`` for ``target`` "tpu", "gpu" or "interpret"."""
    _, _, num_tokens, head_dim = base.shape
    blocking = dispatch.token_blocking(num_tokens, block_tokens, target)
    return dispatch.launch(
        functools.partial(_correction_kernel, blocking=blocking),
        target=target,
        blocking=blocking,
        in_specs=[
            *correction_specs(blocking, deltas.shape[0], weights.shape, head_dim),
            dispatch.segment_spec(blocking, head_dim),
        ],
        out_shape=jax.ShapeDtypeStruct(base.shape, base.dtype),
        inputs=[*correction_inputs(deltas, weights, anchor_valid), base],
        name="apply_correction",
    )


# ----------------------------------------------------------------------------------------
# Public entry point

# (base, deltas, weights, anchor_valid) on a mesh: heads over model, anchors over data.
CORRECTION_LAYOUT = partitioned.Layout(
    axes=(
        partitioned.SEGMENT, partitioned.ANCHOR_STACK, partitioned.ANCHOR_STACK,
        partitioned.ANCHORS,
    ),
    keep=lambda out, base, *_: keep_layer0(out, base),
)


@functools.partial(jax.jit, static_argnames=("impl", "block_tokens", "mesh"))
def apply_correction(
    base: jax.Array,
    deltas: jax.Array,
    weights: jax.Array,
    anchor_valid: jax.Array,
    *,
    impl: str = "auto",
    block_tokens: int = dispatch.DEFAULT_BLOCK_TOKENS,
    mesh: Mesh | None = None,
) -> jax.Array:
    """``base [L, H, T, D] + sum_a w[a] * deltas[a, :, :, :T]`` with layer 0 kept.

    ``deltas``: ``[A, L, H, Td, D]``, Td >= T (only the first T tokens are read);
    ``weights``: float32 ``[A, 1, 1, T, 1]`` or ``[A, L, H, 1, D]``; ``anchor_valid``:
    bool ``[A]``. ``mesh``: the kernel runs per device of it, heads over ``model`` and
    anchors over ``data`` (``None``: one device). Returns ``[L, H, T, D]`` in ``base.dtype``.
    """
    dispatch.check_correction(base, deltas, weights, anchor_valid)
    return dispatch.run(
        apply_correction_reference, _apply_correction_pallas, (base, deltas, weights, anchor_valid),
        impl=impl, block_tokens=block_tokens, mesh=mesh, layout=CORRECTION_LAYOUT,
    )
