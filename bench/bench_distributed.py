"""Data-parallel throughput: seconds of audio trained and enhanced per second of wall time at 1
and 2 ranks (`mlx.launch --backend ring` on 127.0.0.1), the default DeepFilterNet3.

- train: `--steps` training steps (after one warm-up step) of a fixed global batch of
  `--batch` items of `--seconds` s each, split over the ranks (df_mlx.train.train_step with
  averaged gradients and synced BatchNorm); audio per second = steps x batch x seconds / time.
- enhance: `dfmlx enhance` of `--files` files of `--file-seconds` s, timed as a whole command
  (start-up, model load and launcher included); audio per second = total audio / wall time.
Each is the best of `--repeats` runs (other jobs on a shared machine only ever slow a run down).
Every rank gets its share of the machine's cores for its BLAS and OpenMP threads (cores / ranks):
ranks that each take every core oversubscribe them (measured here: 2 ranks on 2 cores trained
8.6 instead of 13.3 audio-s per s).

    python bench/bench_distributed.py [--ranks 1 2] [--steps 3] [--batch 8] [--files 8] [--repeats 2]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SR = 48000
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS")


def _launch(ranks: int, *command: str) -> list:
    if ranks == 1:
        return [sys.executable, *command]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ["mlx.launch", "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(ranks), "-p", str(port), "--",
            sys.executable, *command]


def train_worker(base: str, batch: int, seconds: float, steps: int):
    """Run under the launcher: timed training steps; rank 0 prints a JSON line."""
    import df_mlx  # noqa: F401  (before mlx: the BLAS)
    import mlx.core as mx
    import numpy as np

    from df_mlx import distributed, train
    from df_mlx.checkpoint import load_training_dir
    from df_mlx.libdf import DF
    from df_mlx.model import ModelParams

    mx.random.seed(0)
    model = load_training_dir(base)  # fresh weights: BASE has no checkpoints
    p = ModelParams()
    train.state = DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb,
                     min_nb_erb_freqs=p.min_nb_freqs)
    opt, losses = train.load_opt(None, model), train.setup_losses()
    rng = np.random.default_rng(0)
    n = int(seconds * p.sr)
    clean = (0.1 * rng.standard_normal((batch, n))).astype(np.float32)
    noise = (0.1 * rng.standard_normal((batch, n))).astype(np.float32)
    full = train.make_batch(clean, noise, [0.0] * batch, train.state, p.nb_df)
    local = full.local_share()
    model.train()
    train.train_step(model, opt, losses, local)  # warm-up
    distributed.total(0.0)
    t0 = time.perf_counter()
    for _ in range(steps):
        train.train_step(model, opt, losses, local)
    distributed.total(0.0)
    elapsed = time.perf_counter() - t0
    if distributed.is_writer():
        print(json.dumps({"audio_per_s": steps * batch * seconds / elapsed, "step_s": elapsed / steps}), flush=True)


def _json_line(output: str) -> dict:
    return json.loads(next(x for x in output.splitlines() if x.startswith("{")))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--file-seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", nargs=4, metavar=("BASE", "BATCH", "SECONDS", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        base, batch, seconds, steps = args.worker
        return train_worker(base, int(batch), float(seconds), int(steps))
    import numpy as np
    import soundfile as sf

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "model"
        base.mkdir()
        (base / "config.ini").write_text("[train]\nmodel = deepfilternet3\n")
        noisy = Path(tmp) / "noisy"
        noisy.mkdir()
        rng = np.random.default_rng(1)
        for i in range(args.files):
            sf.write(noisy / f"n{i}.wav", 0.1 * rng.standard_normal(int(args.file_seconds * SR)), SR, subtype="PCM_16")
        for ranks in args.ranks:
            threads = str(max(1, (os.cpu_count() or 1) // ranks))
            env.update({name: threads for name in THREAD_VARIABLES})
            trained, enhanced = {"audio_per_s": 0.0}, 0.0
            for i in range(args.repeats):
                out = subprocess.run(_launch(ranks, __file__, "--worker", str(base), str(args.batch),
                                             str(args.seconds), str(args.steps)),
                                     env=env, cwd=ROOT, capture_output=True, text=True)
                trained = max(trained, _json_line(out.stdout), key=lambda r: r["audio_per_s"])
                t0 = time.perf_counter()
                subprocess.run(_launch(ranks, "-m", "df_mlx", "enhance", str(noisy), "-o",
                                       str(Path(tmp) / f"enh{ranks}_{i}")), env=env, cwd=ROOT, capture_output=True,
                               check=True)
                enhanced = max(enhanced, args.files * args.file_seconds / (time.perf_counter() - t0))
            rows.append((ranks, trained["audio_per_s"], trained["step_s"], enhanced))
    print("| ranks | audio trained per s | s per step | audio enhanced per s |")
    print("|---|---|---|---|")
    for ranks, trained, step, enhanced in rows:
        print(f"| {ranks} | {trained:.2f} | {step:.2f} | {enhanced:.1f} |")


if __name__ == "__main__":
    main()
