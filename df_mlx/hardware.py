"""Hardware detection and training-setting recommendations, as the DFNet4 fork's `df.hardware`.

The fork asks torch which device it has (CUDA, MPS, CPU) and recommends a batch size, eval
batch size, loader workers and prefetch depth from the device kind, its memory, the CPU count
and the Apple chip variant. Here the device is the one MLX runs on: an NVIDIA GPU through MLX's
CUDA backend (`device_type` "cuda"), the Apple GPU through Metal ("metal", where the fork says
"mps") or the CPU; `HardwareConfig.device` is an MLX device name, "gpu" or "cpu". Memory comes
from `mx.device_info()` for a GPU and from os.sysconf or /proc/meminfo for the CPU (no psutil).
The recommendations are the fork's decision tables: the same profile numbers give the same
batch sizes, workers and prefetch (parity/test_fork_hardware.py checks them against the fork).

Left out because they only steer torch and mean nothing on MLX: `pin_memory` (pinned host
memory for CUDA copies; MLX has no such thing), `channels_last` (a torch memory format; MLX is
channels-last throughout), `use_mps_fallback` and `mps_complex_supported` (the torch MPS
backend's macOS < 14 complex-tensor gaps and PYTORCH_ENABLE_MPS_FALLBACK), `enable_amp`,
`amp_dtype`, `supports_fp16`, `supports_bf16` (torch autocast; MLX has none), `torch_compile`,
`supports_complex` and `neural_engine_cores` (never measured by the fork).

Environment overrides as the fork's: DF_DEVICE (cpu or gpu; cuda, mps and metal mean gpu),
DF_BATCH_SIZE, DF_BATCH_SIZE_EVAL, DF_NUM_WORKERS, DF_PREFETCH, DF_DISABLE_AUTOTUNE=1.

    python -m df_mlx.hardware [--json] [--apply config.ini [--output tuned.ini]]
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from configparser import ConfigParser
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
from loguru import logger

from df_mlx import _native

GIB = 1024**3

# (minimum memory in GB, batch size, eval batch size, prefetch batches), first match wins: the
# fork's tables for CUDA (by VRAM), Apple Pro/Max/Ultra chips, base Apple chips (by unified
# memory) and the CPU (by RAM; prefetch there follows the worker count).
CUDA_TABLE = ((24, 32, 64, 64), (16, 24, 48, 48), (12, 16, 32, 32), (8, 8, 16, 24), (0, 4, 8, 16))
APPLE_PRO_TABLE = ((96, 16, 32, 16), (64, 12, 24, 12), (32, 10, 16, 8), (0, 4, 8, 8))
APPLE_BASE_TABLE = ((24, 6, 12, 8), (16, 4, 8, 6), (0, 2, 4, 4))
CPU_TABLE = ((64, 8, 16, None), (32, 4, 8, None), (16, 2, 4, None), (0, 1, 2, None))

# The fork's fallback when the memory size cannot be read.
DEFAULT_MEMORY_GB = 8.0


class HardwareError(ValueError):
    """A bad override (DF_DEVICE, DF_BATCH_SIZE, ...) or an unreadable config file."""


@dataclass
class HardwareProfile:
    """What the machine has, as far as MLX and the OS tell."""

    device_type: str  # "cuda", "metal" or "cpu"
    device_name: str
    device_count: int = 1
    total_memory_gb: float = 0.0
    available_memory_gb: float = 0.0
    cpu_count: int = 1
    cpu_name: str = "Unknown"
    os_name: str = "Unknown"
    os_version: str = ""
    is_apple_silicon: bool = False
    apple_chip_variant: str = ""  # e.g. "M3 Max"
    gpu_cores: int = 0
    performance_cores: int = 0
    efficiency_cores: int = 0


@dataclass
class HardwareConfig:
    """Recommended training settings (the `[train]` keys df reads)."""

    device: str = "cpu"
    batch_size: int = 4
    batch_size_eval: int = 8
    num_workers: int = 4
    prefetch_batches: int = 32
    profile: Optional[HardwareProfile] = None
    is_auto_tuned: bool = True

    @classmethod
    def detect(cls, verbose: bool = True) -> "HardwareConfig":
        """Detect the machine and recommend settings, then apply the DF_* overrides."""
        if os.environ.get("DF_DISABLE_AUTOTUNE", "0") == "1":
            if verbose:
                logger.info("Auto-tuning disabled via DF_DISABLE_AUTOTUNE")
            return cls(is_auto_tuned=False)
        profile = _detect_hardware_profile()
        config = _build_config_for_profile(profile)
        config.profile = profile
        config = _apply_env_overrides(config)
        if verbose:
            _log_hardware_config(config)
        return config

    @classmethod
    def from_env(cls) -> "HardwareConfig":
        """Defaults plus the DF_* overrides, no detection."""
        return _apply_env_overrides(cls(is_auto_tuned=False))

    def to_dict(self) -> Dict:
        return {
            "device": self.device,
            "batch_size": self.batch_size,
            "batch_size_eval": self.batch_size_eval,
            "num_workers": self.num_workers,
            "prefetch_batches": self.prefetch_batches,
            "is_auto_tuned": self.is_auto_tuned,
        }

    def apply_to_config(self, config_parser: ConfigParser) -> None:
        """Write the settings into the `[train]` section of a ConfigParser."""
        if not config_parser.has_section("train"):
            config_parser.add_section("train")
        config_parser.set("train", "DEVICE", self.device)
        config_parser.set("train", "BATCH_SIZE", str(self.batch_size))
        config_parser.set("train", "BATCH_SIZE_EVAL", str(self.batch_size_eval))
        config_parser.set("train", "NUM_WORKERS", str(self.num_workers))
        config_parser.set("train", "NUM_PREFETCH_BATCHES", str(self.prefetch_batches))


def _run(cmd: List[str], timeout: float = 5) -> Optional[str]:
    """stdout of a system tool (sysctl, system_profiler), or None when it is missing or fails."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (subprocess.TimeoutExpired, FileNotFoundError, PermissionError) as e:
        logger.debug(f"{cmd[0]} unavailable: {e}")
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _detect_hardware_profile() -> HardwareProfile:
    profile = HardwareProfile(device_type="cpu", device_name="CPU", os_name=platform.system(),
                              os_version=platform.release(), cpu_count=os.cpu_count() or 1,
                              cpu_name=_get_cpu_name())
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        profile.is_apple_silicon = True
        _detect_apple_silicon_details(profile)
    gpu = mx.is_available(mx.gpu)
    if gpu and hasattr(mx, "cuda") and mx.cuda.is_available():
        info = mx.device_info(mx.gpu)
        profile.device_type = "cuda"
        profile.device_count = mx.device_count(mx.gpu)
        profile.device_name = str(info.get("device_name", "CUDA GPU"))
        total = info.get("total_memory", info.get("memory_size"))
        profile.total_memory_gb = total / GIB if total else _get_system_memory_gb()
        free = info.get("free_memory")
        profile.available_memory_gb = free / GIB if free else profile.total_memory_gb  # the fork: all VRAM
    elif gpu and mx.metal.is_available():
        info = mx.device_info(mx.gpu)
        profile.device_type = "metal"
        variant = profile.apple_chip_variant
        profile.device_name = f"Apple {variant}" if variant else str(info.get("device_name", "Apple Silicon"))
        total = info.get("memory_size", info.get("total_memory"))
        profile.total_memory_gb = total / GIB if total else _get_system_memory_gb()
        # Metal's own limit for one process's GPU working set (the fork guesses 70 %).
        working_set = info.get("max_recommended_working_set_size")
        profile.available_memory_gb = working_set / GIB if working_set else profile.total_memory_gb * 0.7
    else:
        profile.total_memory_gb = _get_system_memory_gb()
        profile.available_memory_gb = profile.total_memory_gb * 0.8  # the fork's estimate
    return profile


