"""The official DeepFilterNet3 ONNX release (`DeepFilterNet3_onnx.tar.gz`) -> the upstream
`df.deepfilternet3` state dict, and a df-mlx converted-model directory.

The release holds `enc.onnx`, `erb_dec.onnx`, `df_dec.onnx` (torch 1.13 exports of the three
sub-modules `enc`, `erb_dec`, `df_dec`, opset 12) and the training `config.ini`. The weights
are initializers and `Constant` nodes; each parametric node is mapped to its state-dict key by
its scope (`/erb_conv1/0/Conv` -> `enc.erb_conv1.0`) and by order inside that scope:

- Conv / ConvTranspose: weight as is (ONNX and torch share the layout). A bias on the conv
  that precedes a BatchNorm is that BatchNorm folded in by the exporter (torch's eval-mode
  Conv+BN fusion, W' = W*g/sqrt(v+eps), b' = beta - mean*g/sqrt(v+eps)); the original
  statistics are gone, so the BN gets an output-identical parametrisation: weight 1,
  bias b', running_mean 0, running_var 1-eps (float32 (1-eps)+eps == 1 exactly, so eval
  BN(x) = x + b' bit for bit), num_batches_tracked 0 (unused in eval and with momentum set).
- GRU: W [1,3H,I], R [1,3H,H], B [1,6H] in ONNX gate order (z, r, h) -> torch (r, z, n);
  B = [W_b | R_b] -> bias_ih | bias_hh. Only linear_before_reset=1 (torch's cell) is accepted.
  The k-th GRU node of a scope is layer k.
- Einsum `btgi,gih->btgh` (GroupedLinearEinsum): weight [G, I/G, H/G] as is.
- MatMul + Add (nn.Linear): weight = MatMul's [I, O] transposed, bias from the Add.
- `erb_fb` / `mask.erb_inv_fb` are not in the graphs (features and mask application run
  outside them): recomputed from the config with libdf's ERB widths (min_nb_erb_freqs).

Every float tensor of the graphs must land on a key, or be one of the known scalars (the
zero pad value, the LSNR scale and offset, checked against the config); integer tensors are
shapes/axes/pads. An unmapped tensor or an unrecovered key is an error, never skipped.
"""

import importlib.util
import re
import tarfile
import tempfile
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from loguru import logger

from converters.record import (CONVERTER_VERSION, MAX_ARCHIVE_BYTES, MAX_ARCHIVE_MEMBERS, REFERENCE_VERSION,
                               ConvertResult, load_config, sha256)
from converters.torch_ckpt import CheckpointError

FAMILY = "deepfilternet3"
# sub-module prefix in the state dict -> graph file in the archive
GRAPHS = {"enc": "enc.onnx", "erb_dec": "erb_dec.onnx", "df_dec": "df_dec.onnx"}
CONFIG_FILE = "config.ini"
GROUPED_LINEAR_EINSUM = "btgi,gih->btgh"
FOLDED_BN = "folded into the preceding conv by the exporter; recovered as weight=1, bias=folded " \
            "bias, running_mean=0, running_var=1-eps (eval output identical)"


class OnnxReleaseError(CheckpointError):
    """The archive is not the DeepFilterNet3 ONNX release, or its graphs do not map completely."""


@dataclass
class Release:
    config_text: str
    graphs: Dict[str, bytes]  # prefix -> serialized ONNX model
    description: str


