"""Run torch checkpoints through the DFNet4 fork's own model, in the fork's own process.

`dfmlx export` must write checkpoints the fork loads: this builds the fork's model for a
config.ini with the fork's `df.model.init_model` (as its `load_model` does), loads each
checkpoint with `load_state_dict(strict=True)` and runs the same inputs through each:

    DFMLX_FORK_DIR=/path/to/DeepFilterNet4 python -m parity.fork_checkpoint \\
        --config config.ini --inputs in.safetensors --out out.safetensors A.ckpt [B.ckpt ...]

`in.safetensors` holds `input/<i>`; `out.safetensors` gets `<checkpoint index>/output/<i>`.
`run_in_fork` wraps the subprocess (the fork's `df` must not meet upstream `df`).
"""

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from parity.fork_recorder import _as_tuple, _load_fork, fork_dir, run_fork_module


def _run(config: Path, inputs: Path, out: Path, checkpoints: Sequence[Path], run_df: bool,
         discriminator: bool = False):
    import torch
    from safetensors.numpy import load_file, save_file

    from parity.fork_gan_step import _import_fork_train

    import_ref = _load_fork(fork_dir())
    import_ref("config").config.load(str(config), config_must_exist=True, allow_reload=True)
    xs = load_file(str(inputs))
    xs = [xs[f"input/{i}"] for i in range(len(xs))]
    tensors: Dict[str, np.ndarray] = {}
    for n, path in enumerate(checkpoints):
        if discriminator:  # the fork's train.setup_discriminator for this config
            model = _import_fork_train(import_ref).setup_discriminator()
        else:
            model = import_ref("model").init_model(run_df=run_df)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        with torch.no_grad():  # copies: the fork's DF writes into its input in place
            out_n = _as_tuple(model.eval()(*(torch.from_numpy(x.copy()) for x in xs)))
        for i, o in enumerate(out_n):
            tensors[f"{n}/output/{i}"] = np.ascontiguousarray(o.numpy())
    save_file(tensors, str(out))


def run_in_fork(config_text: str, inputs: List[np.ndarray], checkpoints: Sequence[Path], run_df: bool = True,
                fork: Optional[str] = None, timeout: float = 300,
                discriminator: bool = False) -> List[List[np.ndarray]]:
    """Each checkpoint's outputs from the fork's model (or, with `discriminator`, the fork's
    GAN discriminator) for `config_text`, run in a subprocess."""
    from safetensors.numpy import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "config.ini").write_text(config_text)
        save_file({f"input/{i}": np.ascontiguousarray(x) for i, x in enumerate(inputs)}, str(tmp / "in.safetensors"))
        args = ["--config", str(tmp / "config.ini"), "--inputs", str(tmp / "in.safetensors"),
                "--out", str(tmp / "out.safetensors"), *([] if run_df else ["--no-df"]),
                *(["--discriminator"] if discriminator else []), *map(str, checkpoints)]
        run_fork_module("parity.fork_checkpoint", args, "running checkpoints in the fork", fork, timeout)
        out = load_file(str(tmp / "out.safetensors"))
    return [[out[f"{n}/output/{i}"] for i in range(sum(k.startswith(f"{n}/") for k in out))]
            for n in range(len(checkpoints))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--config", type=Path, required=True, help="the model's config.ini")
    parser.add_argument("--inputs", type=Path, required=True, help="safetensors with input/<i>")
    parser.add_argument("--out", type=Path, required=True, help="safetensors to write the outputs to")
    parser.add_argument("--no-df", action="store_true", help="init_model(run_df=False)")
    parser.add_argument("--discriminator", action="store_true", help="the config's GAN discriminator")
    args = parser.parse_args(argv)
    _run(args.config, args.inputs, args.out, args.checkpoints, not args.no_df, args.discriminator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
