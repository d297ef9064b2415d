"""Data-parallel training and enhancement on mx.distributed (df_mlx.distributed), with two
local ranks started by `mlx.launch --backend ring` on 127.0.0.1:

- one step at world size 2 on a global batch of N items (4: 2 + 2; 3: 2 + 1, the shares
  weighted by their sizes; 1: 1 + padding of weight 0) equals one single-process step on
  the N items (loss, gradients, updated weights, BatchNorm statistics; the GAN's
  discriminator too);
- whole `dfmlx train` runs, whose epochs end in a partial batch, end within a stated bound of
  the single-process run and are bit-identical when repeated; only rank 0 writes;
- a rank killed with SIGKILL stops the other within a bounded time with an `Error:` line, and
  the run resumes, at the same world size exactly and at another one within the bound;
- a stopped (hung) rank: the other stops itself after DFMLX_DIST_TIMEOUT;
- `dfmlx enhance` over two ranks writes the same bytes as one rank, and `dfmlx eval` the same
  CSVs and means.
mlx.launch exits 0 whatever its ranks return, so the tests read the ranks' files and output.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import df_mlx  # noqa: F401  (before mlx: df_mlx picks the BLAS)
import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from df_mlx import distributed
from df_mlx.config import config
from tests.datasets import build_datasets, clip
from tests.distributed_worker import one_step
from tests.test_train_data import TRAIN_INI

ROOT = Path(__file__).resolve().parent.parent
LR = 3e-3  # TRAIN_INI's [optim] lr
# One step, 2 ranks x 2 items against 1 process x 4 items. Measured: loss 3.6e-7 relative,
# gradient norm 3.8e-6 relative, gradients 2.8e-5 of the largest gradient; a permutation of
# the batch in one process moves them as much (1.2e-7, 9.7e-7, 3.7e-5): float32 reduction order.
# 3 items (2 + 1, weighted): loss 7.8e-7, gradient norm 1.8e-6, gradients 6.9e-6 (with the GAN:
# discriminator loss 1.4e-6, its weights 4.6e-7 apart); 1 item (1 + padding): 0, 0, 5.6e-7.
LOSS_RTOL = 2e-6
GRAD_NORM_RTOL = 2e-5
GRAD_TOL = 2e-4  # of the largest gradient entry
# Adam's first step is lr * g / (|g| + eps): entries whose gradient is above the gradient
# tolerance move alike to float32 rounding of the weights; smaller ones, whose sign rounding can
# flip, at most 2 lr apart (measured 6.8e-4 = 0.23 lr; without BatchNorm sync: 2 lr, and
# gradients 0.18 apart).
WEIGHT_TOL = 1e-6
BUFFER_RTOL = 1e-5  # BatchNorm running statistics: moments summed in another order
DISC_WEIGHT_TOL = 1e-5  # the discriminator after its AdamW step (measured 3.3e-7)
# Whole runs (2 epochs of 3 steps at a global batch of 4, the last of 3 items): Adam turns
# rounding in near-zero gradients into lr-sized steps for a few weights (max 4.2e-3 measured),
# while the mean weight difference stays at rounding level (1.9e-7 measured); test loss
# 1.2e-5 relative.
RUN_STEPS = 2 * 3
RUN_MEAN_TOL = 1e-5
RUN_MAX_TOL = 2 * LR * RUN_STEPS  # at most 2 lr per step
RUN_LOSS_RTOL = 1e-4
KILL_STOP_S = 60  # the surviving rank stops within this after its peer is killed
HANG_TIMEOUT_S = 5  # DFMLX_DIST_TIMEOUT for the hung-rank test

# mlx's own launcher, installed next to this interpreter (or found on PATH)
LAUNCHER = str(Path(sys.executable).with_name("mlx.launch")) if Path(sys.executable).with_name(
    "mlx.launch").exists() else (shutil.which("mlx.launch") or "mlx.launch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_cmd(n: int, *command: str) -> list:
    return [LAUNCHER, "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(n), "-p", str(_free_port()),
            "--", sys.executable, *command]


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def launch(n: int, *command: str, timeout: float = 600, **env) -> str:
    """Run `command` on n local ranks; returns their combined output."""
    proc = subprocess.run(_launch_cmd(n, *command), env=_env(**env), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    return proc.stdout + proc.stderr


def _write_base(base: Path, ini: str) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.ini").write_text(ini)
    return base


@pytest.fixture(autouse=True)
def default_config():
    yield
    config.use_defaults(allow_reload=True)


# ---- one rank: every helper is the identity ------------------------------------------------

def test_one_rank_is_the_identity():
    assert distributed.size() == 1 and distributed.is_writer()
    idx = np.arange(6)
    assert distributed.local_share(idx) is idx
    with distributed.share_of(6):
        loss = mx.array(1.5)
        assert distributed.weigh(loss) is loss and distributed.own(loss[None]).shape == (1,)
    x = mx.random.normal((2, 5, 3, 4))
    mean, var, n = distributed.batch_moments(x, (0, 1, 2))
    assert n == 30 and mx.array_equal(mean, x.mean((0, 1, 2))) and mx.array_equal(var, x.var((0, 1, 2)))
    loss, grads = mx.array(1.5), {"w": mx.ones(3)}
    assert distributed.average_gradients(loss, grads) == (loss, grads)
    assert distributed.share_files(["b", "a"]) == ["b", "a"]
    assert distributed.gather_bytes(b"xyz") == [b"xyz"]
    assert distributed.writer_decides(lambda: True) and not distributed.any_rank(False)


def test_shares_differ_by_at_most_one():
    """Contiguous shares covering the batch, the first n % world ranks one item larger."""
    assert [distributed.share_bounds(3, 2, r) for r in range(2)] == [(0, 2), (2, 3)]
    assert [distributed.share_bounds(1, 2, r) for r in range(2)] == [(0, 1), (1, 1)]
    for n in range(1, 12):
        for world in range(1, 5):
            bounds = [distributed.share_bounds(n, world, r) for r in range(world)]
            sizes = [stop - start for start, stop in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == n and max(sizes) - min(sizes) <= 1
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_moments_of_unequal_parts():
    """Chan et al.'s combination of parts of 3, 2 and 0 items (padding only, m2 0) gives
    the moments of the whole, as BatchNorm over ranks uses it."""
    x = mx.random.normal((5, 7, 3, 4)) * 3 + 1
    parts, items = [x[:3], x[3:], x[4:]], [3, 2, 0]
    means = mx.stack([p.mean((0, 1, 2)) for p in parts])
    m2s = mx.stack([mx.square(p - p.mean((0, 1, 2))).sum((0, 1, 2)) * (k > 0) for p, k in zip(parts, items)])
    mean, var, count = distributed.combine_moments(means, m2s, items, 7 * 3)
    assert count == 5 * 7 * 3
    assert mx.allclose(mean, x.mean((0, 1, 2)), rtol=1e-5, atol=1e-6).item()
    assert mx.allclose(var, x.var((0, 1, 2)), rtol=1e-5).item()


def test_deal_balances_by_length():
    """Longest first to the least loaded rank; equal lengths keep their order."""
    lengths = {"a": 1.0, "b": 5.0, "c": 3.0, "d": 3.0, "e": 2.0, "f": 2.0}
    owner = distributed.deal(lengths, 2)
    assert owner == {"b": 0, "c": 1, "d": 1, "e": 0, "f": 1, "a": 0}
    load = [sum(v for k, v in lengths.items() if owner[k] == r) for r in range(2)]
    assert load == [8.0, 8.0]
    assert set(distributed.deal(lengths, 3).values()) == {0, 1, 2}
    assert distributed.deal(lengths, 1) == dict.fromkeys(lengths, 0)


# ---- one step ---------------------------------------------------------------------------------

def _rank_results(out: Path, output: str, n: int) -> dict:
    files = [out / f"rank{r}_{n}.safetensors" for r in range(2)]
    assert all(f.exists() for f in files), output[-3000:]
    r0, r1 = (mx.load(str(f)) for f in files)
    assert r0.keys() == r1.keys()
    assert all(mx.array_equal(r0[k], r1[k]) for k in r0), "the ranks end with different weights"
    return r0


def _rel(a, b) -> float:
    return float(mx.abs(a - b).max()) / max(float(mx.abs(b).max()), 1e-30)


def _check_step(ours: dict, ref: dict):
    assert ours.keys() == ref.keys()
    assert _rel(ours["loss"], ref["loss"]) < LOSS_RTOL
    assert _rel(ours["grad_norm"], ref["grad_norm"]) < GRAD_NORM_RTOL
    grads = {k[len("grad."):]: v for k, v in ref.items() if k.startswith("grad.")}
    scale = max(float(mx.abs(g).max()) for g in grads.values())
    worst = max(float(mx.abs(ours["grad." + k] - g).max()) for k, g in grads.items())
    assert worst < GRAD_TOL * scale, worst / scale
    for k in (k for k in ref if k.startswith("weight.")):
        name, a, b = k[len("weight."):], ours[k], ref[k]
        if name not in grads:  # buffers: BatchNorm's running statistics and counters
            assert mx.allclose(a, b, rtol=BUFFER_RTOL, atol=BUFFER_RTOL).item(), name
            continue
        diff = mx.abs(a - b)
        clear = mx.abs(grads[name]) > GRAD_TOL * scale
        assert float(mx.where(clear, diff, 0).max()) <= WEIGHT_TOL, name
        assert float(diff.max()) <= 2 * LR, name


@pytest.mark.slow
@pytest.mark.parametrize("gan", [False, True], ids=["df", "gan"])
def test_two_rank_step_equals_one_process(tmp_path, gan):
    """World size 2 on N items = 1 process on N items: loss, gradients, weights, BatchNorm;
    N = 4 (2 + 2), 3 (2 + 1) and, without the GAN, 1 (1 + padding)."""
    ini = TRAIN_INI
    if gan:
        ini = ini.replace("[train]\n", "[train]\ngan_enabled = true\ndiscriminator_type = mpd\nmpd_periods = 2\n", 1)
        ini += "[GANLoss]\nfactor = 1\n[FeatureMatchingLoss]\nfactor = 1\n"
    base = _write_base(tmp_path / "base", ini)
    out = tmp_path / "out"
    out.mkdir()
    sizes = (4, 3) if gan else (4, 3, 1)
    output = launch(2, "-m", "tests.distributed_worker", str(base), ",".join(map(str, sizes)), str(out),
                    *(["gan"] if gan else []))
    for n in sizes:
        ours = _rank_results(out, output, n)
        ref = one_step(base, n, gan=gan)
        _check_step(ours, ref)
        if gan:
            assert _rel(ours["d_loss"], ref["d_loss"]) < LOSS_RTOL
            worst = max(float(mx.abs(ours[k] - ref[k]).max()) for k in ref if k.startswith("disc."))
            assert worst < DISC_WEIGHT_TOL, worst


# ---- whole runs, failure, resume ------------------------------------------------------------

RUN_INI = TRAIN_INI.replace("batch_size = 2\n", "batch_size = 4\n", 1).replace("max_epochs = 3", "max_epochs = 2")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The training datasets, with 11 training samples: global batches of 4, 4 and 3 (2 + 2,
    2 + 2 and 2 + 1 items per rank)."""
    out = tmp_path_factory.mktemp("data")
    cfg = build_datasets(out)
    splits = json.loads(cfg.read_text())
    splits["train"][0][1] = 11 / 9  # 9 speech clips
    odd = out / "odd.cfg"
    odd.write_text(json.dumps(splits))
    return out, odd


