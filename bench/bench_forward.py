"""DFN3 forward speed (random weights at df's default ModelParams, conv_ch 16, which mlx-audio's
DeepFilterNet3Config matches; the pretrained DFN3, conv_ch 64, is bench_enhance.py's; one
thread, T = 1000 and 6000 frames = 10 s and 60 s): df-mlx with its
native recurrences and without (DFMLX_NATIVE=0), each on the BLAS pip alone gives (the
scipy-openblas32 wheel) and on apt's BLIS, against upstream torch and mlx-audio 0.6.2's
DeepFilterNet3 (given the same BLAS through df_mlx._blas); plus df-mlx's per-module profile
with and without the native ops (at the first length). Every row runs in its own process, in
one run. Writes bench/forward.md.

    python bench/bench_forward.py [--frames 1000 6000] [--repeats 5]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# (row name, engine, BLAS, native recurrences)
ROWS = [("df-mlx native, pip BLAS", "df-mlx", "pip", True),
        ("df-mlx native, apt BLIS", "df-mlx", "apt", True),
        ("df-mlx pure-MLX steps, pip BLAS", "df-mlx", "pip", False),
        ("df-mlx pure-MLX steps, apt BLIS", "df-mlx", "apt", False),
        ("mlx-audio 0.6.2, pip BLAS", "mlx-audio", "pip", False),
        ("mlx-audio 0.6.2, apt BLIS", "mlx-audio", "apt", False),
        ("torch 2.13 (upstream df)", "torch", "apt", False)]
PROFILED = ("GRU", "Conv2d", "ConvTranspose2d", "BatchNorm2d", "GroupedLinearEinsum", "GroupedLinear", "DF",
            "DfOp", "Mask", "Linear")


def hide_system_blas() -> None:
    """What a machine without apt's BLAS sees: df_mlx._blas finds no system library."""
    import ctypes.util

    ctypes.util.find_library = lambda name: None


def _inputs(frames: int):
    rng = np.random.default_rng(0)
    # DFN3's defaults: 481 bins, 32 ERB bands, 96 DF bins; [B, 1, T, ...] as upstream
    return [rng.standard_normal(s).astype(np.float32)
            for s in ((1, 1, frames, 481, 2), (1, 1, frames, 32), (1, 1, frames, 96, 2))]


def _df_mlx(inputs, profile):
    import mlx.core as mx

    from df_mlx.config import config
    from df_mlx.deepfilternet3 import init_model

    config.use_defaults(allow_reload=True)
    mx.random.seed(0)
    model = init_model()
    model.eval()
    args = [mx.array(a) for a in inputs]
    run = lambda: mx.eval(model(*args))  # noqa: E731
    return run, (_profiler(model, run) if profile else None)


def _profiler(model, run):
    """Each listed module type's own time: every such call is evaluated on its own."""
    import mlx.core as mx

    times = defaultdict(float)
    classes = {type(m) for _, m in model.named_modules() if type(m).__name__ in PROFILED}
    originals = {cls: cls.__call__ for cls in classes}

    def timed(cls):
        def call(self, *a, **kw):
            mx.eval(a)
            t0 = time.perf_counter()
            out = originals[cls](self, *a, **kw)
            mx.eval(out)
            times[cls.__name__] += time.perf_counter() - t0
            return out
        return call

    def profile():
        times.clear()
        for cls in classes:
            cls.__call__ = timed(cls)
        try:
            t0 = time.perf_counter()
            run()
            total = time.perf_counter() - t0
        finally:
            for cls, fn in originals.items():
                cls.__call__ = fn
        return {"total": total, **times}

    return profile


def _mlx_audio(inputs):
    """mlx-audio's DfNet alone (mlx_audio/sts/... imports every speech model; the DeepFilterNet
    network and config need only mlx), default DeepFilterNet3Config, random weights."""
    import importlib
    import importlib.util
    import types

    import mlx.core as mx

    root = Path(importlib.util.find_spec("mlx_audio").submodule_search_locations[0])
    package = types.ModuleType("mlx_audio_dfn")
    package.__path__ = [str(root / "sts" / "models" / "deepfilternet")]
    sys.modules["mlx_audio_dfn"] = package
    config = importlib.import_module("mlx_audio_dfn.config")
    network = importlib.import_module("mlx_audio_dfn.network")
    mx.random.seed(0)
    model = network.DfNet(config.DeepFilterNet3Config())
    model.eval()
    args = [mx.array(a) for a in inputs]
    return lambda: mx.eval(model(*args))