@dataclass
class OnnxConvertResult(ConvertResult):
    folded_bn: List[str] = field(default_factory=list)  # BatchNorms recovered from folded convs
    recomputed: List[str] = field(default_factory=list)  # keys computed from the config


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def read_release(tar_path) -> Release:
    """The three graphs and the config from the release tarball (read in memory, no extraction)."""
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise OnnxReleaseError(f"ONNX release not found: {tar_path}")
    wanted = list(GRAPHS.values()) + [CONFIG_FILE]
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = {}
            for i, m in enumerate(tar):
                if i >= MAX_ARCHIVE_MEMBERS:
                    raise OnnxReleaseError(f"{tar_path.name}: more than {MAX_ARCHIVE_MEMBERS} members, "
                                           "more than a release holds")
                name = Path(m.name).name
                if m.isfile() and name in wanted:
                    members.setdefault(name, []).append(m)
            missing = [n for n in wanted if n not in members]
            if missing:
                raise OnnxReleaseError(f"{tar_path.name} is not the DeepFilterNet3 ONNX release: "
                                       f"no {', '.join(missing)} in the archive")
            dups = [n for n in wanted if len(members[n]) > 1]
            if dups:
                raise OnnxReleaseError(f"{tar_path.name} holds more than one {', '.join(dups)}")
            dirs = {str(Path(members[n][0].name).parent) for n in wanted}
            if len(dirs) != 1:
                raise OnnxReleaseError(f"{tar_path.name}: the graphs and config.ini are not in one directory")
            size = sum(members[n][0].size for n in wanted)
            if size > MAX_ARCHIVE_BYTES:
                raise OnnxReleaseError(f"{tar_path.name}: its graphs and config unpack to {size / 2**30:.1f} GiB, "
                                       f"more than a release holds (at most {MAX_ARCHIVE_BYTES / 2**30:.0f} GiB)")
            data = {n: tar.extractfile(members[n][0]).read() for n in wanted}
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(":")
        raise OnnxReleaseError(f"{tar_path.name} is not a readable tar archive: {first}") from None
    try:
        config_text = data[CONFIG_FILE].decode("utf-8")
    except UnicodeDecodeError:
        raise OnnxReleaseError(f"{tar_path.name}: config.ini is not UTF-8 text") from None
    graphs = {prefix: data[fname] for prefix, fname in GRAPHS.items()}
    return Release(config_text, graphs, f"{tar_path.name}:{dirs.pop()}")


class _Graph:
    """The tensors of one graph (initializers and Constant outputs), which were taken, and the
    nodes consuming each value."""

    def __init__(self, prefix: str, fname: str, blob: bytes):
        import onnx
        from onnx import helper, numpy_helper

        try:
            model = onnx.load_model_from_string(blob)
        except Exception as e:  # protobuf raises its own DecodeError
            raise OnnxReleaseError(f"{fname} is not a readable ONNX model: {e}") from None
        self.prefix, self.fname = prefix, fname
        self.nodes = list(model.graph.node)
        self.tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant":
                (attr,) = node.attribute
                value = helper.get_attribute_value(attr)
                self.tensors[node.output[0]] = (numpy_helper.to_array(value) if attr.name == "value"
                                                else np.asarray(value))
        self.consumers = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)
        self.taken: Dict[str, str] = {}  # tensor name -> the key it landed on

    def take(self, name: str, key: str) -> np.ndarray:
        if name not in self.tensors:
            raise OnnxReleaseError(f"{self.fname}: `{name}` (for {key}) is computed, not a stored tensor")
        if name in self.taken:
            raise OnnxReleaseError(f"{self.fname}: tensor `{name}` maps to both {self.taken[name]} and {key}")
        if "::" not in name and not name.startswith("/") and f"{self.prefix}.{name}" != key:
            # the exporter kept this parameter's torch name: the scope/order mapping must agree
            raise OnnxReleaseError(f"{self.fname}: tensor `{name}` mapped to `{key}`, its own name says "
                                   f"`{self.prefix}.{name}`")
        self.taken[name] = key
        return self.tensors[name]

    def scope(self, node) -> str:
        """The module path of a node from its name: `/df_convp/df_convp.1/Conv` -> `df_dec.df_convp.1`."""
        parts = [p for p in node.name.split("/")[:-1] if p]
        if not parts:
            raise OnnxReleaseError(f"{self.fname}: {node.op_type} node `{node.name}` has no module scope")
        path: List[str] = []
        for p in parts:
            sub = p.split(".")
            if path and len(sub) > 1 and path[-1] == sub[0]:
                path.pop()
            path.extend(sub)
        return ".".join([self.prefix] + path)


