"""`convert_onnx_release` on archives that are not the DeepFilterNet3 ONNX release: one-line
errors, and no output directory left behind (no reference needed)."""

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from converters.onnx_dfn3 import OnnxReleaseError, convert_onnx_release
from df_mlx.config import config

DFN3_CONFIG = "[train]\nmodel = deepfilternet3\n"
GRAPH_FILES = ("enc.onnx", "erb_dec.onnx", "df_dec.onnx")


@pytest.fixture(autouse=True)
def default_config():
    config.use_defaults(allow_reload=True)
    yield
    config.use_defaults(allow_reload=True)


def _tar_gz(path: Path, files) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path


def _release(path: Path, graphs, config_text=DFN3_CONFIG) -> Path:
    files = {f"tmp/export/{n}": g for n, g in graphs.items()}
    files["tmp/export/config.ini"] = config_text.encode()
    return _tar_gz(path, files)


def _graph(initializers=(), nodes=()) -> bytes:
    """A valid ONNX model with the given initializers ({name: array}) and nodes."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    nodes = list(nodes) or [helper.make_node("Identity", ["x"], ["y"], name="/Identity")]
    inits = [numpy_helper.from_array(v, name=k) for k, v in dict(initializers).items()]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]).SerializeToString()


def _fails(tmp_path: Path, src: Path, match: str):
    out = tmp_path / "out"
    with pytest.raises(OnnxReleaseError, match=match) as err:
        convert_onnx_release(src, out)
    assert "\n" not in str(err.value)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    return str(err.value)


def test_missing_file(tmp_path):
    _fails(tmp_path, tmp_path / "nope.tar.gz", "ONNX release not found")


def test_garbage_bytes(tmp_path):
    src = tmp_path / "DeepFilterNet3_onnx.tar.gz"
    src.write_bytes(b"\x00not a tarball" * 100)
    _fails(tmp_path, src, "is not a readable tar archive")


def test_truncated_gzip(tmp_path):
    graphs = {n: bytes(range(256)) * 400 for n in GRAPH_FILES}
    src = _release(tmp_path / "full.tar.gz", graphs)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    _fails(tmp_path, cut, "is not a readable tar archive")


def test_unrelated_tarball(tmp_path):
    src = _tar_gz(tmp_path / "other.tar.gz", {"pkg/README.md": b"hello", "pkg/model.onnx": b"x"})
    msg = _fails(tmp_path, src, "is not the DeepFilterNet3 ONNX release")
    assert "enc.onnx" in msg and "config.ini" in msg


def test_plain_gzip_not_tar(tmp_path):
    src = tmp_path / "DeepFilterNet3_onnx.tar.gz"
    src.write_bytes(gzip.compress(b"just some text, not a tar archive\n" * 50))
    _fails(tmp_path, src, "is not a readable tar archive")


def test_graph_that_is_not_onnx(tmp_path):
    pytest.importorskip("onnx")
    src = _release(tmp_path / "r.tar.gz", {n: b"\xff\xfe garbage" for n in GRAPH_FILES})
    _fails(tmp_path, src, "enc.onnx is not a readable ONNX model")


def test_unmapped_tensor_is_an_error(tmp_path):
    """A float tensor that maps to no parameter is refused, never dropped."""
    pytest.importorskip("onnx")
    import numpy as np
    from onnx import helper

    node = helper.make_node("Add", ["x", "stray"], ["y"], name="/stray/Add")
    graphs = {"enc.onnx": _graph({"stray": np.ones(3, np.float32)}, [node]),
              "erb_dec.onnx": _graph(), "df_dec.onnx": _graph()}
    msg = _fails(tmp_path, _release(tmp_path / "r.tar.gz", graphs), "tensors left unmapped")
    assert "stray [3]" in msg


def test_missing_weights_are_an_error(tmp_path):
    """Valid graphs without the weights: every unrecovered key is an error."""
    graphs = {n: _graph() for n in GRAPH_FILES}
    msg = _fails(tmp_path, _release(tmp_path / "r.tar.gz", graphs), "not recovered from the graphs")
    assert "enc.erb_conv0.1.weight" in msg


def test_other_family(tmp_path):
    graphs = {n: _graph() for n in GRAPH_FILES}
    src = _release(tmp_path / "r.tar.gz", graphs, "[train]\nmodel = deepfilternet2\n")
    with pytest.raises(ValueError, match="deepfilternet2") as err:
        convert_onnx_release(src, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_existing_output_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(OnnxReleaseError, match="already exists"):
        convert_onnx_release(tmp_path / "whatever.tar.gz", out)
    assert (out / "keep").read_text() == "x"
