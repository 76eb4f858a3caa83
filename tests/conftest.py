"""Test set-up: 8 fake CPU devices (so mesh tests run in-process) and the shared data directory."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture
def data_dir() -> str:
    """$KILN_DATA_DIR; tests that need the shared data sets skip without it."""
    path = os.environ.get("KILN_DATA_DIR")
    if not path or not os.path.isdir(path):
        pytest.skip("KILN_DATA_DIR is not set")
    return path
