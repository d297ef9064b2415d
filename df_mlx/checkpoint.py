"""Checkpoints of df_mlx models, mirroring `df.checkpoint`, over the converted-model format.

A converted model is a directory with `config.ini` (the `df` config: same sections and keys)
and `model.safetensors` (MLX-layout weights under the torch `state_dict` names) whose metadata
records where the weights came from. Directories are written atomically: into a temporary
sibling first, renamed into place only when complete.

Training checkpoints keep df's names and rules (`model_<epoch>.<ext>`, `.best` copies for
improved metrics, history cleanup, `.patience`/`.best` files) but hold safetensors, so the
default extension is "safetensors" instead of df's "ckpt".
"""

import glob
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import mlx.core as mx
import numpy as np
from loguru import logger
from mlx.utils import tree_flatten

from df_mlx.config import Csv, config
from df_mlx.libdf import DF  # noqa: F401  (re-exported, as df.checkpoint)
from df_mlx.model import ModelParams
from df_mlx.model import init_model  # noqa: F401  (re-exported, as df.checkpoint)
from df_mlx.utils import check_finite_module  # noqa: F401  (re-exported, as df.checkpoint)
from df_mlx.version import version

CONFIG_FILE = "config.ini"
MODEL_FILE = "model.safetensors"
FORMAT = "df-mlx-converted-1"


class ModelDirError(ValueError):
    """A converted-model directory that is missing, incomplete or does not fit its config."""


