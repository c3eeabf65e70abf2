"""Length buckets: pad variable lengths to a few static sizes so new inputs do not recompile.

Powers of two up to 512, then every multiple of 256 up to 8192 (512, 768, 1024, 1280, ...),
36 buckets in all: above 512 a length pads by fewer than 256 tokens, so long prompts and
long caches waste little prefill and decode work. Every bucket is a multiple of 16, and
every one from 256 up a multiple of 256, the attention's query block
(``kvcomm_jax.model.attention.Q_BLOCK``).
"""

from __future__ import annotations

DEFAULT_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, *range(512, 8192 + 1, 256))


def bucket_length(n: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS, what: str = "sequence") -> int:
    """Smallest bucket >= n. Raises ValueError if n exceeds the largest bucket."""
    if n < 0:
        raise ValueError(f"{what} length must be >= 0, got {n}")
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{what} length {n} exceeds the largest bucket ({buckets[-1]} tokens)")