def _torch(inputs):
    import torch

    from parity.reference import import_ref

    import_ref("config").config.use_defaults(allow_reload=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dfn3 = import_ref("deepfilternet3")
    model = dfn3.init_model().eval()
    args = [torch.from_numpy(a) for a in inputs]

    def run():
        with torch.no_grad():
            model(*args)

    return run


def _child(engine: str, blas: str, frames_list, repeats: int) -> dict:
    if blas == "pip":
        hide_system_blas()
    import df_mlx  # noqa: F401  (MLX's BLAS, for mlx-audio too)
    from df_mlx import _blas, _native

    mlx_side = engine != "torch"
    result = {"seconds": {}, "mlx_blas": _blas.loaded if mlx_side else None,
              "native_blas": _native.blas_library() if engine == "df-mlx" else None}
    for frames in frames_list:
        inputs = _inputs(frames)
        profile = None
        if engine == "df-mlx":
            run, profile = _df_mlx(inputs, profile=frames == frames_list[0])
        elif engine == "mlx-audio":
            run = _mlx_audio(inputs)
        else:
            run = _torch(inputs)
        run()  # warm-up at this length: compilation, allocation
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
        result["seconds"][str(frames)] = best
        if profile:
            result["profile"] = min((profile() for _ in range(2)), key=lambda p: p["total"])
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[1000, 6000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child, args.frames, args.repeats)))
        return
    results = {}
    for name, engine, blas, native in ROWS:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   BLIS_NUM_THREADS="1", DFMLX_NATIVE="1" if native else "0")
        env.pop("DFMLX_BLAS", None)
        cmd = [sys.executable, __file__, "--child", engine, blas, "--frames", *map(str, args.frames),
               "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
        if out.returncode != 0:
            raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, {k: v for k, v in results[name].items() if k != "profile"}, flush=True)
    _write(results, args)


def _write(results, args):
    import platform

    torch_s = results[ROWS[-1][0]]["seconds"]
    lengths = [f"{frames / 100:g} s" for frames in args.frames]
    lines = ["# DFN3 forward speed", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one thread; DFN3 forward "
             f"(random weights) on T = {' and '.join(map(str, args.frames))} frames ({' and '.join(lengths)} of "
             f"audio), best of {args.repeats}, every row in its own process, in one run.", "",
             "| engine | " + " | ".join(f"RTF {n}" for n in lengths) + " | "
             + " | ".join(f"time / torch's {n}" for n in lengths) + " | MLX matmuls' BLAS | native ops' BLAS |",
             "|---|" + "---|" * (2 * len(lengths) + 2)]
    for name, r in results.items():
        mlx_side = not name.startswith("torch")
        seconds = r["seconds"]
        lines.append(f"| {name} | " + " | ".join(f"{seconds[str(f)] / (f / 100):.4f}" for f in args.frames) + " | "
                     + " | ".join(f"{seconds[str(f)] / torch_s[str(f)]:.2f}x" for f in args.frames)
                     + f" | {_short(r['mlx_blas'], mlx_side)} | {_short(r['native_blas'], False)} |")
    profiled = [(name, r["profile"]) for name, r in results.items() if "profile" in r]
    keys = sorted({k for _, p in profiled for k in p if k != "total"}, key=lambda k: -profiled[-1][1].get(k, 0))
    lines += ["", f"Per-module profile at {lengths[0]} (each module type's own time in ms, every call evaluated "
              "on its own, so the total is a little above the plain forward's):", "",
              "| module | " + " | ".join(name for name, _ in profiled) + " |",
              "|---|" + "---|" * len(profiled)]
    for key in keys + ["total"]:
        lines.append(f"| {key} | " + " | ".join(f"{p.get(key, 0) * 1000:.0f}" for _, p in profiled) + " |")
    (HERE / "forward.md").write_text("\n".join(lines) + "\n")


def _short(path, mlx_side: bool):
    if path is None:
        return "MLX's reference" if mlx_side else "-"
    return Path(path).name


if __name__ == "__main__":
    main()
