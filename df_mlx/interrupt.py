"""Ctrl-C for training runs.

SIGINT only sets a flag, which the training loops test between steps (`check` raises
`Interrupted` there). One MLX evaluation can run for minutes and Python's handlers wait for
it, so a watchdog thread, woken by the signal through `signal.set_wakeup_fd`, ends the process
itself with exit status 130 when the main thread has not reached a check within GRACE_S (at
once on a second Ctrl-C). It never cuts a checkpoint write short (`writing`): checkpoints are
then exactly those of the last finished epoch, and the run resumes from them.

A process has one wakeup fd, so every such watchdog registers with `on_signal` (distributed's
SIGTERM one too) instead of installing its own.
"""

import itertools
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional, Tuple

from loguru import logger

EXIT_CODE = 130  # a shell's status for a process ended by SIGINT
GRACE_S = 1.0  # how long the watchdog waits for the main thread to stop at a check

where = "setup"  # what the run is doing, set by the loops for the interrupt message
_requested = threading.Event()
_acknowledged = threading.Event()
_write_lock = threading.Lock()
_callbacks: Dict[int, Callable[[], None]] = {}
_wakeup: Optional[Tuple[int, int]] = None  # the pipe's write end and the wakeup fd it replaced


class Interrupted(Exception):
    """Ctrl-C, seen at a check between steps; `where` says what was running."""

    def __init__(self, where_: str):
        super().__init__(f"interrupted during {where_}")
        self.where = where_


def check():
    """Raise Interrupted if Ctrl-C was pressed since `handle_sigint` began."""
    if _requested.is_set():
        _acknowledged.set()
        raise Interrupted(where)


@contextmanager
def writing() -> Iterator[None]:
    """A checkpoint write that the watchdog lets finish before it ends the process."""
    with _write_lock:
        yield


def _force_exit(message: Callable[[str], str]):
    with _write_lock:
        logger.warning(message(where))
        logger.remove()  # closes (flushes) train.log
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CODE)


def on_signal(signum: int, callback: Callable[[], None]) -> Callable[[], None]:
    """Run `callback` in a thread of its own each time `signum` arrives, even while the main
    thread is blocked in an MLX evaluation (Python runs handlers only between its bytecodes).
    Main thread only, with a Python handler installed for `signum` (only those reach the wakeup
    fd); returns the function that removes the callback, the last one restoring the wakeup fd."""
    global _wakeup
    if _wakeup is None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        _wakeup = write_fd, signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=_dispatch, args=(read_fd,), daemon=True, name="dfmlx-signals").start()
    _callbacks[signum] = callback

    def remove():
        global _wakeup
        del _callbacks[signum]
        if not _callbacks:
            write_fd, previous_fd = _wakeup
            signal.set_wakeup_fd(previous_fd)
            os.close(write_fd)  # ends _dispatch
            _wakeup = None

    return remove


def _dispatch(read_fd: int):
    """Reads the signal numbers the wakeup fd receives until the pipe closes."""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while data := pipe.read(64):
            for signum in data:
                if callback := _callbacks.get(signum):
                    threading.Thread(target=callback, daemon=True, name=f"dfmlx-signal-{signum}").start()


def _watch(seen: Iterator[int], message: Callable[[str], str]):
    """One SIGINT: the first ends the process unless a check sees it within GRACE_S, a second
    one ends it at once."""
    if next(seen) > 1 or not _acknowledged.wait(GRACE_S):
        _force_exit(message)


@contextmanager
def handle_sigint(message: Callable[[str], str]) -> Iterator[None]:
    """Within the block, Ctrl-C stops the run at the next `check`, or after GRACE_S from
    the watchdog; `message(where)` is the warning logged when the watchdog ends it.
    Outside the main thread (where Python cannot install handlers) the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global where
    _requested.clear()
    _acknowledged.clear()
    where = "setup"
    seen = itertools.count(1)  # next() is atomic: the watchdog threads of two Ctrl-Cs count apart

    previous_handler = signal.signal(signal.SIGINT, lambda *_: _requested.set())
    remove = on_signal(signal.SIGINT, lambda: _watch(seen, message))
    try:
        yield
    finally:
        remove()
        signal.signal(signal.SIGINT, previous_handler)
        _acknowledged.set()  # the run is over: the watchdog must not end the process now
        _requested.clear()