def _detect_apple_silicon_details(profile: HardwareProfile) -> None:
    """Chip variant, performance/efficiency cores and GPU cores from sysctl/system_profiler."""
    brand = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
    if brand:
        profile.cpu_name = brand
        match = re.search(r"Apple (M\d+(?:\s+(?:Pro|Max|Ultra))?)", brand)
        if match:
            profile.apple_chip_variant = match.group(1)
    cores = _run(["sysctl", "-n", "hw.perflevel0.physicalcpu", "hw.perflevel1.physicalcpu"])
    if cores:
        counts = [int(c) for c in cores.split() if c.isdigit()]
        profile.performance_cores, profile.efficiency_cores = (counts + [0, 0])[:2]
    displays = _run(["system_profiler", "SPDisplaysDataType"], timeout=10)
    match = re.search(r"Total Number of Cores:\s*(\d+)", displays or "")
    if match:
        profile.gpu_cores = int(match.group(1))


def _pick(table, memory_gb: float):
    return next(row[1:] for row in table if memory_gb >= row[0])


def _build_config_for_profile(profile: HardwareProfile) -> HardwareConfig:
    """The fork's recommendation for a profile (a pure function of its numbers)."""
    if profile.device_type == "cuda":
        return _tune_for_cuda(profile)
    if profile.device_type == "metal":
        return _tune_for_metal(profile)
    return _tune_for_cpu(profile)


def _tune_for_cuda(profile: HardwareProfile) -> HardwareConfig:
    """Batch sizes by VRAM; at most 8 workers so the loader does not starve the GPU."""
    bs, bs_eval, prefetch = _pick(CUDA_TABLE, profile.total_memory_gb)
    return HardwareConfig(device="gpu", batch_size=bs, batch_size_eval=bs_eval,
                          num_workers=min(profile.cpu_count, 8), prefetch_batches=prefetch)


