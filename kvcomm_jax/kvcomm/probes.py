"""Engine probes: measurements run on an engine's calls, outside their TTFT.

A probe is called once per batched step as ``probe(engine, calls, plans, cache, first_tokens [B], key)``
over the step's reuse rows (every row when it has ``all_calls = True``), with the plan each row
ran (:class:`~kvcomm_jax.kvcomm.plans.Plan`), and returns one dict
per call, merged into that call record's ``fidelity`` (see
:class:`~kvcomm_jax.kvcomm.engine.KVCommEngine`). :func:`per_call` builds one from a
function of a single call.

:class:`FidelityProbe` compares every probed call with a dense reference on the same prompt,
all rows at once, from one batched dense prefill:

* **first token**: whether the call's first token equals the dense prefill's.
* **KV errors** (reuse calls, docs/design.md §10): per-layer relative error of the call's
  cache against the dense one over the first ``n - 1`` slots, and the same for the call's
  cache rebuilt with rotation only.
* **teacher-forced agreement**: the reference's greedy continuation ``d_1 .. d_N`` of the
  prompt (``N = tokens``, stop tokens ignored) is fed after the prompt on both the reference
  cache and the call's cache, each rewound to ``n - 1`` slots: tokens ``ids[-1], d_1 ..
  d_{N-1}`` at positions ``n - 1 .. n + N - 2``. Position ``j`` predicts ``d_{j+1}``; the
  two next-token distributions are compared there (:func:`teacher_forced_metrics`).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvcomm_jax.kvcomm.runner import ModelRunner
from kvcomm_jax.kvcomm.strategies import RotateOnly
from kvcomm_jax.model.buckets import bucket_length
from kvcomm_jax.model.generation import decode
from kvcomm_jax.model.kv_cache import KVCache, concat_rows, take_rows, with_lengths
from kvcomm_jax.model.registry import LoadedModel
from kvcomm_jax.model.sampling import SamplingConfig
from kvcomm_jax.model.transformer import forward
from kvcomm_jax.scale.distributed import host_values


def per_call(measure):
    """A probe from ``measure(engine, call, cache_row, first_token [1], key) -> dict``, run row by row."""

    def probe(engine, calls, plans, cache: KVCache, first, key) -> list[dict]:
        return [
            measure(engine, call, take_rows(cache, jnp.asarray([row], jnp.int32)), first[row : row + 1], key)
            for row, call in enumerate(calls)
        ]

    return probe


def with_capacity(cache: KVCache, capacity: int) -> KVCache:
    """``cache`` with at least ``capacity`` slots: its token axis zero-padded at the end if shorter."""
    extra = capacity - cache.capacity
    if extra <= 0:
        return cache
    pad = ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0))  # [L, B, H, S, D]
    return cache.replace(
        keys=jnp.pad(cache.keys, pad),
        values=jnp.pad(cache.values, pad),
        positions=jnp.pad(cache.positions, ((0, 0), (0, extra))),  # [B, S]
    )


@jax.jit
def layer_relative_errors(a: KVCache, b: KVCache, n):
    """Per-row, per-layer ``||a - b||_F / ||b||_F`` over each row's first ``n [B]`` slots: keys, values ``([B, L], [B, L])``."""
    S = min(a.capacity, b.capacity)
    mask = (jnp.arange(S)[None, :] < n[:, None])[None, :, None, :, None]  # [1, B, 1, S, 1]

    def err(x, y):
        x, y = x[:, :, :, :S].astype(jnp.float32), y[:, :, :, :S].astype(jnp.float32)  # [L, B, H, S, D]
        num = jnp.sqrt(jnp.sum(jnp.where(mask, jnp.square(x - y), 0.0), axis=(2, 3, 4)))  # [L, B]
        den = jnp.sqrt(jnp.sum(jnp.where(mask, jnp.square(y), 0.0), axis=(2, 3, 4)))
        return (num / jnp.maximum(den, 1e-30)).T  # [B, L]

    return err(a.keys, b.keys), err(a.values, b.values)


