"""Builds df_mlx/native/ (the native MLX primitives, df_mlx._kernels, and on Linux the cblas
shim df_mlx._cblas) with CMake during `pip install`.

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
# each extension's file in the CMake build (the shim is a plain shared library, loaded by ctypes)
BUILT = {"df_mlx._kernels": "_kernels*{suffix}", "df_mlx._cblas": "libdfmlx_cblas.so"}


class CMakeBuild(build_ext):
    """Configures and builds df_mlx/native/CMakeLists.txt once; on failure warns and leaves the
    extensions out."""

    def run(self):
        self._cmake_error = None
        self._cmake_dir = None
        super().run()

    def _cmake(self) -> Path:
        if self._cmake_dir is None and self._cmake_error is None:
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
                self._cmake_dir = build_dir
            except (OSError, subprocess.CalledProcessError) as err:  # no compiler, no CMake, ...
                self._cmake_error = err
        return self._cmake_dir

    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = self._cmake()
        try:
            if build_dir is None:
                raise self._cmake_error
            built = next(build_dir.glob(BUILT[ext.name].format(suffix=target.suffix)))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(built, target)
        except (OSError, subprocess.CalledProcessError, StopIteration) as err:
            print(f"WARNING: df_mlx's native extension was not built ({err!r}); df_mlx runs its slower "
                  "pure-MLX path", file=sys.stderr)


extensions = [Extension("df_mlx._kernels", sources=[])]
if sys.platform == "linux":
    extensions.append(Extension("df_mlx._cblas", sources=[]))
setup(ext_modules=extensions, cmdclass={"build_ext": CMakeBuild})
