"""Timing one step of work: warm milliseconds, with compilation measured apart."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from kvcomm_jax.compile_counter import CompileCounter


def ready(tree) -> float:
    """Block until every array in ``tree`` is computed; returns ``time.perf_counter()`` then."""
    jax.block_until_ready(tree)
    return time.perf_counter()


def timed(step):
    """Run the pure ``step()`` and time it: ``(result, warm_ms, compile_ms)``.

    If the step compiled anything, it is run once more on the same inputs and that
    second, warm run is the time reported; the difference is returned as compile time.
    """
    with CompileCounter() as counter:
        start = time.perf_counter()
        out = step()
        first_ms = (ready(out) - start) * 1e3
    if not counter.count:
        return out, first_ms, 0.0
    start = time.perf_counter()
    out = step()
    warm_ms = (ready(out) - start) * 1e3
    return out, warm_ms, max(0.0, first_ms - warm_ms)


def timed_donating(step, donated, signature, seen: set):
    """Time ``step(donated)``, a step that donates (consumes) its argument: ``(result, warm_ms, compile_ms)``.

    A donated input cannot be run twice, so :func:`timed`'s warm rerun is not possible.
    Instead, the first time a ``signature`` (anything hashable that determines the
    compiled program, e.g. the input shapes) is seen, the step runs once untimed on a
    copy of ``donated``, compiling it; ``seen`` remembers the signatures already warm.
    """
    compile_count, first_ms = 0, 0.0
    if signature not in seen:
        copy = jax.tree.map(jnp.copy, donated)
        with CompileCounter() as counter:
            start = time.perf_counter()
            first_ms = (ready(step(copy)) - start) * 1e3
        compile_count = counter.count
        seen.add(signature)
    start = time.perf_counter()
    out = step(donated)
    warm_ms = (ready(out) - start) * 1e3
    return out, warm_ms, max(0.0, first_ms - warm_ms) if compile_count else 0.0
