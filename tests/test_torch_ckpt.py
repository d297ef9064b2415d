"""The torch-free checkpoint reader and writer: the same arrays as
`torch.load(weights_only=True)` on every checkpoint form df-mlx reads, hostile pickles
refused, files torch reads, and `dfmlx convert` / `init_df(<upstream dir>)` / `dfmlx export`
working in a process where torch cannot be imported."""

import collections
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from converters.torch_ckpt import CheckpointError, load, read_state_dict, write_state_dict  # noqa: E402

NO_TORCH = "import sys; sys.modules['torch'] = None\n"  # `import torch` raises ImportError
SENTINEL = Path("/tmp/dfmlx_torch_ckpt_pwned")


def _assert_same(ours, theirs, where="root"):
    """Our numpy tree equals torch's tensor tree: same dtype, shape and values."""
    if isinstance(theirs, torch.Tensor):
        theirs = theirs.detach()
        want = theirs.float().numpy() if theirs.dtype == torch.bfloat16 else theirs.numpy()
        assert isinstance(ours, np.ndarray), where
        assert ours.dtype == want.dtype and ours.shape == want.shape, (where, ours.dtype, want.dtype)
        np.testing.assert_array_equal(ours, want, err_msg=where)
    elif isinstance(theirs, dict):
        assert list(ours) == list(theirs), where
        for k in theirs:
            _assert_same(ours[k], theirs[k], f"{where}.{k}")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, where


def _mixed_checkpoint():
    """What checkpoints hold: module state dicts (OrderedDict with _metadata), every dtype,
    views with offsets and strides, shared storages, 0-d and empty tensors, plain values."""
    gru = torch.nn.GRU(4, 8, 2)
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    tensors = {
        "transposed": base.transpose(0, 2), "offset_view": base[1:, 2], "shared": base,
        "float64": torch.randn(3, dtype=torch.float64), "float16": torch.randn(4).half(),
        "bfloat16": torch.randn(4).to(torch.bfloat16), "int64": torch.tensor([-(2**40), 7]),
        "int32": torch.tensor([1, -2], dtype=torch.int32), "int8": torch.tensor([-3], dtype=torch.int8),
        "uint8": torch.tensor([250], dtype=torch.uint8), "bool": torch.tensor([True, False]),
        "complex64": torch.randn(2, dtype=torch.complex64), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(torch.randn(2, 2)),
    }
    return {"model": gru.state_dict(), "tensors": tensors, "epoch": 7, "name": "x", "hist": [1.5, None, (2, "a")]}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_same_arrays_as_torch_load(tmp_path, legacy):
    path = tmp_path / "mixed.ckpt"
    torch.save(_mixed_checkpoint(), path, _use_new_zipfile_serialization=not legacy)
    _assert_same(load(path), torch.load(path, map_location="cpu", weights_only=True))


def test_written_without_torch_reads_in_torch(tmp_path):
    """write_state_dict's zip is what torch.load(weights_only=True) reads, every dtype and
    layout (0-d, empty, transposed), and a torch module loads it strictly."""
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, np.int64),
             "e": np.zeros((0, 4), np.float16), "t": np.arange(6, dtype=np.float64).reshape(3, 2).T,
             "b": np.array([True, False]), "i8": np.array([-3], np.int8), "c": np.array([1 + 2j], np.complex64)}
    write_state_dict(state, tmp_path / "w.ckpt")
    back = torch.load(tmp_path / "w.ckpt", weights_only=True)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].numpy().dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k].numpy(), v, err_msg=k)
    gru = torch.nn.GRU(3, 4)
    write_state_dict({k: v.detach().numpy() for k, v in gru.state_dict().items()}, tmp_path / "gru.ckpt")
    torch.nn.GRU(3, 4).load_state_dict(torch.load(tmp_path / "gru.ckpt", weights_only=True), strict=True)
    with pytest.raises(CheckpointError, match="no torch storage"):
        write_state_dict({"s": np.array(["x"])}, tmp_path / "s.ckpt")


