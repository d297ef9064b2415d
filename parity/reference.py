"""Find and import the PyTorch reference `df` without running `df/__init__.py`.

`df/__init__` imports `df.enhance` -> `df.io` -> torchaudio, which has no build for the torch
we pin (2.13). We therefore register a bare package object named `df` whose `__path__` points
at the reference sources, so `import df.deepfilternet3` etc. load the real submodules and
skip the package initialiser. `df.io` is replaced by a module whose functions raise: model,
DSP and loss parity never call them (audio I/O is compared separately).

The reference is upstream `deepfilternet` from site-packages, or the checkout named by the
environment variable `DF_REFERENCE` (a directory holding `df/`, or a DeepFilterNet repository
root holding `DeepFilterNet/df/`, such as the DFNet4 fork).
"""

import importlib
import importlib.util
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ENV_VAR = "DF_REFERENCE"
_STUBBED = ("df.io",)


class ReferenceUnavailable(RuntimeError):
    """The reference (torch, libdf and the `df` sources) cannot be loaded here."""


@dataclass(frozen=True)
class ReferenceInfo:
    path: Path
    version: Optional[str]
    commit: Optional[str]
    source: str  # "site-packages" or "$DF_REFERENCE"

    def describe(self) -> str:
        commit = f", git {self.commit}" if self.commit else ""
        return f"df {self.version or '?'} from {self.source} ({self.path}{commit})"


_info: Optional[ReferenceInfo] = None


def _df_dir_from_env(value: str) -> Path:
    root = Path(value).expanduser().resolve()
    for candidate in (root / "df", root / "DeepFilterNet" / "df", root):
        if (candidate / "deepfilternet3.py").is_file():
            return candidate
    raise ReferenceUnavailable(f"${ENV_VAR}={value} holds no df/ package (no deepfilternet3.py)")


def _df_dir_from_site_packages() -> Path:
    spec = importlib.util.find_spec("df")
    if spec is None or not spec.submodule_search_locations:
        raise ReferenceUnavailable(
            "upstream df is not installed: pip install --no-deps deepfilternet==0.5.6"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _version_of(df_dir: Path, from_env: bool) -> Optional[str]:
    pyproject = df_dir.parent / "pyproject.toml"
    if from_env and pyproject.is_file():
        for line in pyproject.read_text().splitlines():
            if line.strip().startswith("version"):
                return line.split("=", 1)[1].strip().strip("\"'")
    try:
        import importlib.metadata as md

        return md.version("deepfilternet")
    except Exception:
        return None


def _git_commit(path: Path) -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, check=True,
        )
        return out.stdout.strip() or None
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def _stub_io() -> types.ModuleType:
    mod = types.ModuleType("df.io")

    def unavailable(*_args, **_kwargs):
        raise ReferenceUnavailable("df.io needs torchaudio, which the parity harness does not load")

    for name in ("load_audio", "save_audio", "resample", "get_resample_params", "get_test_sample"):
        setattr(mod, name, unavailable)
    return mod


def load_reference() -> ReferenceInfo:
    """Make `import df.<module>` load the reference, with its config at defaults; idempotent.
    Raises ReferenceUnavailable."""
    global _info
    if _info is not None:
        return _info
    for dep in ("torch", "libdf"):
        if importlib.util.find_spec(dep) is None:
            raise ReferenceUnavailable(f"{dep} is not installed (pip install -e '.[reference]')")
    env = os.environ.get(ENV_VAR)
    df_dir = _df_dir_from_env(env) if env else _df_dir_from_site_packages()
    if "df" in sys.modules and getattr(sys.modules["df"], "__path__", None) != [str(df_dir)]:
        raise ReferenceUnavailable(f"another `df` package is already imported: {sys.modules['df']}")
    pkg = types.ModuleType("df")
    pkg.__path__ = [str(df_dir)]
    pkg.__file__ = str(df_dir / "__init__.py")
    sys.modules["df"] = pkg
    for name in _STUBBED:
        sys.modules[name] = _stub_io()
    importlib.import_module("df.config").config.use_defaults(allow_reload=True)
    _info = ReferenceInfo(
        path=df_dir,
        version=_version_of(df_dir, bool(env)),
        commit=_git_commit(df_dir) if env else None,  # site-packages may sit in another repo
        source=f"${ENV_VAR}" if env else "site-packages",
    )
    return _info


def import_ref(module: str):
    """`import_ref("modules")` -> the reference's `df.modules`."""
    load_reference()
    return importlib.import_module("df." + module)


def load_configs(ini_text: str, tmp_dir: Path) -> Path:
    """Load the same INI into the reference's and df_mlx's global configs (fresh defaults)."""
    from df_mlx.config import config as mlx_config

    path = Path(tmp_dir) / "config.ini"
    path.write_text(ini_text)
    import_ref("config").config.load(str(path), allow_reload=True)
    mlx_config.load(str(path), allow_reload=True)
    return path


def public_names(module: str) -> set:
    """The public names `dir(df.<module>)` shows that belong to df's API: what the module
    defines (functions, classes, assigned names) and what it re-exports from df itself or
    libdf. Read from the source, so that df.io and df.enhance (torchaudio) need not import;
    imports of other packages (torch, typing, os ...) are not df's API. "" is df/__init__."""
    import ast

    df_dir = load_reference().path
    path = df_dir / ("__init__.py" if module == "" else module.replace(".", "/") + ".py")
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign) or (isinstance(node, ast.AnnAssign) and node.value is not None):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").split(".")[0] in ("df", "libdf")):
            names.update(a.asname or a.name for a in node.names)
    return {n for n in names if not n.startswith("_")}


def modules() -> list:
    """df's modules by dotted name ("" for df/__init__), scripts included."""
    df_dir = load_reference().path
    found = [p.relative_to(df_dir).with_suffix("").as_posix().replace("/", ".")
             for p in sorted(df_dir.glob("*.py")) + sorted((df_dir / "scripts").glob("*.py"))]
    return ["" if m == "__init__" else m for m in found if m != "scripts.__init__"]
