"""Building blocks of the DeepFilterNet models, mirroring `df.modules`."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from df_mlx.utils import get_device  # noqa: F401  (re-exported, as in df.modules)


def erb_fb(widths: np.ndarray, sr: int, normalized: bool = True, inverse: bool = False) -> mx.array:
    """ERB filter matrix from band widths: [F, E] averaging bins into bands (1/width entries
    when `normalized`), or with `inverse` [E, F] repeating bands over bins (ones)."""
    widths = np.asarray(widths).astype(np.int64)
    n_freqs = int(widths.sum())
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    fb = np.zeros((n_freqs, len(widths)), dtype=np.float32)
    for i, (b, w) in enumerate(zip(starts, widths)):
        fb[b : b + w, i] = 1
    if inverse:
        fb = fb.T
        if not normalized:
            fb = fb / fb.sum(axis=1, keepdims=True)
    elif normalized:
        fb = fb / fb.sum(axis=0)
    return mx.array(fb.astype(np.float32))


class Sequential(nn.Module):
    """`torch.nn.Sequential` with torch's child names "0", "1", ...: the flattened parameter
    names then equal the torch `state_dict` keys (MLX's own Sequential says `layers.0`)."""

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self._size = len(modules)
        for i, module in enumerate(modules):
            self[str(i)] = module

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, key):
        return super().__getitem__(str(key) if isinstance(key, int) else key)

    def __call__(self, x):
        for i in range(self._size):
            x = self[str(i)](x)
        return x
