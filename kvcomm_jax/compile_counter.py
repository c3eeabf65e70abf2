"""Count XLA compilations, so tests can assert that a new input does not recompile."""

from __future__ import annotations

import contextlib
import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_total = 0
_registered = False


def _on_event(event: str, duration: float, **kwargs) -> None:
    global _total
    if event == _EVENT:
        with _lock:
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


class CompileCounter:
    """``with CompileCounter() as c: ...`` then ``c.count`` is the number of compilations inside."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self._start = compile_count()
        return self

    def __exit__(self, *exc):
        self.count = compile_count() - self._start
        return False


@contextlib.contextmanager
def no_new_compiles():
    """Raise AssertionError if anything inside the block compiles."""
    with CompileCounter() as counter:
        yield counter
    if counter.count:
        raise AssertionError(f"expected no new compilations, saw {counter.count}")
