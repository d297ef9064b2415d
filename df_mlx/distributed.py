"""Data-parallel training and corpus enhancement on `mx.distributed` (df has none, hence a
df_mlx-only module): started under `mlx.launch` (ring, MPI or NCCL), every rank runs the same
command; without a launcher the group has one rank and every function here is the identity.

- Sharding: each global batch of the deterministic sampler, the last incomplete one too, is
  cut into contiguous shares whose sizes differ by at most one (3 items over 2 ranks: 2 + 1),
  rank r taking the r-th (`local_share`), so the union over ranks is the single-process
  epoch; files are dealt by length (`share_files`).
- Weights: df's losses are means over a batch's items, so each rank's loss counts n_r / N of
  the global batch's (`weigh`, inside the differentiated function); the loss and gradients
  are then averaged over ranks (`average_gradients`) before clipping. Every rank computes
  the largest share's number of items, the smaller shares padded with items of weight 0
  (a rank left without items by a batch smaller than the world computes only padding).
- BatchNorm's batch moments are combined over ranks by their shares' counts (`batch_moments`),
  their gradient summed back to every rank, so that averaged gradients equal the gradient of
  the global batch.
- Only rank 0 writes (`on_writer`); its decisions reach every rank (`writer_decides`).
- Failure: a lost peer ends the rank with one `Error:` line instead of a traceback; a rank
  left waiting in a collective longer than DFMLX_DIST_TIMEOUT seconds stops itself.
"""

import hashlib
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from loguru import logger

from df_mlx import interrupt

TIMEOUT_ENV = "DFMLX_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # longest a training step may wait for the other ranks
SIGTERM_GRACE_S = 10.0  # after the launcher's SIGTERM, the rank unwinds for this long, then exits
RESUME_HINT = "run the same command again to resume from the last checkpoint"

T = TypeVar("T")
_group: Optional[mx.distributed.Group] = None


class DistributedError(RuntimeError):
    """Ranks that cannot work together (different checkpoints, fewer items than ranks)."""


def group() -> mx.distributed.Group:
    """The launcher's group, initialised once (one rank without a launcher)."""
    global _group
    if _group is None:
        _group = mx.distributed.init()
        if _group.size() > 1:
            _install_failure_handlers()
            logger.info(f"Distributed: rank {_group.rank()} of {_group.size()}")
    return _group


def rank() -> int:
    return group().rank()


def size() -> int:
    return group().size()


def is_writer() -> bool:
    """Rank 0 writes checkpoints, logs, summaries and merged CSVs; the others write nothing."""
    return rank() == 0