class _Recovery:
    """Fills the expected state dict key by key, refusing unknown, repeated or mis-shaped ones."""

    def __init__(self, expected: Dict[str, np.ndarray], bn_eps: Dict[str, float]):
        self.expected, self.bn_eps = expected, bn_eps
        self.state: Dict[str, np.ndarray] = {}
        self.sources: Dict[str, str] = {}
        self.folded_bn: List[str] = []

    def put(self, key: str, value: np.ndarray, source: str):
        if key not in self.expected:
            raise OnnxReleaseError(f"{source} maps to `{key}`, which the model does not have")
        if key in self.state:
            raise OnnxReleaseError(f"`{key}` recovered twice ({self.sources[key]} and {source})")
        ref = self.expected[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise OnnxReleaseError(f"{source} -> `{key}`: shape {tuple(value.shape)} != {tuple(ref.shape)}")
        self.state[key] = np.array(value, dtype=ref.dtype, order="C")  # keeps 0-d
        self.sources[key] = source

    def first_free(self, g: _Graph, node, pattern: str, ndim: int, what: str) -> str:
        """The first (natural order) unrecovered key under the node's scope that matches
        `pattern` and has `ndim` dimensions: nodes of one scope come in module order."""
        scope = g.scope(node)
        keys = sorted((k for k in self.expected if k.startswith(scope + ".") and k not in self.state
                       and re.fullmatch(pattern, k) and self.expected[k].ndim == ndim), key=_natural)
        if not keys:
            raise OnnxReleaseError(f"{g.fname}: {node.op_type} `{node.name}` has no free {what} under `{scope}`")
        return keys[0]

    def conv(self, g: _Graph, node):
        key = self.first_free(g, node, r".+\.\d+\.weight", 4, "conv weight")
        self.put(key, g.take(node.input[1], key), f"{g.fname}:{node.input[1]}")
        if len(node.input) < 3 or not node.input[2]:
            return
        parent, idx = key[: -len(".weight")].rsplit(".", 1)
        bias_key, bn = f"{parent}.{idx}.bias", f"{parent}.{int(idx) + 1}"
        if bias_key in self.expected:
            self.put(bias_key, g.take(node.input[2], bias_key), f"{g.fname}:{node.input[2]}")
        elif f"{bn}.running_mean" in self.expected:
            self.fold_bn(bn, g.take(node.input[2], f"{bn}.bias"), f"{g.fname}:{node.input[2]}")
        else:
            raise OnnxReleaseError(f"{g.fname}: conv `{node.name}` has a bias but `{key}` has neither "
                                   "a bias nor a following BatchNorm")

    def fold_bn(self, bn: str, bias: np.ndarray, source: str):
        """An eval-mode BatchNorm that adds `bias` exactly (see the module docstring)."""
        eps = np.float32(self.bn_eps[bn])
        var = np.float32(1) - eps
        if var + eps != np.float32(1):
            raise OnnxReleaseError(f"{bn}: no float32 running_var with running_var + eps == 1 (eps {eps})")
        n = bias.shape[0]
        self.put(f"{bn}.bias", bias, source)
        for name, value in (("weight", np.ones(n)), ("running_mean", np.zeros(n)), ("running_var", np.full(n, var)),
                            ("num_batches_tracked", np.zeros((), np.int64))):
            self.put(f"{bn}.{name}", np.asarray(value), f"folded BN ({source})")
        self.folded_bn.append(bn)

    def gru(self, g: _Graph, node):
        attrs = {a.name: a for a in node.attribute}
        lbr = attrs["linear_before_reset"].i if "linear_before_reset" in attrs else 0
        unsupported = set(attrs) - {"hidden_size", "linear_before_reset", "direction"}
        direction = attrs["direction"].s.decode() if "direction" in attrs else "forward"
        if lbr != 1 or unsupported or direction != "forward":
            raise OnnxReleaseError(f"{g.fname}: GRU `{node.name}` is not torch's GRU cell "
                                   f"(linear_before_reset={lbr}, direction={direction}, other {sorted(unsupported)})")
        wkey = self.first_free(g, node, r".+\.weight_ih_l\d+", 2, "GRU layer")
        gru, layer = wkey.rsplit(".weight_ih_l", 1)
        src = f"{g.fname}:{node.name}"
        w = g.take(node.input[1], wkey)[0]
        r = g.take(node.input[2], f"{gru}.weight_hh_l{layer}")[0]
        b = g.take(node.input[3], f"{gru}.bias_*_l{layer}")[0]
        h = w.shape[0] // 3
        for name, value in (("weight_ih", w), ("weight_hh", r), ("bias_ih", b[: 3 * h]), ("bias_hh", b[3 * h:])):
            self.put(f"{gru}.{name}_l{layer}", zrh_to_rzn(value), f"{src} ({name}, gates z,r,h -> r,z,n)")

    def einsum(self, g: _Graph, node):
        eq = next(a.s.decode() for a in node.attribute if a.name == "equation")
        if eq != GROUPED_LINEAR_EINSUM:
            raise OnnxReleaseError(f"{g.fname}: Einsum `{node.name}` has equation {eq}, "
                                   f"expected {GROUPED_LINEAR_EINSUM}")
        key = self.first_free(g, node, r".+\.weight", 3, "grouped linear weight")
        self.put(key, g.take(node.input[1], key), f"{g.fname}:{node.input[1]}")

    def matmul(self, g: _Graph, node):
        key = self.first_free(g, node, r".+\.weight", 2, "linear weight")
        self.put(key, g.take(node.input[1], key).T, f"{g.fname}:{node.input[1]} (transposed)")
        adds = [n for n in g.consumers[node.output[0]] if n.op_type == "Add"]
        bias = [i for n in adds for i in n.input if i in g.tensors]
        if len(bias) != 1:
            raise OnnxReleaseError(f"{g.fname}: MatMul `{node.name}` is not followed by exactly one bias Add")
        bkey = key[: -len("weight")] + "bias"
        self.put(bkey, g.take(bias[0], bkey), f"{g.fname}:{bias[0]}")


def zrh_to_rzn(x: np.ndarray) -> np.ndarray:
    """ONNX GRU gate blocks (z, r, h) along axis 0 -> torch's (r, z, n)."""
    z, r, h = np.split(x, 3, axis=0)
    return np.concatenate([r, z, h], axis=0)


HANDLERS = {"Conv": _Recovery.conv, "ConvTranspose": _Recovery.conv, "GRU": _Recovery.gru,
            "Einsum": _Recovery.einsum, "MatMul": _Recovery.matmul}


def _check_leftovers(g: _Graph, known_scalars: Dict[str, float]):
    """Every float tensor not taken must be a scalar operand of one known op with the value
    the config implies (pad value, LSNR scale/offset); anything else is an error."""
    bad = []
    for name, value in g.tensors.items():
        if name in g.taken or not np.issubdtype(value.dtype, np.floating):
            continue
        ops = sorted({n.op_type for n in g.consumers[name]})
        expected = known_scalars.get(ops[0]) if value.size == 1 and len(ops) == 1 else None
        if expected is not None and abs(float(value.reshape(())) - expected) <= 1e-6:
            g.taken[name] = f"{ops[0]} constant {expected}"
        else:
            bad.append(f"{name} {list(value.shape)} (used by {', '.join(ops) or 'nothing'})")
    if bad:
        more = " ..." if len(bad) > 6 else ""
        raise OnnxReleaseError(f"{g.fname}: tensors left unmapped: {'; '.join(bad[:6])}{more}")


def _filterbanks(p) -> Dict[str, np.ndarray]:
    """`erb_fb` and `mask.erb_inv_fb` as the release's training run built them (libdf ERB
    widths with the config's min_nb_erb_freqs)."""
    from df_mlx.libdf import DF
    from df_mlx.modules import erb_fb

    widths = DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb,
                min_nb_erb_freqs=p.min_nb_freqs).erb_widths()
    return {"erb_fb": np.array(erb_fb(widths, p.sr, inverse=False)),
            "mask.erb_inv_fb": np.array(erb_fb(widths, p.sr, inverse=True))}