@jax.jit
def teacher_forced_metrics(reference_logits, probed_logits, fed, stop_ids) -> dict:
    """Per-row agreement of two teacher-forced runs over the same fed tokens.

    Args:
      reference_logits, probed_logits: ``[B, N, V]``; position ``j`` predicts the token after ``fed[:, j]``.
      fed: ``[B, N]`` int32, the tokens fed: the prompt's last, then ``d_1 .. d_{N-1}``.
      stop_ids: ``[K]`` int32. Position ``j`` counts iff none of ``d_1 .. d_j`` is a stop token
        (the position predicting the first stop token counts, later ones do not).

    Returns per row ``[B]``: ``top1_agreement`` (fraction of counted positions whose argmaxes
    agree), ``kl`` (mean over counted positions of ``KL(p_ref || p_probed)``, float32),
    ``response_agreement`` (every counted position agrees) and ``teacher_forced_tokens``
    (positions counted).
    """
    stops = jnp.any(fed[:, 1:, None] == stop_ids[None, None, :], axis=-1)  # [B, N-1]: is d_j a stop
    counted = jnp.cumsum(jnp.pad(stops, ((0, 0), (1, 0))), axis=1) == 0  # [B, N]
    agree = jnp.argmax(probed_logits, axis=-1) == jnp.argmax(reference_logits, axis=-1)  # [B, N]
    log_ref = jax.nn.log_softmax(reference_logits.astype(jnp.float32), axis=-1)  # [B, N, V]
    log_probed = jax.nn.log_softmax(probed_logits.astype(jnp.float32), axis=-1)
    kl = jnp.maximum(jnp.sum(jnp.exp(log_ref) * (log_ref - log_probed), axis=-1), 0.0)  # [B, N]; >= 0 up to rounding
    count = jnp.sum(counted, axis=1)  # [B]
    return {
        "top1_agreement": jnp.sum(agree & counted, axis=1) / count,
        "kl": jnp.sum(jnp.where(counted, kl, 0.0), axis=1) / count,
        "response_agreement": jnp.all(agree | ~counted, axis=1),
        "teacher_forced_tokens": count,
    }


def teacher_forced(
    reference: LoadedModel, probed: LoadedModel, prompts: Sequence[Sequence[int]], reference_cache: KVCache,
    probed_caches: Sequence[KVCache], tokens: int, stop_ids, key,
) -> list[dict]:
    """:func:`teacher_forced_metrics` of each of ``probed_caches`` (run with ``probed``) against ``reference``'s dense path.

    ``reference_cache`` is ``reference``'s dense prefill of ``prompts`` (it is donated);
    each probed cache holds at least each prompt's first ``n - 1`` tokens. All need room for
    ``n - 1 + tokens`` slots. ``reference``'s greedy decode from the prompt's last token
    (stop tokens ignored) gives the fed tokens ``[B, N]``, once; then one forward of them on
    the reference cache and on each probed cache, rewound to ``n - 1``. Returns, per probed
    cache, the metrics as numpy arrays ``[B]``.
    """
    kept = [len(ids) - 1 for ids in prompts]  # slots each cache is rewound to (a list: fresh arrays, safe to donate)
    start = jnp.asarray(kept, jnp.int32)  # [B]
    last = jnp.asarray([ids[-1] for ids in prompts], jnp.int32)  # [B]
    never = jnp.asarray([-1], jnp.int32)
    fed, _, reference_cache = decode(
        reference.params, last, start, with_lengths(reference_cache, kept), never, key,
        reference.config, SamplingConfig(), tokens,
    )  # [B, N]: ids[-1], d_1 .. d_{N-1}
    positions = start[:, None] + jnp.arange(tokens, dtype=jnp.int32)[None, :]  # [B, N]
    reference_logits, _ = forward(reference.params, fed, positions, with_lengths(reference_cache, kept), reference.config)
    metrics = []
    for cache in probed_caches:
        probed_logits, _ = forward(probed.params, fed, positions, with_lengths(cache, kept), probed.config)
        metrics.append(teacher_forced_metrics(reference_logits, probed_logits, fed, stop_ids))
    return host_values(metrics)  # [B] each


