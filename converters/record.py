"""What every converter writes and reports: the converter and reference versions recorded
in a converted model's metadata, the result shown to users, the source's hash, and the model
family a config names (checked against the supported ones). Shared by converters.convert and
converters.onnx_dfn3, below both."""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from converters.torch_ckpt import CheckpointError

FAMILIES = ("deepfilternet3", "deepfilternet2", "deepfilternet", "deepfilternetmf", "deepfilternet4")
CONVERTER_VERSION = "1"
# The layout this converter maps (state_dict names and shapes): deepfilternet 0.5.6, and the
# DFNet4 fork at the commit its parity fixtures were recorded from.
REFERENCE_VERSION = "deepfilternet 0.5.6"
REFERENCE_VERSIONS = {"deepfilternet4": "sealad886/DeepFilterNet4 893ec67cb578123bcc9ec186b3a9d38c5ea71c22"}
# Bounds on a release zip or tarball, checked on its directory before anything is extracted (a
# bomb of a few MB can unpack to GBs): upstream's releases hold a handful of files and tens of MB.
MAX_ARCHIVE_MEMBERS = 1000
MAX_ARCHIVE_BYTES = 1 << 30


@dataclass
class ConvertResult:
    out_dir: Path
    family: str
    source: str
    tensors: int
    parameters: int
    ignored: List[str]
    discriminator: Optional[str] = None  # the fork's disc checkpoint converted alongside


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_config(text: str, tmp: Path):
    """Make `text` the global df_mlx config; returns the model family it names."""
    from df_mlx.config import config

    path = tmp / "config.ini"
    path.write_text(text)
    config.load(str(path), config_must_exist=True, allow_defaults=True, allow_reload=True)
    family = config("MODEL", default="deepfilternet3", section="train")
    if family not in FAMILIES:
        raise CheckpointError(f"model family `{family}` is not supported yet (supported: {', '.join(FAMILIES)})")
    return family
