"""`dfmlx train` as a user runs it: an earlier run is never overwritten (--no-resume refuses
it, --start-over moves it aside), Ctrl-C stops a long step within seconds with exit 130 and a
state that resumes, failed runs leave nothing behind, configs that do nothing are reported,
the example DFN3 config trains without a warning, and GAN training with the fork's default
discriminator runs an epoch."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import df_mlx  # noqa: F401  (before mlx.core: MLX's fast BLAS)
import mlx.core as mx
import pytest
from click.testing import CliRunner
from loguru import logger

import df_mlx.train as train
import df_mlx.train_gan as gan
from df_mlx import config_check, interrupt
from df_mlx.cli import main as cli
from df_mlx.config import config
from tests.test_train_data import TRAIN_INI, dataset, default_config  # noqa: F401  (fixtures)
from tests.test_train_gan import _setup, _small_mpd

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "deepfilternet3" / "config.ini"
# upstream's DFN3 config.ini keys that df_mlx's training does not read (left out of the example)
UNREAD_UPSTREAM_KEYS = {"train": {"device", "jit", "p_atten_lim", "detect_anomaly", "validation_set_caching"},
                        "deepfilternet": {"conv_dec_mode", "dfop_method", "group_shuffle"},
                        "optim": {"lr_cycle_limit", "lr_update_per_epoch"}, "sdrloss": {"segmental_ws"}}
SIGINT_EXIT_BOUND_S = interrupt.GRACE_S + 4  # the watchdog's grace plus process teardown on 2 busy cores


def _base(path: Path, ini: str = TRAIN_INI, epochs: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.ini").write_text(ini.replace("max_epochs = 3", f"max_epochs = {epochs}"))
    return path


def _earlier_run(base: Path) -> dict:
    """Files as an earlier run leaves them (contents only need to survive)."""
    cp = base / "checkpoints"
    cp.mkdir()
    files = {"model_5.safetensors": b"m5", "opt_5.safetensors": b"o5", "model_4.safetensors.best": b"b4",
             ".best": b"4 0.001\n", ".patience": b"1 0.001\n"}
    for name, data in files.items():
        (cp / name).write_bytes(data)
    return files


@contextmanager
def _logged(level: str) -> Iterator[list]:
    """The log messages at `level` and above while the block runs (train.log is the first
    training run's in a process, and init_logger, run once, would drop a sink added before)."""
    from df_mlx import logger as df_logger

    if not df_logger._logger_initialized:
        df_logger.init_logger(level="INFO")
    lines: list = []
    sink = logger.add(lines.append, level=level)
    try:
        yield lines
    finally:
        logger.remove(sink)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO))


