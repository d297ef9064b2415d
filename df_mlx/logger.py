"""loguru setup and metric logging, as `df.logger`."""

import os
import sys
from collections import defaultdict
from typing import Dict, Optional, Tuple

from loguru import logger

from df_mlx.modules import GroupedLinearEinsum  # noqa: F401  (df.logger imports it for its FLOP hook)
from df_mlx.utils import get_branch_name, get_commit_hash, get_device, get_host  # noqa: F401

_logger_initialized = False
WARN_ONCE_NO = logger.level("WARNING").no + 1
DEPRECATED_NO = logger.level("WARNING").no + 2


class Formatter:
    def __init__(self, debug=False):
        where = "<cyan>{name}</cyan>:<cyan>{function}</cyan>:<cyan>{line}</cyan>" if debug else (
            "<cyan>DF</cyan>"
        )
        self.fmt = (
            "<green>{time:YYYY-MM-DD HH:mm:ss}</green> | <level>{level: <8}</level> | "
            + where
            + " | <level>{message}</level>\n{exception}"
        )

    def format(self, record):
        if record["level"].no == WARN_ONCE_NO:
            return self.fmt.replace("{level: <8}", "WARNING ")
        return self.fmt


class DuplicateFilter:
    """Passes each (level, message) pair only once."""

    def __init__(self):
        self.msgs = set()

    def __call__(self, record) -> bool:
        key = f"{record['level']}{record['message']}"
        if key in self.msgs:
            return False
        self.msgs.add(key)
        return True


_duplicate_filter = DuplicateFilter()


def _above_progress_bars(stream):
    """A sink writing to `stream` through tqdm.write, which lifts running progress bars off
    their line first, so a log line never shares a line with a bar."""
    from tqdm import tqdm

    def write(message: str):
        tqdm.write(message, end="", file=stream)
        stream.flush()

    return write


def init_logger(file: Optional[str] = None, level: str = "INFO", model: Optional[str] = None):
    """Route loguru to stdout (and `file`); warn-once and deprecation messages go to stderr once."""
    global _logger_initialized
    if _logger_initialized:
        logger.debug("Logger already initialized.")
    else:
        logger.remove()
        level = level.upper()
        if level.lower() != "none":
            log_format = Formatter(debug=logger.level(level).no <= logger.level("DEBUG").no).format
            special = {WARN_ONCE_NO, DEPRECATED_NO}
            logger.add(
                _above_progress_bars(sys.stdout), level=level, format=log_format,
                filter=lambda r: r["level"].no not in special, colorize=sys.stdout.isatty(),
            )
            if file is not None:
                logger.add(
                    file, level=level, format=log_format,
                    filter=lambda r: r["level"].no != WARN_ONCE_NO,
                )
            import mlx.core as mx

            logger.info(f"Running on mlx {mx.__version__} ({mx.default_device()})")
            logger.info(f"Running on host {get_host()}")
            commit = get_commit_hash()
            if commit is not None:
                logger.info(f"Git commit: {commit}, branch: {get_branch_name()}")
            for name, no in (("WARNONCE", WARN_ONCE_NO), ("DEPRECATED", DEPRECATED_NO)):
                logger.level(name, no=no, color="<yellow><bold>")
                logger.add(
                    sys.stderr, level=max(logger.level(level).no, no), format=log_format,
                    filter=lambda r, no=no: r["level"].no == no and _duplicate_filter(r),
                )
    if model is not None:
        logger.info("Loading model settings of {}", os.path.basename(model.rstrip("/")))
    _logger_initialized = True


def warn_once(message, *args, **kwargs):
    try:
        logger.log("WARNONCE", message, *args, **kwargs)
    except ValueError:
        logger.warning(message, *args, **kwargs)


def log_deprecated(message, *args, **kwargs):
    try:
        logger.log("DEPRECATED", message, *args, **kwargs)
    except ValueError:
        logger.warning(message, *args, **kwargs)


def _metrics_key(k_: Tuple[str, float]):
    """Sort key: losses first, per-SNR metrics by SNR, lr and wd last."""
    k0 = k_[0]
    ks = k0.split("_")
    if len(ks) > 2:
        try:
            return int(ks[-1])
        except ValueError:
            return 1000
    if k0 == "loss":
        return -999
    if "loss" in k0.lower():
        return -998
    if k0 == "lr":
        return 998
    if k0 == "wd":
        return 999
    return -101


def log_metrics(prefix: str, metrics: Dict[str, float], level="INFO"):
    msg = ""
    stages = defaultdict(str)
    loss_msg = ""
    for n, v in sorted(metrics.items(), key=_metrics_key):
        m = f" | {n}: {v: #.5f}" if abs(v) > 1e-3 else f" | {n}: {v: #.3E}"
        if "stage" in n:
            s = n.split("stage_")[1].split("_snr")[0]
            stages[s] += m.replace(f"stage_{s}_", "")
        elif ("valid" in prefix or "test" in prefix) and "loss" in n.lower():
            loss_msg += m
        else:
            msg += m
    for s, msg_s in stages.items():
        logger.log(level, f"{prefix} | stage {s}" + msg_s)
    if len(stages) == 0:
        logger.log(level, prefix + msg)
    if len(loss_msg) > 0:
        logger.log(level, prefix + loss_msg)


def log_model_summary(model, verbose: bool = False):
    """Log the model's parameter count as df does ("Model complexity: ...M #Params"), and with
    `verbose` each top-level module's; returns the count. df also counts MACs with ptflops, a
    torch-only tool: df-mlx leaves MACs out."""
    from mlx.utils import tree_flatten

    def count(module) -> int:  # torch's parameters() are MLX's trainable ones (no BatchNorm statistics)
        return sum(v.size for _, v in tree_flatten(module.trainable_parameters()))

    if verbose:
        for name, child in model.children().items():
            if hasattr(child, "trainable_parameters"):
                logger.info(f"  {name}: {count(child) / 1e6:.3f}M #Params")
    n = count(model)
    logger.info(f"Model complexity: {n / 1e6:.3f}M #Params")
    return n
