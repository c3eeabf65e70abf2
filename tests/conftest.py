import os

# Simulated CPU devices for the sharding tests; harmless for everything else.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the environment above, before any backend starts)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    Every XLA:CPU executable holds memory mappings of its own; the whole suite in one
    process compiles thousands, and past the kernel's limit on mappings per process
    (``vm.max_map_count``, 65530 by default) a later compilation crashes the process.
    """
    yield
    jax.clear_caches()
