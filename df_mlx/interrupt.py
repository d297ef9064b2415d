"""Ctrl-C for training runs.

SIGINT only sets a flag, which the training loops test between steps (`check` raises
`Interrupted` there). One MLX evaluation can run for minutes and Python's handlers wait for
it, so a watchdog thread, woken by the signal through `signal.set_wakeup_fd`, ends the process
itself with exit status 130 when the main thread has not reached a check within GRACE_S (at
once on a second Ctrl-C). It never cuts a checkpoint write short (`writing`): checkpoints are
then exactly those of the last finished epoch, and the run resumes from them.
"""

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from loguru import logger

EXIT_CODE = 130  # a shell's status for a process ended by SIGINT
GRACE_S = 1.0  # how long the watchdog waits for the main thread to stop at a check

where = "setup"  # what the run is doing, set by the loops for the interrupt message
_requested = threading.Event()
_acknowledged = threading.Event()
_write_lock = threading.Lock()


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


def _watch(read_fd: int, message: Callable[[str], str]):
    """Reads the signal numbers the wakeup fd receives until the pipe closes: a first SIGINT
    ends the process unless a check sees it within GRACE_S, a second one ends it at once."""
    seen = 0
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while data := pipe.read(64):
            seen += data.count(signal.SIGINT)
            if seen > 1 or (seen == 1 and not _acknowledged.wait(GRACE_S)):
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
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    previous_handler = signal.signal(signal.SIGINT, lambda *_: _requested.set())
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd, message), daemon=True, name="sigint-watchdog").start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, previous_handler)
        _acknowledged.set()  # the run is over: the watchdog must not end the process now
        _requested.clear()
        os.close(write_fd)
