"""KV of one prompt segment, and moving keys between RoPE frames.

Keys of reusable segments are kept in *frame 0*: de-rotated to position 0
(``R(-p)`` applied to a key observed at ``p``). Rotation is linear, so
corrections add in frame 0 and a single rotation places the result.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from kvcomm_jax.model.kv_cache import KVCache, slice_span
from pallas_kernels import rotate_keys


@struct.dataclass
class SegmentKV:
    """A segment padded to a bucket.

    keys:   ``[L, H, T, D]`` (frame 0 unless said otherwise)
    values: ``[L, H, T, D]``
    length: int32 scalar, valid tokens (the rest is zero padding)
    """

    logical_axes = {  # see kvcomm_jax.scale.sharding
        "keys": ("layers", "kv_heads", "tokens", "head_dim"),
        "values": ("layers", "kv_heads", "tokens", "head_dim"),
    }

    keys: jax.Array
    values: jax.Array
    length: jax.Array

    @property
    def bucket(self) -> int:
        """Padded tokens (the token axis, of one segment or of a stack of them)."""
        return self.keys.shape[-2]


def fit_tokens(x: jax.Array, tokens: int) -> jax.Array:
    """Zero-pad or cut the token axis (-2) of ``[..., T, D]`` (a segment or a stack of them) to ``tokens``."""
    if x.shape[-2] >= tokens:
        return x[..., :tokens, :]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, tokens - x.shape[-2]), (0, 0)])


def _zero_padding(x, length):
    """Zero tokens ``t >= length`` of ``[L, H, T, D]``."""
    mask = jnp.arange(x.shape[2]) < length  # [T]
    return jnp.where(mask[None, :, None], x, jnp.zeros((), x.dtype))


@functools.partial(jax.jit, static_argnames=("bucket", "frame0", "impl", "mesh"))
def extract_segment(
    cache: KVCache, start, length, inv_freq, *, bucket: int, frame0: bool = True, impl: str = "auto",
    mesh: Mesh | None = None, row=0
) -> SegmentKV:
    """Slots ``[start, start + length)`` of row ``row`` of ``cache`` as a :class:`SegmentKV` of ``bucket`` tokens.

    With ``frame0`` the keys are de-rotated from the positions recorded in the
    cache to position 0 (``inv_freq``: per-layer RoPE tables ``[L, D/2]``) by
    :func:`~pallas_kernels.rotate_keys` with ``impl`` and ``mesh``. Padding tokens
    are zero. The cache must have at least ``start + bucket`` slots.
    """
    keys, values, positions = slice_span(cache, row, start, bucket)  # [L, H, bucket, D], [bucket]
    if frame0:
        keys = rotate_keys(keys, -positions, inv_freq, length, impl=impl, mesh=mesh)
    return SegmentKV(_zero_padding(keys, length), _zero_padding(values, length), jnp.asarray(length, jnp.int32))


@jax.jit
def segment_difference(real: SegmentKV, base: SegmentKV) -> SegmentKV:
    """``real - base`` over the same tokens (a deviation), zero beyond the length."""
    keys = real.keys.astype(jnp.float32) - base.keys.astype(jnp.float32)
    values = real.values.astype(jnp.float32) - base.values.astype(jnp.float32)
    return SegmentKV(_zero_padding(keys, real.length).astype(real.keys.dtype),
                     _zero_padding(values, real.length).astype(real.values.dtype), real.length)


def stack_rows(segments: Sequence[SegmentKV], bucket: int = 0) -> SegmentKV:
    """Segments of any buckets as one batch: keys/values ``[B, L, H, T, D]``, lengths ``[B]``.

    ``T`` is the largest bucket, or ``bucket`` when that is larger (a fixed width keeps the
    programs that read the batch from recompiling as contents change).
    """
    bucket = max(bucket, *(s.bucket for s in segments))
    return SegmentKV(
        keys=jnp.stack([fit_tokens(s.keys, bucket) for s in segments]),
        values=jnp.stack([fit_tokens(s.values, bucket) for s in segments]),
        length=jnp.stack([jnp.asarray(s.length, jnp.int32) for s in segments]),
    )
