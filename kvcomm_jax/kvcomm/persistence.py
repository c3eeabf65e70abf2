"""Anchor pools and converted params on disk (orbax-checkpoint), checked against the model reading them.

A checkpoint directory holds one live version and a pointer to it::

    CURRENT                  the live version's name; replaced atomically (os.replace)
    v-<id>/metadata.json     kind, model fingerprint, pool structure, array checksums
    v-<id>/arrays/           the orbax PyTree checkpoint
    .tmp-<id>/               a save in progress (or one that was killed)

A save writes a complete ``.tmp-<id>``, renames it to ``v-<id>``, then swaps
``CURRENT``; a save killed at any point leaves ``CURRENT`` naming the previous,
complete version, and the next save removes the leftovers. One writer per
directory at a time.

The *fingerprint* is the model config as a dict (:func:`model_fingerprint`);
loading compares it key by key and raises ValueError naming what differs. Each
array's checksum (a position-weighted sum of its bits, computed where the array
lives) is stored beside it, so truncated or garbled files raise
:class:`CorruptCheckpointError` instead of loading wrong values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from kvcomm_jax.kvcomm.anchor_pool import AnchorPool, empty_pool, record_deltas
from kvcomm_jax.kvcomm.slot_book import SlotBook
from kvcomm_jax.model.config import ModelConfig
from kvcomm_jax.model.params import check_param_shapes, param_shapes
from kvcomm_jax.scale.distributed import is_primary
from kvcomm_jax.scale.sharding import (
    params_shardings,
    shardings_for,
    single_device_mesh,
)

FORMAT_VERSION = 1
POOLS, PARAMS = "anchor_pools", "params"
CURRENT = "CURRENT"
METADATA = "metadata.json"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files are missing, truncated or garbled."""


def model_fingerprint(config: ModelConfig) -> dict:
    """The model config fields as a JSON-ready dict."""
    return _json_roundtrip(dataclasses.asdict(config))


# ------------------------------------------------------------------------------ public API


def save_pools(directory: str, pools: dict[str, AnchorPool], model_fingerprint: dict) -> None:
    """Save anchor pools (name -> :class:`AnchorPool`, any sharding) atomically to ``directory``.

    Raises ValueError, before writing, if a pool does not fit the fingerprint's model.
    """
    structure = {name: pool_structure(pool) for name, pool in pools.items()}
    for name, pool_meta in structure.items():
        _check_pool_fits(name, pool_meta, model_fingerprint)
    _save(directory, pools, {"kind": POOLS, "fingerprint": _json_roundtrip(model_fingerprint), "pools": structure})


def load_pools(directory: str, model_fingerprint: dict, shardings=None) -> dict[str, AnchorPool]:
    """Restore the pools saved in ``directory``, straight into their target layout.

    ``shardings``: None (one local device), a ``Mesh`` (the layout of
    :func:`kvcomm_jax.scale.sharding.shardings_for`), or name -> a pool-shaped tree of
    shardings. Raises ValueError if the checkpoint is for another model or pool
    structure, :class:`CorruptCheckpointError` if its files are damaged.
    """
    version, meta = _read_metadata(directory, POOLS)
    _check_fingerprint(directory, meta["fingerprint"], model_fingerprint)
    abstract = {name: abstract_pool(pool_meta) for name, pool_meta in meta["pools"].items()}
    targets = _targets(abstract, shardings, lambda mesh: shardings_for(abstract, mesh))
    return _restore(version, meta, targets)


def save_params(directory: str, params, config: ModelConfig) -> None:
    """Save a converted params pytree (layout ``param_shapes(config)``, dtype ``config.dtype``) atomically."""
    check_param_shapes(config, params)
    dtypes = {str(x.dtype) for x in jax.tree.leaves(params)}
    if dtypes != {config.dtype}:
        raise ValueError(f"params have dtypes {sorted(dtypes)}, the config says {config.dtype}")
    _save(directory, params, {"kind": PARAMS, "fingerprint": model_fingerprint(config)})


