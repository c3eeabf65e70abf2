"""Length buckets: pad variable lengths to a few static sizes so new inputs do not recompile."""

from __future__ import annotations

DEFAULT_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def bucket_length(n: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS, what: str = "sequence") -> int:
    """Smallest bucket >= n. Raises ValueError if n exceeds the largest bucket."""
    if n < 0:
        raise ValueError(f"{what} length must be >= 0, got {n}")
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{what} length {n} exceeds the largest bucket ({buckets[-1]} tokens)")
