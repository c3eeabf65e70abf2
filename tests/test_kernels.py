"""Pallas kernels (interpret mode) against their references, and the references against
independent float64 formulations of docs/design.md §4, §6 and §7."""

from __future__ import annotations

import functools
import re
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import correction, fused_key, rotation

L, H, T, TD_EXTRA, NUM_VALID, BLOCK = 3, 2, 37, 3, 30, 16
TOLERANCE = {  # (rtol, atol): f32 differs by summation order; bf16 by at most one ulp
    "float32": (1e-5, 1e-5),
    "bfloat16": (2**-7, 1e-3),
}


class Case(NamedTuple):
    head_dim: int
    num_anchors: int
    dtype: str
    layout: str  # "token" ([A, 1, 1, T, 1] weights) or "channel" ([A, L, H, 1, D])
    heads: int = H


def inv_freq_row(head_dim: int, base: float = 500000.0) -> np.ndarray:
    """RoPE frequencies of one layer, float32 ``[D/2]``."""
    return (1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)


def llama_inv_freq(head_dim: int) -> np.ndarray:
    """The same frequencies for every layer, float32 ``[L, D/2]``."""
    return np.broadcast_to(inv_freq_row(head_dim), (L, head_dim // 2))


def per_layer_inv_freq(head_dim: int) -> np.ndarray:
    """Different frequencies per layer (base 1e4 * 10**l), float32 ``[L, D/2]``."""
    return np.stack([inv_freq_row(head_dim, 1e4 * 10.0**layer) for layer in range(L)])


@functools.cache
def make_inputs(case: Case) -> dict:
    """Random inputs; invalid anchors and the deltas past T hold NaN; base holds -0.0."""
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    a, d, h = case.num_anchors, case.head_dim, case.heads
    base = rng.normal(size=(L, h, T, d)).astype(np.float32)  # [L, H, T, D]
    base[:, :, ::5, ::7] = -0.0
    deltas = rng.normal(scale=0.5, size=(a, L, h, T + TD_EXTRA, d)).astype(np.float32)
    valid = np.ones(a, bool) if a == 1 else (np.arange(a) % 3 != 1)  # [A]
    w_shape = (a, 1, 1, T, 1) if case.layout == "token" else (a, L, h, 1, d)
    logits = rng.normal(size=w_shape)
    weights = np.where(valid[:, None, None, None, None], np.exp(logits), 0.0)
    weights = (weights / weights.sum(0, keepdims=True)).astype(np.float32)
    deltas[~valid] = np.nan
    weights[~valid] = np.nan
    deltas[:, :, :, T:] = np.nan
    dtype = jnp.dtype(case.dtype)
    return dict(
        base=jnp.asarray(base, dtype),
        deltas=jnp.asarray(deltas, dtype),
        weights=jnp.asarray(weights),
        anchor_valid=jnp.asarray(valid),
        positions=jnp.asarray(rng.integers(-200, 5000, size=T), jnp.int32),
        inv_freq=jnp.asarray(llama_inv_freq(d)),  # [L, D/2], rows equal
        num_valid=jnp.int32(NUM_VALID),
    )


def correction_args(x):
    return x["base"], x["deltas"], x["weights"], x["anchor_valid"]


def rotation_args(x):
    return x["positions"], x["inv_freq"], x["num_valid"]


@functools.cache
def run(kernel: str, case: Case, impl: str, block_tokens: int = BLOCK) -> np.ndarray:
    """One kernel on one case, as a float32 numpy array (cached across tests)."""
    x = make_inputs(case)
    if kernel == "rotate":
        out = pk.rotate_keys(x["base"], *rotation_args(x), impl=impl, block_tokens=block_tokens)
    elif kernel == "correct":
        out = pk.apply_correction(*correction_args(x), impl=impl, block_tokens=block_tokens)
    else:
        out = pk.correct_and_rotate_keys(
            *correction_args(x), *rotation_args(x), impl=impl, block_tokens=block_tokens
        )
    assert out.shape == x["base"].shape and out.dtype == x["base"].dtype
    return np.asarray(out.astype(jnp.float32))


def bits(x: jax.Array) -> np.ndarray:
    """Raw bit pattern, so -0.0 and 0.0 differ."""
    return np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint16 if x.dtype.itemsize == 2 else jnp.uint32))