def recover_state_dict(release: Release, model) -> Tuple[Dict[str, np.ndarray], _Recovery]:
    """The torch-layout state dict of `model` (df_mlx DFN3 at the release config, already
    built) recovered from the release graphs; every key and every float tensor accounted for."""
    from converters.layout import mlx_state_dict
    from df_mlx.deepfilternet3 import ModelParams
    from df_mlx.layers import BatchNorm2d

    expected = mlx_state_dict(model)
    eps = {name: m.eps for name, m in model.named_modules() if isinstance(m, BatchNorm2d)}
    rec = _Recovery(expected, eps)
    p = ModelParams()
    scalars = {"Pad": 0.0}
    for prefix, fname in GRAPHS.items():
        g = _Graph(prefix, fname, release.graphs[prefix])
        for node in g.nodes:
            if node.op_type in HANDLERS:
                HANDLERS[node.op_type](rec, g, node)
        lsnr = {"Mul": float(p.lsnr_max - p.lsnr_min), "Add": float(p.lsnr_min)} if prefix == "enc" else {}
        _check_leftovers(g, {**scalars, **lsnr})
    for key, value in _filterbanks(p).items():
        rec.put(key, value, f"recomputed from {CONFIG_FILE}")
    missing = [k for k in expected if k not in rec.state]
    if missing:
        raise OnnxReleaseError(f"{release.description}: not recovered from the graphs: {', '.join(missing[:8])}"
                               f"{' ...' if len(missing) > 8 else ''}")
    return {k: rec.state[k] for k in expected}, rec