def test_no_resume_refuses_an_earlier_run(dataset, tmp_path):
    out, cfg = dataset
    base = _base(tmp_path / "model")
    files = _earlier_run(base)
    result = CliRunner().invoke(cli, ["train", str(cfg), str(out), str(base), "--no-resume", "--no-progress"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "--start-over" in result.output, result.output
    assert {p.name: p.read_bytes() for p in (base / "checkpoints").iterdir()} == files
    assert sorted(p.name for p in base.iterdir()) == ["checkpoints", "config.ini"]


@pytest.mark.slow
def test_start_over_moves_the_earlier_run_aside(dataset, tmp_path):
    """The old checkpoints survive whole under a timestamped name; the new run's epoch 1 is
    neither deleted by the history cleanup nor confused with the old best (epoch 4 at 0.001)."""
    out, cfg = dataset
    base = _base(tmp_path / "model")
    files = _earlier_run(base)
    result = CliRunner().invoke(cli, ["train", str(cfg), str(out), str(base), "--start-over", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.output.endswith("(best epoch 1)\n"), result.output
    moved = [p for p in base.iterdir() if p.name.startswith("checkpoints.")]
    assert len(moved) == 1 and {p.name: p.read_bytes() for p in moved[0].iterdir()} == files
    names = {p.name for p in (base / "checkpoints").iterdir()}
    assert {"model_1.safetensors", "opt_1.safetensors", "model_1.safetensors.best"} <= names, names
    assert not names & set(files) - {".best", ".patience"}


def test_failed_train_leaves_nothing_it_created(dataset, tmp_path):
    """A dataset config naming a missing file fails after the loader starts; the model folder
    it created (train.log, checkpoints/, summaries/) is removed again."""
    out, _ = dataset
    cfg = tmp_path / "missing.cfg"
    cfg.write_text(json.dumps({"train": [["nope.hdf5", 1.0]], "valid": [], "test": []}))
    base = tmp_path / "new_model"
    proc = subprocess.run([sys.executable, "-m", "df_mlx", "train", str(cfg), str(out), str(base), "--no-progress"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Error: " in proc.stderr, proc.stdout + proc.stderr
    assert not base.exists(), list(base.iterdir())


def test_interrupt_check_raises_after_sigint():
    """Ctrl-C only sets a flag; the next check raises Interrupted with where the run was."""
    before = signal.getsignal(signal.SIGINT)
    with interrupt.handle_sigint(lambda where: where):
        interrupt.where = "epoch 3, train step 2/9"
        interrupt.check()
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(interrupt.Interrupted, match="epoch 3, train step 2/9"):
            for _ in range(1000):
                interrupt.check()
                time.sleep(0.001)
    assert signal.getsignal(signal.SIGINT) is before


def test_signal_watchdogs_share_the_wakeup_fd():
    """Another watchdog (distributed's SIGTERM one; SIGUSR1 here) registered before Ctrl-C's is
    woken during handle_sigint and after it; the last removal restores the wakeup fd."""
    woken = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    fd_before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd_before)
    try:
        remove = interrupt.on_signal(signal.SIGUSR1, woken.set)
        with interrupt.handle_sigint(lambda where: where):
            os.kill(os.getpid(), signal.SIGUSR1)
            assert woken.wait(10)
        woken.clear()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert woken.wait(10)
        remove()
        assert signal.set_wakeup_fd(fd_before) == fd_before
    finally:
        signal.signal(signal.SIGUSR1, previous)

def _read_lines(proc, lines: list):
    for line in proc.stdout:
        lines.append(line)


@pytest.mark.slow
def test_sigint_during_a_long_step_exits_130_and_resumes(dataset, tmp_path):
    """Ctrl-C in the middle of a multi-second GAN step (one MLX evaluation) ends the process
    within SIGINT_EXIT_BOUND_S with exit 130, saying where it stopped and how to resume;
    the same command then resumes from epoch 1 and finishes."""
    out, _ = dataset
    cfg = _one_step_cfg(tmp_path)
    ini = TRAIN_INI.replace("[train]\n", "[train]\ngan_enabled = true\ndiscriminator_type = mpd\nmpd_periods = 2\n", 1)
    base = _base(tmp_path / "gan", ini + "[GANLoss]\nfactor = 1\n", epochs=2)
    command = [sys.executable, "-m", "df_mlx", "train", str(cfg), str(out), str(base), "--no-progress"]
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list = []
    reader = threading.Thread(target=_read_lines, args=(proc, lines), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any("Start train epoch 1" in line for line in lines) and proc.poll() is None:
        assert time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)
    time.sleep(0.5)  # inside epoch 1's only step: the discriminator's and generator's evaluations
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    elapsed = time.monotonic() - sent
    reader.join(timeout=10)
    output = "".join(lines)
    assert rc == interrupt.EXIT_CODE, output
    assert elapsed < SIGINT_EXIT_BOUND_S, (elapsed, output)
    print(f"SIGINT to exit: {elapsed:.2f} s")
    assert "Interrupted during epoch 1, train step 1/1" in output and "resumes from there" in output, output
    assert "Interrupted during epoch 1" in (base / "train.log").read_text()
    checkpoints = base / "checkpoints"
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".") and p.name not in (".best", ".patience")]
    assert train.resumable_epoch(str(checkpoints)) == 1
    resumed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "model_1.safetensors with epoch 1" in resumed.stdout, resumed.stdout
    assert {"model_2.safetensors", "disc_2.safetensors", "d_opt_2.safetensors"} <= {p.name for p in checkpoints.iterdir()}


def _load(tmp_path: Path, text: str):
    path = tmp_path / "config.ini"
    path.write_text(text)
    config.load(str(path), allow_reload=True)


def test_warns_on_a_section_the_model_never_reads(tmp_path):
    from df_mlx.model import init_model

    _load(tmp_path, "[train]\nmodel = deepfilternet3\n[deepfilternet3]\nconv_ch = 8\n[deepfilternet]\nemb_hidden_dim = 32\n"
                    "linear_groups = 8\nfoo = 1\n")
    init_model(run_df=True)
    warnings = config_check.warn_unread()
    assert len(warnings) == 2, warnings
    assert "[deepfilternet3]" in warnings[0] and "reads its settings from [deepfilternet]" in warnings[0]
    assert "conv_ch has no effect" in warnings[0]
    assert warnings[1].startswith("config.ini: [deepfilternet] foo read by nothing"), warnings[1]


@pytest.mark.parametrize("ini, expect", [
    ("", "No loss trains the mask or the DF decoder (active: LocalSnrLoss (factor 0.0005)"),
    ("[MaskLoss]\nfactor = 1\n", "Only [MaskLoss] trains the enhancement: the DF decoder is never trained"),
    ("[MaskLoss]\nfactor = 1\n[train]\nmodel = deepfilternet3\nmask_only = true\n", None),
    ("[MultiResSpecLoss]\nfactor = 500\n", None),
    ("[SpectralLoss]\nfactor_complex = 1\n", None),
])
def test_warns_when_no_loss_trains_the_mask_or_df_path(tmp_path, ini, expect):
    from df_mlx.libdf import DF
    from df_mlx.model import ModelParams

    _load(tmp_path, ini)
    p = ModelParams()
    train.state = DF(p.sr, p.fft_size, p.hop_size, p.nb_erb, p.min_nb_freqs)
    try:
        msg = config_check.warn_untrained(train.setup_losses())
    finally:
        train.state = None
    assert (msg is None) if expect is None else (expect in msg), msg


def test_keys_read_after_the_check_are_the_listed_ones(tmp_path, monkeypatch):
    """A whole GAN run (3 epochs) reads, after the config check, only READ_DURING_TRAINING,
    and all of them; GAN_INI has no unread key. The discriminator's checkpoints keep the
    model's history length (n_checkpoint_history = 1: only epoch 3's files stay)."""
    _small_mpd(monkeypatch)
    seen = {}
    warn_unread = config_check.warn_unread

    def snapshot():
        seen["warnings"] = warn_unread()
        seen["read"] = set(config.read)
        return seen["warnings"]

    monkeypatch.setattr(config_check, "warn_unread", snapshot)
    model, opt, losses, loader = _setup(tmp_path, monkeypatch, epochs=3)
    config.set("n_checkpoint_history", 1, int, "train")
    cp = tmp_path / "checkpoints"
    cp.mkdir()
    gan.train_loop(model, opt, loader, losses, str(cp), None, epoch=0, resume=False, progress=False)
    assert seen["warnings"] == []
    late = config.read - seen["read"]
    assert late <= config_check.READ_DURING_TRAINING, late - config_check.READ_DURING_TRAINING
    assert config_check.READ_DURING_TRAINING <= config.read, config_check.READ_DURING_TRAINING - config.read
    names = sorted(p.name for p in cp.iterdir() if p.suffix == ".safetensors")
    assert names == ["d_opt_3.safetensors", "disc_3.safetensors", "model_3.safetensors", "opt_3.safetensors"], names


@pytest.mark.slow
def test_example_config_trains_without_warnings(dataset, tmp_path, monkeypatch):
    """examples/deepfilternet3/config.ini (README: Train) is upstream's released DFN3 config:
    same model and losses; one epoch at a CPU batch size trains with no config warning."""
    from configparser import ConfigParser

    example, upstream = ConfigParser(), ConfigParser()
    example.read(EXAMPLE)
    upstream.read(REPO / "df_mlx" / "pretrained" / "DeepFilterNet3" / "config.ini")
    assert set(example.sections()) == set(upstream.sections()) - {"settings", "dfalphaloss"}
    for section in example.sections():
        expected = {k: v for k, v in upstream[section].items() if k not in UNREAD_UPSTREAM_KEYS.get(section, ())}
        if section == "distortion":
            expected["p_reverb"] = "0.0"  # df_mlx's loader does not reverberate
        assert dict(example[section]) == expected, section
    out, cfg = dataset
    base = tmp_path / "dfn3"
    base.mkdir()
    (base / "config.ini").write_text(EXAMPLE.read_text())
    for key, value in (("BATCH_SIZE", "2"), ("BATCH_SIZE_EVAL", "2"), ("MAX_SAMPLE_LEN_S", "0.5"), ("MAX_EPOCHS", "1"),
                       ("NUM_WORKERS", "1")):
        monkeypatch.setenv(key, value)
    with _logged("WARNING") as warnings:
        result = CliRunner().invoke(cli, ["train", str(cfg), str(out), str(base), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert not [w for w in warnings if "config.ini" in w or "loss" in w.lower()], warnings


def _one_step_cfg(tmp_path: Path) -> Path:
    """A dataset.cfg of one training batch (the full-width discriminators are slow)."""
    cfg = tmp_path / "one_step.cfg"
    cfg.write_text(json.dumps({"train": [["speech_pcm_int16.hdf5", 0.2], ["noise.hdf5"]],
                               "valid": [["speech_flac.hdf5", 0.1], ["noise.hdf5"]],
                               "test": [["speech_vorbis.hdf5", 0.1], ["noise.hdf5"]]}))
    return cfg


@pytest.mark.slow
def test_gan_epoch_with_the_default_discriminator(dataset, tmp_path):
    """`dfmlx train` on the test data with the fork's default discriminator (combined:
    full-width MPD over periods 2, 3, 5, 7, 11 and a 3-scale MSD, 70.7M parameters) on 0.1 s
    samples: it warns first, trains the epoch, and logs the first step's measured time."""
    out, _ = dataset
    ini = TRAIN_INI.replace("max_sample_len_s = 0.5", "max_sample_len_s = 0.1")
    base = _base(tmp_path / "gan", ini.replace("[train]\n", "[train]\ngan_enabled = true\n", 1) + "[GANLoss]\nfactor = 1\n")
    with _logged("INFO") as lines:
        result = CliRunner().invoke(cli, ["train", str(_one_step_cfg(tmp_path)), str(out), str(base), "--no-progress"])
    assert result.exit_code == 0, result.output
    log = "".join(lines)
    assert "CombinedDiscriminator with 70.7M parameters" in log, log
    timed = [line for line in log.splitlines() if "First GAN step" in line]
    assert len(timed) == 1, log
    disc = mx.load(str(base / "checkpoints" / "disc_1.safetensors"))
    assert sum(v.size for v in disc.values()) == 70_728_688
    print(timed[0].split("| ")[-1])


def test_log_lines_lift_progress_bars_off_their_line():
    from tqdm import tqdm

    from df_mlx.logger import _above_progress_bars

    buf = io.StringIO()
    bar = tqdm(total=3, file=buf, mininterval=0)
    bar.update(1)
    _above_progress_bars(buf)("a log line\n")
    bar.close()
    before, _ = buf.getvalue().split("a log line\n")
    assert "1/3" in before and before.endswith("\r"), repr(before)


def test_train_help_names_the_readme_arguments():
    result = CliRunner().invoke(cli, ["train", "--help"])
    assert "DATASET_CFG DATA_DIR BASE_DIR" in result.output and "--start-over" in result.output


def test_eval_help_explains_the_noisy_scores_of_both_modes():
    result = CliRunner().invoke(cli, ["eval", "--help"])
    assert "16 kHz" in result.output and "48 kHz" in result.output and "STFT round trip" in result.output


def test_prepare_data_prints_no_debug_lines(tmp_path):
    from tests.datasets import write_clips

    _, noise = write_clips(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "df_mlx.scripts.prepare_data", "noise", str(noise[0].parent),
                           str(tmp_path / "noise.hdf5"), "--num_workers", "1"], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "DEBUG" not in proc.stderr and "Added" in proc.stderr, proc.stderr


def _readme_block(marker: str) -> str:
    blocks = (REPO / "README.md").read_text().split("```python\n")[1:]
    return next(b.split("```")[0] for b in blocks if marker in b)


def test_readme_snippet_loads_an_export_into_torch_df(tmp_path):
    """README: Train's torch snippet, run as written, loads `dfmlx export my_model/ -o
    my_model.ckpt` into upstream df strictly."""
    from df_mlx.checkpoint import write_model_dir
    from df_mlx.model import init_model

    _load(tmp_path, TRAIN_INI)
    write_model_dir(init_model(run_df=True), tmp_path / "my_model", {"family": "deepfilternet3"})
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "my_model"), "-o", str(tmp_path / "my_model.ckpt")])
    assert result.exit_code == 0, result.output
    snippet = _readme_block('import_ref("deepfilternet3")') + 'print("loaded", type(model).__module__)\n'
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["loaded", "df.deepfilternet3"], proc.stdout