def rotate_float64(keys, positions, inv_freq, num_valid) -> np.ndarray:
    """Rotation as complex multiplication, layer l at ``inv_freq[l]``, in float64.

    The angle is a float32 product by convention; cos/sin and the rotation are float64.
    Tokens ``t >= num_valid`` are returned as given.
    """
    k = np.asarray(keys, np.float64)  # [L, H, T, D]
    half = k.shape[-1] // 2
    angle = np.asarray(positions, np.float32)[None, None, :, None] * np.asarray(inv_freq)[:, None, None, :]
    z = (k[..., :half] + 1j * k[..., half:]) * np.exp(1j * angle.astype(np.float64))  # [L, H, T, D/2]
    out = np.concatenate([z.real, z.imag], -1)
    out[:, :, num_valid:] = k[:, :, num_valid:]
    return out


def correct_float64(x) -> np.ndarray:
    """The correction as an explicit loop over valid anchors, layer 0 kept, in float64."""
    base = np.asarray(x["base"], np.float64)
    deltas = np.asarray(x["deltas"], np.float64)
    weights = np.asarray(x["weights"], np.float64)
    out = base.copy()
    for a, ok in enumerate(np.asarray(x["anchor_valid"])):
        if ok:
            out[1:] += (weights[a] * deltas[a, :, :, :T])[1:]
    return out


def assert_close(actual, expected, dtype: str):
    rtol, atol = TOLERANCE[dtype]
    assert np.isfinite(actual).all()
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


ROTATION_CASES = [Case(d, 1, dt, "token") for d in (64, 128) for dt in TOLERANCE]
# Every pair of values of (D, A, dtype, layout) appears in some case (a covering array).
CORRECTION_CASES = [
    Case(64, 1, "float32", "token"),
    Case(64, 20, "bfloat16", "channel"),
    Case(128, 1, "bfloat16", "channel"),
    Case(128, 20, "float32", "channel"),
    Case(128, 20, "bfloat16", "token"),
]


# ----------------------------------------------------------------------------------------
# References against independent float64 formulations