def on_writer(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 only (None elsewhere)."""
    return fn(*args, **kwargs) if is_writer() else None


def writer_decides(fn: Callable, *args, **kwargs) -> bool:
    """fn's truth value on rank 0 (which alone runs it, e.g. to update a file), on every rank."""
    value = bool(fn(*args, **kwargs)) if is_writer() else False
    return total(1.0 if value else 0.0) > 0


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is set on any (a stop request that one rank received)."""
    return total(1.0 if flag else 0.0) > 0 if size() > 1 else bool(flag)


def check_batch_size(batch_size: int, what: str = "[train] batch_size"):
    """Every rank needs an item of every full batch (a smaller last batch leaves some ranks
    only padding of weight 0; on every batch it would waste them)."""
    if batch_size < size():
        raise DistributedError(f"{what} = {batch_size} is smaller than the {size()} ranks: every step would "
                               f"leave {size() - batch_size} of them without items; use at least one item per rank")


def share_bounds(n: int, world: int, r: int) -> Tuple[int, int]:
    """Start and stop of rank r's contiguous share of n items over `world` ranks: the first
    n % world ranks take one item more (3 over 2: [0, 2) and [2, 3))."""
    k, extra = divmod(n, world)
    start = r * k + min(r, extra)
    return start, start + k + (r < extra)


def local_share(indices: Sequence[int]) -> Sequence[int]:
    """This rank's contiguous share of one global batch's sample indices, padded with the
    batch's last item to the largest share's size (3 over 2 ranks: [0, 1] and [2, 2]), so that
    every rank computes the same shapes: MLX may order the collectives of graphs of other
    shapes differently, pairing one rank's BatchNorm layer with another's. The padding items
    count nothing (`own`, `weigh`, `batch_moments`)."""
    if size() == 1:
        return indices
    start, stop = share_bounds(len(indices), size(), rank())
    pad = -(-len(indices) // size()) - (stop - start)
    return list(indices[start:stop]) + [indices[len(indices) - 1]] * pad


_global_items: Optional[int] = None  # the global batch of the step being computed (share_of)


@contextmanager
def share_of(global_items: Optional[int]):
    """Within: this rank computes its share (local_share) of a global batch of `global_items`
    items (None: equal shares, the batch's own size on every rank), which sets the weight of
    its loss (`weigh`) and of its BatchNorm moments."""
    global _global_items
    before, _global_items = _global_items, global_items
    try:
        yield
    finally:
        _global_items = before


def _items(local_items: int) -> List[int]:
    """The own (not padding) items of every rank's share in the current step."""
    if _global_items is None:
        return [local_items] * size()
    return [stop - start for start, stop in (share_bounds(_global_items, size(), r) for r in range(size()))]


def own(x: mx.array) -> mx.array:
    """The rows of x [batch, ...] that are this rank's own items, without the padding of its
    share (all rows for a rank with none: its loss weighs 0), for the loss to average over."""
    n = _items(x.shape[0])[rank()] if size() > 1 else x.shape[0]
    return x if n in (0, x.shape[0]) else x[:n]


def weigh(loss: mx.array) -> mx.array:
    """This rank's share of a loss that is a mean over its items, scaled by n_r * world / N,
    so that the average over ranks is the mean over the global batch (0 for a rank with only padding)."""
    if size() == 1 or _global_items is None:
        return loss
    start, stop = share_bounds(_global_items, size(), rank())
    weight = (stop - start) * size() / _global_items
    return loss if weight == 1 else loss * weight


def file_seconds(path: str) -> float:
    """An audio file's duration (0 for a file that cannot be read: the per-file code reports it)."""
    import soundfile as sf

    try:
        return float(sf.info(path).duration)
    except Exception:  # soundfile raises several types; the file's own error comes later
        return 0.0


def deal(lengths: Dict[str, float], world: int) -> Dict[str, int]:
    """A rank for every key: longest first to the rank with the least total so far (ties: the
    lower rank, then the first key), which every rank computes alike."""
    load = [0.0] * world
    owner = {}
    for k in sorted(lengths, key=lambda k: -lengths[k]):  # stable: equal lengths keep their order
        target = min(range(world), key=lambda r: (load[r], r))
        load[target] += lengths[k]
        owner[k] = target
    return owner


def share_files(files: Sequence[T], key: Callable[[T], str] = os.path.realpath,
                seconds: Callable[[T], float] = file_seconds) -> List[T]:
    """This rank's files (paths, or jobs with `key` and `seconds` to read them), in their given
    order, balanced by duration; files with the same `key` (their output path) go to one rank,
    so no two ranks write one path."""
    if size() == 1:
        return list(files)
    keys = [key(f) for f in files]
    lengths: Dict[str, float] = {}
    for k, f in zip(keys, files):
        lengths[k] = lengths.get(k, 0.0) + seconds(f)
    owner = deal(lengths, size())
    return [f for k, f in zip(keys, files) if owner[k] == rank()]


def gather_bytes(data: bytes) -> List[bytes]:
    """Every rank's `data`, in rank order, on every rank."""
    if size() == 1:
        return [data]
    with _bounded("gathering results"):
        lengths = np.array(mx.distributed.all_gather(mx.array([len(data)], mx.int32)))
        padded = np.zeros(max(1, int(lengths.max())), np.uint8)
        padded[: len(data)] = np.frombuffer(data, np.uint8)
        every = np.array(mx.distributed.all_gather(mx.array(padded))).reshape(size(), -1)
    return [every[r, : lengths[r]].tobytes() for r in range(size())]


def total(value: float) -> float:
    """The sum of `value` over ranks (also a barrier: every rank waits for the others)."""
    if size() == 1:
        return value
    with _bounded("synchronising with them"):
        return float(mx.distributed.all_sum(mx.array(value, mx.float32)).item())


def average_gradients(loss: mx.array, grads) -> Tuple[mx.array, object]:
    """The loss and the gradient tree averaged over ranks (mlx.nn.average_gradients); of
    `weigh`ted losses, these are the global batch's mean loss and its gradient."""
    if size() == 1:
        return loss, grads
    _watchdog.arm("in a training step")
    return mx.distributed.all_sum(loss) / size(), nn.average_gradients(grads)


@mx.custom_function
def _gather_over_ranks(x: mx.array) -> mx.array:
    return mx.distributed.all_gather(x)


@_gather_over_ranks.vjp
def _gather_over_ranks_vjp(primals, cotangent, output):
    # Every rank's loss depends on this rank's part: the sum of their cotangents, this part.
    x = primals[0] if isinstance(primals, (list, tuple)) else primals
    k = x.shape[0]
    return mx.distributed.all_sum(cotangent)[rank() * k : (rank() + 1) * k]


def batch_moments(x: mx.array, axes: Tuple[int, ...]) -> Tuple[mx.array, mx.array, int]:
    """Mean, biased variance and element count per channel over `axes`, over every rank's
    share of the batch (share_of): each rank's mean and sum of squared deviations, gathered in
    one collective and combined with the shares' counts (Chan et al.'s pairwise formula for
    unequal counts, as accurate as two passes over the whole batch), so the global batch is
    normalised as one batch. The counts follow from the global batch's size by the share rule
    on every rank alike; padding items count 0."""
    n = x.size // x.shape[-1]
    if size() == 1:
        return x.mean(axes), x.var(axes), n
    _watchdog.arm("computing BatchNorm statistics")
    per_item = n // x.shape[0]
    items = _items(x.shape[0])
    # the own items only, by a mask (the same graph on every rank)
    keep = (mx.arange(x.shape[0]) < items[rank()]).astype(x.dtype).reshape(-1, *(1,) * (x.ndim - 1))
    local_mean = (x * keep).sum(axes) / max(items[rank()] * per_item, 1)
    local_m2 = (mx.square(x - local_mean) * keep).sum(axes)
    every = _gather_over_ranks(mx.stack([local_mean, local_m2])).reshape(size(), 2, -1)
    return combine_moments(every[:, 0], every[:, 1], items, per_item)


def combine_moments(means: mx.array, m2s: mx.array, items: Sequence[int],
                    per_item: int) -> Tuple[mx.array, mx.array, int]:
    """Mean, biased variance and element count of parts of `items` items of `per_item`
    elements each, from their means and sums of squared deviations [parts, C] (Chan et al.:
    the means weighted by the counts, the m2s plus each count times its mean's squared
    distance from the mean); a part of 0 items (whose m2 is 0) counts nothing."""
    count = sum(items) * per_item
    mean = (mx.array([k / sum(items) for k in items])[:, None] * means).sum(0)
    spread = (mx.array([float(k * per_item) for k in items])[:, None] * mx.square(means - mean)).sum(0)
    return mean, (m2s.sum(0) + spread) / count, count


def step_done():
    """A step's collectives completed (or the step failed): nothing is waited for until the next."""
    _watchdog.disarm()


def _digest(arrays: Dict[str, mx.array]) -> bytes:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.asarray(arrays[name]).tobytes())
    return h.digest()


def check_same_start(epoch: int, **states: Dict[str, mx.array]):
    """Every rank must start from the same epoch and the same weights and optimizer state
    (named dicts of arrays); a rank that read other checkpoints stops all of them."""
    if size() == 1:
        return
    h = hashlib.sha256(str(epoch).encode())
    for name in sorted(states):
        h.update(name.encode() + _digest(states[name]))
    mine = np.frombuffer(h.digest()[:16], np.int32)
    with _bounded("comparing their starting points"):
        every = np.array(mx.distributed.all_gather(mx.array(mine))).reshape(size(), -1)
    if not (every == every[0]).all():
        raise DistributedError(f"the ranks start from different checkpoints or weights (rank {rank()} at epoch "
                               f"{epoch}): every rank must read the same BASE_DIR (shared storage across hosts)")


class _Watchdog:
    """Stops this rank when a collective waits longer than its timeout: a rank that hung,
    was stopped or lost its host never closes its connections, and MLX's collectives have
    no timeout of their own."""

    def __init__(self):
        self.deadline: Optional[float] = None
        self.what = ""
        self.timeout = DEFAULT_TIMEOUT_S
        self.thread: Optional[threading.Thread] = None

    def arm(self, what: str):
        """Wait at most the timeout from now (the collectives of a step run after its last arm)."""
        if self.thread is None:
            value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
            try:
                self.timeout = float(value)
            except ValueError:
                raise DistributedError(f"{TIMEOUT_ENV}={value!r} must be a number of seconds") from None
        self.what, self.deadline = what, time.monotonic() + self.timeout
        if self.thread is None:
            self.thread = threading.Thread(target=self._watch, daemon=True, name="dfmlx-dist-watchdog")
            self.thread.start()

    def disarm(self):
        self.deadline = None

    def _watch(self):
        while True:
            time.sleep(min(1.0, self.timeout / 10))
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                _stop(f"no answer from the other ranks for {self.timeout:g} s while {self.what} (a rank hung, "
                      f"was stopped or lost its host; {TIMEOUT_ENV} sets the limit); stopping, {RESUME_HINT}")


_watchdog = _Watchdog()


@contextmanager
def _bounded(what: str):
    """A collective evaluated inside this block stops the rank when it waits too long."""
    _watchdog.arm(what)
    try:
        yield
    finally:
        _watchdog.disarm()


def _stop(message: str, code: int = 1):
    """One `Error:` line on stderr and in the log, then exit at once (threads may be blocked
    in a collective, so no clean-up that could wait on them)."""
    text = f"Error: rank {rank()}: {message}"
    logger.error(text)
    logger.remove()  # flushes and closes the log file
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
    os._exit(code)


def _is_peer_lost(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("[ring]" in msg or "[mpi]" in msg or "nccl" in msg)


def _install_failure_handlers():
    """A lost peer or DistributedError ends this rank with one clear line; the launcher's
    SIGTERM (sent when another rank exited) says why this rank stops."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if isinstance(value, DistributedError):
            _stop(str(value))
        if _is_peer_lost(value):
            _stop(f"lost the connection to another rank, which failed or was killed ({str(value).strip()}); "
                  f"stopping, {RESUME_HINT}")
        previous(kind, value, tb)

    sys.excepthook = hook
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
        # Python runs the handler only between bytecodes: a main thread blocked in MLX would
        # never see it, so a thread woken by the signal itself exits after a grace period.
        interrupt.on_signal(signal.SIGTERM, _exit_after_sigterm)


def _exit_after_sigterm():
    """Give the main thread SIGTERM_GRACE_S to unwind, then exit."""
    time.sleep(SIGTERM_GRACE_S)
    _stop(f"stopped by the launcher because another rank exited; {RESUME_HINT}", 128 + signal.SIGTERM)


def _on_sigterm(*_):
    """The launcher stops the other ranks when one exits with an error: say so, then unwind
    normally (temporary files are removed; nothing waits on a collective any more)."""
    # stderr only: the signal may arrive while the logger holds its lock
    sys.stderr.write(f"Error: rank {rank()}: stopped by the launcher because another rank exited; {RESUME_HINT}\n")
    raise SystemExit(128 + signal.SIGTERM)