def load_params(directory: str, config: ModelConfig, shardings=None):
    """Restore params saved by :func:`save_params` for the same ``config``.

    ``shardings``: None (one local device), a ``Mesh`` (the layout of
    :func:`kvcomm_jax.scale.sharding.params_shardings`), or a params-shaped tree of shardings.
    """
    version, meta = _read_metadata(directory, PARAMS)
    _check_fingerprint(directory, meta["fingerprint"], model_fingerprint(config))
    abstract = jax.tree.map(
        lambda shape: jax.ShapeDtypeStruct(shape, config.jnp_dtype), param_shapes(config), is_leaf=lambda x: isinstance(x, tuple)
    )
    return _restore(version, meta, _targets(abstract, shardings, lambda mesh: params_shardings(config, mesh)))


# ------------------------------------------------------------------------------ pool structure


def pool_structure(pool: AnchorPool) -> dict:
    """JSON description (sizes, dtype, consumer key -> prefix tokens) from which :func:`abstract_pool` rebuilds the pool."""
    V, L, H, T, D = pool.keys.shape
    return {
        "capacity": pool.capacity, "slots": V, "num_layers": L, "num_kv_heads": H, "tokens": T, "head_dim": D,
        "dtype": str(pool.keys.dtype),
        "consumers": {key: c.prefix_keys.shape[3] for key, c in pool.consumers.items()},  # key -> prefix tokens Tp
    }


def abstract_pool(structure: dict) -> AnchorPool:
    """ShapeDtypeStructs of the pool a :func:`pool_structure` dict describes (its exact pytree, consumer
    keys included), built by the pool's own functions without allocating anything."""
    s = structure
    L, H, T, D = s["num_layers"], s["num_kv_heads"], s["tokens"], s["head_dim"]

    def build():
        pool = empty_pool(s["capacity"], L, H, D, T, jnp.dtype(s["dtype"]), slots=s["slots"])
        book = SlotBook.empty(s["slots"])
        for key, prefix_tokens in s["consumers"].items():
            content, prefix = jnp.zeros((L, H, T, D)), jnp.zeros((L, H, prefix_tokens, D))
            pool = record_deltas(pool, book, 0, key, content, content, prefix, prefix)
        return pool

    return jax.eval_shape(build)


def _check_pool_fits(name: str, pool_meta: dict, fingerprint: dict) -> None:
    """ValueError if a pool's (L, H, D) or dtype differ from the fingerprint's model (keys it has)."""
    diffs = [
        f"{field}: pool {pool_meta[field]!r}, model {fingerprint[field]!r}"
        for field in ("num_layers", "num_kv_heads", "head_dim", "dtype")
        if field in fingerprint and pool_meta[field] != fingerprint[field]
    ]
    if diffs:
        raise ValueError(f"anchor pool {name!r} does not fit the model: {'; '.join(diffs)}")


# ------------------------------------------------------------------------------ checks


def _json_roundtrip(x):
    return json.loads(json.dumps(x))


def _differences(saved, given, path: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(given, dict):
        return [d for k in sorted(set(saved) | set(given), key=str)
                for d in _differences(saved.get(k, "<absent>"), given.get(k, "<absent>"), f"{path}{k}.")]
    return [] if saved == given else [f"{path[:-1]}: checkpoint {saved!r}, expected {given!r}"]


def _check_fingerprint(directory: str, saved: dict, given: dict) -> None:
    diffs = _differences(saved, _json_roundtrip(given))
    if diffs:
        raise ValueError(f"checkpoint {directory!r} was saved for a different model: {'; '.join(diffs)}")


def _targets(abstract, shardings, from_mesh):
    """ShapeDtypeStructs carrying the shardings to restore into."""
    if shardings is None:
        shardings = single_device_mesh()
    if isinstance(shardings, Mesh):
        shardings = from_mesh(shardings)
    elif jax.tree.structure(shardings) != jax.tree.structure(abstract):
        raise ValueError(
            f"the shardings given do not match the checkpoint's structure:\n"
            f"  checkpoint: {jax.tree.structure(abstract)}\n  shardings:  {jax.tree.structure(shardings)}"
        )
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@jax.jit
def _checksums(tree):
    """uint32 per leaf: ``sum_i bits[i] * (2 i + 1) mod 2**32`` over the flat index ``i``.

    The odd weights make any single changed word change the sum. The index is
    built from per-dimension iotas (no reshape), so sharded leaves need no gather.
    """

    def leaf(x):
        if x.dtype == jnp.bool_:
            bits = x.astype(jnp.uint32)
        else:
            bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}")).astype(jnp.uint32)
        index = jnp.zeros(x.shape, jnp.uint32)
        for d in range(x.ndim):
            stride = math.prod(x.shape[d + 1 :]) % 2**32
            index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride)
        return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)

    return jax.tree.map(leaf, tree)