def test_rotation_reference_is_complex_multiplication():
    x = make_inputs(Case(64, 1, "float32", "token"))
    out = np.asarray(pk.rotate_keys_reference(x["base"], *rotation_args(x)))
    expected = rotate_float64(x["base"], x["positions"], x["inv_freq"], NUM_VALID)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_rotation_reference_composes():
    x = make_inputs(Case(128, 1, "float32", "token"))
    keys, inv_freq = x["base"], x["inv_freq"]
    a = jnp.arange(T, dtype=jnp.int32) * 7 - 50
    b = jnp.arange(T, dtype=jnp.int32)[::-1] * 11 + 3
    once = pk.rotate_keys_reference(keys, a, inv_freq, T)
    twice = pk.rotate_keys_reference(once, b, inv_freq, T)
    direct = pk.rotate_keys_reference(keys, a + b, inv_freq, T)
    np.testing.assert_allclose(twice, direct, rtol=1e-4, atol=1e-4)
    assert not np.allclose(once, keys, atol=1e-2)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_per_layer_frequencies(dtype):
    """Layer l rotated at its own frequencies (base 1e4 * 10**l): kernels (interpret),
    references and the float64 formulation agree, and the rows do make a difference."""
    case = Case(64, 20, dtype, "channel")
    x = {**make_inputs(case), "inv_freq": jnp.asarray(per_layer_inv_freq(case.head_dim))}
    rot, kw = rotation_args(x), dict(impl="interpret", block_tokens=BLOCK)
    as_f32 = lambda a: np.asarray(a.astype(jnp.float32))
    rotated = as_f32(pk.rotate_keys(x["base"], *rot, **kw))
    rotated_ref = as_f32(pk.rotate_keys_reference(x["base"], *rot))
    fused = as_f32(pk.correct_and_rotate_keys(*correction_args(x), *rot, **kw))
    fused_ref = as_f32(pk.correct_and_rotate_keys_reference(*correction_args(x), *rot))
    assert_close(rotated, rotated_ref, dtype)
    assert_close(fused, fused_ref, dtype)

    positions = x["positions"]
    rotated64 = rotate_float64(x["base"], positions, x["inv_freq"], NUM_VALID)
    fused64 = rotate_float64(correct_float64(x), positions, x["inv_freq"], NUM_VALID)
    fused64[:, :, NUM_VALID:] = np.asarray(x["base"], np.float64)[:, :, NUM_VALID:]
    assert_close(rotated_ref, rotated64, dtype)
    assert_close(fused_ref, fused64, dtype)

    first_row = np.broadcast_to(per_layer_inv_freq(case.head_dim)[:1], (L, case.head_dim // 2))
    as_layer0 = rotate_float64(x["base"], positions, first_row, NUM_VALID)
    np.testing.assert_allclose(rotated64[0], as_layer0[0])
    for layer in range(1, L):
        assert not np.allclose(rotated64[layer, :, :NUM_VALID], as_layer0[layer, :, :NUM_VALID], atol=1e-2)


@pytest.mark.parametrize("layout", ["token", "channel"])
def test_correction_reference_is_weighted_sum(layout):
    x = make_inputs(Case(64, 20, "float32", layout))
    out = np.asarray(pk.apply_correction_reference(*correction_args(x)))
    np.testing.assert_allclose(out, correct_float64(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Kernels (interpret mode) against references


@pytest.mark.parametrize("case", ROTATION_CASES, ids=str)
def test_rotate_keys_kernel(case):
    assert_close(run("rotate", case, "interpret"), run("rotate", case, "reference"), case.dtype)


@pytest.mark.parametrize("case", CORRECTION_CASES, ids=str)
def test_apply_correction_kernel(case):
    assert_close(run("correct", case, "interpret"), run("correct", case, "reference"), case.dtype)


@pytest.mark.parametrize("case", CORRECTION_CASES, ids=str)
def test_correct_and_rotate_keys_kernel(case):
    assert_close(run("fused", case, "interpret"), run("fused", case, "reference"), case.dtype)


@pytest.mark.parametrize("kernel", ["rotate", "correct", "fused"])
def test_single_partial_block(kernel):
    """Default block size on a segment shorter than one block."""
    case = Case(128, 20, "float32", "channel")
    out = run(kernel, case, "interpret", pk.DEFAULT_BLOCK_TOKENS)
    assert_close(out, run(kernel, case, "reference"), case.dtype)


@pytest.mark.parametrize("layout", ["token", "channel"])
def test_whole_blocks(layout):
    """T a multiple of the block: the path without row masks."""
    x = make_inputs(Case(64, 20, "bfloat16", layout))
    t = 2 * BLOCK
    base = x["base"][:, :, :t]
    weights = x["weights"][..., :t, :] if layout == "token" else x["weights"]
    corr = (base, x["deltas"], weights, x["anchor_valid"])
    rot = (x["positions"][:t], x["inv_freq"], jnp.int32(t - 3))
    for kernel, reference in (
        (pk.apply_correction, pk.apply_correction_reference),
        (pk.correct_and_rotate_keys, pk.correct_and_rotate_keys_reference),
    ):
        args = corr if kernel is pk.apply_correction else corr + rot
        out = kernel(*args, impl="interpret", block_tokens=BLOCK)
        expected = reference(*args)
        assert_close(np.asarray(out, np.float32), np.asarray(expected, np.float32), "bfloat16")


@pytest.mark.parametrize("layout", ["token", "channel"])
def test_fused_equals_correction_then_rotation(layout):
    x = make_inputs(Case(64, 20, "float32", layout))
    fused = pk.correct_and_rotate_keys(
        *correction_args(x), *rotation_args(x), impl="interpret", block_tokens=BLOCK
    )
    corrected = pk.apply_correction(*correction_args(x), impl="interpret", block_tokens=BLOCK)
    separate = pk.rotate_keys(corrected, *rotation_args(x), impl="interpret", block_tokens=BLOCK)
    np.testing.assert_allclose(
        fused[:, :, :NUM_VALID], separate[:, :, :NUM_VALID], rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(bits(fused[:, :, NUM_VALID:]), bits(x["base"][:, :, NUM_VALID:]))


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_layer0_untouched(dtype):
    case = Case(128, 20, dtype, "token")
    x = make_inputs(case)
    corrected = pk.apply_correction(*correction_args(x), impl="interpret", block_tokens=BLOCK)
    np.testing.assert_array_equal(bits(corrected[0]), bits(x["base"][0]))
    fused = run("fused", case, "interpret")
    rotated = run("rotate", case, "interpret")
    np.testing.assert_allclose(fused[0], rotated[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(fused[1], rotated[1], atol=1e-2)


@pytest.mark.parametrize("kernel", ["rotate", "fused"])
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_padding_bit_identical(kernel, dtype):
    x = make_inputs(Case(64, 20, dtype, "channel"))
    if kernel == "rotate":
        out = pk.rotate_keys(x["base"], *rotation_args(x), impl="interpret", block_tokens=BLOCK)
    else:
        out = pk.correct_and_rotate_keys(
            *correction_args(x), *rotation_args(x), impl="interpret", block_tokens=BLOCK
        )
    np.testing.assert_array_equal(bits(out[:, :, NUM_VALID:]), bits(x["base"][:, :, NUM_VALID:]))
    assert not np.array_equal(bits(out[:, :, :NUM_VALID]), bits(x["base"][:, :, :NUM_VALID]))


def test_auto_is_reference_on_cpu():
    assert jax.default_backend() == "cpu"
    assert pk.resolve_impl("auto") == "reference"
    case = Case(64, 20, "bfloat16", "token")
    for kernel in ("rotate", "correct", "fused"):
        np.testing.assert_array_equal(run(kernel, case, "auto"), run(kernel, case, "reference"))


# ----------------------------------------------------------------------------------------
# Lowering for the accelerators (no device needed)


@pytest.fixture
def verify_triton_modules(monkeypatch):
    """Runs the MLIR verifier on every Triton module the GPU lowering builds; otherwise a
    malformed module would only be caught when compiled on a GPU.

    The hook is a JAX-private module: if a JAX release moves it, this import fails (it
    does not skip), and the hook has to be updated to the new location.
    """
    from jax._src.pallas.triton import pallas_call_registration as registration

    lower = registration.lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        with result.module.context:
            result.module.operation.verify()  # raises on an invalid module
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", lower_and_verify)


@pytest.mark.accelerator_lowering
@pytest.mark.parametrize("target,platform", [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("layout", ["token", "channel"])
def test_kernels_lower_for_accelerators(target, platform, layout, verify_triton_modules):
    """Triton (GPU) and Mosaic (TPU) lowering of all kernels, partial last block included."""
    x = make_inputs(Case(128, 20, "bfloat16", layout))
    kw = dict(target=target, block_tokens=BLOCK)
    kernels = {
        "rotate": lambda b, p, f, n: rotation._rotate_keys_pallas(b, p, f, n, **kw),
        "correct": lambda b, d, w, v: correction._apply_correction_pallas(b, d, w, v, **kw),
        "fused": lambda *a: fused_key._correct_and_rotate_keys_pallas(*a, **kw),
    }
    args = {
        "rotate": (x["base"], *rotation_args(x)),
        "correct": correction_args(x),
        "fused": (*correction_args(x), *rotation_args(x)),
    }
    unstable = [jax.export.DisabledSafetyCheck.custom_call(name)
                for name in ("__gpu$xla.gpu.triton", "tpu_custom_call")]
    for name, fn in kernels.items():
        exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=unstable)
        text = exported(*args[name]).mlir_module()
        assert ("__gpu$xla.gpu.triton" if target == "gpu" else "tpu_custom_call") in text


# ----------------------------------------------------------------------------------------
# Validation


def _small():
    a, d, t = 2, 8, 5
    return dict(
        base=jnp.zeros((2, 2, t, d), jnp.bfloat16),
        deltas=jnp.zeros((a, 2, 2, t + 1, d), jnp.bfloat16),
        weights=jnp.zeros((a, 1, 1, t, 1), jnp.float32),
        anchor_valid=jnp.ones((a,), bool),
        positions=jnp.zeros((t,), jnp.int32),
        inv_freq=jnp.ones((2, d // 2), jnp.float32),
        num_valid=jnp.int32(t),
    )


def _call(kernel, x, impl="interpret", block_tokens=BLOCK):
    kw = dict(impl=impl, block_tokens=block_tokens)
    if kernel == "rotate":
        return pk.rotate_keys(x["base"], *rotation_args(x), **kw)
    if kernel == "correct":
        return pk.apply_correction(*correction_args(x), **kw)
    return pk.correct_and_rotate_keys(*correction_args(x), *rotation_args(x), **kw)


ROTATION_ERRORS = [
    (dict(base=jnp.zeros((2, 5, 8))), ValueError, "must have 4 dims"),
    (dict(base=jnp.zeros((2, 2, 5, 8), jnp.int32)), TypeError, "must be floating"),
    (dict(base=jnp.zeros((2, 2, 5, 7)), inv_freq=jnp.ones((2, 3))), ValueError, "D must be even"),
    (dict(positions=jnp.zeros((4,), jnp.int32)), ValueError, re.escape("shape [T]=(5,)")),
    (dict(positions=jnp.zeros((5,), jnp.float32)), TypeError, "must be integer"),
    (dict(inv_freq=jnp.ones((4,), jnp.float32)), ValueError, re.escape("inv_freq must have shape (L, D/2)=(2, 4)")),
    (dict(inv_freq=jnp.ones((2, 8), jnp.float32)), ValueError, re.escape("inv_freq must have shape (L, D/2)=(2, 4)")),
    (dict(inv_freq=jnp.ones((3, 4), jnp.float32)), ValueError, re.escape("inv_freq must have shape (L, D/2)=(2, 4)")),
    (dict(inv_freq=jnp.ones((2, 4), jnp.bfloat16)), TypeError, "inv_freq must be float32"),
    (dict(num_valid=jnp.float32(5)), TypeError, "num_valid must be an integer scalar"),
    (dict(num_valid=jnp.ones((1,), jnp.int32)), TypeError, "num_valid must be an integer scalar"),
]
CORRECTION_ERRORS = [
    (dict(deltas=jnp.zeros((2, 2, 6, 8))), ValueError, "deltas must have 5 dims"),
    (dict(deltas=jnp.zeros((2, 2, 2, 6, 8), jnp.int8)), TypeError, "deltas must be floating"),
    (dict(deltas=jnp.zeros((0, 2, 2, 6, 8)), weights=jnp.zeros((0, 1, 1, 5, 1)),
          anchor_valid=jnp.ones((0,), bool)), ValueError, "A == 0"),
    (dict(deltas=jnp.zeros((2, 3, 2, 6, 8))), ValueError, "do not match base"),
    (dict(deltas=jnp.zeros((2, 2, 1, 6, 8))), ValueError, "do not match base"),
    (dict(deltas=jnp.zeros((2, 2, 2, 6, 4))), ValueError, "do not match base"),
    (dict(deltas=jnp.zeros((2, 2, 2, 4, 8))), ValueError, "Td=4 tokens, fewer than base's T=5"),
    (dict(weights=jnp.zeros((2, 1, 1, 5, 1), jnp.bfloat16)), TypeError, "weights must be float32"),
    (dict(weights=jnp.zeros((2, 1, 1, 5, 8))), ValueError, "neither per-token"),
    (dict(weights=jnp.zeros((2, 2, 2, 5, 8))), ValueError, "neither per-token"),
    (dict(weights=jnp.zeros((3, 1, 1, 5, 1))), ValueError, "neither per-token"),
    (dict(anchor_valid=jnp.ones((3,), bool)), ValueError, re.escape("anchor_valid must have shape [A]=(2,)")),
    (dict(anchor_valid=jnp.ones((2,), jnp.int32)), TypeError, "anchor_valid must be bool"),
]


@pytest.mark.parametrize("change,error,match", ROTATION_ERRORS)
@pytest.mark.parametrize("kernel", ["rotate", "fused"])
def test_rotation_validation(kernel, change, error, match):
    with pytest.raises(error, match=match):
        _call(kernel, {**_small(), **change})


@pytest.mark.parametrize("change,error,match", CORRECTION_ERRORS)
@pytest.mark.parametrize("kernel", ["correct", "fused"])
def test_correction_validation(kernel, change, error, match):
    with pytest.raises(error, match=match):
        _call(kernel, {**_small(), **change})


def test_positions_named_in_fused_errors():
    with pytest.raises(ValueError, match=re.escape("positions must have shape [T]")):
        _call("fused", {**_small(), "positions": jnp.zeros((4,), jnp.int32)})


@pytest.mark.parametrize("kernel", ["rotate", "correct", "fused"])
def test_impl_and_block_validation(kernel):
    x = _small()
    with pytest.raises(ValueError, match="impl must be one of"):
        _call(kernel, x, impl="triton")
    with pytest.raises(ValueError, match="impl='pallas' needs a TPU or GPU backend"):
        _call(kernel, x, impl="pallas")
    for bad in (4, 24):
        with pytest.raises(ValueError, match="block_tokens must be a power of two >= 8"):
            _call(kernel, x, block_tokens=bad)