def _tune_for_metal(profile: HardwareProfile) -> HardwareConfig:
    """Batch sizes by unified memory and chip class (Pro/Max/Ultra or base); at most 4 workers,
    no more than the performance cores (unified memory makes more workers hurt, per the fork)."""
    chip = profile.apple_chip_variant.lower()
    pro = any(x in chip for x in ("pro", "max", "ultra"))
    bs, bs_eval, prefetch = _pick(APPLE_PRO_TABLE if pro else APPLE_BASE_TABLE, profile.total_memory_gb)
    return HardwareConfig(device="gpu", batch_size=bs, batch_size_eval=bs_eval,
                          num_workers=min(profile.performance_cores, 4), prefetch_batches=prefetch)


def _tune_for_cpu(profile: HardwareProfile) -> HardwareConfig:
    """Batch sizes by RAM; all cores but two load data, four batches ahead each."""
    bs, bs_eval, _ = _pick(CPU_TABLE, profile.total_memory_gb)
    workers = max(1, profile.cpu_count - 2)
    return HardwareConfig(device="cpu", batch_size=bs, batch_size_eval=bs_eval, num_workers=workers,
                          prefetch_batches=workers * 4)


def _mlx_device(value: str) -> str:
    kind = value.split(":")[0].strip().lower()
    kind = "gpu" if kind in ("cuda", "mps", "metal") else kind
    if kind not in ("cpu", "gpu"):
        raise HardwareError(f"DF_DEVICE={value!r} is not an MLX device (use cpu or gpu)")
    return kind


def _env_int(name: str, minimum: int) -> int:
    value = os.environ[name]
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise HardwareError(f"{name}={value!r} is not an integer >= {minimum}")
    return number


def _apply_env_overrides(config: HardwareConfig) -> HardwareConfig:
    """DF_DEVICE, DF_BATCH_SIZE, DF_BATCH_SIZE_EVAL, DF_NUM_WORKERS, DF_PREFETCH win over the
    recommendation (and mark it as not auto-tuned)."""
    if "DF_DEVICE" in os.environ:
        config.device = _mlx_device(os.environ["DF_DEVICE"])
        config.is_auto_tuned = False
    for var, attr, minimum in (("DF_BATCH_SIZE", "batch_size", 1), ("DF_BATCH_SIZE_EVAL", "batch_size_eval", 1),
                               ("DF_NUM_WORKERS", "num_workers", 0), ("DF_PREFETCH", "prefetch_batches", 1)):
        if var in os.environ:
            setattr(config, attr, _env_int(var, minimum))
            config.is_auto_tuned = False
    return config


def _get_cpu_name() -> str:
    if platform.system() == "Darwin":
        brand = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if brand:
            return brand
    elif platform.system() == "Linux":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return platform.processor() or "Unknown CPU"


def _get_system_memory_gb() -> float:
    """Physical memory from sysconf (Linux, macOS), else /proc/meminfo, else the fork's 8 GB."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        if pages > 0 and page_size > 0:
            return pages * page_size / GIB
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 1024**2
    except (OSError, ValueError, IndexError):
        pass
    return DEFAULT_MEMORY_GB


def _log_hardware_config(config: HardwareConfig) -> None:
    p = config.profile
    logger.info(f"Platform: {p.os_name} {p.os_version}; CPU: {p.cpu_name} ({p.cpu_count} cores)")
    if p.is_apple_silicon:
        logger.info(f"Apple Silicon: {p.apple_chip_variant} ({p.performance_cores} performance, "
                    f"{p.efficiency_cores} efficiency, {p.gpu_cores} GPU cores)")
    logger.info(f"Device: {p.device_type} ({p.device_name}), {p.total_memory_gb:.1f} GB total, "
                f"~{p.available_memory_gb:.1f} GB available")
    logger.info(f"Compute: {_native.describe()}")
    logger.info(f"Recommended: device {config.device}, batch size {config.batch_size} (eval "
                f"{config.batch_size_eval}), {config.num_workers} workers, {config.prefetch_batches} prefetch")
    if not config.is_auto_tuned:
        logger.info("Some settings overridden via environment variables")


def auto_tune_training_config(config_path: str, output_path: Optional[str] = None) -> HardwareConfig:
    """Write the detected recommendation into the `[train]` section of a config.ini (in place
    unless `output_path`), through a temporary file renamed into place."""
    if not Path(config_path).is_file():
        raise HardwareError(f"config file {config_path} does not exist")
    hw_config = HardwareConfig.detect()
    parser = ConfigParser()
    parser.read(config_path)
    hw_config.apply_to_config(parser)
    output = Path(output_path or config_path)
    from df_mlx.atomic import atomic_file

    with atomic_file(output, suffix=".tmp") as tmp, open(tmp, "w") as f:
        parser.write(f)
    logger.info(f"Auto-tuned config written to: {output}")
    return hw_config


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m df_mlx.hardware",
                                     description="Detect hardware and show recommended settings")
    parser.add_argument("--json", action="store_true", help="Output as JSON")
    parser.add_argument("--apply", type=str, help="Apply settings to config file")
    parser.add_argument("--output", type=str, help="Output path for modified config")
    args = parser.parse_args(argv)
    try:
        if args.apply:
            auto_tune_training_config(args.apply, args.output)
            return 0
        config = HardwareConfig.detect(verbose=not args.json)
    except HardwareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(config.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
