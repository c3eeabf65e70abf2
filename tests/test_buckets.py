"""Length buckets."""

import pytest

from kvcomm_jax.model.buckets import DEFAULT_BUCKETS, bucket_length


def test_length_buckets_pad_up_and_refuse_what_no_bucket_holds():
    assert [bucket_length(n) for n in (0, 1, 16, 17, 300, 513, 8192)] == [16, 16, 16, 32, 512, 768, 8192]
    assert all(b % 16 == 0 for b in DEFAULT_BUCKETS) and all(b % 256 == 0 for b in DEFAULT_BUCKETS if b >= 256)
    with pytest.raises(ValueError, match="prompt length 8193 exceeds the largest bucket"):
        bucket_length(8193, what="prompt")
    with pytest.raises(ValueError, match="must be >= 0"):
        bucket_length(-1)