def _checksum_table(tree) -> dict[str, int]:
    sums = _checksums(tree)
    return {jax.tree_util.keystr(path): int(s) for path, s in jax.tree_util.tree_leaves_with_path(sums)}


# ------------------------------------------------------------------------------ files


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _version_id() -> str:
    """A random id, the same on every process."""
    token = np.frombuffer(os.urandom(8), np.uint32)
    if jax.process_count() > 1:
        token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    return "".join(f"{int(t):08x}" for t in token)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _save(directory: str, tree, meta: dict) -> None:
    directory = os.path.abspath(os.fspath(directory))
    meta = {"format_version": FORMAT_VERSION, **meta, "checksums": _checksum_table(tree)}
    version = f"v-{_version_id()}"
    tmp = os.path.join(directory, f".tmp-{version}")
    if is_primary():
        os.makedirs(tmp)
    _barrier(f"kvcomm_save_start_{version}")
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        checkpointer.save(os.path.join(tmp, "arrays"), args=ocp.args.StandardSave(tree))
    if is_primary():
        _write_durably(os.path.join(tmp, METADATA), json.dumps(meta, indent=1))
        os.rename(tmp, os.path.join(directory, version))
        pointer = os.path.join(directory, f".{CURRENT}-{version}")
        _write_durably(pointer, version)
        os.replace(pointer, os.path.join(directory, CURRENT))
        _fsync_dir(directory)
        for entry in os.listdir(directory):  # older versions and killed saves
            path = os.path.join(directory, entry)
            if entry == version or not entry.startswith(("v-", ".tmp-v-", f".{CURRENT}-")):
                continue
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
    _barrier(f"kvcomm_save_done_{version}")


def _read_metadata(directory: str, kind: str) -> tuple[str, dict]:
    """``(version directory, metadata)`` of the live version; checks the kind."""
    directory = os.fspath(directory)
    try:
        with open(os.path.join(directory, CURRENT)) as f:
            name = f.read().strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint in {directory!r} (no {CURRENT} file)") from None
    version = os.path.join(directory, name)
    try:
        with open(os.path.join(version, METADATA)) as f:
            meta = json.load(f)
        found, fingerprint, checksums = meta["kind"], meta["fingerprint"], meta["checksums"]
        if meta["format_version"] != FORMAT_VERSION or not isinstance(fingerprint, dict) or not isinstance(checksums, dict):
            raise ValueError("unexpected format")
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptCheckpointError(f"checkpoint {directory!r}: unreadable {METADATA} in {name!r} ({type(e).__name__}: {e})") from e
    if found != kind:
        raise ValueError(f"checkpoint {directory!r} holds {found}, not {kind}")
    if kind == POOLS and not isinstance(meta.get("pools"), dict):
        raise CorruptCheckpointError(f"checkpoint {directory!r}: {METADATA} in {name!r} lists no pools")
    return version, meta


def _restore(version: str, meta: dict, targets):
    """Restore ``targets`` (ShapeDtypeStructs with shardings) from ``version`` and verify the checksums."""
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(os.path.join(version, "arrays"), args=ocp.args.StandardRestore(targets))
    except Exception as e:  # orbax/tensorstore raise many types for damaged files; the cause stays chained
        reason = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0][:200]
        raise CorruptCheckpointError(
            f"checkpoint {version!r}: the arrays cannot be read, files are missing, truncated or garbled "
            f"({type(e).__name__}: {reason})"
        ) from e
    got = _checksum_table(restored)
    bad = sorted(k for k in set(got) | set(meta["checksums"]) if got.get(k) != meta["checksums"].get(k))
    if bad:
        raise CorruptCheckpointError(
            f"checkpoint {version!r}: {len(bad)} array(s) do not match their saved checksums: {', '.join(bad[:5])}"
        )
    return restored
