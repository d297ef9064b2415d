"""Record the DFNet4 fork's hardware recommendations and model sizes as JSON fixtures.

The fork's `df.hardware` decides batch sizes, workers and prefetch from a few numbers (device
kind, memory, CPU count, chip variant, performance cores), and its `df.quantization` measures a
model's size from its parameters and buffers. Both are pure functions of their inputs, so a
grid of inputs and the fork's answers is the whole fixture:

    parity/fixtures/fork/hardware_decisions.json   profile fields -> the fork's to_dict()
    parity/fixtures/fork/quantization_sizes.json   config -> get_model_size_mb, compare_model_sizes

Record (the fork runs in its own process, as for parity/fork_recorder.py):

    DFMLX_FORK_DIR=/path/to/DeepFilterNet4 python -m parity.fork_hardware_recorder [--out DIR] [hardware|quantization]
"""

import argparse
import itertools
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from parity.fork_recorder import BASE_INI, ENV_VAR, FIXTURE_DIR, _git_commit, _load_fork, fork_dir, run_fork_module

HARDWARE = "hardware_decisions"
QUANTIZATION = "quantization_sizes"

# Memory sizes on both sides of every threshold of the fork's tables, and a spread of CPUs.
_CUDA = dict(total_memory_gb=[4.0, 7.9, 8.0, 11.9, 12.0, 16.0, 23.9, 24.0, 80.0], cpu_count=[2, 8, 32])
_MPS = dict(apple_chip_variant=["", "M1", "M2 Pro", "M3 Max", "M2 Ultra"],
            total_memory_gb=[8.0, 16.0, 23.9, 24.0, 31.9, 32.0, 64.0, 96.0, 192.0], performance_cores=[0, 4, 12])
_CPU = dict(total_memory_gb=[4.0, 15.9, 16.0, 32.0, 63.9, 64.0, 256.0], cpu_count=[1, 2, 3, 16])
# Overrides as the fork applies them (values that both the fork and df_mlx accept).
ENV_CASES = [{}, {"DF_BATCH_SIZE": "3"}, {"DF_BATCH_SIZE_EVAL": "5", "DF_NUM_WORKERS": "0"},
             {"DF_PREFETCH": "7", "DF_DEVICE": "cpu"}]

# Model configs whose float size both sides count from the same parameters and buffers.
SIZE_CONFIGS = {
    "deepfilternet3": "[train]\nmodel = deepfilternet3\n",
    "deepfilternet4": BASE_INI,
}


def profile_grid() -> List[Dict]:
    """Every profile the hardware fixture holds, as HardwareProfile keyword arguments."""
    grid = []
    for device_type, axes in (("cuda", _CUDA), ("mps", _MPS), ("cpu", _CPU)):
        for values in itertools.product(*axes.values()):
            grid.append(dict(device_type=device_type, device_name=device_type, **dict(zip(axes, values))))
    return grid


@contextmanager
def _environ(values: Dict[str, str]):
    """os.environ with `values` set and every DF_* override cleared, restored afterwards."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("DF_")]:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _meta(path: Path) -> Dict:
    import torch

    return {"fork": {"commit": _git_commit(path)}, "torch": torch.__version__}


def record_hardware(path: Path) -> Dict:
    hw = _load_fork(path)("hardware")
    decisions = [{"profile": kw, "config": hw._build_config_for_profile(hw.HardwareProfile(**kw)).to_dict()}
                 for kw in profile_grid()]
    overrides = []
    for env in ENV_CASES:
        with _environ(env):
            overrides.append({"env": env, "config": hw._apply_env_overrides(hw.HardwareConfig()).to_dict()})
    return {**_meta(path), "decisions": decisions, "overrides": overrides}


def record_quantization(path: Path) -> Dict:
    import_ref = _load_fork(path)
    q, cfg = import_ref("quantization"), import_ref("config").config
    sizes, models = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ini in SIZE_CONFIGS.items():
            (Path(tmp) / "config.ini").write_text(ini)
            cfg.load(str(Path(tmp) / "config.ini"), allow_reload=True)
            models[name] = import_ref(name).init_model()
            sizes[name] = {"ini": ini, "size_mb": q.get_model_size_mb(models[name])}
    comparison = q.compare_model_sizes(models["deepfilternet4"], models["deepfilternet3"])
    return {**_meta(path), "sizes": sizes, "compare_dfnet4_to_dfnet3": comparison}


RECORDERS = {HARDWARE: record_hardware, QUANTIZATION: record_quantization}


def record(names: Sequence[str], out_dir: Path, fork: Optional[str] = None) -> None:
    path = fork_dir(fork)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        data = RECORDERS[name](path)
        (out_dir / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


def record_in_subprocess(names: Sequence[str], out_dir: Path, timeout: float = 300) -> None:
    """Record in a fresh interpreter (the fork's `df` must not meet one this process loaded)."""
    run_fork_module("parity.fork_hardware_recorder", ["--out", str(out_dir), *names], "fork recording",
                    timeout=timeout)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"any of {', '.join(RECORDERS)} (default: all)")
    parser.add_argument("--out", type=Path, default=FIXTURE_DIR)
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(RECORDERS)
    if unknown:
        parser.error(f"unknown fixture(s) {', '.join(sorted(unknown))}")
    if not os.environ.get(ENV_VAR):
        print(f"error: set ${ENV_VAR} to a DeepFilterNet4 checkout", file=sys.stderr)
        return 1
    record(args.names or list(RECORDERS), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