def per_row(columns: dict) -> list[dict]:
    """``{name: numpy [B, ...]}`` -> one dict of plain Python values (floats, ints, bools, lists) per row."""
    B = len(next(iter(columns.values())))
    return [{name: np.asarray(values[row]).tolist() for name, values in columns.items()} for row in range(B)]


@dataclasses.dataclass(frozen=True, eq=False)
class FidelityProbe:
    """An engine probe comparing each call with a dense reference on the same prompt (see the module docstring).

    tokens: teacher-forced positions ``N`` (0: no teacher forcing)
    kv_errors: report per-layer KV errors (reuse calls only: it rebuilds their caches with rotation only)
    reference: the runner whose dense path is the reference (default: the engine's own); e.g.
      a float32 runner to measure a bfloat16 engine's precision noise
    all_calls: probe every call, not only reuse calls

    Every row gets ``first_token_agrees``, ``dense_first_token`` and ``dense_ttft_ms`` (the
    reference's batched dense prefill of the probed rows, warm); ``kv_errors`` adds
    ``key_error``, ``value_error``, ``rotate_only_key_error``, ``rotate_only_value_error``
    (``[L]`` lists); ``tokens`` adds the four of :func:`teacher_forced_metrics`.
    """

    tokens: int = 32
    kv_errors: bool = True
    reference: ModelRunner | None = None
    all_calls: bool = False

    def __post_init__(self):
        if self.tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {self.tokens}")
        if self.kv_errors and self.all_calls:
            raise ValueError("kv_errors rebuilds reuse caches, so it cannot probe all calls")

    def __call__(self, engine, calls, plans, cache: KVCache, first, key) -> list[dict]:
        reference = self.reference or engine.runner
        prompts = [c.ids for c in calls]
        need = bucket_length(max(len(ids) for ids in prompts) + self.tokens, what="prompt + fidelity tokens")
        capacity = max(cache.capacity, need)
        dense_first, dense, dense_ms, _ = reference.prefill(prompts, capacity, key)
        first_tokens, dense_first = host_values((first, dense_first))  # [B], [B]
        out = [
            {"first_token_agrees": bool(a == d), "dense_first_token": int(d), "dense_ttft_ms": dense_ms}
            for a, d in zip(first_tokens, dense_first)
        ]
        if self.kv_errors:
            out = [{**o, **e} for o, e in zip(out, _kv_errors(engine, calls, cache, dense))]
        if self.tokens:
            (metrics,) = teacher_forced(
                reference.model, engine.model, prompts, dense, [with_capacity(cache, capacity)], self.tokens,
                engine.runner.stop_ids, key,
            )
            out = [{**o, **m} for o, m in zip(out, per_row(metrics))]
        return out


def _kv_errors(engine, calls, cache: KVCache, dense: KVCache) -> list[dict]:
    """Per-layer KV errors of ``cache`` and of the calls' rotate-only caches against ``dense``, one dict per row."""
    n = jnp.asarray([len(c.ids) - 1 for c in calls], jnp.int32)  # [B]
    capacity = max(c.capacity for c in calls)
    rotated = concat_rows([with_capacity(engine.reuse_cache(c, RotateOnly()), capacity) for c in calls])
    (k_err, v_err), (k_rot, v_rot) = host_values(
        (layer_relative_errors(cache, dense, n), layer_relative_errors(rotated, dense, n))
    )  # [B, L] each
    return per_row(
        {"key_error": k_err, "value_error": v_err, "rotate_only_key_error": k_rot, "rotate_only_value_error": v_rot}
    )


def teacher_forced_summary(fidelities: Iterable[dict | None]) -> dict:
    """Means of the teacher-forced metrics over the calls that have them (None when none), and their count."""
    measured = [f for f in fidelities if f and "teacher_forced_tokens" in f]

    def mean(name):
        return statistics.fmean(float(f[name]) for f in measured) if measured else None

    return {name: mean(name) for name in ("top1_agreement", "kl", "response_agreement")} | {"calls": len(measured)}


kv_fidelity = FidelityProbe(tokens=0)
"""First-token agreement and per-layer KV errors of reuse calls (no teacher forcing)."""
