"""Package version from the installed metadata, else from pyproject.toml (source checkout)."""

import importlib.metadata
import os
import re

VERSION_REGEX = r"\s*version\s*=\s*[\"']\s*([-.\w]{3,})\s*[\"']\s*"


def _read_version():
    try:
        return importlib.metadata.version("df-mlx")
    except importlib.metadata.PackageNotFoundError:
        pass
    path = os.path.join(os.path.dirname(__file__), os.pardir, "pyproject.toml")
    if os.path.isfile(path):
        pattern = re.compile(VERSION_REGEX)
        with open(path) as f:
            for line in f:
                match = pattern.search(line)
                if match is not None:
                    return match.group(1).strip()
    return None


version = _read_version()
