"""Builds df_mlx._kernels (df_mlx/native/: the native MLX primitives) with CMake during `pip install`.

Everything else about the package is in pyproject.toml. The build needs a C++20 compiler; pip
fetches CMake, nanobind and the pinned mlx (whose CMake package, headers and libmlx the
extension is built against) into the isolated build environment. A failed or impossible build
does not fail the install: df_mlx then runs its pure-MLX path and says why (df_mlx/_native.py).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE_DIR = Path(__file__).resolve().parent / "df_mlx" / "native"
CBLAS_SHIM = "libdfmlx_cblas.so"  # installed beside the extension; df_mlx/_blas.py loads it


class CMakeBuild(build_ext):
    """Configures and builds df_mlx/native/CMakeLists.txt; on failure warns and leaves it out."""

    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "native"
        build_dir.mkdir(parents=True, exist_ok=True)
        # --fresh: pip's isolated build environment, and with it mlx's path, is new every time
        configure = ["cmake", "--fresh", str(SOURCE_DIR), f"-DPython_EXECUTABLE={sys.executable}",
                     "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build_dir}"]
        if shutil.which("ninja"):
            configure.append("-GNinja")
        try:
            subprocess.run(configure, cwd=build_dir, check=True)
            subprocess.run(["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)],
                           check=True)
            extension = next(build_dir.glob("_kernels*" + target.suffix))
            target.parent.mkdir(parents=True, exist_ok=True)
            if sys.platform == "linux":
                shutil.copyfile(build_dir / CBLAS_SHIM, target.parent / CBLAS_SHIM)
            shutil.copyfile(extension, target)
        except (OSError, subprocess.CalledProcessError, StopIteration) as err:  # no compiler, ...
            print(f"WARNING: df_mlx's native extension was not built ({err}); df_mlx runs its slower "
                  "pure-MLX path", file=sys.stderr)


setup(ext_modules=[Extension("df_mlx._kernels", sources=[])], cmdclass={"build_ext": CMakeBuild})