def test_upstream_state_dict_and_legacy_renaming(tmp_path):
    """df's checkpoints: `torch.save(model.state_dict())`, with the old `clc` names renamed."""
    state = {"clc_dec.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "enc.b": np.ones(2, np.float32)}
    write_state_dict(state, tmp_path / "model_1.ckpt")
    got = read_state_dict(tmp_path / "model_1.ckpt")
    assert list(got) == ["df_dec.weight", "enc.b"]
    np.testing.assert_array_equal(got["df_dec.weight"], state["clc_dec.weight"])


def test_resemblyzer_legacy_checkpoint():
    """resemblyzer's pretrained.pt, a legacy-format file saved on CUDA."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None:
        pytest.skip("resemblyzer is not installed (the test command installs it)")
    path = Path(spec.origin).parent / "pretrained.pt"
    _assert_same(load(path), torch.load(path, map_location="cpu", weights_only=True))


class _Storage:
    """Pickled as a persistent id, as torch pickles a storage."""

    def __init__(self, numel):
        self.numel = numel


class _Crafted:
    """A tensor record with chosen fields (and optionally a BUILD state)."""

    def __init__(self, storage, size, stride, state=None):
        self.args = (storage, 0, size, stride, False, collections.OrderedDict())
        self.state = state

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args) + ((self.state,) if self.state else ())


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {SENTINEL}",))


class _CraftingPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def _zip_checkpoint(path: Path, obj, data: bytes = np.zeros(2, np.float32).tobytes()):
    buf = io.BytesIO()
    _CraftingPickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/data/0", data)
        z.writestr("archive/version", "3\n")
    return path


def _loop():
    loop = []
    loop.append(loop)
    return {"x": loop}


def _hostile(tmp_path: Path):
    """(name, file, expected message part)."""
    torch.save({"x": _Evil()}, tmp_path / "evil_zip.pt")
    torch.save({"x": _Evil()}, tmp_path / "evil_legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "evil_plain.pt").write_bytes(pickle.dumps(_Evil()))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    eval_pickle = b"\x80\x02cbuiltins\neval\nX\x06\x00\x00\x00print(1)\x85R."
    with zipfile.ZipFile(tmp_path / "eval.pt", "w") as z:
        z.writestr("archive/data.pkl", eval_pickle)
        z.writestr("archive/version", "3\n")
    return [
        ("reduce_zip", tmp_path / "evil_zip.pt", "refusing to load evil_zip.pt: it would import `posix.system`"),
        ("reduce_legacy", tmp_path / "evil_legacy.pt", "it would import `posix.system`"),
        ("reduce_plain", tmp_path / "evil_plain.pt", "it would import `posix.system`"),
        ("whole_module", tmp_path / "module.pt", "it would import `torch.nn.modules.linear.Linear`"),
        ("eval", tmp_path / "eval.pt", "it would import `builtins.eval`"),
        ("set_state", _zip_checkpoint(tmp_path / "build.pt", _Crafted(_Storage(2), (2,), (1,), {"a": 1})),
         "refusing to set the state"),
        ("past_storage", _zip_checkpoint(tmp_path / "oob.pt", _Crafted(_Storage(2), (10,), (1,))),
         "reaches past the end of its storage"),
        ("short_storage", _zip_checkpoint(tmp_path / "short.pt", _Crafted(_Storage(64), (2,), (1,))),
         "shorter than its declared size"),
        ("negative_stride", _zip_checkpoint(tmp_path / "neg.pt", _Crafted(_Storage(2), (2,), (-1,))),
         "negative size, stride or offset"),
        ("stride_0_bomb", _zip_checkpoint(tmp_path / "bomb.pt", _Crafted(_Storage(2), (10**12,), (0,))),
         "more elements than its storage"),
        ("self_reference", _zip_checkpoint(tmp_path / "loop.pt", _loop()), "contains itself"),
    ]


def test_hostile_pickles_refused(tmp_path):
    SENTINEL.unlink(missing_ok=True)
    for name, path, message in _hostile(tmp_path):
        with pytest.raises(CheckpointError) as e:
            load(path)
        assert message in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    assert not SENTINEL.exists()


def test_shared_objects_resolve_once(tmp_path):
    """A pickle that shares one object 2^60 times over (a "billion laughs") reads at once, with
    the sharing kept; torch reads it too."""
    level = [torch.ones(2)]
    for _ in range(60):
        level = [level, level]
    torch.save({"x": level}, tmp_path / "laughs.pt")
    got = load(tmp_path / "laughs.pt")["x"]
    assert got[0] is got[1]
    for _ in range(60):
        got = got[0]
    np.testing.assert_array_equal(got[0], np.ones(2, np.float32))


def test_torch_refuses_what_we_refuse(tmp_path):
    """The import refusals agree with torch's own weights_only loader."""
    for name, path, _ in _hostile(tmp_path)[:5]:
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)
    assert not SENTINEL.exists()


def _upstream_dir(root: Path) -> Path:
    from converters.layout import mlx_state_dict
    from df_mlx.config import config
    from df_mlx.deepfilternet3 import init_model

    config.use_defaults(allow_reload=True)
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.ini").write_text("[train]\nmodel = deepfilternet3\n")
    write_state_dict(mlx_state_dict(init_model()), root / "checkpoints" / "model_5.ckpt.best")
    return root


def _run_without_torch(code: str):
    return subprocess.run([sys.executable, "-c", NO_TORCH + code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))


@pytest.mark.slow
def test_convert_and_init_df_without_torch(tmp_path):
    src = _upstream_dir(tmp_path / "DFN3")
    want = read_state_dict(src / "checkpoints" / "model_5.ckpt.best")
    np.savez(tmp_path / "want.npz", **want)
    code = f"""
import numpy as np
from click.testing import CliRunner
from converters.layout import mlx_state_dict
from df_mlx.checkpoint import load_model_dir
from df_mlx.cli import main
from df_mlx.enhance import init_df
r = CliRunner().invoke(main, ["convert", {str(src)!r}, "-o", {str(tmp_path / "out")!r}])
assert r.exit_code == 0, r.output
r = CliRunner().invoke(main, ["export", {str(tmp_path / "out")!r}, "-o", {str(tmp_path / "back.ckpt")!r}])
assert r.exit_code == 0, r.output
want = np.load({str(tmp_path / "want.npz")!r})
for got in (mlx_state_dict(load_model_dir({str(tmp_path / "out")!r})[0]),
            mlx_state_dict(init_df({str(src)!r}, log_file=None)[0])):
    assert set(got) == set(want.files)
    for k in want.files:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
import sys
assert sys.modules["torch"] is None
print("ok")
"""
    result = _run_without_torch(code)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
    back = torch.load(tmp_path / "back.ckpt", weights_only=True)  # exported without torch
    assert set(back) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(back[k].numpy(), v, err_msg=k)
