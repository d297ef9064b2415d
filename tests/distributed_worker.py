"""One training step of a tiny DFN3 on this rank's share of a fixed batch, for
tests/test_distributed.py: run by every rank under mlx.launch (`python -m
tests.distributed_worker BASE N[,N...] OUT [gan]` writes OUT/rank<r>_<N>.safetensors, one step
from the same start per batch size N) and, in one process, as the reference with the whole
batch. Both build the same weights from the same seed."""

import sys
from pathlib import Path
from typing import Dict

import df_mlx  # noqa: F401  (before mlx: df_mlx picks the BLAS)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from df_mlx import distributed
from df_mlx import train
from df_mlx.checkpoint import load_model
from df_mlx.config import config
from df_mlx.libdf import DF
from df_mlx.model import ModelParams
from tests.datasets import clip

SAMPLES = 24000  # 0.5 s per item


def fixed_batch(n: int, df_state, nb_df: int) -> train.Batch:
    """n mixtures of the bundled speech and noise clips at fixed SNRs."""
    clean = np.stack([clip("speech", i % 8)[:SAMPLES] for i in range(n)])
    noise = np.stack([clip("noise", i % 4)[i * 1000 : i * 1000 + SAMPLES] for i in range(n)])
    return train.make_batch(clean, noise, [(-5, 0, 5, 10)[i % 4] for i in range(n)], df_state, nb_df)


def one_step(base: Path, n: int, gan: bool = False) -> Dict[str, mx.array]:
    """Loss, gradient norm, raw gradients and updated weights (and buffers) of one step on this
    rank's share of the n-item batch (the whole batch in one process)."""
    config.load(str(base / "config.ini"), allow_reload=True)
    p = ModelParams()
    train.state = DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb,
                     min_nb_erb_freqs=p.min_nb_freqs)
    mx.random.seed(0)
    model, _ = load_model(None, train.state)
    opt, losses = train.load_opt(None, model), train.setup_losses()
    batch = fixed_batch(n, train.state, p.nb_df)
    local = batch.local_share()
    model.train()
    out: Dict[str, mx.array] = {}
    if gan:
        from df_mlx import train_gan

        disc = train_gan.build_discriminator()
        d_opt = train_gan.load_discriminator_opt(None, disc)
        result = train_gan.gan_train_step(model, disc, opt, d_opt, losses, train_gan.GanLoss(), local)
        out["d_loss"] = result.d_loss
        out.update({f"disc.{k}": w for k, w in tree_flatten(disc.parameters())})
    else:
        result = train.train_step(model, opt, losses, local)
    out.update({"loss": result.loss, "grad_norm": result.grad_norm})
    out.update({f"grad.{k}": g for k, g in result.grads.items() if g is not None})
    out.update({f"weight.{k}": w for k, w in tree_flatten(model.parameters())})
    mx.eval(out)
    return out


if __name__ == "__main__":
    base, sizes, out_dir = Path(sys.argv[1]), [int(n) for n in sys.argv[2].split(",")], Path(sys.argv[3])
    for n in sizes:
        arrays = one_step(base, n, gan=len(sys.argv) > 4 and sys.argv[4] == "gan")
        mx.save_safetensors(str(out_dir / f"rank{distributed.rank()}_{n}.safetensors"), arrays)