def is_model_dir(path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()


def is_df_mlx_weights(path) -> bool:
    """Whether `path` is a safetensors file df-mlx wrote (its format metadata says so)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def is_df_mlx_model_dir(path) -> bool:
    """Whether `path` is a folder `write_model_dir` wrote and nothing else: config.ini and
    safetensors files that carry df-mlx's format metadata, model.safetensors among them."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink() or not is_model_dir(path):
        return False
    return all(p.is_file() and not p.is_symlink() and (p.name == CONFIG_FILE or (
        p.suffix == ".safetensors" and is_df_mlx_weights(p))) for p in path.iterdir())


def check_model_dir_target(out_dir, overwrite: bool, protect=()):
    """Refuse, before any work, an output folder that may not be replaced: an existing one
    without `overwrite`, one holding the current directory or a `protect`ed path (the source),
    and anything but a df-mlx model folder."""
    from df_mlx.atomic import is_inside

    out_dir = Path(out_dir)
    if not os.path.lexists(out_dir):
        return
    if not overwrite:
        raise ModelDirError(f"output directory already exists: {out_dir} (use --overwrite)")
    if is_inside(os.getcwd(), out_dir):
        raise ModelDirError(f"refusing to replace {out_dir}: it holds the current directory")
    for path in protect:
        if path is not None and is_inside(path, out_dir):
            raise ModelDirError(f"refusing to replace {out_dir}: it holds the source {path}")
    if not is_df_mlx_model_dir(out_dir):
        what = "a file" if not out_dir.is_dir() else "a folder df-mlx did not write"
        raise ModelDirError(f"refusing to replace {out_dir}: it is {what}, not a df-mlx model folder")


def write_model_dir(model, out_dir, metadata: Dict[str, str], overwrite: bool = False,
                    extra: Optional[Dict[str, Dict[str, mx.array]]] = None) -> Path:
    """Write the global config and the model's weights to `out_dir`, atomically; `extra` adds
    safetensors files (name -> weights) with the same metadata, e.g. a discriminator. Only a
    df-mlx model folder is ever replaced (`check_model_dir_target`)."""
    from df_mlx.atomic import atomic_dir

    out_dir = Path(out_dir)
    check_model_dir_target(out_dir, overwrite)
    with atomic_dir(out_dir) as tmp:
        with open(tmp / CONFIG_FILE, "w") as f:  # config.save skips unmodified configs
            config.parser.write(f)
        meta = {"format": FORMAT, "df_mlx_version": str(version), **{k: str(v) for k, v in metadata.items()}}
        files = {MODEL_FILE: dict(tree_flatten(model.parameters())), **(extra or {})}
        for name, weights in files.items():
            try:
                mx.save_safetensors(str(tmp / name), weights, metadata=meta)
            except RuntimeError as e:  # mlx's write failures (a full disk) are plain RuntimeErrors
                raise ModelDirError(f"cannot write {out_dir / name}: {str(e).splitlines()[0]}") from None
    return out_dir


def read_metadata(model_dir) -> Dict[str, str]:
    _, meta = mx.load(str(Path(model_dir) / MODEL_FILE), return_metadata=True)
    return meta


def load_model_dir(model_dir, df_state=None, run_df: bool = True, train_mask: bool = True,
                   load_config: bool = True) -> Tuple[object, Dict[str, str]]:
    """Load a converted-model directory: its config becomes the global config (unless the
    caller loaded and adjusted it: `load_config=False`), then the model family it names is
    built and its weights loaded strictly."""
    from df_mlx.model import init_model

    model_dir = Path(model_dir)
    if not is_model_dir(model_dir):
        raise ModelDirError(f"{model_dir} is not a converted model (needs {CONFIG_FILE} and {MODEL_FILE})")
    try:
        weights, meta = mx.load(str(model_dir / MODEL_FILE), return_metadata=True)
    except Exception as e:  # mlx raises plain exceptions for corrupt files
        raise ModelDirError(f"{model_dir / MODEL_FILE} is not a readable safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise ModelDirError(f"{model_dir / MODEL_FILE} is not a df-mlx converted model (format {meta.get('format')!r})")
    if load_config:
        config.load(str(model_dir / CONFIG_FILE), config_must_exist=True, allow_defaults=True, allow_reload=True)
    model = init_model(df_state, run_df=run_df, train_mask=train_mask)
    own = dict(tree_flatten(model.parameters()))
    missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    bad_shape = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or extra or bad_shape:
        raise ModelDirError(
            f"{model_dir}: weights do not fit its config ({meta.get('family', '?')}): "
            + "; ".join(f"{what} {', '.join(keys[:5])}" for what, keys in
                        (("missing", missing), ("unexpected", extra), ("mis-shaped", bad_shape)) if keys))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    logger.info(f"Loaded {meta.get('family', 'model')} from {model_dir}")
    return model, meta


def get_epoch(cp) -> int:
    return int(os.path.basename(cp).split(".")[0].split("_")[-1])


EXTENSION = "safetensors"


def _arrays(obj) -> Dict[str, mx.array]:
    """A module's parameters or an optimizer's state, flattened by name."""
    return dict(tree_flatten(obj.parameters() if hasattr(obj, "parameters") else obj.state))


def load_model(cp_dir: Optional[str], df_state, jit: bool = False, mask_only: bool = False,
               train_df_only: bool = False, extension: str = EXTENSION, epoch: Union[str, int, None] = "latest"):
    """Build the model the config names and load its checkpoint from `cp_dir` (if any);
    returns (model, epoch). `jit` is accepted for df's signature; MLX has nothing to script."""
    from df_mlx.model import init_model

    if mask_only and train_df_only:
        raise ValueError("Only one of `mask_only` `train_df_only` can be enabled")
    model = init_model(df_state, run_df=mask_only is False, train_mask=train_df_only is False)
    blacklist: List[str] = config("CP_BLACKLIST", [], Csv(), save=False, section="train")
    if cp_dir is None:
        return model, 0
    found = read_cp(model, "model", cp_dir, blacklist=blacklist, extension=extension, epoch=epoch)
    return model, 0 if found is None else found


def read_cp(obj, name: str, dirname: str, epoch: Union[str, int, None] = "latest", extension: str = EXTENSION,
            blacklist=(), log: bool = True) -> Optional[int]:
    """Load the best/latest/given-epoch checkpoint `<name>_<epoch>.<extension>[.best]` into a
    model (by name, strictly for shapes; `blacklist` regexes skip keys) or an optimizer."""
    if isinstance(epoch, str) and epoch not in ("best", "latest"):
        raise ValueError(f"epoch must be best, latest or an integer, got {epoch!r}")
    checkpoints: List[str] = []
    if epoch == "best":
        checkpoints = glob.glob(os.path.join(dirname, f"{name}*.{extension}.best"))
        if not checkpoints:
            logger.warning("Could not find `best` checkpoint. Checking for default...")
    if not checkpoints:
        checkpoints = glob.glob(os.path.join(dirname, f"{name}*.{extension}"))
        checkpoints += glob.glob(os.path.join(dirname, f"{name}*.{extension}.best"))
    if not checkpoints:
        return None
    if isinstance(epoch, int):
        latest = next((x for x in checkpoints if get_epoch(x) == epoch), None)
        if latest is None:
            raise FileNotFoundError(f"Could not find checkpoint of epoch {epoch} in {dirname}")
    else:
        latest = max(checkpoints, key=get_epoch)
        epoch = get_epoch(latest)
    if log:
        logger.info(f"Found checkpoint {latest} with epoch {epoch}")
    state = {k.replace("clc", "df"): v for k, v in mx.load(latest, format="safetensors").items()}
    if blacklist:
        reg = re.compile("|".join(f"({b})" for b in blacklist))
        state = {k: v for k, v in state.items() if reg.search(k) is None}
    if hasattr(obj, "load_weights"):
        own = _arrays(obj)
        for key in sorted(set(own) - set(state)):
            logger.warning(f"Missing key: '{key}'")
        for key in sorted(set(state) - set(own)):
            logger.warning(f"Unexpected key: {key}")
        obj.load_weights([(k, v) for k, v in state.items() if k in own], strict=False)
    else:
        from mlx.utils import tree_unflatten

        obj.state = tree_unflatten(list(state.items()))
    return epoch


def write_cp(obj, name: str, dirname: str, epoch: int, extension: str = EXTENSION,
             metric: Optional[float] = None, cmp: str = "min"):
    """Write `<name>_<epoch>.<extension>` (and a `.best` copy when `metric` improves on the
    best so far, recorded in `<dirname>/.best`), keeping df's history limits."""
    from df_mlx.utils import check_finite_module

    if hasattr(obj, "parameters"):
        check_finite_module(obj)
    n_keep = config("n_checkpoint_history", default=3, cast=int, section="train")
    n_keep_best = config("n_best_checkpoint_history", default=5, cast=int, section="train")
    arrays = _arrays(obj)
    if metric is not None:
        if cmp not in ("min", "max"):
            raise ValueError(f"cmp must be min or max, got {cmp!r}")
        metric = float(metric)
        with open(os.path.join(dirname, ".best"), "a+") as prev_best_f:
            prev_best_f.seek(0)
            lines = prev_best_f.readlines()
            prev_best = float(lines[-1].strip().split(" ")[1]) if lines else float("inf" if cmp == "min" else "-inf")
            if getattr(metric, "__lt__" if cmp == "min" else "__gt__")(prev_best):
                best_name = os.path.join(dirname, f"{name}_{epoch}.{extension}.best")
                logger.info(f"Saving new best checkpoint {best_name} (epoch {epoch}, metric {metric})")
                prev_best_f.seek(0, os.SEEK_END)
                np.savetxt(prev_best_f, np.array([[float(epoch), metric]]))
                _save_atomic(arrays, best_name)
                cleanup(name, dirname, extension + ".best", nkeep=n_keep_best)
    cp_name = os.path.join(dirname, f"{name}_{epoch}.{extension}")
    # With a metric (after validation) this rewrites the epoch's checkpoint, as df does: not news.
    logger.log("INFO" if metric is None else "DEBUG", f"Writing checkpoint {cp_name} with epoch {epoch}")
    _save_atomic(arrays, cp_name)
    cleanup(name, dirname, extension, nkeep=n_keep)


def _save_atomic(arrays: Dict[str, mx.array], path: str):
    from df_mlx.atomic import atomic_file

    with atomic_file(path, suffix=".safetensors") as tmp:  # mlx appends .safetensors to other names
        mx.save_safetensors(tmp, arrays)


def cleanup(name: str, dirname: str, extension: str, nkeep=5):
    """Keep the `nkeep` newest `<name>*.<extension>` files (all when nkeep < 0)."""
    if nkeep < 0:
        return
    checkpoints = sorted(glob.glob(os.path.join(dirname, f"{name}*.{extension}")), key=get_epoch, reverse=True)
    for cp in checkpoints[nkeep:]:
        logger.debug(f"Removing old checkpoint: {cp}")
        os.remove(cp)


def check_patience(dirname: str, max_patience: int, new_metric: float, cmp: str = "min", raise_: bool = True):
    """Early stopping: False (or ValueError with `raise_`) once the metric has not improved
    for `max_patience` calls; state in `<dirname>/.patience` as df keeps it."""
    better = "__lt__" if cmp == "min" else "__gt__"
    new_metric = float(new_metric)
    prev_patience, prev_metric = read_patience(dirname)
    if prev_patience is None or getattr(new_metric, better)(prev_metric):
        write_patience(dirname, 0, new_metric)
        return True
    new_patience = prev_patience + 1
    write_patience(dirname, new_patience, prev_metric)
    if new_patience >= max_patience:
        msg = (f"No improvements on validation metric ({prev_metric:.3f} - {new_metric:.3f}) for "
               f"{max_patience} epochs. Stopping.")
        if raise_:
            raise ValueError(msg)
        logger.warning(msg)
        return False
    return True


def read_patience(dirname: str) -> Tuple[Optional[int], float]:
    fn = os.path.join(dirname, ".patience")
    if not os.path.isfile(fn):
        return None, 0.0
    patience, metric = np.loadtxt(fn)
    return int(patience), float(metric)


def write_patience(dirname: str, new_patience: int, metric: float):
    return np.savetxt(os.path.join(dirname, ".patience"), [new_patience, metric])


def no_checkpoint(epoch) -> bool:
    """df's rule: epoch None or "none" builds the model without loading a checkpoint."""
    return epoch is None or (isinstance(epoch, str) and epoch.lower() == "none")


def maybe_post_filter(post_filter: bool):
    """Switch the global config's post-filter on (init_df's `post_filter`)."""
    if post_filter:
        config.set("mask_pf", True, bool, ModelParams().section)
        logger.info("Running with post-filter")


def is_training_dir(model_base_dir: str) -> bool:
    """A `dfmlx train` base directory: config.ini and safetensors checkpoints/model_*."""
    return os.path.isfile(os.path.join(model_base_dir, "config.ini")) and bool(
        glob.glob(os.path.join(model_base_dir, "checkpoints", f"model_*.{EXTENSION}*")))


def load_training_dir(model_base_dir: str, epoch: Union[str, int, None] = "best", post_filter: bool = False,
                      mask_only: bool = False, config_allow_defaults: bool = True):
    """The model of a training directory at `epoch` (best, latest or a number; best falls back
    to latest), as df's init_df loads its own model directories; its config becomes global.
    With epoch None or "none" (any model directory) the model is built untrained, as df's."""
    config.load(os.path.join(model_base_dir, "config.ini"), config_must_exist=True,
                allow_defaults=config_allow_defaults, allow_reload=True)
    maybe_post_filter(post_filter)
    p = ModelParams()
    df_state = DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb,
                  min_nb_erb_freqs=p.min_nb_freqs)
    mask_only = mask_only or config("mask_only", cast=bool, section="train", default=False, save=False)
    cp_dir = None if no_checkpoint(epoch) else os.path.join(model_base_dir, "checkpoints")
    model, found = load_model(cp_dir, df_state, mask_only=mask_only, epoch=epoch)
    logger.info(f"Loaded checkpoint of epoch {found} from {model_base_dir}")
    model.eval()
    return model
