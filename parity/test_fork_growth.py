"""Live only: df_mlx's Mamba and DfNet4 against the DFNet4 fork at T = 100 to 6000 steps, so
that an error accumulating along the selective scan (or over the attention's sums) shows."""

import os

import pytest

from parity.fork_growth import GROWTH_CASES, growth_report
from parity.fork_recorder import ENV_VAR, record_in_subprocess

pytestmark = pytest.mark.skipif(not os.environ.get(ENV_VAR),
                                reason=f"${ENV_VAR} (a DeepFilterNet4 checkout) is not set; the growth "
                                       "recordings are too large to commit")


@pytest.fixture(scope="module")
def live_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fork_growth")
    record_in_subprocess(GROWTH_CASES, out, timeout=900)
    return out


@pytest.mark.parametrize("name", GROWTH_CASES)
def test_growth(name, live_dir):
    report = growth_report(name, live_dir)
    print(report.table())
    assert report.passed, report.summary()
