"""Test set-up: 8 fake CPU devices (so mesh tests run in-process), a compilation cache for this
session, and the shared data directory."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs (a smoke run, stopped and resumed, ...): XLA's persistent cache
# compiles each once per session. Empty at the start, so the suite's time is that of a cold machine.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="kiln-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    # pytest-xdist's workers inherit the directory; a size limit turns on JAX's file lock, so that a
    # worker never reads an entry another is still writing.
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))

import pytest  # noqa: E402


@pytest.fixture
def data_dir() -> str:
    """$KILN_DATA_DIR; tests that need the shared data sets skip without it."""
    path = os.environ.get("KILN_DATA_DIR")
    if not path or not os.path.isdir(path):
        pytest.skip("KILN_DATA_DIR is not set")
    return path
