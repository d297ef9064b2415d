"""Upstream DeepFilterNet checkpoints -> df-mlx converted-model directories, and back.

Sources: an upstream model directory (`config.ini` + `checkpoints/model_*.ckpt[.best]`), a
release zip holding one, a bare `.ckpt`/`.pt` state dict (with `--config`, or the family
detected from its keys at that family's default config), or the official DeepFilterNet3 ONNX
release tarball (`converters.onnx_dfn3`). The DFNet4 fork's `deepfilternet4` family
(`sealad886/DeepFilterNet4`: DfNet4, and DfNet4Lite by `[deepfilternet4] model_variant`)
converts the same way from a model directory or a bare checkpoint: the fork writes plain
`state_dict`s, under the names df_mlx.deepfilternet4 uses. Every tensor must land on a
parameter of the model the config describes: unknown, missing or mis-shaped tensors are an
error naming them.
"""

import configparser
import glob
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from converters.layout import LayoutError, mlx_state_dict, torch_to_mlx
from converters.record import (CONVERTER_VERSION, FAMILIES, MAX_ARCHIVE_BYTES, MAX_ARCHIVE_MEMBERS, REFERENCE_VERSION,
                               REFERENCE_VERSIONS, ConvertResult, load_config, sha256)
from converters.torch_ckpt import CheckpointError, read_state_dict, write_state_dict

# Without a config, a bare checkpoint is tried against these configs in turn: each family at
# its defaults, then the fork's DfNet4Lite (a switch of the deepfilternet4 family, not a family).
DETECT_CONFIGS = [(f, f"[train]\nmodel = {f}\n") for f in FAMILIES] + [
    ("deepfilternet4", "[train]\nmodel = deepfilternet4\n[deepfilternet4]\nmodel_variant = lite\n")]
# Keys upstream's own `read_cp` ignores when loading (GRU initial states of old releases).
IGNORED_SUFFIXES = (".h0",)
IGNORED_PARTS = ("erb_comp",)


@dataclass
class Source:
    checkpoint: Path
    config_text: Optional[str]
    description: str
    config_origin: str = "config.ini"  # where config_text came from, for errors


def _pick_checkpoint(cp_dir: Path, epoch: Union[str, int], label: str) -> Path:
    """Upstream `read_cp`'s choice: the best (or latest, or a given epoch) `model_*.ckpt`;
    `label` names `cp_dir` in errors as the user knows it."""
    from df_mlx.checkpoint import get_epoch

    cps: List[str] = []
    if epoch == "best":
        cps = glob.glob(str(cp_dir / "model*.ckpt.best"))
    if not cps:
        cps = glob.glob(str(cp_dir / "model*.ckpt")) + glob.glob(str(cp_dir / "model*.ckpt.best"))
    if not cps:
        raise CheckpointError(f"no model_*.ckpt in {label}")
    if isinstance(epoch, int):
        match = [c for c in cps if get_epoch(c) == epoch]
        if not match:
            raise CheckpointError(f"no checkpoint of epoch {epoch} in {label}")
        return Path(match[0])
    return Path(max(cps, key=get_epoch))


def _read_config(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{label}: not UTF-8 text") from None


def _model_dir_source(root: Path, epoch, label: str) -> Source:
    cp_dir = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    cp = _pick_checkpoint(cp_dir, epoch, f"{label}/{cp_dir.relative_to(root)}".rstrip("/."))
    origin = f"{label}/config.ini"
    return Source(cp, _read_config(root / "config.ini", origin), f"{root.name}/{cp.relative_to(root)}", origin)


def _extract_model_zip(src: Path, tmp: Path) -> Path:
    """The one model directory (with config.ini) of a release zip, extracted into `tmp`
    after its directory passed the bounds: only that directory's members, names sanitised."""
    try:
        with zipfile.ZipFile(src) as z:
            members = z.infolist()
            if len(members) > MAX_ARCHIVE_MEMBERS:
                raise CheckpointError(f"{src.name}: {len(members)} members, more than a model zip holds "
                                      f"(at most {MAX_ARCHIVE_MEMBERS})")
            roots = [os.path.dirname(m.filename) for m in members
                     if not m.is_dir() and os.path.basename(m.filename) == "config.ini"]
            if len(roots) != 1:
                raise CheckpointError(f"{src.name} must hold exactly one model directory with config.ini, "
                                      f"found {len(roots)}")
            prefix = f"{roots[0]}/" if roots[0] else ""
            wanted = [m for m in members if m.filename.startswith(prefix) and not m.is_dir()]
            size = sum(m.file_size for m in wanted)
            if size > MAX_ARCHIVE_BYTES:
                raise CheckpointError(f"{src.name}: its model directory unpacks to {size / 2**30:.1f} GiB, "
                                      f"more than a model holds (at most {MAX_ARCHIVE_BYTES / 2**30:.0f} GiB)")
            for m in wanted:
                z.extract(m, tmp)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, zlib.error) as e:
        raise CheckpointError(f"{src.name} is not a readable zip archive: {e}") from None
    return Path(glob.glob(str(tmp / "**" / "config.ini"), recursive=True)[0]).parent  # as sanitised


