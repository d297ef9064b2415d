"""df_mlx.visualization against df.visualization: the plotted numbers (the mesh's values and
coordinates, colour limits, colour map) and the axes (title, labels, limits, axis on/off,
colorbar) for the same inputs, and that both figures save to image files."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import QuadMesh  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from df_mlx import visualization as ours  # noqa: E402
from parity.reference import import_ref  # noqa: E402
from parity.report import Report, Tolerance, compare  # noqa: E402

ref = import_ref("visualization")

# The dB mesh is compared as amplitude 10^(dB/20): float32 FFT rounding (MLX against pocketfft)
# is a few ulps of the loudest bin, which is ~1e-7 relative but 2e-3 dB at a -85 dB bin.
AMPLITUDE = Tolerance(0.0, 1e-5, "float32 FFT rounding, relative to the loudest bin")
# The colour limit vmax is the loudest bin in dB, where rounding is ~1e-6 dB.
DB = Tolerance(1e-4, 0.0, "float32 rounding of the loudest bin in dB")
# Mesh coordinates are the same float64 numpy arithmetic on both sides.
EXACT = Tolerance(0.0, 0.0, "same float64 arithmetic")


def _speechlike(n: int, sr: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _complex_spec(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal((65, 40)) + 1j * rng.standard_normal((65, 40))) * 0.1).astype(np.complex64)


def _plot(fn, data, sr, kwargs):
    """Call a plotting function on a fresh pyplot state: (mesh, axes/figure state, figure)."""
    plt.close("all")
    out = fn(data, sr, **kwargs)
    fig = out if isinstance(out, Figure) else plt.gcf()
    meshes = [c for c in fig.axes[0].collections if isinstance(c, QuadMesh)]  # later axes: colorbar
    assert len(meshes) == 1
    im = meshes[0]
    ax = im.axes
    state = dict(title=ax.get_title(), xlabel=ax.get_xlabel(), ylabel=ax.get_ylabel(), xlim=ax.get_xlim(),
                 ylim=ax.get_ylim(), axis_on=ax.axison, n_axes=len(fig.axes), size=tuple(fig.get_size_inches()),
                 cmap=im.cmap.name, returned=type(out).__name__)
    return im, state, fig


def _check(name, fn_name, data_np, to_ref, to_mlx, sr, kwargs, tmp_path):
    report = Report(f"visualization.{fn_name} {name}", "df.visualization (df 0.5.6)")
    im_ref, state_ref, fig_ref = _plot(getattr(ref, fn_name), to_ref(data_np), sr, dict(kwargs))
    values_ref, coords_ref = np.asarray(im_ref.get_array()).copy(), im_ref.get_coordinates().copy()
    clim_ref = np.array(im_ref.get_clim(), np.float64)
    fig_ref.savefig(tmp_path / f"{name}_ref.png")
    im, state, fig = _plot(getattr(ours, fn_name), to_mlx(data_np), sr, dict(kwargs))
    fig.savefig(tmp_path / f"{name}_mlx.png")
    report.add(compare("mesh.values as 10^(dB/20)", 10 ** (np.asarray(im.get_array(), np.float64) / 20),
                       10 ** (values_ref.astype(np.float64) / 20), AMPLITUDE))
    report.add(compare("mesh.coordinates", im.get_coordinates(), coords_ref, EXACT))
    report.add(compare("clim [dB]", np.array(im.get_clim(), np.float64), clim_ref, DB))
    print(report.table())
    plt.close("all")
    assert report.passed, report.summary()
    assert state == state_ref
    for side in ("ref", "mlx"):
        assert (tmp_path / f"{name}_{side}.png").stat().st_size > 1000


AUDIO_CASES = {
    "defaults": dict(),
    "labels_colorbar": dict(labels=True, colorbar=True, title="noisy", ticks=True),
    "n_fft512_kHz_ylim": dict(n_fft=512, hop=128, kHz=True, ylabels=True, ylim=(0, 4), figsize=(6, 3), ticks=True),
    "vmax_nonpositive": dict(vmax=-10, vmin=-80, xlabels=True, ticks=True),
    "return_im": dict(return_im=True, cmap="magma"),
}


@pytest.mark.parametrize("case", AUDIO_CASES)
def test_spec_figure_from_audio(case, tmp_path):
    x = _speechlike(8000)
    _check(case, "spec_figure", x, torch.from_numpy, mx.array, 16000, dict(AUDIO_CASES[case], from_audio=True),
           tmp_path)


def test_spec_figure_batched_audio(tmp_path):
    """A [1, T] waveform: the STFT keeps the batch axis and spec_figure squeezes it."""
    x = _speechlike(6000, seed=3)[None]
    _check("batched", "spec_figure", x, torch.from_numpy, mx.array, 16000, dict(from_audio=True), tmp_path)


def test_spec_figure_complex_and_real_view(tmp_path):
    """A complex [F, T] spectrum and its [F, T, 2] real view plot the same dB mesh as df."""
    s = _complex_spec()
    _check("complex", "spec_figure", s, torch.from_numpy, mx.array, 8000, dict(colorbar=True), tmp_path)
    real = np.stack([s.real, s.imag], -1)
    _check("real_view", "spec_figure", real, torch.from_numpy, mx.array, 8000, dict(), tmp_path)


def test_specshow_on_axes(tmp_path):
    """specshow of a dB spectrogram on given axes, with explicit t/f-free hop and limits."""
    db = 20 * np.log10(np.abs(_complex_spec(2)) + 1e-12)
    for name, kw in (("plain", dict()), ("axes", dict(title="t", xlabel="x", ylabel="y", hop=16, xlim=(0, 0.05),
                                                       vmin=-60, vmax=-5, ticks=True))):
        def on_axes(fn):
            def call(spec, sr, **k):
                _, ax = plt.subplots(figsize=(4, 3))
                return fn(spec, sr, ax=ax, **k)
            return call
        report_name = f"specshow_{name}"
        im_ref, state_ref, _ = _plot(on_axes(ref.specshow), torch.from_numpy(db), 8000, kw)
        values_ref, coords_ref, clim_ref = np.asarray(im_ref.get_array()).copy(), im_ref.get_coordinates().copy(), \
            im_ref.get_clim()
        im, state, _ = _plot(on_axes(ours.specshow), mx.array(db), 8000, kw)
        assert state == state_ref, report_name
        assert np.array_equal(np.asarray(im.get_array()), values_ref), report_name
        assert np.array_equal(im.get_coordinates(), coords_ref), report_name
        assert im.get_clim() == clim_ref, report_name
    plt.close("all")


def test_specshow_raw_in_numpy(tmp_path):
    """raw_in=True takes a complex spectrum; numpy input is accepted as df accepts tensors."""
    s = _complex_spec(4)
    _check("raw_in", "specshow", s, torch.from_numpy, lambda a: a, 8000, dict(raw_in=True), tmp_path)


def test_bad_shape_is_a_clear_error():
    with pytest.raises(ours.SpectrogramShapeError, match=r"\[F, T\]"):
        ours.specshow(mx.zeros((2, 3, 4)), 16000)
    with pytest.raises(ValueError, match="too short"):
        ours.spec_figure(mx.zeros((100,)), 16000, from_audio=True)
    plt.close("all")
