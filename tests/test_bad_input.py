"""The bad-input matrix of `dfmlx enhance`, `convert` and `export` (README: "Bad input").

Every case states its exit code, that the one-line `Error:` names the file, and that nothing is
left behind or changed: the whole tree the case works in is checksummed before and after, and
only the outputs the case expects may be new.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from df_mlx.cli import main
from df_mlx.config import config
from tests.test_enhance_cli import SMALL, model_dir  # noqa: F401  (the small random-weight DFN3)

ROOT = Path(__file__).resolve().parents[1]
SR = 16000


def tree(root: Path) -> dict:
    """{relative path: (kind, sha256 or link target, mode)} of everything under `root`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path), None)
            elif path.is_dir():
                out[rel] = ("dir", None, path.stat().st_mode & 0o777)
            else:
                out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode & 0o777)
    return out


def assert_only_new(before: dict, after: dict, new=()):
    """`after` is `before` plus exactly the paths in `new` (unchanged otherwise)."""
    assert {k: v for k, v in after.items() if k not in new} == before
    assert set(new) <= set(after), sorted(set(new) - set(after))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def errors(result) -> list:
    return [line for line in result.output.splitlines() if line.startswith("Error: ")]


def tone(seconds=0.5, sr=SR, channels=1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


def write(path: Path, seconds=0.5, sr=SR, channels=1, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(seconds, sr, channels), sr, **kw)
    return path


# ---- enhance ---------------------------------------------------------------------------------


def test_no_suffix_through_a_symlink_never_overwrites_the_input(tmp_path, model_dir):  # noqa: F811
    src = write(tmp_path / "in" / "x.wav")
    (tmp_path / "link").symlink_to(tmp_path / "in")
    before = tree(tmp_path)
    result = run("enhance", src, "-m", model_dir, "-o", tmp_path / "link", "--no-suffix")
    assert result.exit_code == 1
    assert errors(result) == [f"Error: {src}: its output {tmp_path / 'link' / 'x.wav'} would overwrite an input"]
    assert_only_new(before, tree(tmp_path))


def test_no_suffix_onto_a_hard_link_of_the_input(tmp_path, model_dir):  # noqa: F811
    src = write(tmp_path / "in" / "x.wav")
    (tmp_path / "out").mkdir()
    os.link(src, tmp_path / "out" / "x.wav")
    before = tree(tmp_path)
    result = run("enhance", src, "-m", model_dir, "-o", tmp_path / "out", "--no-suffix")
    assert result.exit_code == 1 and errors(result)[0].startswith(f"Error: {src}: its output")
    assert_only_new(before, tree(tmp_path))


def test_an_output_that_is_another_input(tmp_path, model_dir):  # noqa: F811
    a = write(tmp_path / "a.wav")
    b = write(tmp_path / "a_small.wav")  # a.wav's output name in the same folder
    before = tree(tmp_path)
    result = run("enhance", a, b, "-m", model_dir, "-o", tmp_path)
    assert result.exit_code == 1
    assert errors(result) == [f"Error: {a}: its output {b} would overwrite an input"]
    assert_only_new(before, tree(tmp_path), ["a_small_small.wav"])


def test_output_name_collisions_are_found_before_any_work(tmp_path, model_dir):  # noqa: F811
    a, b = write(tmp_path / "dA" / "x.wav"), write(tmp_path / "dB" / "x.wav")
    good = write(tmp_path / "dA" / "y.wav")
    before = tree(tmp_path)
    result = run("enhance", a, b, good, "-m", model_dir, "-o", tmp_path / "out")
    assert result.exit_code == 1
    out = tmp_path / "out" / "x_small.wav"
    assert errors(result) == [f"Error: {a}: its output {out} would also be written for {b}",
                              f"Error: {b}: its output {out} would also be written for {a}"]
    assert "enhanced 1/3 files" in result.output
    assert_only_new(before, tree(tmp_path), ["out", "out/y_small.wav"])


def test_collisions_by_case_where_names_ignore_case(tmp_path, model_dir, monkeypatch):  # noqa: F811
    import df_mlx.enhance_cli as cli

    monkeypatch.setattr(cli, "_ignores_case", lambda folder: True)  # as on macOS's default APFS
    a, b = write(tmp_path / "dA" / "x.wav"), write(tmp_path / "dB" / "X.wav")
    before = tree(tmp_path)
    result = run("enhance", a, b, "-m", model_dir, "-o", tmp_path / "out")
    assert result.exit_code == 1 and [e.split(": its output")[0] for e in errors(result)] == [
        f"Error: {a}", f"Error: {b}"]
    assert_only_new(before, tree(tmp_path), ["out"])


def test_one_file_under_three_spellings_is_enhanced_once(tmp_path, model_dir, monkeypatch):  # noqa: F811
    src = write(tmp_path / "in" / "x.wav")
    (tmp_path / "alias").symlink_to(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    result = run("enhance", "in/x.wav", "./in/../in/x.wav", "alias/x.wav", "-m", model_dir, "-o", "out")
    assert result.exit_code == 0, result.output
    assert "enhanced 1/1 files" in result.output and os.listdir("out") == ["x_small.wav"]
    assert src.is_file()


def test_a_device_or_pipe_is_not_read(tmp_path, model_dir):  # noqa: F811
    os.mkfifo(tmp_path / "pipe.wav")
    result = run("enhance", tmp_path / "pipe.wav", "/dev/null", "-m", model_dir, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert errors(result) == [f"Error: {tmp_path / 'pipe.wav'}: not a regular file", "Error: /dev/null: not a regular file"]


def test_a_sub_folder_named_like_audio_is_not_an_input(tmp_path, model_dir):  # noqa: F811
    write(tmp_path / "in" / "a.wav")
    (tmp_path / "in" / "folder.wav").mkdir()
    result = run("enhance", tmp_path / "in", "-m", model_dir, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "enhanced 1/1 files" in result.output and os.listdir(tmp_path / "out") == ["a_small.wav"]


def _corrupt_flac(path: Path) -> Path:
    write(path.with_suffix(".tmp.flac"), seconds=2.0)
    data = path.with_suffix(".tmp.flac").read_bytes()
    path.with_suffix(".tmp.flac").unlink()
    path.write_bytes(data[: len(data) // 2] + bytes(len(data) // 2))  # frames lost mid-stream
    return path


def _odd_rate_wav(path: Path) -> Path:
    sf.write(path, tone(0.2, 44101), 44101)  # 44101:48000 share no factor: a 48000-phase kernel
    return path


def _many_channels(path: Path) -> Path:
    return write(path, seconds=0.05, channels=33)


def _low_rate(path: Path) -> Path:
    return write(path, seconds=0.5, sr=2000)


@pytest.mark.parametrize("make, reason", [
    (_corrupt_flac, "cannot decode"),
    (_odd_rate_wav, "cannot resample 44101 Hz to 48000 Hz"),
    (_many_channels, "33 channels, more than 32"),
    (_low_rate, "sample rate 2000 Hz is outside 4000..384000 Hz"),
], ids=["corrupt_flac", "rate_44101", "33_channels", "rate_2000"])
def test_a_bad_file_fails_alone_and_the_batch_goes_on(tmp_path, model_dir, make, reason):  # noqa: F811
    bad = make(tmp_path / ("bad.flac" if make is _corrupt_flac else "bad.wav"))
    good = write(tmp_path / "good.wav")
    before = tree(tmp_path)
    t0 = time.perf_counter()
    result = run("enhance", bad, good, "-m", model_dir, "-o", tmp_path / "out")
    assert time.perf_counter() - t0 < 60  # the bounds are checked before any allocation
    assert result.exit_code == 1
    [error] = errors(result)
    assert error.startswith(f"Error: {bad}: ") and reason in error, error
    assert "enhanced 1/2 files" in result.output
    assert_only_new(before, tree(tmp_path), ["out", "out/good_small.wav"])


def test_a_file_name_with_a_newline_fails_on_one_line(tmp_path, model_dir):  # noqa: F811
    bad = tmp_path / "in" / "a\nb.wav"
    bad.parent.mkdir()
    bad.write_bytes(b"RIFF not audio")
    before = tree(tmp_path)
    result = run("enhance", bad, "-m", model_dir, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert errors(result) == [f"Error: {tmp_path}/in/a\\nb.wav: not a readable audio file "
                              "(Format not recognised.)"]
    assert_only_new(before, tree(tmp_path), new=["out"])


def test_too_long_is_refused_from_the_header(tmp_path, model_dir, monkeypatch):  # noqa: F811
    import df_mlx.enhance_cli as cli

    monkeypatch.setattr(cli, "MAX_SECONDS", 0.25)  # the bound itself: a day of audio
    src = write(tmp_path / "long.wav", seconds=0.5)
    before = tree(tmp_path)
    result = run("enhance", src, "-m", model_dir, "-o", tmp_path)
    assert result.exit_code == 1 and errors(result) == [f"Error: {src}: 0.5 s long, more than 0.25 s"]
    assert_only_new(before, tree(tmp_path))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_atten_lim_is_refused(tmp_path, model_dir, value):  # noqa: F811
    src = write(tmp_path / "x.wav")
    before = tree(tmp_path)
    result = run("enhance", src, "-m", model_dir, "-o", tmp_path, "--atten-lim", value)
    assert result.exit_code == 2 and "--atten-lim" in result.output and "finite" in result.output
    assert_only_new(before, tree(tmp_path))


def test_non_finite_model_output_writes_nothing(tmp_path):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from df_mlx.checkpoint import write_model_dir
    from df_mlx.deepfilternet3 import init_model

    (tmp_path / "c.ini").write_text(SMALL)
    config.load(str(tmp_path / "c.ini"), allow_reload=True)
    model = init_model()
    name, value = next((k, v) for k, v in tree_flatten(model.parameters()) if k.endswith("weight"))
    model.load_weights([(name, mx.full(value.shape, float("nan")))], strict=False)
    nan_model = write_model_dir(model, tmp_path / "nan_model", {"family": "deepfilternet3"})
    config.use_defaults(allow_reload=True)
    src = write(tmp_path / "audio" / "x.wav")
    before = tree(tmp_path)
    result = run("enhance", src, "-m", nan_model, "-o", tmp_path / "audio")
    assert result.exit_code == 1
    assert errors(result) == [f"Error: {src}: the model produced NaN or infinite samples (are its weights finite?)"]
    assert_only_new(before, tree(tmp_path))


@pytest.mark.parametrize("name, subtype, fmt", [
    ("x.ogg", "VORBIS", "OGG"), ("x.mp3", "MPEG_LAYER_III", "MP3"),
    ("x24.wav", "PCM_24", "WAV"), ("xf.wav", "FLOAT", "WAV"), ("x.flac", "PCM_24", "FLAC")])
def test_output_keeps_the_input_format_and_encoding(tmp_path, model_dir, name, subtype, fmt):  # noqa: F811
    src = write(tmp_path / name, seconds=1.0, sr=48000, subtype=subtype)
    result = run("enhance", src, "-m", model_dir, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / f"{Path(name).stem}_small{Path(name).suffix}"
    info = sf.info(out)
    assert (info.format, info.subtype, info.samplerate) == (fmt, subtype, 48000)
    assert abs(info.frames - 48000) <= (1152 if fmt == "MP3" else 0)  # MP3 frames pad the end


def test_outputs_follow_the_umask(tmp_path, model_dir):  # noqa: F811
    src = write(tmp_path / "x.wav")
    old = os.umask(0o022)
    try:
        assert run("enhance", src, "-m", model_dir, "-o", tmp_path / "out").exit_code == 0
        os.umask(0o027)
        assert run("enhance", src, "-m", model_dir, "-o", tmp_path / "out2").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "x_small.wav").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out2" / "x_small.wav").stat().st_mode & 0o777 == 0o640


def test_a_truncated_wav_is_warned_about(tmp_path, model_dir):  # noqa: F811
    full = write(tmp_path / "full.wav", seconds=1.0)
    data = full.read_bytes()
    src = tmp_path / "cut.wav"
    src.write_bytes(data[: len(data) // 2])
    result = run("enhance", src, "-m", model_dir, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"Warning: {src}: truncated" in result.output
    assert sf.info(tmp_path / "out" / "cut_small.wav").frames == sf.info(src).frames


def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "df_mlx", *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["TERM", "HUP", "INT"])
def test_a_signal_mid_file_leaves_nothing(tmp_path, model_dir, signum):  # noqa: F811
    src = write(tmp_path / "long.wav", seconds=120.0)
    out = tmp_path / "out"
    out.mkdir()
    before = tree(tmp_path)
    proc = _cli(["enhance", src, "-m", model_dir, "-o", out])
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".dfmlx-") for p in out.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    time.sleep(0.2)  # inside the first blocks
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr  # SIGINT: 130, as shells report it
    assert_only_new(before, tree(tmp_path))


def _disk_full_past(size: int):
    """A subprocess setup under which writing past `size` bytes of a file fails as a full disk
    does (RLIMIT_FSIZE: EFBIG, with SIGXFSZ ignored)."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def test_a_full_disk_fails_the_file_and_the_batch_goes_on(tmp_path, model_dir):  # noqa: F811
    big = write(tmp_path / "big.wav", seconds=10.0)  # 320 kB out
    small = write(tmp_path / "small.wav", seconds=0.5)
    before = tree(tmp_path)
    proc = _cli(["enhance", big, small, "-m", model_dir, "-o", tmp_path / "out"], preexec_fn=_disk_full_past(256 << 10))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    [error] = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert error.startswith(f"Error: {big}: cannot write {tmp_path / 'out' / 'big_small.wav'}"), stderr
    assert "enhanced 1/2 files" in stdout
    assert_only_new(before, tree(tmp_path), ["out", "out/small_small.wav"])


# ---- convert and export ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_state():
    """The small DFN3's state dict in torch layout (checkpoints need torch to be written)."""
    pytest.importorskip("torch")
    from converters.layout import mlx_state_dict
    from df_mlx.deepfilternet3 import init_model

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dfmlx-small-{os.getpid()}.ini"
    path.write_text(SMALL)
    config.load(str(path), allow_reload=True)
    path.unlink()
    state = mlx_state_dict(init_model())
    config.use_defaults(allow_reload=True)
    return state


@pytest.fixture
def src(tmp_path, small_state):
    """An upstream-style model directory beside unrelated user files."""
    from converters.torch_ckpt import write_state_dict

    root = tmp_path / "work"
    (root / "model" / "checkpoints").mkdir(parents=True)
    (root / "model" / "config.ini").write_text(SMALL)
    write_state_dict(small_state, root / "model" / "checkpoints" / "model_3.ckpt")
    (root / "notes.txt").write_text("mine")
    (root / "user" / "sub").mkdir(parents=True)
    (root / "user" / "data.bin").write_bytes(b"\x00\x01")
    (root / "user" / "sub" / "keep.txt").write_text("keep")
    return root / "model"


def _refused(tmp_path, args, message, cwd=None, monkeypatch=None):
    before = tree(tmp_path)
    if cwd is not None:
        monkeypatch.chdir(cwd)
    result = run(*args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert_only_new(before, tree(tmp_path))
    return lines[0]


def test_convert_onto_the_current_directory(tmp_path, src, monkeypatch):
    _refused(tmp_path, ["convert", src / "checkpoints" / "model_3.ckpt", "--config", src / "config.ini",
                        "-o", ".", "--overwrite"], "refusing to replace .: it holds the current directory",
             cwd=src.parent, monkeypatch=monkeypatch)


def test_convert_onto_a_user_folder(tmp_path, src):
    user = src.parent / "user"
    _refused(tmp_path, ["convert", src, "-o", user, "--overwrite"],
             f"refusing to replace {user}: it is a folder df-mlx did not write")


def test_convert_onto_its_source(tmp_path, src):
    _refused(tmp_path, ["convert", src, "-o", src, "--overwrite"], f"refusing to replace {src}: it holds the source")


def test_convert_onto_an_ancestor_of_its_source(tmp_path, src):
    _refused(tmp_path, ["convert", src, "-o", src.parent, "--overwrite"],
             f"refusing to replace {src.parent}: it holds the source")


def test_convert_onto_a_file(tmp_path, src):
    notes = src.parent / "notes.txt"
    _refused(tmp_path, ["convert", src, "-o", notes, "--overwrite"],
             f"refusing to replace {notes}: it is a file, not a df-mlx model folder")


def test_convert_replaces_only_a_df_mlx_model_folder(tmp_path, src):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert run("convert", src, "-o", out).exit_code == 0
        first = tree(out)
        assert run("convert", src, "-o", out, "--overwrite").exit_code == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert tree(out) == first and all(mode == 0o644 for kind, _, mode in first.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dfmlx-")]
    (out / "mine.txt").write_text("a file the user put there")
    _refused(tmp_path, ["convert", src, "-o", out, "--overwrite"],
             f"refusing to replace {out}: it is a folder df-mlx did not write")


def _zip(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_convert_a_zip_bomb_is_refused_before_extraction(tmp_path, src, monkeypatch):
    import converters.convert as convert

    monkeypatch.setattr(convert, "MAX_ARCHIVE_BYTES", 1 << 20)  # the bound itself: 1 GiB
    bomb = _zip(tmp_path / "bomb.zip", {"m/config.ini": SMALL, "m/checkpoints/model_1.ckpt": bytes(2 << 20)})
    monkeypatch.setattr(zipfile.ZipFile, "extract", lambda *a: pytest.fail("extracted"))
    _refused(tmp_path, ["convert", bomb, "-o", tmp_path / "out"], "bomb.zip: its model directory unpacks to")


def test_convert_a_tar_bomb_is_refused_before_reading(tmp_path, monkeypatch):
    import io
    import tarfile

    import converters.onnx_dfn3 as onnx_dfn3

    monkeypatch.setattr(onnx_dfn3, "MAX_ARCHIVE_BYTES", 1 << 20)  # the bound itself: 1 GiB
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:
        for name in ("enc.onnx", "erb_dec.onnx", "df_dec.onnx", "config.ini"):
            info = tarfile.TarInfo(f"r/{name}")
            info.size = 2 << 20 if name == "enc.onnx" else 1
            tar.addfile(info, io.BytesIO(bytes(info.size)))
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda *a: pytest.fail("read"))
    _refused(tmp_path, ["convert", bomb, "-o", tmp_path / "out"], "bomb.tar.gz: its graphs and config unpack to")


def test_convert_a_zip_with_too_many_members(tmp_path, src, monkeypatch):
    import converters.convert as convert

    monkeypatch.setattr(convert, "MAX_ARCHIVE_MEMBERS", 10)  # the bound itself: 1000
    many = _zip(tmp_path / "many.zip", {f"m/f{i}": b"" for i in range(11)})
    _refused(tmp_path, ["convert", many, "-o", tmp_path / "out"], "many.zip: 11 members, more than a model zip holds")


def test_convert_a_zip_names_its_members_not_a_temp_folder(tmp_path):
    empty = _zip(tmp_path / "m.zip", {"DFN/config.ini": SMALL})
    _refused(tmp_path, ["convert", empty, "-o", tmp_path / "out"], "no model_*.ckpt in m.zip:DFN")


def test_convert_names_the_folder_without_checkpoints(tmp_path, src):
    bare = tmp_path / "bare"
    bare.mkdir()
    _refused(tmp_path, ["convert", bare, "--config", src / "config.ini", "-o", tmp_path / "out"],
             f"no model_*.ckpt in {bare}")


def test_convert_an_undecodable_config(tmp_path, src):
    bad = tmp_path / "latin1.ini"
    bad.write_bytes("[train]\nmodel = deepfilternet3 # caf\xe9\n".encode("latin-1"))
    _refused(tmp_path, ["convert", src, "--config", bad, "-o", tmp_path / "out"], f"{bad}: not UTF-8 text")


@pytest.mark.parametrize("text, reason", [("[train\nmodel = x\n", "File contains no section headers."),
                                          ("[df]\nsr = abc\n", "invalid literal for int()")],
                         ids=["unparsable", "uncastable"])
def test_convert_an_unusable_config(tmp_path, src, text, reason):
    (src / "config.ini").write_text(text)
    _refused(tmp_path, ["convert", src, "-o", tmp_path / "out"], f"{src}/config.ini: not a usable config: {reason}")


def test_convert_a_bogus_safetensors(tmp_path):
    bogus = tmp_path / "w.safetensors"
    bogus.write_bytes((10**12).to_bytes(8, "little") + b"{not json")
    _refused(tmp_path, ["convert", bogus, "-o", tmp_path / "out"], f"{bogus}: a safetensors file")


def test_convert_an_already_converted_model(tmp_path, src):
    out = tmp_path / "out"
    assert run("convert", src, "-o", out).exit_code == 0
    for given in (out / "model.safetensors", out):
        _refused(tmp_path, ["convert", given, "-o", tmp_path / "again"], f"{given} is already a df-mlx model")


def test_convert_int_weights_are_not_cast(tmp_path, src, small_state):
    from converters.torch_ckpt import write_state_dict

    name = next(k for k, v in small_state.items() if k.endswith("weight") and v.dtype == np.float32)
    write_state_dict(dict(small_state, **{name: small_state[name].astype(np.int64)}), tmp_path / "int.ckpt")
    _refused(tmp_path, ["convert", tmp_path / "int.ckpt", "--config", src / "config.ini", "-o", tmp_path / "out"],
             f"{name}: a int64 tensor where the model has mlx.core.float32")


@pytest.fixture
def converted(tmp_path, src):
    assert run("convert", src, "-o", tmp_path / "converted").exit_code == 0
    return tmp_path / "converted"


def test_export_onto_a_folder(tmp_path, converted, src):
    user = src.parent / "user"
    _refused(tmp_path, ["export", converted, "-o", user, "--overwrite"],
             f"refusing to replace {user}: it is a directory")


def test_export_onto_a_user_file(tmp_path, converted, src):
    notes = src.parent / "notes.txt"
    _refused(tmp_path, ["export", converted, "-o", notes, "--overwrite"],
             f"refusing to replace {notes}: not a PyTorch checkpoint")


def test_export_into_its_own_model(tmp_path, converted):
    target = converted / "model.safetensors"
    _refused(tmp_path, ["export", converted, "-o", target, "--overwrite"], "it is part of the model being exported")


def test_export_replaces_its_own_kind_with_umask_permissions(tmp_path, converted):
    target = tmp_path / "back.ckpt"
    old = os.umask(0o022)
    try:
        assert run("export", converted, "-o", target).exit_code == 0
        assert run("export", converted, "-o", target, "--overwrite").exit_code == 0
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dfmlx-")]


@pytest.mark.parametrize("command", ["convert", "export"])
def test_a_full_disk_fails_convert_and_export_cleanly(tmp_path, src, converted, command):
    args = [src, "-o", tmp_path / "out"] if command == "convert" else [converted, "-o", tmp_path / "out.ckpt"]
    before = tree(tmp_path)
    proc = _cli([command, *args], preexec_fn=_disk_full_past(16 << 10))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    assert stderr.strip().splitlines()[-1].startswith(f"Error: cannot write {args[-1]}"), stderr
    assert [line for line in stderr.splitlines() if line.startswith("Error")] == [stderr.strip().splitlines()[-1]]
    assert_only_new(before, tree(tmp_path))


# ---- eval ------------------------------------------------------------------------------------


@pytest.fixture
def scored(tmp_path):
    """A clean and an enhanced folder with one file each, and a user's file beside them."""
    write(tmp_path / "clean" / "a.wav")
    write(tmp_path / "enh" / "a.wav")
    (tmp_path / "notes.txt").write_text("mine\n")
    return tmp_path


@pytest.mark.parametrize("target, reason", [
    ("notes.txt", "is not a scores CSV written by dfmlx eval"),
    ("clean/a.wav", "is not a scores CSV written by dfmlx eval"),
])
def test_eval_csv_never_replaces_a_user_file(scored, target, reason):
    before = tree(scored)
    path = scored / target
    result = run("eval", scored / "clean", scored / "enh", "--metrics", "sisdr", "--csv-enh", path)
    assert result.exit_code == 1
    assert errors(result) == [f"Error: {path}: exists and {reason}; refusing to replace it"]
    assert_only_new(before, tree(scored))


def test_eval_csv_onto_a_folder(scored):
    before = tree(scored)
    result = run("eval", scored / "clean", scored / "enh", "--metrics", "sisdr", "--csv-enh", scored / "enh")
    assert result.exit_code == 2  # click's usage error
    assert "is a directory" in result.output and str(scored / "enh") in result.output
    assert_only_new(before, tree(scored))


def test_eval_csv_paths_must_differ(scored):
    before = tree(scored)
    path = scored / "s.csv"
    result = run("eval", scored / "clean", scored / "enh", "-n", scored / "clean", "--metrics", "sisdr",
                 "--csv-enh", path, "--csv-noisy", path)
    assert result.exit_code == 1
    assert errors(result) == [f"Error: {path}: given for both --csv-enh and --csv-noisy"]
    assert_only_new(before, tree(scored))


def test_eval_csv_replaces_its_own_scores(scored):
    path = scored / "s.csv"
    for _ in range(2):
        result = run("eval", scored / "clean", scored / "enh", "--metrics", "sisdr", "--csv-enh", path)
        assert result.exit_code == 0, result.output
    assert path.read_text().splitlines()[0] == "filename,SISDR"
