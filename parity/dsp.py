"""DSP parity cases: `df_mlx.libdf` (+ the helpers that wrap it) against the Rust `libdf`.

One function builds the whole report for one STFT setting; `pytest parity/` and
`dfmlx parity dsp` both use it.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from parity.reference import import_ref, load_reference
from parity.report import Report, Tolerance, compare

# Bit-exact steps: same float32 operations in the same order as libdf.
EXACT = Tolerance(0.0, 0.0, "same float32 operations in libdf's order")
# ERB energies in dB: float32 log10 is not correctly rounded; numpy's SIMD loops (chosen by the
# CPU) and the C library's log10f (libdf) may differ by an ulp, i.e. 7.6e-6 at -100 dB.
LOG10 = Tolerance(0.0, 2.4e-7, "float32 log10: numpy's CPU-dependent SIMD vs libm's log10f, 1-2 ulp")
# The FFT is numpy's (float64) instead of RustFFT's (float32): a few float32 ulps of the
# spectrum's peak. Measured worst 3.1e-7 relative over the settings below.
SPECTRUM = Tolerance(0.0, 1e-6, "FFT rounding: numpy float64 vs RustFFT float32")
# Features computed from our own spectrum inherit its 1e-7-relative error. In dB it is an
# absolute error of 4.34 * relative power error, which is large only for bands ~100 dB below
# the peak; after erb_norm's /40 the measured worst is 2e-5 on real audio.
FEATURES = Tolerance(1e-4, 0.0, "inherits the spectrum's FFT rounding; dB of near-silent bands")

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


@dataclass(frozen=True)
class Setting:
    sr: int
    fft_size: int
    hop_size: int
    nb_bands: int
    min_nb_erb_freqs: int

    @property
    def label(self) -> str:
        return f"sr{self.sr}_fft{self.fft_size}_hop{self.hop_size}_erb{self.nb_bands}_min{self.min_nb_erb_freqs}"

    @property
    def args(self) -> Tuple[int, int, int, int, int]:
        return (self.sr, self.fft_size, self.hop_size, self.nb_bands, self.min_nb_erb_freqs)


SETTINGS: List[Setting] = [
    Setting(48000, 960, 480, 32, 2),  # DeepFilterNet 2/3 release
    Setting(48000, 960, 480, 32, 1),  # libdf's own default min_nb_erb_freqs
    Setting(16000, 320, 160, 32, 2),
    Setting(48000, 960, 240, 24, 2),  # 75 % overlap
    Setting(44100, 882, 441, 32, 1),  # odd hop
]
# Odd, hop-misaligned chunks: each call drops its trailing partial hop, on both sides.
ODD_CHUNKS = (479, 1000, 4801, 97, 12345)


def signals_for(sr: int, seconds: float = 2.0) -> List[Tuple[str, np.ndarray]]:
    """Deterministic float32 [2, T] signals: random noise, and real audio (channel 0 synthesised
    speech mixed with recorded noise at 5 dB SNR, channel 1 the noise alone)."""
    import soundfile as sf

    n = int(sr * seconds)
    rng = np.random.default_rng(0)
    rand = (rng.standard_normal((2, n)) * 0.1).astype(np.float32)
    noise, _ = sf.read(DATA / "noise_freesound_573577.wav", dtype="float32")
    speech, _ = sf.read(DATA / "speech_espeak_48k.wav", dtype="float32")
    noise, speech = np.resize(noise, n), np.resize(speech, n)
    gain = np.sqrt(np.mean(speech**2) / np.mean(noise**2) / 10 ** (5 / 10))
    real = np.stack([speech + gain * noise, gain * noise]).astype(np.float32)
    return [("random", rand), ("real", real)]


def _chunks(x: np.ndarray, sizes: Sequence[int]):
    start, i = 0, 0
    while start < x.shape[1]:
        size = sizes[i % len(sizes)]
        yield x[:, start : start + size]
        start, i = start + size, i + 1


def dsp_report(setting: Setting, alpha: float = 0.99) -> Report:
    """Every libdf function at one STFT setting, on random and real signals."""
    import libdf

    import df_mlx.libdf as ours

    info = load_reference()
    report = Report(f"DSP {setting.label}", f"libdf + {info.describe()}")
    ref, mine = libdf.DF(*setting.args), ours.DF(*setting.args)
    widths = ref.erb_widths()
    report.add(compare("erb_widths", mine.erb_widths().astype(np.int64), widths.astype(np.int64), EXACT))
    report.add(compare("fft_window", mine.fft_window(), ref.fft_window(), EXACT))
    nb_df = min(96, setting.fft_size // 2 + 1)
    report.add(compare("unit_norm_init", ours.unit_norm_init(nb_df), libdf.unit_norm_init(nb_df), EXACT))

    for sig_name, x in signals_for(setting.sr):
        spec_ref = ref.analysis(x)
        report.add(compare(f"{sig_name}/analysis", mine.analysis(x), spec_ref, SPECTRUM))

        ref.reset()
        spec_ref_c = np.concatenate([ref.analysis(c, reset=False) for c in _chunks(x, ODD_CHUNKS)], 1)
        mine.reset()
        spec_mine_c = np.concatenate([mine.analysis(c, reset=False) for c in _chunks(x, ODD_CHUNKS)], 1)
        report.add(compare(f"{sig_name}/analysis_odd_chunks", spec_mine_c, spec_ref_c, SPECTRUM))

        # Synthesis and features are compared on the reference's own spectrum, isolating them.
        spec = spec_ref[:1]
        report.add(compare(f"{sig_name}/synthesis", mine.synthesis(spec), ref.synthesis(spec.copy()), SPECTRUM))
        t_split = spec.shape[1] // 3
        ref.reset()
        syn_ref = np.concatenate([ref.synthesis(np.ascontiguousarray(s), reset=False)
                                  for s in (spec[:, :t_split].copy(), spec[:, t_split:].copy())], 1)
        mine.reset()
        syn_mine = np.concatenate([mine.synthesis(s, reset=False)
                                   for s in (spec[:, :t_split], spec[:, t_split:])], 1)
        report.add(compare(f"{sig_name}/synthesis_chunked", syn_mine, syn_ref, SPECTRUM))

        for db in (True, False):
            report.add(compare(f"{sig_name}/erb_db={db}", ours.erb(spec_ref, widths, db=db),
                               libdf.erb(spec_ref, widths, db=db), LOG10 if db else EXACT))
        erb_4d = spec_ref[None]
        report.add(compare(f"{sig_name}/erb_4d", ours.erb(erb_4d, widths), libdf.erb(erb_4d, widths), LOG10))
        gains = np.random.default_rng(1).random((2, 7, len(widths)), dtype=np.float32)
        report.add(compare(f"{sig_name}/erb_inv", ours.erb_inv(gains, widths), libdf.erb_inv(gains, widths), EXACT))

        erb_ref = libdf.erb(spec_ref, widths)
        norm_ref = libdf.erb_norm(erb_ref.copy(), alpha)
        report.add(compare(f"{sig_name}/erb_norm", ours.erb_norm(erb_ref, alpha), norm_ref, EXACT))
        first, state = ours.erb_norm(erb_ref[:, :t_split], alpha, return_state=True)
        rest = ours.erb_norm(erb_ref[:, t_split:], alpha, state)
        report.add(compare(f"{sig_name}/erb_norm_state_carried", np.concatenate([first, rest], 1), norm_ref, EXACT))
        rest_ref = libdf.erb_norm(np.ascontiguousarray(erb_ref[:, t_split:]), alpha, state)
        report.add(compare(f"{sig_name}/erb_norm_state_into_libdf", rest, rest_ref, EXACT))

        cplx = np.ascontiguousarray(spec_ref[..., :nb_df])
        unit_ref = libdf.unit_norm(cplx, alpha)
        report.add(compare(f"{sig_name}/unit_norm", ours.unit_norm(cplx, alpha), unit_ref, EXACT))
        first, state = ours.unit_norm(cplx[:, :t_split], alpha, return_state=True)
        rest = ours.unit_norm(cplx[:, t_split:], alpha, state)
        report.add(compare(f"{sig_name}/unit_norm_state_carried", np.concatenate([first, rest], 1), unit_ref, EXACT))
        rest_ref = libdf.unit_norm(np.ascontiguousarray(cplx[:, t_split:]), alpha, state)
        report.add(compare(f"{sig_name}/unit_norm_state_into_libdf", rest, rest_ref, EXACT))

        # The whole feature pipeline from audio, as df.enhance.df_features computes it.
        spec_mine = mine.analysis(x)
        report.add(compare(f"{sig_name}/features_erb", ours.erb_norm(ours.erb(spec_mine, widths), alpha),
                           norm_ref, FEATURES))
        report.add(compare(f"{sig_name}/features_spec", ours.unit_norm(spec_mine[..., :nb_df], alpha),
                           unit_ref, FEATURES))
    return report


def helpers_report() -> Report:
    """The df helpers that wrap libdf: get_norm_alpha and modules.erb_fb."""
    import libdf

    from df_mlx import modules as mlx_modules
    from df_mlx import utils as mlx_utils
    from df_mlx.config import config as mlx_config

    info = load_reference()
    ref_config = import_ref("config").config
    ref_utils = import_ref("utils")
    ref_modules = import_ref("modules")
    report = Report("DSP helpers", info.describe())
    for sr, hop, tau in ((48000, 480, 1.0), (16000, 160, 1.0), (48000, 240, 1.0), (48000, 480, 0.5), (8000, 80, 0.1)):
        for cfg in (ref_config, mlx_config):
            cfg.use_defaults(allow_reload=True)
            cfg.set("SR", sr, int, "df")
            cfg.set("HOP_SIZE", hop, int, "df")
            cfg.set("NORM_TAU", tau, float, "df")
        report.add(compare(f"get_norm_alpha sr={sr} hop={hop} tau={tau}",
                           np.array(mlx_utils.get_norm_alpha(False)),
                           np.array(ref_utils.get_norm_alpha(False)), EXACT))
    for cfg in (ref_config, mlx_config):
        cfg.use_defaults(allow_reload=True)
    for setting in SETTINGS[:3]:
        widths = libdf.DF(*setting.args).erb_widths()
        for normalized in (True, False):
            for inverse in (True, False):
                ours = mlx_modules.erb_fb(widths, setting.sr, normalized=normalized, inverse=inverse)
                theirs = ref_modules.erb_fb(widths, setting.sr, normalized=normalized, inverse=inverse)
                report.add(compare(f"erb_fb {setting.label} normalized={normalized} inverse={inverse}",
                                   np.array(ours), theirs, EXACT))
    return report
