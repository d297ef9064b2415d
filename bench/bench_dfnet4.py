"""DFNet4 forward speed: df-mlx (MLX CPU) against the DFNet4 fork's torch model
(`sealad886/DeepFilterNet4`, needs a checkout in $DFMLX_FORK_DIR) on the same weights and
inputs, in one run. The fork's default DfNet4 (5.1M parameters, seeded init) is built by the
torch process and handed to df-mlx as a checkpoint; each engine runs in its own process (the
fork's `df` must not meet anything else). Real-time factor = forward time / audio duration of
the frames (hop 10 ms); prints a Markdown table and the largest output difference.

    DFMLX_FORK_DIR=/path/to/DeepFilterNet4 python bench/bench_dfnet4.py [--repeats 3] [--seconds 2 5]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENGINES = ("df-mlx", "torch")
CONFIG = "[train]\nmodel = deepfilternet4\n"


def _inputs(p, frames: int):
    rng = np.random.default_rng(0)
    f = p.fft_size // 2 + 1
    return [rng.standard_normal((1, 1, frames, f, 2)).astype(np.float32),
            rng.standard_normal((1, 1, frames, p.nb_erb)).astype(np.float32),
            rng.standard_normal((1, 1, frames, p.nb_df, 2)).astype(np.float32)]


def _torch_runner(tmp: Path, threads: int):
    """The fork's default DfNet4 (seed 0), saved to tmp/model.ckpt for df-mlx."""
    import torch

    from parity.fork_recorder import _load_fork, fork_dir

    torch.set_num_threads(threads)
    import_ref = _load_fork(fork_dir())
    import_ref("config").config.load(str(tmp / "config.ini"), config_must_exist=True, allow_reload=True)
    torch.manual_seed(0)
    model = import_ref("model").init_model().eval()
    if not (tmp / "model.ckpt").exists():
        torch.save(model.state_dict(), tmp / "model.ckpt")

    def run(xs):
        with torch.no_grad():  # copies: the fork's DF writes into its input in place
            return [o.numpy() for o in model(*(torch.from_numpy(x.copy()) for x in xs))]

    return import_ref("model").ModelParams(), run


def _mlx_runner(tmp: Path):
    from df_mlx._blas import use_fast_blas

    use_fast_blas()  # before mlx.core is imported (see df_mlx/_blas.py)
    import mlx.core as mx

    from converters.layout import load_torch_state_dict
    from converters.torch_ckpt import read_state_dict
    from df_mlx.config import config
    from df_mlx.model import ModelParams, init_model

    config.load(str(tmp / "config.ini"), config_must_exist=True, allow_reload=True)
    model = load_torch_state_dict(init_model(), read_state_dict(tmp / "model.ckpt")).eval()

    def run(xs):
        out = model(*map(mx.array, xs))
        mx.eval(out)
        return [np.array(o) for o in out]

    return ModelParams(), run


def _child(engine: str, tmp: Path, threads: int, seconds_list, repeats: int) -> dict:
    p, run = _torch_runner(tmp, threads) if engine == "torch" else _mlx_runner(tmp)
    run(_inputs(p, 10))  # warm-up (compilation, allocation)
    result = {}
    for seconds in seconds_list:
        frames = int(round(seconds * p.sr / p.hop_size))
        xs = _inputs(p, frames)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = run(xs)
            times.append(time.perf_counter() - t0)
        result[f"{seconds:g}"] = min(times) / seconds
        np.savez(tmp / f"{engine}_{seconds:g}.npz", *out)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, nargs="+", default=[2, 5])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = _child(args.child[0], Path(args.child[1]), args.threads, args.seconds, args.repeats)
        print(json.dumps(result))
        return
    from parity.fork_recorder import ForkUnavailable, fork_env

    try:
        env = fork_env(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    except ForkUnavailable as e:
        raise SystemExit(f"bench_dfnet4 needs the DFNet4 fork: {e} (a checkout of sealad886/DeepFilterNet4)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.ini").write_text(CONFIG)
        for engine in ("torch", "df-mlx"):  # torch first: it writes the checkpoint
            cmd = [sys.executable, __file__, "--child", engine, tmp, "--threads", str(args.threads),
                   "--repeats", str(args.repeats), "--seconds", *map(str, args.seconds)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                raise SystemExit(f"{engine} failed:\n{out.stderr[-2000:]}")
            results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
        diffs = {}
        for s in args.seconds:
            a, b = np.load(Path(tmp) / f"df-mlx_{s:g}.npz"), np.load(Path(tmp) / f"torch_{s:g}.npz")
            diffs[s] = max(float(np.abs(a[k] - b[k]).max()) for k in a.files)
    print(f"DFNet4 forward (fork default config, 5.1M parameters), {args.threads} thread(s), {os.cpu_count()} cores; "
          f"real-time factor, best of {args.repeats}; lower is better\n")
    print("| audio | df-mlx RTF | torch (fork) RTF | df-mlx / torch | max output difference |")
    print("|---|---|---|---|---|")
    for s in args.seconds:
        m, t = results["df-mlx"][f"{s:g}"], results["torch"][f"{s:g}"]
        print(f"| {s:g} s | {m:.3f} | {t:.3f} | {m / t:.2f}x | {diffs[s]:.1e} |")


if __name__ == "__main__":
    main()
