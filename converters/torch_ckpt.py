"""Read and write PyTorch checkpoints without torch. Reading is safe: a restricted unpickler
rebuilds tensors (as numpy arrays) and plain containers only and refuses every other import,
so no code in a checkpoint ever runs. Both of torch's formats are read: the zip archive
(`<name>/data.pkl` + `<name>/data/<key>`, torch >= 1.6) and the legacy stream (magic number,
protocol, system info, the object pickle, its storage keys, then each storage's bytes).
Writing produces the zip archive torch.save writes for a dict of tensors."""

import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message is one line for users."""


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asks for an import outside the allow-list."""


# torch's storage classes -> numpy dtypes (bfloat16 has none: it is widened to float32).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
                 "bool", "complex64", "complex128", "float", "double", "half", "long", "int"}
_STORAGE_MODULES = ("torch", "torch.storage", "torch.cuda")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


@dataclass(frozen=True)
class _StorageType:
    dtype: Any  # a numpy dtype, or "bfloat16"

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize


@dataclass
class _Storage:
    """A storage whose bytes arrive later (the legacy stream stores them after the pickle)."""

    type: _StorageType
    numel: int
    data: Optional[np.ndarray] = None  # flat, of `type.dtype`, once read


@dataclass
class _Tensor:
    """A tensor of a storage, resolved to a numpy array once the storage's bytes are in."""

    storage: _Storage
    offset: int
    size: Tuple[int, ...]
    stride: Tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise pickle.UnpicklingError("a tensor refers to a storage the file does not hold")
        if any(n < 0 for n in self.size) or any(s < 0 for s in self.stride) or self.offset < 0:
            raise pickle.UnpicklingError("a tensor has a negative size, stride or offset")
        if 0 not in self.size:
            last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
            if last >= flat.size:
                raise pickle.UnpicklingError("a tensor reaches past the end of its storage")
            if int(np.prod(self.size, dtype=object)) > flat.size:  # overlapping strides: a copy could be any size
                raise pickle.UnpicklingError("a tensor has more elements than its storage (overlapping strides)")
        strides = tuple(s * flat.itemsize for s in self.stride)
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size, strides) if 0 not in self.size \
            else np.empty(self.size, flat.dtype)
        return np.array(view, order="C")


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor(_v2): requires_grad, hooks and metadata do not matter here."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor is rebuilt from something that is not a storage")
    return _Tensor(storage, int(offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *_ignored):
    """torch._utils._rebuild_parameter(_with_state): a parameter is its tensor."""
    return data


class _OrderedDict(dict):
    """collections.OrderedDict as the pickle rebuilds it; its BUILD state (a state dict's
    `_metadata`, module versions) is dropped."""


_ALLOWED: Dict[Tuple[str, str], Callable] = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): lambda text, encoding="latin1": str(text).encode(encoding),  # protocol-2 bytes
}


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with its imports limited to `_ALLOWED`, torch's storage
    classes and dtypes, and BUILD (which would call `__setstate__`) allowed on dicts only."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, persistent_load: Optional[Callable] = None):
        super().__init__(file, encoding="utf-8")
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in _STORAGE_MODULES and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return name
        raise RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid):
        if self._persistent_load is None:
            raise pickle.UnpicklingError("unexpected persistent id")
        return self._persistent_load(pid)

    def _load_build(self):
        self.stack.pop()  # the state, dropped
        if not isinstance(self.stack[-1], dict):
            raise pickle.UnpicklingError(f"refusing to set the state of a {type(self.stack[-1]).__name__}")

    dispatch[pickle.BUILD[0]] = _load_build


def _unpickle(data: bytes, persistent_load: Optional[Callable] = None):
    return _RestrictedUnpickler(io.BytesIO(data), persistent_load).load()


def _storage_id(pid, expected_len: int) -> Tuple[_StorageType, str, int, tuple]:
    if not isinstance(pid, tuple) or len(pid) != expected_len or pid[0] not in ("storage", b"storage"):
        raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:60]}")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError("a storage has no known type or size")
    return storage_type, str(key), numel, pid[5:]


