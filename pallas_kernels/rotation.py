"""RoPE re-rotation of cached keys (docs/design.md §4).

The rotation is the model's (``kvcomm_jax.model.rope``): rotate-half, ``angle = amount *
inv_freq``, math in float32, one cast back to the input dtype. ``inv_freq`` is float32
``[L, D/2]``: row ``l`` holds the frequencies (any scaling already applied) of layer ``l``
of the ``[L, H, T, D]`` keys. Tokens ``t >= num_valid`` (padding) are returned
bit-identical.

The kernel's per-layer cos/sin tables ``[L, T, D/2]`` are computed once per call by XLA
(``rope_inputs``, with the function the reference uses); grid step (t, l, h) reads
the ``[bt, D/2]`` block of layer l, which costs ``4 L D`` bytes per token next to the
``2 L H D`` bytes of a bf16 key row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import Mesh

from kvcomm_jax.model.rope import apply_rope, cos_sin, rotate_halves
from pallas_kernels import dispatch, partitioned

# ----------------------------------------------------------------------------------------
# Reference (the spec)


def keep_padding(out: jax.Array, original: jax.Array, num_valid) -> jax.Array:
    """``out [..., T, D]`` with the tokens ``t >= num_valid`` taken from ``original``."""
    valid = jnp.arange(out.shape[-2])[:, None] < num_valid  # [T, 1]
    return jnp.where(valid, out, original)


def rotate_layers(x: jax.Array, amounts: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """``x [L, H, T, D]`` with token t of layer l rotated by ``amounts[t]`` at ``inv_freq[l]``."""
    return apply_rope(x, amounts, inv_freq[:, None, None, :])  # [L, 1, 1, D/2] frequencies


def rotate_keys_reference(keys, amounts, inv_freq, num_valid) -> jax.Array:
    """Reference ``rotate_keys``: ``keys [L, H, T, D]`` rotated per token, padding kept."""
    return keep_padding(rotate_layers(keys, amounts, inv_freq), keys, num_valid)


# ----------------------------------------------------------------------------------------
# Kernel pieces (shared with the fused kernel)


def rope_specs(blocking: dispatch.TokenBlocking, head_dim: int) -> list[pl.BlockSpec]:
    """Block specs of ``rope_inputs`` for grid step (t, l, h).

    num_valid ``[1, 1]`` whole; cos and sin ``[bt, D/2]``: token block t of layer l's table.
    """
    table = pl.BlockSpec(
        (pl.squeezed, blocking.block, head_dim // 2), lambda t, l, h: (l, t, 0)
    )
    return [dispatch.whole_spec((1, 1)), table, table]


def rope_inputs(amounts, inv_freq, num_valid) -> list[jax.Array]:
    """Kernel inputs for a rotation: ``[num_valid [1, 1] int32, cos, sin [L, T, D/2]]``."""
    cos, sin = cos_sin(amounts, inv_freq[:, None, :])  # [L, T, D/2] each
    return [jnp.reshape(num_valid, (1, 1)).astype(jnp.int32), cos, sin]


def load_halves(ref, row_mask):
    """The two halves ``[bt, D/2]`` of a ``[bt, D]`` block ref, in its dtype."""
    half = ref.shape[-1] // 2
    return (
        dispatch.load(ref.at[:, :half], row_mask),
        dispatch.load(ref.at[:, half:], row_mask),
    )


def store_rotated(o_ref, x1, x2, raw1, raw2, rope_refs, rows, row_mask) -> None:
    """Writes the rotation of float32 halves ``x1, x2 [bt, D/2]`` into ``o_ref [bt, D]``.

    Tokens at or past num_valid get ``raw1, raw2`` (the untouched input) instead.
    ``rope_refs`` are the refs of ``rope_inputs``; ``rows [bt, 1]`` the token indices.
    """
    nv_ref, cos_ref, sin_ref = rope_refs
    half = o_ref.shape[-1] // 2
    cos = dispatch.load(cos_ref, row_mask)  # [bt, D/2]
    sin = dispatch.load(sin_ref, row_mask)  # [bt, D/2]
    r1, r2 = rotate_halves(x1, x2, cos, sin)  # [bt, D/2] each
    valid = rows < nv_ref[...]  # [bt, 1]
    for cols, r, raw in ((slice(None, half), r1, raw1), (slice(half, None), r2, raw2)):
        out = jnp.where(valid, r.astype(o_ref.dtype), raw)  # [bt, D/2]
        dispatch.store(o_ref.at[:, cols], out, row_mask)


def _rotation_kernel(nv_ref, cos_ref, sin_ref, x_ref, o_ref, *, blocking):
    """One ``[bt, D]`` block of one (layer, head)."""
    rows, row_mask = dispatch.block_rows(blocking)
    raw1, raw2 = load_halves(x_ref, row_mask)  # [bt, D/2] each
    store_rotated(
        o_ref,
        raw1.astype(jnp.float32),
        raw2.astype(jnp.float32),
        raw1,
        raw2,
        (nv_ref, cos_ref, sin_ref),
        rows,
        row_mask,
    )


def _rotate_keys_pallas(keys, amounts, inv_freq, num_valid, *, target, block_tokens):
    """Pallas ``rotate_keys`` for ``target`` "tpu", "gpu" or "interpret"."""
    _, _, num_tokens, head_dim = keys.shape
    blocking = dispatch.token_blocking(num_tokens, block_tokens, target)
    return dispatch.launch(
        functools.partial(_rotation_kernel, blocking=blocking),
        target=target,
        blocking=blocking,
        in_specs=[*rope_specs(blocking, head_dim), dispatch.segment_spec(blocking, head_dim)],
        out_shape=jax.ShapeDtypeStruct(keys.shape, keys.dtype),
        inputs=[*rope_inputs(amounts, inv_freq, num_valid), keys],
        name="rotate_keys",
    )


# ----------------------------------------------------------------------------------------
# Public entry point

# (keys, amounts, inv_freq, num_valid) on a mesh: heads over model, the rest replicated.
ROTATION_LAYOUT = partitioned.Layout(
    axes=(partitioned.SEGMENT, partitioned.TOKENS, partitioned.FREQUENCIES, partitioned.SCALAR)
)


@functools.partial(jax.jit, static_argnames=("impl", "block_tokens", "mesh"))
def rotate_keys(
    keys: jax.Array,
    amounts: jax.Array,
    inv_freq: jax.Array,
    num_valid,
    *,
    impl: str = "auto",
    block_tokens: int = dispatch.DEFAULT_BLOCK_TOKENS,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Rotates each token t of ``keys [L, H, T, D]`` by ``amounts[t]`` (int ``[T]``).

    ``inv_freq``: float32 ``[L, D/2]``, row l the frequencies of layer l; ``num_valid``:
    int scalar, tokens ``t >= num_valid`` come back bit-identical. ``mesh``: the kernel
    runs per device of it, heads over ``model`` (``None``: one device). Returns
    ``[L, H, T, D]`` in ``keys.dtype``.
    """
    dispatch.check_rotation(keys, amounts, inv_freq, num_valid)
    return dispatch.run(
        rotate_keys_reference, _rotate_keys_pallas, (keys, amounts, inv_freq, num_valid),
        impl=impl, block_tokens=block_tokens, mesh=mesh, layout=ROTATION_LAYOUT,
    )
