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

import glob
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from converters.layout import LayoutError, mlx_state_dict, torch_to_mlx
from converters.record import (CONVERTER_VERSION, FAMILIES, REFERENCE_VERSION, REFERENCE_VERSIONS, ConvertResult,
                               load_config, sha256)
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


def _pick_checkpoint(cp_dir: Path, epoch: Union[str, int]) -> Path:
    """Upstream `read_cp`'s choice: the best (or latest, or a given epoch) `model_*.ckpt`."""
    from df_mlx.checkpoint import get_epoch

    cps: List[str] = []
    if epoch == "best":
        cps = glob.glob(str(cp_dir / "model*.ckpt.best"))
    if not cps:
        cps = glob.glob(str(cp_dir / "model*.ckpt")) + glob.glob(str(cp_dir / "model*.ckpt.best"))
    if not cps:
        raise CheckpointError(f"no checkpoints/model_*.ckpt in {cp_dir.parent}")
    if isinstance(epoch, int):
        match = [c for c in cps if get_epoch(c) == epoch]
        if not match:
            raise CheckpointError(f"no checkpoint of epoch {epoch} in {cp_dir}")
        return Path(match[0])
    return Path(max(cps, key=get_epoch))


def _model_dir_source(root: Path, epoch) -> Source:
    cp_dir = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    cp = _pick_checkpoint(cp_dir, epoch)
    return Source(cp, (root / "config.ini").read_text(), f"{root.name}/{cp.relative_to(root)}")


def find_source(src: Path, epoch, config_path: Optional[Path], tmp: Path) -> Source:
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"source not found: {src}")
    override = Path(config_path).read_text() if config_path else None
    if src.is_dir():
        if not (src / "config.ini").is_file() and override is None:
            raise CheckpointError(f"{src} has no config.ini (pass --config)")
        found = _model_dir_source(src, epoch) if (src / "config.ini").is_file() else Source(
            _pick_checkpoint(src, epoch), None, src.name)
    elif zipfile.is_zipfile(src) and src.suffix == ".zip":
        with zipfile.ZipFile(src) as z:
            z.extractall(tmp)
        roots = [Path(p).parent for p in glob.glob(str(tmp / "**" / "config.ini"), recursive=True)]
        if len(roots) != 1:
            raise CheckpointError(f"{src.name} must hold exactly one model directory with config.ini, found {len(roots)}")
        found = _model_dir_source(roots[0], epoch)
        found.description = f"{src.name}:{found.description}"
    else:
        found = Source(src, None, src.name)
    if override is not None:
        found.config_text = override
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

    from df_mlx.checkpoint import write_model_dir

    src = Path(src)
    out_dir = Path(out_dir) if out_dir else src.parent / f"{src.name.split('.')[0]}_mlx"
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"output directory already exists: {out_dir} (use --overwrite)")
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
        if path.exists() and not overwrite:
            raise CheckpointError(f"output file already exists: {path} (use --overwrite)")
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


def _write_atomically(state: Dict[str, np.ndarray], out_path: Path):
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    os.close(fd)
    try:
        write_state_dict(state, Path(tmp))
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
