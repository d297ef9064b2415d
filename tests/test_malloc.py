"""df_mlx keeps freed CPU memory in the heap, so MLX's buffers of a repeated call do not fault
their pages in again (df_mlx/_malloc.py)."""

import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

# two rounds of eight 16 MB MLX buffers (four times MLX's 32 MB buffer cache), then the second
# round's page faults
ROUNDS = """
import resource
import df_mlx, mlx.core as mx
from df_mlx import _malloc
def round_():
    xs = [mx.full((4 << 20,), float(i)) for i in range(8)]
    mx.eval(xs)
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(_malloc.applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 8 * (16 << 20) // 4096


def _faults(**env) -> tuple:
    environ = dict(os.environ, **env)
    done = subprocess.run([sys.executable, "-c", ROUNDS], capture_output=True, text=True, env=environ)
    assert done.returncode == 0, done.stderr
    applied, faults = done.stdout.split()
    return applied == "True", int(faults)


@glibc_only
def test_repeated_buffers_reuse_the_heap_instead_of_faulting_in_again():
    applied, faults = _faults()
    untouched, faults_without = _faults(DFMLX_MALLOC="0")
    assert applied and not untouched
    assert faults < PAGES // 16 < faults_without, (faults, faults_without)