def _train_args(data, base: Path) -> list:
    out, cfg = data
    return ["-m", "df_mlx", "train", str(cfg), str(out), str(base), "--no-progress"]


def _model(base: Path, epoch: int) -> dict:
    return mx.load(str(base / "checkpoints" / f"model_{epoch}.safetensors"))


def _diff(a: dict, b: dict):
    """(max, mean) absolute weight difference."""
    assert a.keys() == b.keys()
    diffs = [mx.abs(a[k].astype(mx.float32) - b[k].astype(mx.float32)) for k in a]
    return max(float(d.max()) for d in diffs), sum(float(d.sum()) for d in diffs) / sum(d.size for d in diffs)


def _test_loss(output: str) -> float:
    line = next(x for x in output.splitlines() if x.startswith("test loss"))
    return float(line.split()[2])


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Uninterrupted 2-epoch runs: one process, and two ranks twice."""
    root = tmp_path_factory.mktemp("runs")
    bases, outputs = {}, {}
    one = _write_base(root / "one", RUN_INI)
    outputs["one"] = subprocess.run([sys.executable, *_train_args(data, one)], env=_env(), cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout
    bases["one"] = one
    for name in ("two", "two_again"):
        bases[name] = _write_base(root / name, RUN_INI)
        outputs[name] = launch(2, *_train_args(data, bases[name]))
    return bases, outputs


@pytest.mark.slow
def test_two_rank_run_matches_one_process(runs):
    bases, outputs = runs
    for name in ("two", "two_again"):
        assert (bases[name] / "checkpoints" / "model_2.safetensors").exists(), outputs[name][-3000:]
    worst, mean = _diff(_model(bases["two"], 2), _model(bases["one"], 2))
    assert mean < RUN_MEAN_TOL and worst < RUN_MAX_TOL, (worst, mean)
    assert abs(_test_loss(outputs["two"]) / _test_loss(outputs["one"]) - 1) < RUN_LOSS_RTOL
    assert _diff(_model(bases["two"], 2), _model(bases["two_again"], 2)) == (0.0, 0.0), "not repeatable"
    log = (bases["two"] / "train.log").read_text()
    assert log.count("Start train epoch 0") == 1, "a rank other than 0 wrote to train.log"
    for name in ("one", "two"):  # the epoch keeps its last, partial batch
        assert "[1] [1/3]" in (bases[name] / "train.log").read_text(), name
    assert "Error" not in outputs["two"]


def _rank_pid(marker: str, rank: int):
    """The pid of the process of `rank` whose command line names `marker`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmdline and f"MLX_RANK={rank}".encode() in environ and "df_mlx" in cmdline:
            return int(pid)
    return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _start_and_signal(data, base: Path, sig: int, **env):
    """Start a 2-rank run, send rank 1 `sig` once epoch 1's checkpoints exist; returns the
    launcher's output and the seconds from the signal until rank 0 ended."""
    proc = subprocess.Popen(_launch_cmd(2, *_train_args(data, base)), env=_env(**env), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = base / "checkpoints" / "opt_1.safetensors"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    pids = [_rank_pid(str(base), r) for r in range(2)]
    assert None not in pids and proc.poll() is None, "the run ended before rank 1 could be signalled"
    os.kill(pids[1], sig)
    t0 = time.monotonic()
    while _alive(pids[0]) and time.monotonic() < t0 + KILL_STOP_S + HANG_TIMEOUT_S:
        time.sleep(0.05)
    stopped_after = time.monotonic() - t0
    if sig == signal.SIGSTOP:  # a stopped process ignores the launcher's SIGTERM
        os.kill(pids[1], signal.SIGKILL)
    try:
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return output, stopped_after


@pytest.mark.slow
def test_killed_rank_stops_the_other_and_the_run_resumes(data, runs, tmp_path):
    """SIGKILL rank 1 after epoch 1: rank 0 stops at once with an `Error:` line. Resumed at 2
    ranks the run ends exactly as the uninterrupted one; resumed at 1 rank (re-sharded: the
    global batch stays 4) within the whole-run bound of the 1-process run."""
    bases, _ = runs
    killed = _write_base(tmp_path / "killed", RUN_INI)
    output, stopped_after = _start_and_signal(data, killed, signal.SIGKILL)
    assert stopped_after < KILL_STOP_S, output[-3000:]
    assert "Error: rank 0:" in output, output[-3000:]
    assert not (killed / "checkpoints" / "model_2.safetensors").exists()
    one_rank = tmp_path / "one_rank"
    shutil.copytree(killed, one_rank)
    output = launch(2, *_train_args(data, killed))
    assert "Error" not in output, output[-3000:]
    assert _diff(_model(killed, 2), _model(bases["two"], 2)) == (0.0, 0.0)
    subprocess.run([sys.executable, *_train_args(data, one_rank)], env=_env(), cwd=ROOT, capture_output=True,
                   check=True)
    worst, mean = _diff(_model(one_rank, 2), _model(bases["one"], 2))
    assert mean < RUN_MEAN_TOL and worst < RUN_MAX_TOL, (worst, mean)


@pytest.mark.slow
def test_hung_rank_stops_the_other(data, tmp_path):
    """SIGSTOP rank 1 (its connections stay open): rank 0 stops itself after the timeout."""
    base = _write_base(tmp_path / "hung", RUN_INI)
    output, stopped_after = _start_and_signal(data, base, signal.SIGSTOP, DFMLX_DIST_TIMEOUT=str(HANG_TIMEOUT_S))
    assert "Error: rank 0: no answer from the other ranks for 5 s" in output, output[-3000:]
    assert stopped_after < HANG_TIMEOUT_S + KILL_STOP_S


@pytest.mark.slow
def test_batch_smaller_than_the_world_is_refused(data, tmp_path):
    """A configured batch with fewer items than ranks (2 over 3) stops every rank at once."""
    base = _write_base(tmp_path / "three", TRAIN_INI)
    output = launch(3, *_train_args(data, base), timeout=300)
    # mlx.launch relays each rank's stderr as it comes, so a rank's line can follow the launcher's
    # own "[WARN] Node ... exited" on the same line: look for the message anywhere in a line
    lines = output.splitlines()
    assert any("Error: rank" in x and "batch_size = 2 is smaller than the 3 ranks" in x
               for x in lines), output[-3000:]
    # every rank stops: its own check, or the launcher's SIGTERM after the first (before a rank
    # has joined the group, SIGTERM ends it as usual and the launcher reports its exit code)
    stopped = [any(f"Error: rank {r}:" in x or f"Node with rank {r} exited with code" in x for x in lines)
               for r in range(3)]
    assert all(stopped), output[-3000:]
    assert not (base / "checkpoints").exists() or not list((base / "checkpoints").iterdir())


# ---- enhance --------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_rank_enhance_writes_the_same_bytes(tmp_path):
    """Five files of different lengths over 2 ranks: the same files, byte for byte, as 1 rank."""
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    for i, seconds in enumerate((0.3, 0.8, 0.6, 0.2, 0.5)):
        n = int(seconds * 48000)
        sf.write(noisy / f"f{i}.wav", clip("speech", i)[:n] + 0.2 * clip("noise", i % 4)[:n], 48000, subtype="PCM_16")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "df_mlx", "enhance", str(noisy), "-o", str(one)], env=_env(), cwd=ROOT,
                   check=True, capture_output=True)
    output = launch(2, "-m", "df_mlx", "enhance", str(noisy), "-o", str(two))
    assert "Error" not in output, output[-3000:]
    shares = sorted(int(x.split()[1].split("/")[0]) for x in output.splitlines() if x.startswith("enhanced "))
    assert shares == [2, 3], output[-3000:]  # 0.8 + 0.3 s and 0.6 + 0.5 + 0.2 s
    names = sorted(p.name for p in one.iterdir())
    assert len(names) == 5 and sorted(p.name for p in two.iterdir()) == names
    assert all((one / n).read_bytes() == (two / n).read_bytes() for n in names)


