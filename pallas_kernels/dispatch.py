"""Implementation selection, input validation and Pallas plumbing shared by the kernels.

Every public kernel takes a static ``impl``:

* ``"auto"``: the compiled Pallas kernel on a TPU or GPU backend, the jnp reference
  otherwise;
* ``"pallas"``: the compiled Pallas kernel (Mosaic on TPU, Triton on GPU);
* ``"interpret"``: the same ``pallas_call`` run by the Pallas interpreter (any backend);
* ``"reference"``: the pure-jnp reference.

``resolve_impl`` turns that into a *target*: ``"tpu"``, ``"gpu"``, ``"interpret"`` or
``"reference"``. A static ``mesh`` of more than one device runs the kernel per device
(``partitioned.py``); ``None`` or one device runs it as is. The ``check_*`` functions
raise ``TypeError``/``ValueError`` at trace time, before anything runs. The rest is the
Pallas plumbing the three kernels share: a grid of ``(token blocks, L, H)``, token blocks
that need not divide T, and the row masking that the Triton lowering needs for the last,
partial block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from jax.sharding import Mesh

from pallas_kernels import partitioned

IMPLS = ("auto", "pallas", "interpret", "reference")
DEFAULT_BLOCK_TOKENS = 128
MIN_BLOCK_TOKENS = 8
TRITON_NUM_WARPS = 8  # a [128, 128] float32 accumulator is 64 registers a thread at 8 warps


# ----------------------------------------------------------------------------------------
# Implementation selection


def resolve_impl(impl: str) -> str:
    """Maps a public ``impl`` string to ``"tpu" | "gpu" | "interpret" | "reference"``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl in ("interpret", "reference"):
        return impl
    backend = jax.default_backend()
    if backend in ("tpu", "gpu"):
        return backend
    if impl == "pallas":
        raise ValueError(
            f"impl='pallas' needs a TPU or GPU backend, the default backend is "
            f"{backend!r}; use impl='interpret' to run the kernel on it"
        )
    return "reference"


def run(
    reference,
    kernel,
    args,
    *,
    impl: str,
    block_tokens: int,
    mesh: Mesh | None,
    layout: partitioned.Layout,
):
    """Call ``reference(*args)`` or ``kernel(*args, target=..., block_tokens=...)`` as ``impl`` asks.

    The one dispatch of every public kernel function (after its input checks). On a
    ``mesh`` of more than one device the kernel runs per device under
    :func:`pallas_kernels.partitioned.shard` as ``layout`` lays ``args`` out; the
    reference ignores the mesh (XLA partitions it).
    """
    check_block_tokens(block_tokens)
    target = resolve_impl(impl)
    if target == "reference":
        return reference(*args)
    kernel = functools.partial(kernel, target=target, block_tokens=block_tokens)
    if mesh is None or mesh.size == 1:
        return kernel(*args)
    return partitioned.shard(kernel, args, layout, mesh)


def check_block_tokens(block_tokens: int) -> None:
    """Token blocks are powers of two (Triton) and multiples of 8 (Mosaic sublanes)."""
    if (
        not isinstance(block_tokens, int)
        or block_tokens < MIN_BLOCK_TOKENS
        or block_tokens & (block_tokens - 1)
    ):
        raise ValueError(
            f"block_tokens must be a power of two >= {MIN_BLOCK_TOKENS}, got {block_tokens!r}"
        )


# ----------------------------------------------------------------------------------------
# Input validation


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _is_int(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.integer)


def check_cache(name: str, x) -> None:
    """``x`` is a floating ``[L, H, T, D]`` cache segment with an even head dim D."""
    if x.ndim != 4:
        raise ValueError(f"{name} must have 4 dims [L, H, T, D], got shape {x.shape}")
    if not _is_float(x):
        raise TypeError(f"{name} must be floating, got dtype {x.dtype}")
    if x.shape[-1] % 2:
        raise ValueError(f"head dim D must be even for rotate-half RoPE, got D={x.shape[-1]}")