def find_source(src: Path, epoch, config_path: Optional[Path], tmp: Path) -> Source:
    from df_mlx.checkpoint import is_df_mlx_model_dir, is_df_mlx_weights

    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"source not found: {src}")
    if is_df_mlx_model_dir(src) or (src.is_file() and is_df_mlx_weights(src)):
        raise CheckpointError(f"{src} is already a df-mlx model: use its folder as it is (-m)")
    if src.suffix == ".safetensors":
        raise CheckpointError(f"{src}: a safetensors file; convert reads PyTorch checkpoints (.ckpt, .pt), "
                              "model folders and release zips")
    override = _read_config(Path(config_path), str(config_path)) if config_path else None
    if src.is_dir():
        if not (src / "config.ini").is_file() and override is None:
            raise CheckpointError(f"{src} has no config.ini (pass --config)")
        found = _model_dir_source(src, epoch, str(src)) if (src / "config.ini").is_file() else Source(
            _pick_checkpoint(src, epoch, str(src)), None, src.name)
    elif zipfile.is_zipfile(src) and src.suffix == ".zip":
        root = _extract_model_zip(src, tmp)
        found = _model_dir_source(root, epoch, f"{src.name}:{root.relative_to(tmp)}".rstrip(":."))
        found.description = f"{src.name}:{found.description}"
    else:
        found = Source(src, None, src.name)
    if override is not None:
        found.config_text, found.config_origin = override, str(config_path)
    return found


def _build():
    """The model the global config describes."""
    from df_mlx.model import init_model

    return init_model()


def _split_ignored(state: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], List[str]]:
    ignored = [k for k in state if k.endswith(IGNORED_SUFFIXES) or any(p in k for p in IGNORED_PARTS)]
    return {k: v for k, v in state.items() if k not in ignored}, ignored


def _fit(state: Dict[str, np.ndarray], config_text: Optional[str], tmp: Path):
    """Build the model the config names (or, without config, the family whose default
    config fits the keys) and map the tensors onto it."""
    if config_text is not None:
        family = load_config(config_text, tmp)
        model = _build()
        return family, model, torch_to_mlx(model, state)
    errors = []
    for family, text in DETECT_CONFIGS:
        load_config(text, tmp)
        model = _build()
        try:
            return family, model, torch_to_mlx(model, state)
        except LayoutError as e:
            errors.append(f"{family}: {e}")
    raise CheckpointError("no config given and the weights fit no family at its default config "
                          f"(pass --config): {errors[0]}")