@pytest.mark.slow
def test_two_rank_eval_writes_the_same_csv(tmp_path):
    """`dfmlx eval` over 2 ranks: rank 0's merged CSVs and the means are one process's."""
    clean, enh, noisy = (tmp_path / d for d in ("clean", "enh", "noisy"))
    for d in (clean, enh, noisy):
        d.mkdir()
    for i, seconds in enumerate((0.6, 0.8, 0.4, 0.7)):
        n = int(seconds * 48000)
        speech = clip("speech", i)[:n]
        sf.write(clean / f"c{i}.wav", speech, 48000, subtype="PCM_16")
        sf.write(noisy / f"c{i}.wav", speech + 0.3 * clip("noise", i)[:n], 48000, subtype="PCM_16")
        sf.write(enh / f"c{i}.wav", speech + 0.05 * clip("noise", i)[:n], 48000, subtype="PCM_16")
    outputs = {}
    for ranks in (1, 2):
        args = ["-m", "df_mlx", "eval", str(clean), str(enh), "-n", str(noisy), "--metrics", "stoi,sisdr",
                "--csv-enh", str(tmp_path / f"enh{ranks}.csv"), "--csv-noisy", str(tmp_path / f"noisy{ranks}.csv")]
        if ranks == 1:
            outputs[ranks] = subprocess.run([sys.executable, *args], env=_env(), cwd=ROOT, capture_output=True,
                                            text=True, check=True).stdout
        else:
            outputs[ranks] = launch(2, *args)
    for kind in ("enh", "noisy"):
        assert (tmp_path / f"{kind}2.csv").read_bytes() == (tmp_path / f"{kind}1.csv").read_bytes()
    table = [x for x in outputs[1].splitlines() if x.startswith(("Enhanced", "Noisy"))]
    assert len(table) == 4 and outputs[2].count("\n".join(table)) == 2, outputs[2][-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".csv") == [
        "enh1.csv", "enh2.csv", "noisy1.csv", "noisy2.csv"]