def check_rotation(keys, amounts, inv_freq, num_valid, amounts_name: str = "amounts") -> None:
    """Validates the arguments of a rotation of ``keys [L, H, T, D]``."""
    check_cache("keys", keys)
    num_layers, _, t, d = keys.shape
    if amounts.shape != (t,):
        raise ValueError(f"{amounts_name} must have shape [T]=({t},), got {amounts.shape}")
    if not _is_int(amounts):
        raise TypeError(f"{amounts_name} must be integer, got dtype {amounts.dtype}")
    if inv_freq.shape != (num_layers, d // 2):
        raise ValueError(
            f"inv_freq must have shape (L, D/2)=({num_layers}, {d // 2}), one row per layer "
            f"of the keys, got {inv_freq.shape}"
        )
    if inv_freq.dtype != jnp.float32:
        raise TypeError(f"inv_freq must be float32, got dtype {inv_freq.dtype}")
    if jnp.ndim(num_valid) != 0 or not _is_int(num_valid):
        raise TypeError(
            f"num_valid must be an integer scalar, got shape {jnp.shape(num_valid)} "
            f"dtype {num_valid.dtype}"
        )


def check_correction(base, deltas, weights, anchor_valid) -> None:
    """Validates ``apply_correction`` arguments (docs/design.md §7)."""
    check_cache("base", base)
    l, h, t, d = base.shape
    if deltas.ndim != 5:
        raise ValueError(f"deltas must have 5 dims [A, L, H, Td, D], got shape {deltas.shape}")
    if not _is_float(deltas):
        raise TypeError(f"deltas must be floating, got dtype {deltas.dtype}")
    a, dl, dh, td, dd = deltas.shape
    if a == 0:
        raise ValueError("need at least one anchor, got A == 0")
    if (dl, dh, dd) != (l, h, d):
        raise ValueError(
            f"deltas [L, H, D]=({dl}, {dh}, {dd}) do not match base [L, H, D]=({l}, {h}, {d})"
        )
    if td < t:
        raise ValueError(f"deltas hold Td={td} tokens, fewer than base's T={t}")
    if weights.dtype != jnp.float32:
        raise TypeError(f"weights must be float32, got dtype {weights.dtype}")
    per_token, per_channel = (a, 1, 1, t, 1), (a, l, h, 1, d)
    if weights.shape not in (per_token, per_channel):
        raise ValueError(
            f"weights shape {weights.shape} is neither per-token [A, 1, 1, T, 1]={per_token} "
            f"nor per-channel [A, L, H, 1, D]={per_channel}"
        )
    if anchor_valid.shape != (a,):
        raise ValueError(f"anchor_valid must have shape [A]=({a},), got {anchor_valid.shape}")
    if anchor_valid.dtype != jnp.bool_:
        raise TypeError(f"anchor_valid must be bool, got dtype {anchor_valid.dtype}")


# ----------------------------------------------------------------------------------------
# Pallas plumbing


@dataclasses.dataclass(frozen=True)
class TokenBlocking:
    """How the T tokens of a segment are cut into blocks of the grid's first axis.

    ``masked`` is set on the Triton path when T is not a multiple of ``block``: Triton
    loads and stores are raw pointer accesses, so rows past T must be masked. Mosaic and
    the interpreter handle a partial last block themselves; the interpreter still takes
    the masked path so that it is exercised without a GPU.
    """

    num_tokens: int
    block: int
    num_blocks: int
    masked: bool


def token_blocking(num_tokens: int, block_tokens: int, target: str) -> TokenBlocking:
    """Blocks of ``min(block_tokens, next_pow2(T))`` tokens (at least 8) over T tokens."""
    block = min(block_tokens, max(MIN_BLOCK_TOKENS, pl.next_power_of_2(num_tokens)))
    return TokenBlocking(
        num_tokens=num_tokens,
        block=block,
        num_blocks=pl.cdiv(num_tokens, block),
        masked=target != "tpu" and num_tokens % block != 0,
    )


def block_rows(blocking: TokenBlocking):
    """Inside a kernel: the token index of each row of this block and the row mask.

    Returns ``rows [bt, 1] int32`` and ``row_mask [bt, 1] bool`` (rows < T), or ``None``
    for the mask when the block needs none.
    """
    rows = pl.program_id(0) * blocking.block + jax.lax.broadcasted_iota(
        jnp.int32, (blocking.block, 1), 0
    )  # [bt, 1]
    return rows, (rows < blocking.num_tokens) if blocking.masked else None


def load(ref, row_mask):
    """``ref[...]``; rows outside ``row_mask [bt, 1]`` are not read (they load as 0)."""
    if row_mask is None:
        return ref[...]
    return pltriton.load(ref, mask=row_mask, other=jnp.zeros((), ref.dtype))


def store(ref, value, row_mask) -> None:
    """``ref[...] = value``; rows outside ``row_mask [bt, 1]`` are not written."""
    if row_mask is None:
        ref[...] = value
    else:
        pltriton.store(ref, value, mask=jnp.broadcast_to(row_mask, value.shape))


def segment_spec(blocking: TokenBlocking, head_dim: int) -> pl.BlockSpec:
    """Block of a ``[L, H, T, D]`` segment seen by grid step (t, l, h): ``[bt, D]``."""
    return pl.BlockSpec(
        (pl.squeezed, pl.squeezed, blocking.block, head_dim), lambda t, l, h: (l, h, t, 0)
    )


def whole_spec(shape: Sequence[int]) -> pl.BlockSpec:
    """The whole (small) array at every grid step."""
    return pl.BlockSpec(tuple(shape), lambda t, l, h: (0,) * len(shape))


def _compiler_params(target: str) -> Any:
    if target == "tpu":
        return pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
    if target == "gpu":
        return pltriton.CompilerParams(num_warps=TRITON_NUM_WARPS)
    return None


def launch(
    kernel: Callable,
    *,
    target: str,
    blocking: TokenBlocking,
    in_specs: Sequence[pl.BlockSpec],
    out_shape: jax.ShapeDtypeStruct,
    inputs: Sequence[jax.Array],
    name: str,
) -> jax.Array:
    """Runs ``kernel`` over the grid ``(token blocks, L, H)`` of an ``[L, H, T, D]`` output."""
    num_layers, num_heads, _, head_dim = out_shape.shape
    return pl.pallas_call(
        kernel,
        grid=(blocking.num_blocks, num_layers, num_heads),
        in_specs=list(in_specs),
        out_specs=segment_spec(blocking, head_dim),
        out_shape=out_shape,
        interpret=target == "interpret",
        compiler_params=_compiler_params(target),
        name=name,
    )(*inputs)