def convert(src, out_dir=None, epoch: Union[str, int] = "best", config_path=None,
            overwrite: bool = False) -> ConvertResult:
    """Convert `src` into a converted-model directory (default: `<src name>_mlx` beside it)."""
    import mlx.core as mx

    from df_mlx.checkpoint import check_model_dir_target, write_model_dir

    src = Path(src)
    where = Path(os.path.abspath(src))  # `.` and `..` have no name of their own
    out_dir = Path(out_dir) if out_dir else where.parent / f"{where.name.split('.')[0]}_mlx"
    check_model_dir_target(out_dir, overwrite, protect=[src, config_path])
    if src.name.endswith((".tar.gz", ".tgz")):  # the official DeepFilterNet3 ONNX release
        from converters.onnx_dfn3 import convert_onnx_release

        if config_path is not None:
            raise CheckpointError(f"{src.name} brings its own config.ini (drop --config)")
        return convert_onnx_release(src, out_dir, overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = find_source(src, epoch, config_path, tmp)
        state, ignored = _split_ignored(read_state_dict(source.checkpoint))
        try:
            family, model, weights = _fit(state, source.config_text, tmp)
        except LayoutError as e:
            raise CheckpointError(f"{source.description}: {e}") from None
        except CheckpointError:
            raise
        except (configparser.Error, ValueError) as e:  # a config that does not parse or cast
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{source.config_origin}: not a usable config: {first}") from None
        model.load_weights(weights, strict=True)
        mx.eval(model.parameters())
        extra, disc_source = _discriminator_alongside(source.checkpoint)
        meta = {
            "family": family,
            "source": source.description,
            "source_sha256": sha256(source.checkpoint),
            "reference_version": REFERENCE_VERSIONS.get(family, REFERENCE_VERSION),
            "converter_version": CONVERTER_VERSION,
        }
        write_model_dir(model, out_dir, meta, overwrite=overwrite, extra=extra)
    n_params = int(sum(v.size for v in state.values() if not np.issubdtype(v.dtype, np.integer)))
    return ConvertResult(out_dir, family, source.description, len(state), n_params, ignored, disc_source)


def _discriminator_alongside(model_checkpoint: Path):
    """The fork's `disc_<epoch>.ckpt` next to the model checkpoint, converted for the model's
    (global) config: ({file name: weights}, its name), or ({}, None) when there is none."""
    from converters.discriminator import DISC_FILE, convert_discriminator, disc_checkpoint_for, discriminator_weights

    disc_cp = disc_checkpoint_for(model_checkpoint)
    if disc_cp is None:
        return {}, None
    return {DISC_FILE: discriminator_weights(convert_discriminator(disc_cp))}, disc_cp.name


def disc_export_path(out_path) -> Path:
    """Where `export` writes a converted discriminator: `<name>_disc<suffix>` beside the model."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}_disc{out_path.suffix}")


def export(model_dir, out_path, overwrite: bool = False, epoch: Union[str, int] = "best") -> List[Path]:
    """Write a converted model's (or a `dfmlx train` directory's checkpoint at `epoch`)
    weights as a PyTorch state dict (`torch.load` + `load_state_dict(strict=True)` in upstream
    `df`, or in the fork for deepfilternet4), atomically; a converted discriminator goes to
    `disc_export_path(out_path)`. Returns the files written."""
    from df_mlx.checkpoint import is_training_dir, load_model_dir, load_training_dir

    from converters.discriminator import DISC_FILE, export_state_dict

    out_path = Path(out_path)
    has_disc = (Path(model_dir) / DISC_FILE).is_file()
    for path in [out_path] + ([disc_export_path(out_path)] if has_disc else []):
        _check_export_target(path, overwrite, model_dir)
    if is_training_dir(str(model_dir)):
        model = load_training_dir(str(model_dir), epoch)
    else:
        model, _ = load_model_dir(model_dir)
    states = {out_path: mlx_state_dict(model)}
    if has_disc:
        states[disc_export_path(out_path)] = export_state_dict(model_dir)
    for path, state in states.items():
        _write_atomically(state, path)
    return list(states)


def _is_torch_checkpoint(path: Path) -> bool:
    """Whether `path` is a zip-format `torch.save` file: the only kind `export` replaces."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def _check_export_target(path: Path, overwrite: bool, model_dir):
    """Refuse, before any work, an export target that may not be replaced."""
    from df_mlx.atomic import is_inside

    if not os.path.lexists(path):
        return
    if not overwrite:
        raise CheckpointError(f"output file already exists: {path} (use --overwrite)")
    if path.is_dir():
        raise CheckpointError(f"refusing to replace {path}: it is a directory (give a .ckpt file name)")
    if is_inside(path, model_dir):
        raise CheckpointError(f"refusing to replace {path}: it is part of the model being exported")
    if not path.is_file() or path.is_symlink() or not _is_torch_checkpoint(path):
        raise CheckpointError(f"refusing to replace {path}: not a PyTorch checkpoint "
                              "(only files of the kind export writes are replaced)")


def _write_atomically(state: Dict[str, np.ndarray], out_path: Path):
    from df_mlx.atomic import atomic_file

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_path) as tmp:
        try:
            write_state_dict(state, Path(tmp))
        except OSError as e:  # a full disk, a file size limit
            raise CheckpointError(f"cannot write {out_path}: {e.strerror or e}") from None
