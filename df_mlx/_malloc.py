"""Keep freed CPU memory in the process's heap (glibc), so MLX's buffers do not fault in anew.

MLX's CPU allocator caches freed buffers up to its cache limit (32 MB by default) and gives the
rest to free(). glibc then returns big blocks to the OS (blocks above its mmap threshold, and
free space at the top of the heap beyond its trim threshold), so the next call's buffers of the
same sizes fault their pages in again and are zeroed by the kernel: about 20000 page faults
and 12 % of a DFN3 forward over 10 s on one thread (190 -> 166 ms; peak RSS 296 -> 303 MB).
Blocks of up to 32 MB (glibc's largest mmap threshold) are served from the heap, and up to
256 MB of free heap is kept: a bound on what stays (`dfmlx enhance` of a 10-minute file peaked
at 372 MB with it, 338 without; 1 minute: 325-341, 334). Raising MLX's cache limit instead
measured the same speed at 382 MB, as that cache matches buffers by size. DFMLX_MALLOC=0
leaves malloc as it is.
"""

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20  # above DFN3's 165 MB of buffers for 10 s; 64 MB let the faults back
applied = False


def keep_freed_memory() -> bool:
    """Set glibc's thresholds once (Linux with glibc, unless DFMLX_MALLOC=0); whether they are set."""
    global applied
    if applied or os.environ.get("DFMLX_MALLOC", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return applied
    libc = ctypes.CDLL(None)
    applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return applied
