"""Peak memory of `dfmlx enhance` against file length: streaming in 10 s blocks keeps it flat.

    python bench/bench_memory.py [--minutes 1 10]

Writes bench/memory.md. Each run is a separate process; peak RSS from getrusage.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

HERE = Path(__file__).resolve().parent


def _make_file(path: Path, minutes: float):
    noisy, sr = sf.read(HERE.parent / "df_mlx" / "data" / "noisy_sample.wav", dtype="float32")
    total = int(minutes * 60 * sr)
    with sf.SoundFile(path, "w", samplerate=sr, channels=1, subtype="PCM_16") as f:
        for start in range(0, total, len(noisy)):
            f.write(noisy[: min(len(noisy), total - start)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 10])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for minutes in args.minutes:
            src = Path(tmp) / f"noisy_{minutes:g}min.wav"
            _make_file(src, minutes)
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "df_mlx", "enhance", str(src), "-o", str(Path(tmp) / "out")],
                           check=True, capture_output=True)
            elapsed = time.perf_counter() - t0
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            rows.append((minutes, max(peak, before) / 1024, elapsed / (minutes * 60)))
            print(rows[-1], flush=True)
            os.remove(src)
    lines = ["# `dfmlx enhance` memory against file length", "",
             "Peak resident memory of the whole process (model, MLX, Python); RTF includes "
             "reading, resampling and writing. RUSAGE_CHILDREN reports the largest child so far, "
             "so a row can only repeat or grow.", "",
             "| file | peak memory (MB) | RTF |", "|---|---|---|"]
    lines += [f"| {m:g} min | {mb:.0f} | {rtf:.3f} |" for m, mb, rtf in rows]
    (HERE / "memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