def _flat(raw: bytes, storage_type: _StorageType, numel: int, big_endian: bool = False) -> np.ndarray:
    if len(raw) < numel * storage_type.itemsize:
        raise pickle.UnpicklingError("a storage is shorter than its declared size")
    if storage_type.dtype == "bfloat16":
        bits = np.frombuffer(raw, ">u2" if big_endian else "<u2", numel).astype(np.uint32)
        return (bits << 16).view(np.float32)
    dtype = np.dtype(storage_type.dtype).newbyteorder(">" if big_endian else "<")
    return np.frombuffer(raw, dtype, numel).astype(np.dtype(storage_type.dtype).newbyteorder("="))


def _load_zip(path: Path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise pickle.UnpicklingError("no data.pkl in the archive")
        prefix = pkl[0][: -len("data.pkl")]
        big = prefix + "byteorder" in names and archive.read(prefix + "byteorder").strip() == b"big"
        storages: Dict[str, _Storage] = {}

        def persistent_load(pid):
            storage_type, key, numel, _ = _storage_id(pid, 5)
            if key not in storages:
                entry = f"{prefix}data/{key}"
                if entry not in names:
                    raise pickle.UnpicklingError(f"storage {key} is missing from the archive")
                storages[key] = _Storage(storage_type, numel, _flat(archive.read(entry), storage_type, numel, big))
            return storages[key]

        return _unpickle(archive.read(pkl[0]), persistent_load)


def _load_legacy(path: Path):
    stream = io.BytesIO(path.read_bytes())
    header = [_RestrictedUnpickler(stream).load() for _ in range(3)]
    if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("not a PyTorch checkpoint (no zip archive, no legacy magic number)")
    storages: Dict[str, _Storage] = {}
    views = []

    def persistent_load(pid):
        storage_type, key, numel, (view,) = _storage_id(pid, 6)
        root = storages.setdefault(key, _Storage(storage_type, numel))
        if view is None:
            return root
        _view_key, offset, view_numel = view
        view_storage = _Storage(storage_type, int(view_numel))
        views.append((root, int(offset), view_storage))
        return view_storage

    result = _RestrictedUnpickler(stream, persistent_load).load()
    for key in _RestrictedUnpickler(stream).load():
        storage = storages.get(str(key))
        if storage is None:
            raise pickle.UnpicklingError(f"storage {key} was never declared")
        head = stream.read(8)
        if len(head) < 8:
            raise EOFError("the file ends inside its storages")
        (numel,) = struct.unpack("<q", head)
        if numel != storage.numel:
            raise pickle.UnpicklingError(f"storage {key} holds {numel} elements, {storage.numel} declared")
        storage.data = _flat(stream.read(numel * storage.type.itemsize), storage.type, numel)
    for root, offset, view in views:
        if root.data is not None:
            view.data = root.data[offset : offset + view.numel]
    return result


def _resolve(obj, done: Optional[dict] = None):
    """Tensors -> numpy arrays through plain containers. Each object is resolved once (a
    pickle may share one object many times over, which would otherwise cost exponential time)
    and an object that contains itself is refused."""
    done = {} if done is None else done
    if id(obj) in done:
        if done[id(obj)] is _IN_PROGRESS:
            raise pickle.UnpicklingError("a checkpoint object contains itself")
        return done[id(obj)]
    if isinstance(obj, (_Storage, _StorageType)):
        raise pickle.UnpicklingError("a bare storage outside a tensor")
    if not isinstance(obj, (_Tensor, dict, list, tuple)):
        return obj
    done[id(obj)] = _IN_PROGRESS
    if isinstance(obj, _Tensor):
        out = obj.to_numpy()
    elif isinstance(obj, dict):
        out = {k: _resolve(v, done) for k, v in obj.items()}
    else:
        out = type(obj)(_resolve(v, done) for v in obj)
    done[id(obj)] = out
    return out


_IN_PROGRESS = object()


def load(path: Path):
    """What `torch.load(path, weights_only=True)` gives, with numpy arrays for tensors and
    dicts for OrderedDicts; raises CheckpointError (one line) on anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return _resolve(_load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path))
    except RefusedGlobal as e:
        raise CheckpointError(f"refusing to load {path.name}: it would import `{e}` "
                              "(only plain weights are loaded)") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError,
            TypeError, AttributeError, struct.error, RecursionError, MemoryError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint: {first}") from None


def read_state_dict(path: Path) -> Dict[str, np.ndarray]:
    """A torch state dict (upstream `df` checkpoint: a plain `state_dict()`, or one under a
    "model"/"state_dict" key) as numpy arrays, with upstream's legacy `clc` -> `df` renaming."""
    path = Path(path)
    obj = load(path)
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path.name} holds no state dict (got {type(obj).__name__})")
    for k, v in obj.items():
        if not isinstance(v, np.ndarray):
            raise CheckpointError(f"entry `{k}` is a {type(v).__name__}, not a tensor")
    return {str(k).replace("clc", "df"): v for k, v in obj.items()}


