"""Records the DFNet4 fork's `SpeakerContrastiveLoss` on deterministic audio into a JSON
fixture (`parity/fixtures/fork/speaker_contrastive_loss.json`): the loss values only, since the
inputs are rebuilt from the committed test audio (`speaker_loss_inputs`).

    DFMLX_FORK_DIR=/path/to/DeepFilterNet4 python -m parity.fork_speaker_loss [--out DIR]

The fork's loss embeds audio with resemblyzer's VoiceEncoder; resemblyzer's package imports
webrtcvad, which only its silence trimming uses, so a stand-in module is registered first.
"""

import argparse
import json
import sys
import types
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from parity.dsp import signals_for
from parity.fork_recorder import FIXTURE_DIR, _git_commit, _load_fork, fork_dir, run_fork_module

NAME = "speaker_contrastive_loss"
CASES = {"clean_only": False, "with_noisy": True}  # case -> whether the noisy audio is passed
FACTOR, NEGATIVE_WEIGHT = 0.1, 0.25


def speaker_loss_inputs() -> Dict[str, np.ndarray]:
    """[2, T] enhanced, clean and noisy audio at 16 kHz from the committed speech and noise."""
    speech_in_noise, noise = signals_for(16000, seconds=2.0)[1][1]
    clean = np.stack([speech_in_noise, speech_in_noise[::-1].copy()])
    return {"enhanced": clean + 0.3 * noise, "clean": clean, "noisy": clean + noise}


def record(out_dir: Path, fork: Optional[str] = None) -> Path:
    """Run the fork's loss on speaker_loss_inputs() and write the fixture."""
    import torch

    root = fork_dir(fork)
    sys.modules.setdefault("webrtcvad", types.ModuleType("webrtcvad"))
    loss_module = _load_fork(root)("loss")
    loss = loss_module.SpeakerContrastiveLoss(factor=FACTOR, negative_weight=NEGATIVE_WEIGHT)
    x = {k: torch.from_numpy(v) for k, v in speaker_loss_inputs().items()}
    values = {case: float(loss(x["enhanced"], x["clean"], x["noisy"] if noisy else None))
              for case, noisy in CASES.items()}
    if loss.speaker_encoder is None:
        raise RuntimeError("the fork's SpeakerContrastiveLoss could not load resemblyzer")
    meta = {"fork": {"repository": "https://github.com/sealad886/DeepFilterNet4", "commit": _git_commit(root)},
            "torch": torch.__version__,
            "module": "loss.SpeakerContrastiveLoss", "factor": FACTOR, "negative_weight": NEGATIVE_WEIGHT,
            "inputs": "parity.fork_speaker_loss.speaker_loss_inputs()", "loss": values}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{NAME}.json"
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return path


def load(out_dir: Path = FIXTURE_DIR) -> dict:
    return json.loads((out_dir / f"{NAME}.json").read_text())


def record_in_subprocess(out_dir: Path, fork: Optional[str] = None) -> dict:
    """Record in a fresh interpreter (the fork's `df` must not meet upstream `df`) and load."""
    run_fork_module("parity.fork_speaker_loss", ["--out", str(out_dir)], "recording the fork's speaker loss", fork)
    return load(out_dir)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=FIXTURE_DIR)
    print(record(ap.parse_args().out))
