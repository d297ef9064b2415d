"""Every file and folder df-mlx writes goes through here, so no output is ever half-written.

An output is built beside its target under a hidden `.dfmlx-` name and renamed into place only
when complete; it gets the permissions the umask gives (mkstemp/mkdtemp alone would leave it
private), and it is removed when the work fails or the process is stopped by SIGINT, SIGTERM or
SIGHUP (`stop_on_signals` turns the last two into SystemExit, as Python turns SIGINT into
KeyboardInterrupt). Whether a target may be replaced at all is the caller's decision, made
before any work: these helpers only replace.
"""

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

TEMP_PREFIX = ".dfmlx-"
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _umask() -> int:
    """The process umask, read without setting it where Linux shows it (setting it, even
    briefly, would apply to files other threads create meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_inside(path, folder) -> bool:
    """Whether `path` is `folder` or lies anywhere under it, links resolved."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def file_identity(path):
    """What makes two spellings of one file equal: (device, inode) when it exists, else the
    resolved path."""
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return os.path.realpath(path)


@contextlib.contextmanager
def _naming(target):
    """OSErrors of the temporary's creation and renaming name the target: the temporary's
    name means nothing to the user and is gone by the time the error is shown."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(target)) from None


@contextlib.contextmanager
def atomic_file(target, suffix=None):
    """Yield a temporary path beside `target` ending in `suffix` (default: the target's
    extension, so writers that pick the format from the name still do); when the block
    succeeds it replaces `target` in one rename."""
    directory, name = os.path.split(os.path.abspath(target))
    suffix = os.path.splitext(name)[1] if suffix is None else suffix
    with _naming(target):
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{name}.", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        with _naming(target):
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(target):
    """Yield a temporary folder beside `target`; when the block succeeds it takes `target`'s
    place. An existing `target` is renamed aside first and deleted only once the new folder is
    in place (put back if that rename fails)."""
    target = Path(os.path.abspath(target))
    with _naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}.", dir=target.parent))
    try:
        yield tmp
        with _naming(target):
            os.chmod(tmp, 0o777 & ~_umask())
            _move_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_in(folder: Path, target: Path):
    if not os.path.lexists(target):
        os.rename(folder, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}.old.", dir=target.parent))
    try:
        os.rename(target, aside / "dir")
        try:
            os.rename(folder, target)
        except BaseException:
            os.rename(aside / "dir", target)
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _stop(signum, frame):
    for s in STOP_SIGNALS:  # a second signal must not cut the cleanup short
        signal.signal(s, signal.SIG_IGN)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def stop_on_signals():
    """While active, SIGTERM and SIGHUP end the process as SystemExit(128 + signal), which
    unwinds through the cleanup of every pending output (signals reach only the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
