"""df_mlx.hardware's recommendations against the DFNet4 fork's `df.hardware`: every profile of a
grid that straddles each threshold of the fork's tables gives the same batch sizes, workers and
prefetch, and the DF_* overrides act alike. From the committed fixture
(parity/fixtures/fork/hardware_decisions.json, recorded by parity/fork_hardware_recorder.py) and
live against the fork when $DFMLX_FORK_DIR names a checkout."""

import json
import os

import pytest

from df_mlx import hardware as hw
from parity.fork_hardware_recorder import HARDWARE, record_in_subprocess
from parity.fork_recorder import FIXTURE_DIR, live

# The fork's Apple GPU is torch's "mps"; MLX reaches it through Metal. Both GPUs are MLX's "gpu".
DEVICE_TYPES = {"cuda": "cuda", "mps": "metal", "cpu": "cpu"}
DEVICES = {"cuda": "gpu", "mps": "gpu", "cpu": "cpu"}
# Fork settings that only steer torch (see df_mlx/hardware.py): recorded, not ported.
TORCH_ONLY = {"pin_memory", "use_mps_fallback", "channels_last", "enable_amp", "amp_dtype"}



def ours(fork_config: dict) -> dict:
    """The fork's to_dict() as df_mlx states it: MLX device names, torch-only keys dropped."""
    out = {k: v for k, v in fork_config.items() if k not in TORCH_ONLY}
    out["device"] = DEVICES[out["device"]]
    return out


def check_decisions(recording: dict):
    assert len(recording["decisions"]) > 100
    for case in recording["decisions"]:
        kw = dict(case["profile"], device_type=DEVICE_TYPES[case["profile"]["device_type"]])
        got = hw._build_config_for_profile(hw.HardwareProfile(**kw)).to_dict()
        assert got == ours(case["config"]), case["profile"]


def check_overrides(recording: dict, monkeypatch):
    for case in recording["overrides"]:
        with monkeypatch.context() as m:
            for var in [k for k in os.environ if k.startswith("DF_")]:
                m.delenv(var)
            for var, value in case["env"].items():
                m.setenv(var, value)
            assert hw._apply_env_overrides(hw.HardwareConfig()).to_dict() == ours(case["config"]), case["env"]


def load(directory=FIXTURE_DIR) -> dict:
    return json.loads((directory / f"{HARDWARE}.json").read_text())


def test_fixture_decisions():
    check_decisions(load())


def test_fixture_overrides(monkeypatch):
    check_overrides(load(), monkeypatch)


def test_only_torch_settings_are_left_out():
    """If the fork adds a setting, this names it: df_mlx ports it or lists it as torch-only."""
    fork_keys = set(load()["decisions"][0]["config"])
    assert fork_keys - TORCH_ONLY == set(hw.HardwareConfig().to_dict())


def test_fixture_is_small():
    assert (FIXTURE_DIR / f"{HARDWARE}.json").stat().st_size < 200_000


@pytest.fixture(scope="module")
def live_recording(tmp_path_factory):
    out = tmp_path_factory.mktemp("fork_hardware")
    record_in_subprocess([HARDWARE], out)
    return load(out)


@live
def test_live_decisions(live_recording, monkeypatch):
    check_decisions(live_recording)
    check_overrides(live_recording, monkeypatch)


@live
def test_live_matches_fixture(live_recording):
    committed = load()
    assert live_recording["decisions"] == committed["decisions"]
    assert live_recording["overrides"] == committed["overrides"]
