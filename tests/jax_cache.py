"""A persistent XLA compilation cache for end-to-end tests that rerun the same pipeline.

A resumed run builds new jitted functions with the same programs as the first run; with the cache
they are loaded instead of compiled again, which makes the resume tests several times faster.
"""

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

OPTIONS = (
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache_dir(tmp_path_factory):
    """Cache every compiled program of the module in a fresh folder; restore the settings after."""
    previous = {name: getattr(jax.config, name) for name in OPTIONS}
    for name in OPTIONS:
        jax.config.update(name, 0)
    compilation_cache.reset_cache()
    compilation_cache.set_cache_dir(str(tmp_path_factory.mktemp("xla_cache")))
    yield
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", None)
    for name, value in previous.items():
        jax.config.update(name, value)
