"""Corrected and re-rotated keys in one pass (docs/design.md §4 and §7).

Keys live in a position-free frame 0, so a corrected key at its target position is
``rope(base0 + sum_a w[a] * deltas[a], positions)``: correct in frame 0, rotate once.
The kernel reads base0 and the deltas once and writes the result once, instead of the
extra write and read of the corrected keys that ``apply_correction`` followed by
``rotate_keys`` would cost. Layer 0 is rotated but not corrected; padded tokens
(``t >= num_valid``) come back as base0, bit-identical. The value path is
``apply_correction`` alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from pallas_kernels import correction, dispatch, partitioned, rotation


def correct_and_rotate_keys_reference(
    base0, deltas, weights, anchor_valid, positions, inv_freq, num_valid
) -> jax.Array:
    """Reference: the correction reference, then the rotation, padding taken from base0.

    Both run on a float32 copy of base0 so that the result is cast to ``base0.dtype``
    once, at the end, as the kernel does.
    """
    corrected = correction.apply_correction_reference(
        base0.astype(jnp.float32), deltas, weights, anchor_valid
    )  # [L, H, T, D] float32
    rotated = rotation.rotate_layers(corrected, positions, inv_freq).astype(base0.dtype)
    return rotation.keep_padding(rotated, base0, num_valid)


def _fused_kernel(
    valid_ref, w_ref, d_ref, nv_ref, cos_ref, sin_ref, base_ref, o_ref, *, blocking
):
    """One ``[bt, D]`` block of one (layer, head): correct both halves, then rotate."""
    rows, row_mask = dispatch.block_rows(blocking)
    half = base_ref.shape[-1] // 2
    raw1, raw2 = rotation.load_halves(base_ref, row_mask)  # [bt, D/2] each
    x1, x2 = correction.add_correction(
        (raw1.astype(jnp.float32), raw2.astype(jnp.float32)),
        (slice(None, half), slice(half, None)),
        (valid_ref, w_ref, d_ref),
        row_mask,
    )
    rotation.store_rotated(
        o_ref, x1, x2, raw1, raw2, (nv_ref, cos_ref, sin_ref), rows, row_mask
    )


def _correct_and_rotate_keys_pallas(
    base0, deltas, weights, anchor_valid, positions, inv_freq, num_valid, *, target,
    block_tokens,
):
    """Pallas ``correct_and_rotate_keys`` for ``target`` "tpu", "gpu" or "interpret"."""
    _, _, num_tokens, head_dim = base0.shape
    blocking = dispatch.token_blocking(num_tokens, block_tokens, target)
    return dispatch.launch(
        functools.partial(_fused_kernel, blocking=blocking),
        target=target,
        blocking=blocking,
        in_specs=[
            *correction.correction_specs(blocking, deltas.shape[0], weights.shape, head_dim),
            *rotation.rope_specs(blocking, head_dim),
            dispatch.segment_spec(blocking, head_dim),
        ],
        out_shape=jax.ShapeDtypeStruct(base0.shape, base0.dtype),
        inputs=[
            *correction.correction_inputs(deltas, weights, anchor_valid),
            *rotation.rope_inputs(positions, inv_freq, num_valid),
            base0,
        ],
        name="correct_and_rotate_keys",
    )


# The arguments on a mesh: heads over model, anchors over data, the rest replicated.
FUSED_LAYOUT = partitioned.Layout(
    axes=(*correction.CORRECTION_LAYOUT.axes, *rotation.ROTATION_LAYOUT.axes[1:]),
    keep=lambda out, base0, *args: rotation.keep_padding(out, base0, args[-1]),  # num_valid
)


@functools.partial(jax.jit, static_argnames=("impl", "block_tokens", "mesh"))
def correct_and_rotate_keys(
    base0: jax.Array,
    deltas: jax.Array,
    weights: jax.Array,
    anchor_valid: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array,
    num_valid,
    *,
    impl: str = "auto",
    block_tokens: int = dispatch.DEFAULT_BLOCK_TOKENS,
    mesh: Mesh | None = None,
) -> jax.Array:
    """``rope(base0 + sum_a w[a] * deltas[a, :, :, :T], positions)`` in one pass.

    ``base0``: frame-0 keys ``[L, H, T, D]``; ``deltas``, ``weights``, ``anchor_valid``,
    ``mesh`` as in ``apply_correction``; ``positions``: int ``[T]`` target positions;
    ``inv_freq``: float32 ``[L, D/2]``, row l the frequencies of layer l; ``num_valid``:
    int scalar. Returns ``[L, H, T, D]`` in ``base0.dtype``.
    """
    dispatch.check_correction(base0, deltas, weights, anchor_valid)
    dispatch.check_rotation(base0, positions, inv_freq, num_valid, amounts_name="positions")
    return dispatch.run(
        correct_and_rotate_keys_reference, _correct_and_rotate_keys_pallas,
        (base0, deltas, weights, anchor_valid, positions, inv_freq, num_valid),
        impl=impl, block_tokens=block_tokens, mesh=mesh, layout=FUSED_LAYOUT,
    )
