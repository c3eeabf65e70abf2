"""Count XLA compilations and the seconds they take, so tests can assert that a new input does not recompile."""

from __future__ import annotations

import contextlib
import threading

import jax

_BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
# Tracing, lowering and backend compilation: every stage of turning a jitted call into a program.
_COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    _BACKEND_EVENT,
})
_lock = threading.Lock()
_total = 0
_seconds = 0.0
_registered = False


def _on_event(event: str, duration: float, **kwargs) -> None:
    global _total, _seconds
    if event in _COMPILE_EVENTS:
        with _lock:
            _seconds += duration
            if event == _BACKEND_EVENT:
                _total += 1


def _ensure_registered() -> None:
    global _registered
    with _lock:
        if not _registered:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _registered = True


def compile_count() -> int:
    """Backend compilations seen in this process since counting started."""
    _ensure_registered()
    return _total


def compile_seconds() -> float:
    """Seconds spent tracing, lowering and compiling in this process since counting started."""
    _ensure_registered()
    return _seconds


class CompileCounter:
    """``with CompileCounter() as c: ...`` then ``c.count`` is the number of compilations inside, ``c.seconds`` their time."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0

    def __enter__(self):
        self._start = compile_count()
        self._start_seconds = compile_seconds()
        return self

    def __exit__(self, *exc):
        self.count = compile_count() - self._start
        self.seconds = compile_seconds() - self._start_seconds
        return False


@contextlib.contextmanager
def no_new_compiles():
    """Raise AssertionError if anything inside the block compiles."""
    with CompileCounter() as counter:
        yield counter
    if counter.count:
        raise AssertionError(f"expected no new compilations, saw {counter.count}")
