"""Pallas kernels for the KVCOMM reuse path: key re-rotation, offset correction, and both
fused for keys. Each has a pure-jnp reference (the spec) next to its kernel."""

from pallas_kernels.correction import apply_correction, apply_correction_reference
from pallas_kernels.dispatch import DEFAULT_BLOCK_TOKENS, IMPLS, resolve_impl
from pallas_kernels.fused_key import (
    correct_and_rotate_keys,
    correct_and_rotate_keys_reference,
)
from pallas_kernels.rotation import rotate_keys, rotate_keys_reference

__all__ = [
    "DEFAULT_BLOCK_TOKENS",
    "IMPLS",
    "apply_correction",
    "apply_correction_reference",
    "correct_and_rotate_keys",
    "correct_and_rotate_keys_reference",
    "resolve_impl",
    "rotate_keys",
    "rotate_keys_reference",
]
