"""The Pallas kernels (interpret mode) under ``shard_map`` on an 8-device simulated CPU mesh.

KV heads over ``model``, anchors over ``data`` with the weighted sum ``psum``-ed, each
only where the mesh axis divides the dimension; results equal the references, with layer 0
and padded tokens kept bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import pallas_kernels as pk
from kvcomm_jax.scale.sharding import make_mesh, single_device_mesh
from tests.test_kernels import (
    BLOCK,
    NUM_VALID,
    TOLERANCE,
    Case,
    assert_close,
    bits,
    make_inputs,
)

KERNELS = {  # name -> (kernel, reference, input names)
    "rotate": (pk.rotate_keys, pk.rotate_keys_reference, ("base", "positions", "inv_freq", "num_valid")),
    "correct": (pk.apply_correction, pk.apply_correction_reference, ("base", "deltas", "weights", "anchor_valid")),
    "fused": (
        pk.correct_and_rotate_keys,
        pk.correct_and_rotate_keys_reference,
        ("base", "deltas", "weights", "anchor_valid", "positions", "inv_freq", "num_valid"),
    ),
}


def sharded_case(heads: int, anchors: int, dtype: str, layout: str) -> Case:
    """A kernel test case with ``heads`` KV heads and ``anchors`` anchors, head dim 16."""
    return Case(head_dim=16, num_anchors=anchors, dtype=dtype, layout=layout, heads=heads)


# H=4 splits over model=4 and A=4 over data=2; then each split falls back to replicated alone.
SPLIT_CASES = [sharded_case(4, 4, dt, layout) for dt in TOLERANCE for layout in ("token", "channel")]
SPLIT_RUNS = [  # the rotation takes no weights: one layout is enough
    (kernel, case) for case in SPLIT_CASES for kernel in KERNELS
    if kernel != "rotate" or case.layout == "token"
]
FALLBACK_CASES = [sharded_case(4, 3, "float32", "channel"), sharded_case(2, 4, "float32", "channel")]


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8
    return make_mesh("data=2,model=4")


def call(kernel: str, case: Case, mesh, impl: str = "interpret"):
    fn, _, names = KERNELS[kernel]
    x = make_inputs(case)
    return fn(*(x[n] for n in names), impl=impl, block_tokens=BLOCK, mesh=mesh)


def reference(kernel: str, case: Case):
    _, ref, names = KERNELS[kernel]
    x = make_inputs(case)
    return ref(*(x[n] for n in names))


def jaxpr_text(kernel: str, case: Case, mesh, impl: str = "interpret") -> str:
    fn, _, names = KERNELS[kernel]
    x = make_inputs(case)
    bound = functools.partial(fn, impl=impl, block_tokens=BLOCK, mesh=mesh)
    return str(jax.make_jaxpr(bound)(*(x[n] for n in names)))


def check_against_reference(kernel: str, case: Case, out):
    x = make_inputs(case)
    expected = reference(kernel, case)
    assert out.shape == x["base"].shape and out.dtype == x["base"].dtype
    assert_close(np.asarray(out.astype(jnp.float32)), np.asarray(expected.astype(jnp.float32)), case.dtype)
    if kernel == "correct":  # layer 0 is the base
        np.testing.assert_array_equal(bits(out[0]), bits(x["base"][0]))
    else:  # padded tokens are the base; the valid ones moved
        np.testing.assert_array_equal(bits(out[:, :, NUM_VALID:]), bits(x["base"][:, :, NUM_VALID:]))
        assert not np.array_equal(bits(out[:, :, :NUM_VALID]), bits(x["base"][:, :, :NUM_VALID]))
    if kernel == "fused":  # layer 0 rotated, not corrected
        rotated = pk.rotate_keys_reference(x["base"], x["positions"], x["inv_freq"], x["num_valid"])
        assert_close(np.asarray(out[0], np.float32), np.asarray(rotated[0], np.float32), case.dtype)


@pytest.mark.parametrize("kernel, case", SPLIT_RUNS, ids=str)
def test_split_kernels_match_reference(mesh, kernel, case):
    out = call(kernel, case, mesh)
    check_against_reference(kernel, case, out)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(None, "model")), out.ndim)


@pytest.mark.parametrize("kernel", ["correct", "fused"])
@pytest.mark.parametrize("case", FALLBACK_CASES, ids=str)
def test_fallback_to_replicated(mesh, kernel, case):
    """A (or H) that the mesh axis does not divide is replicated; the other split still runs."""
    check_against_reference(kernel, case, call(kernel, case, mesh))
    text = jaxpr_text(kernel, case, mesh)
    assert ("psum" in text) == (case.num_anchors % mesh.shape["data"] == 0)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_jaxpr_holds_shard_map_around_pallas_call(mesh, kernel):
    case = SPLIT_CASES[0]
    text = jaxpr_text(kernel, case, mesh)
    assert "shard_map" in text and "pallas_call" in text
    assert ("psum" in text) == (kernel != "rotate")  # only a split over anchors is summed
    for one_device in (None, single_device_mesh()):
        text = jaxpr_text(kernel, case, one_device)
        assert "pallas_call" in text and "shard_map" not in text
    text = jaxpr_text(kernel, case, mesh, impl="reference")  # XLA partitions the reference
    assert "pallas_call" not in text and "shard_map" not in text


def test_under_vmap(mesh):
    """As ``correct_segments_batch`` calls it: rows of bases and anchor validity, shared deltas."""
    case = sharded_case(4, 4, "bfloat16", "channel")
    x = make_inputs(case)
    base = jnp.stack([x["base"], -x["base"]])  # [B, L, H, T, D]
    valid = jnp.stack([x["anchor_valid"], x["anchor_valid"].at[0].set(False)])  # [B, A]
    rest = (x["positions"], x["inv_freq"], x["num_valid"])

    def row(b, v):
        return pk.correct_and_rotate_keys(
            b, x["deltas"], x["weights"], v, *rest, impl="interpret", block_tokens=BLOCK, mesh=mesh
        )

    out = jax.vmap(row)(base, valid)  # [B, L, H, T, D]
    for r in range(2):
        expected = pk.correct_and_rotate_keys_reference(base[r], x["deltas"], x["weights"], valid[r], *rest)
        assert_close(np.asarray(out[r], np.float32), np.asarray(expected, np.float32), case.dtype)
    np.testing.assert_array_equal(bits(out[:, :, :, NUM_VALID:]), bits(base[:, :, :, NUM_VALID:]))
