"""Load the PyTorch reference once for every parity test.

Without a reference every parity test is skipped with one reason; with
DFMLX_REQUIRE_REFERENCE=1 (set by CI) a missing reference is an error instead.
"""

import os

import pytest

from parity.reference import ReferenceUnavailable, load_reference

REQUIRE_VAR = "DFMLX_REQUIRE_REFERENCE"

try:
    REFERENCE = load_reference()
    UNAVAILABLE = None
except ReferenceUnavailable as e:
    REFERENCE, UNAVAILABLE = None, str(e)


def pytest_report_header(config):
    return f"parity reference: {REFERENCE.describe() if REFERENCE else 'unavailable: ' + UNAVAILABLE}"


def pytest_collection_modifyitems(config, items):
    if UNAVAILABLE is None:
        return
    if os.environ.get(REQUIRE_VAR) == "1":
        raise pytest.UsageError(f"{REQUIRE_VAR}=1 but the parity reference is unavailable: {UNAVAILABLE}")
    skip = pytest.mark.skip(reason=f"parity reference unavailable: {UNAVAILABLE}")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def default_configs():
    """Every parity test starts with both configs (reference and df_mlx) at their defaults."""
    if REFERENCE is None:
        yield
        return
    from df_mlx.config import config as mlx_config
    from parity.reference import import_ref

    configs = (import_ref("config").config, mlx_config)
    for cfg in configs:
        cfg.use_defaults(allow_reload=True)
    yield
    for cfg in configs:
        cfg.use_defaults(allow_reload=True)