_NUMPY_STORAGES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items()
                   if k not in ("BFloat16Storage", "UntypedStorage")}


@dataclass(frozen=True)
class _Global:
    """A `module.name` reference written into the pickle as it is (torch need not import)."""

    module: str
    name: str

    def __call__(self, *args):  # pickle's save_reduce wants a callable; this only names one
        raise TypeError(f"{self.module}.{self.name} is a name in a pickle, not a function here")


@dataclass(eq=False)
class _TensorOut:
    """A tensor to write: its storage's key and its (contiguous, little-endian) data."""

    key: str
    array: np.ndarray


@dataclass(eq=False)
class _StorageOut:
    tensor: _TensorOut


class _EmptyOrderedDict:
    """An empty collections.OrderedDict (a tensor's backward hooks)."""


class _TorchPickler(pickle._Pickler):
    """Pickles a dict of tensors as torch.save does: each tensor as
    torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict()) over a
    storage given by persistent id; the globals are named, never imported."""

    dispatch = dict(pickle._Pickler.dispatch)

    def persistent_id(self, obj):
        if isinstance(obj, _StorageOut):
            a = obj.tensor.array
            return ("storage", _Global("torch", _NUMPY_STORAGES[a.dtype]), obj.tensor.key, "cpu", a.size)
        return None

    def _save_global(self, obj: _Global):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    def _save_tensor(self, obj: _TensorOut):
        a = obj.array
        stride = tuple(int(np.prod(a.shape[i + 1 :])) for i in range(a.ndim))
        self.save_reduce(_Global("torch._utils", "_rebuild_tensor_v2"),
                         (_StorageOut(obj), 0, tuple(a.shape), stride, False, _EmptyOrderedDict()))

    def _save_hooks(self, _obj):
        self.save_reduce(_Global("collections", "OrderedDict"), ())

    dispatch[_Global] = _save_global
    dispatch[_TensorOut] = _save_tensor
    dispatch[_EmptyOrderedDict] = _save_hooks


def write_state_dict(state_dict: Dict[str, np.ndarray], path: Path):
    """Save numpy arrays as the zip checkpoint torch.save writes (read by
    `torch.load(weights_only=True)`), without torch."""
    tensors = {}
    for i, (name, value) in enumerate(state_dict.items()):
        array = np.asarray(value)
        if array.dtype not in _NUMPY_STORAGES:
            raise CheckpointError(f"entry `{name}`: dtype {array.dtype} has no torch storage")
        tensors[str(name)] = _TensorOut(str(i), np.array(array, dtype=array.dtype.newbyteorder("<"), order="C"))  # keeps 0-d
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(tensors)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for tensor in tensors.values():
            z.writestr(f"archive/data/{tensor.key}", tensor.array.tobytes())
        z.writestr("archive/version", "3\n")
