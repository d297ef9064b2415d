"""df_mlx.hardware: detection on this machine, the recommendation tables at their edges, the
DF_* overrides, writing a config, and the command line."""

import json
from configparser import ConfigParser

import mlx.core as mx
import pytest

from df_mlx import hardware as hw
from df_mlx.hardware import HardwareConfig, HardwareError, HardwareProfile

OVERRIDES = ("DF_DEVICE", "DF_BATCH_SIZE", "DF_BATCH_SIZE_EVAL", "DF_NUM_WORKERS", "DF_PREFETCH",
             "DF_DISABLE_AUTOTUNE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in OVERRIDES:
        monkeypatch.delenv(var, raising=False)


def recommend(**kw):
    kw.setdefault("device_name", "test")
    return hw._build_config_for_profile(HardwareProfile(**kw))


def settings(config):
    return config.device, config.batch_size, config.batch_size_eval, config.num_workers, config.prefetch_batches


def meminfo_gb():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemTotal")) / 1024**2


def test_cuda_by_vram():
    """24 GB is the top row (>=), just under it the next; workers capped at 8."""
    assert settings(recommend(device_type="cuda", total_memory_gb=24.0, cpu_count=32)) == ("gpu", 32, 64, 8, 64)
    assert settings(recommend(device_type="cuda", total_memory_gb=23.9, cpu_count=4)) == ("gpu", 24, 48, 4, 48)
    assert settings(recommend(device_type="cuda", total_memory_gb=6.0, cpu_count=4)) == ("gpu", 4, 8, 4, 16)


def test_metal_by_chip_class():
    """A Max chip with 64 GB gets the Pro table, a base chip with 64 GB the base table's top."""
    pro = recommend(device_type="metal", apple_chip_variant="M3 Max", total_memory_gb=64.0, performance_cores=12)
    base = recommend(device_type="metal", apple_chip_variant="M2", total_memory_gb=64.0, performance_cores=4)
    assert settings(pro) == ("gpu", 12, 24, 4, 12)
    assert settings(base) == ("gpu", 6, 12, 4, 8)
    assert settings(recommend(device_type="metal", total_memory_gb=8.0, performance_cores=2)) == ("gpu", 2, 4, 2, 4)


def test_cpu_by_ram():
    assert settings(recommend(device_type="cpu", total_memory_gb=32.0, cpu_count=16)) == ("cpu", 4, 8, 14, 56)
    assert settings(recommend(device_type="cpu", total_memory_gb=8.0, cpu_count=2)) == ("cpu", 1, 2, 1, 4)


def test_detects_this_machine():
    """mlx[cpu] here: no GPU, so the CPU profile with the memory /proc/meminfo reports."""
    config = HardwareConfig.detect(verbose=False)
    p = config.profile
    if mx.is_available(mx.gpu):
        pytest.skip("this test describes a CPU-only MLX")
    assert (p.device_type, config.device) == ("cpu", "cpu")
    assert p.total_memory_gb == pytest.approx(meminfo_gb(), rel=0.02)
    assert p.available_memory_gb == pytest.approx(0.8 * p.total_memory_gb)
    assert p.cpu_count >= 1 and p.cpu_name
    assert settings(config) == settings(hw._tune_for_cpu(p)) and config.is_auto_tuned


def test_system_memory_without_sysconf(monkeypatch):
    """/proc/meminfo is the fallback when sysconf cannot tell."""
    monkeypatch.setattr(hw.os, "sysconf", lambda name: -1)
    assert hw._get_system_memory_gb() == pytest.approx(meminfo_gb())


def test_overrides(monkeypatch):
    monkeypatch.setenv("DF_BATCH_SIZE", "3")
    monkeypatch.setenv("DF_NUM_WORKERS", "0")
    monkeypatch.setenv("DF_DEVICE", "mps")  # torch's name for the Apple GPU -> MLX's gpu
    config = HardwareConfig.detect(verbose=False)
    assert (config.batch_size, config.num_workers, config.device, config.is_auto_tuned) == (3, 0, "gpu", False)


def test_disable_autotune(monkeypatch):
    monkeypatch.setenv("DF_DISABLE_AUTOTUNE", "1")
    monkeypatch.setenv("DF_BATCH_SIZE", "3")  # ignored, as in the fork
    config = HardwareConfig.detect(verbose=False)
    assert settings(config) == settings(HardwareConfig()) and config.profile is None and not config.is_auto_tuned


@pytest.mark.parametrize("var,value", [("DF_DEVICE", "tpu"), ("DF_BATCH_SIZE", "many"), ("DF_BATCH_SIZE", "0"),
                                       ("DF_NUM_WORKERS", "-1"), ("DF_PREFETCH", "1.5")])
def test_bad_override(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(HardwareError, match=var):
        HardwareConfig.from_env()


def test_auto_tune_writes_train_section(tmp_path, monkeypatch):
    """The [train] keys df_mlx.train reads are set; other sections and keys survive; the input
    file is untouched when an output path is given."""
    monkeypatch.setenv("DF_BATCH_SIZE", "5")
    src, out = tmp_path / "config.ini", tmp_path / "tuned.ini"
    src.write_text("[train]\nmax_epochs = 3\n\n[df]\nsr = 48000\n")
    before = src.read_text()
    config = hw.auto_tune_training_config(str(src), str(out))
    parser = ConfigParser()
    parser.read(out)
    assert parser.get("train", "batch_size") == "5" and parser.get("train", "max_epochs") == "3"
    assert parser.get("train", "num_prefetch_batches") == str(config.prefetch_batches)
    assert parser.get("train", "device") == config.device and parser.get("df", "sr") == "48000"
    assert src.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.ini", "tuned.ini"]  # no temp file left


def test_auto_tune_missing_file(tmp_path):
    with pytest.raises(HardwareError, match="does not exist"):
        hw.auto_tune_training_config(str(tmp_path / "nope.ini"))


def test_cli_json(capsys):
    assert hw.main(["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == HardwareConfig.detect(verbose=False).to_dict()


def test_cli_bad_override(monkeypatch, capsys):
    monkeypatch.setenv("DF_DEVICE", "tpu")
    assert hw.main(["--json"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: DF_DEVICE='tpu'") and "\n" not in err
