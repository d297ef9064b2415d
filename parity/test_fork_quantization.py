"""df_mlx.quantization's size accounting against the DFNet4 fork's `df.quantization`: the fork's
get_model_size_mb and compare_model_sizes on its float DFN3 and DFN4 (default configs) equal
df_mlx's on the same configs, to the byte. From the committed fixture
(parity/fixtures/fork/quantization_sizes.json, recorded by parity/fork_hardware_recorder.py) and
live when $DFMLX_FORK_DIR names a checkout. Quantized sizes are not compared: the fork's count
misses torch's packed int8 weights (see df_mlx/quantization.py)."""

import json
from importlib import import_module

import pytest

from df_mlx.config import config
from df_mlx.quantization import compare_model_sizes, get_model_size_mb
from parity.fork_hardware_recorder import QUANTIZATION, record_in_subprocess
from parity.fork_recorder import FIXTURE_DIR, live

# Both sides sum element counts times element sizes of the same arrays: only the final division
# to MiB rounds (float64), so the sizes agree to the last bits.
SIZE_RTOL = 1e-12



def load(directory=FIXTURE_DIR) -> dict:
    return json.loads((directory / f"{QUANTIZATION}.json").read_text())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """df_mlx's float models under each recorded config."""
    tmp = tmp_path_factory.mktemp("cfg")
    out = {}
    try:
        for name, case in load()["sizes"].items():
            (tmp / "config.ini").write_text(case["ini"])
            config.load(str(tmp / "config.ini"), allow_reload=True)
            out[name] = import_module(f"df_mlx.{name}").init_model()
    finally:
        config.use_defaults(allow_reload=True)
    return out


def check(recording: dict, models):
    for name, case in recording["sizes"].items():
        assert get_model_size_mb(models[name]) == pytest.approx(case["size_mb"], rel=SIZE_RTOL), name
    ours = compare_model_sizes(models["deepfilternet4"], models["deepfilternet3"])
    assert ours == pytest.approx(recording["compare_dfnet4_to_dfnet3"], rel=SIZE_RTOL)


def test_fixture_sizes(models):
    check(load(), models)


@live
def test_live_sizes(models, tmp_path):
    record_in_subprocess([QUANTIZATION], tmp_path)
    fresh = load(tmp_path)
    check(fresh, models)
    assert fresh["sizes"] == load()["sizes"]