def load_release(tar_path, tmp: Path):
    """Read the release, load its config into df_mlx's global config, build the model and
    recover its state dict. Returns (release, model, state dict, recovery)."""
    from df_mlx.model import init_model

    release = read_release(tar_path)
    if importlib.util.find_spec("onnx") is None:
        raise OnnxReleaseError("reading the ONNX release needs the onnx package (pip install onnx)")
    family = load_config(release.config_text, tmp)
    if family != FAMILY:
        raise OnnxReleaseError(f"{release.description}: config names `{family}`, only {FAMILY} ONNX "
                               "releases are supported")
    model = init_model()
    state, rec = recover_state_dict(release, model)
    return release, model, state, rec


def release_state_dict(tar_path) -> Tuple[Dict[str, np.ndarray], str]:
    """(torch-layout state dict for upstream `load_state_dict(strict=True)`, config.ini text).
    Leaves the release config loaded in df_mlx's global config."""
    with tempfile.TemporaryDirectory() as tmp:
        release, _, state, _ = load_release(tar_path, Path(tmp))
    return state, release.config_text


def convert_onnx_release(tar_path, out_dir, overwrite: bool = False) -> OnnxConvertResult:
    """Convert the DeepFilterNet3 ONNX release into a df-mlx converted-model directory."""
    from converters.layout import load_torch_state_dict
    from df_mlx.checkpoint import write_model_dir

    tar_path, out_dir = Path(tar_path), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OnnxReleaseError(f"output directory already exists: {out_dir} (use --overwrite)")
    with tempfile.TemporaryDirectory() as tmp:
        release, model, state, rec = load_release(tar_path, Path(tmp))
        load_torch_state_dict(model, state)
        meta = {
            "family": FAMILY,
            "source": release.description,
            "source_sha256": sha256(tar_path),
            "source_format": "onnx",
            "batchnorm": FOLDED_BN,
            "reference_version": REFERENCE_VERSION,
            "converter_version": CONVERTER_VERSION,
        }
        write_model_dir(model, out_dir, meta, overwrite=overwrite)
    recomputed = [k for k, s in rec.sources.items() if s.startswith("recomputed")]
    logger.info(f"{release.description}: {len(state)} tensors, {len(rec.folded_bn)} BatchNorms {FOLDED_BN}")
    n_params = int(sum(v.size for v in state.values() if not np.issubdtype(v.dtype, np.integer)))
    return OnnxConvertResult(out_dir, FAMILY, release.description, len(state), n_params, [],
                             folded_bn=rec.folded_bn, recomputed=recomputed)
