"""Speech-enhancement performance measures of `df.sepm` (Loizou's composite measures): segmental
SNR, frequency-weighted segmental SNR, LLR, WSS and CSIG/CBAK/COVL with PESQ. Evaluation
metrics, not losses, so numpy (float64) as in df; spectra through scipy's STFT as df does.
"""

from typing import Optional, Tuple

import numpy as np
from loguru import logger
from scipy.linalg import toeplitz
from scipy.signal import stft

EPS = np.finfo(np.float64).eps
# The 25 critical bands (centre frequency, bandwidth in Hz) of Loizou's implementation.
CENT_FREQ = np.array([50.0, 120.0, 190.0, 260.0, 330.0, 400.0, 470.0, 540.0, 617.372, 703.378, 798.717, 904.128,
                      1020.38, 1148.30, 1288.72, 1442.54, 1610.70, 1794.16, 1993.93, 2211.08, 2446.71, 2701.97,
                      2978.04, 3276.17, 3597.63])
BANDWIDTH = np.array([70.0, 70.0, 70.0, 70.0, 70.0, 70.0, 70.0, 77.3724, 86.0056, 95.3398, 105.411, 116.256, 127.914,
                      140.423, 153.823, 168.154, 183.457, 199.776, 217.153, 235.631, 255.255, 276.072, 298.126,
                      321.465, 346.136])


def extractOverlappedWindows(x, nperseg, noverlap, window=None):
    """Frames [..., n, nperseg] with hop nperseg - noverlap (optionally windowed)."""
    step = nperseg - noverlap
    frames = np.lib.stride_tricks.sliding_window_view(x, nperseg, axis=-1)[..., ::step, :]
    return frames * window if window is not None else frames


def _frame_params(fs, frame_len, overlap) -> Tuple[int, int, np.ndarray]:
    winlength = round(frame_len * fs)
    skiprate = int(np.floor((1 - overlap) * frame_len * fs))
    hann = 0.5 * (1 - np.cos(2 * np.pi * np.arange(1, winlength + 1) / (winlength + 1)))
    return winlength, skiprate, hann


def SNRseg(clean_speech, processed_speech, fs, frameLen=0.03, overlap=0.75):
    """Mean segmental SNR in dB, per-frame values clipped to [-10, 35], last frame dropped."""
    winlength, skiprate, hann = _frame_params(fs, frameLen, overlap)
    clean = extractOverlappedWindows(clean_speech, winlength, winlength - skiprate, hann)
    proc = extractOverlappedWindows(processed_speech, winlength, winlength - skiprate, hann)
    signal_energy = np.power(clean, 2).sum(-1)
    noise_energy = np.power(clean - proc, 2).sum(-1)
    snr = np.clip(10 * np.log10(signal_energy / (noise_energy + EPS) + EPS), -10, 35)
    return np.mean(snr[:-1])


def _critical_band_filters(fs, winlength) -> Tuple[np.ndarray, int]:
    """The Gaussian-shaped critical-band filters [25, n_fft/2] (cut at -30 dB) and n_fft."""
    n_fft = int(2 ** np.ceil(np.log2(2 * winlength)))
    half = n_fft // 2
    max_freq = fs / 2
    min_factor = np.exp(-30.0 / (2.0 * 2.303))
    j = np.arange(0, half)
    f0 = np.floor(CENT_FREQ / max_freq * half)[:, None]
    bw = (BANDWIDTH / max_freq * half)[:, None]
    norm = (np.log(BANDWIDTH[0]) - np.log(BANDWIDTH))[:, None]
    filters = np.exp(-11 * ((j - f0) / bw) ** 2 + norm)
    return filters * (filters > min_factor), n_fft


def _magnitudes(x, fs, winlength, skiprate, hann, n_fft) -> np.ndarray:
    """|STFT| [n_fft/2, frames] of the whole frames of x, as df computes them with scipy."""
    num_frames = len(x) / skiprate - (winlength / skiprate)
    seg = x[0 : int(num_frames) * skiprate + int(winlength - skiprate)]
    _, _, zxx = stft(seg, fs=fs, window=hann, nperseg=winlength, noverlap=winlength - skiprate, nfft=n_fft,
                     detrend=False, return_onesided=True, boundary=None, padded=False)
    return np.abs(zxx)[:-1, :]


def _check_pair(a, b):
    if a.shape != b.shape:
        raise ValueError("The two signals do not match!")


def fwSNRseg(cleanSig, enhancedSig, fs, frameLen=0.03, overlap=0.75):
    """Frequency-weighted segmental SNR in dB (per-frame values clipped to [-10, 35])."""
    _check_pair(cleanSig, enhancedSig)
    clean = cleanSig.astype(np.float64) + EPS
    enhanced = enhancedSig.astype(np.float64) + EPS
    winlength, skiprate, hann = _frame_params(fs, frameLen, overlap)
    filters, n_fft = _critical_band_filters(fs, winlength)
    clean_spec = _magnitudes(clean, fs, winlength, skiprate, hann, n_fft)
    enh_spec = _magnitudes(enhanced, fs, winlength, skiprate, hann, n_fft)
    clean_energy = filters.dot(clean_spec / clean_spec.sum(0))
    processed_energy = filters.dot(enh_spec / enh_spec.sum(0))
    error_energy = np.maximum(np.power(clean_energy - processed_energy, 2), EPS)
    w_freq = np.power(clean_energy, 0.2)
    snr_log = 10 * np.log10((clean_energy**2) / error_energy)
    fw_snr = np.sum(w_freq * snr_log, 0) / np.sum(w_freq, 0)
    return np.mean(np.clip(fw_snr, -10, 35))


def lpcoeff(speech_frame, model_order):
    """LPC coefficients [1, -a_1, ...] (float32) and autocorrelation lags by Levinson-Durbin."""
    n = speech_frame.shape[0]
    r = [np.sum(speech_frame[: n - k] * speech_frame[k:n]) for k in range(model_order + 1)]
    a = np.ones((model_order,))
    e = np.zeros((model_order + 1,))
    rcoeff = np.zeros((model_order,))
    e[0] = r[0]
    for i in range(model_order):
        a_past = a[:i]
        sum_term = np.sum(a_past * np.array(r[i:0:-1])) if i > 0 else 0
        rcoeff[i] = (r[i + 1] - sum_term) / max(e[i], EPS)
        a[i] = rcoeff[i]
        if i > 0:
            a[:i] = a_past[:i] - rcoeff[i] * a_past[::-1]
        e[i + 1] = (1 - rcoeff[i] * rcoeff[i]) * e[i]
    lpparams = np.array([1] + list(-a), dtype=np.float32)
    return lpparams, np.array(r, dtype=np.float32)


def llr(clean_speech, processed_speech, fs, frameLen=0.03, overlap=0.75) -> Optional[float]:
    """Log-likelihood ratio of the LPC models (lowest 95 % of frames); None without frames."""
    winlength, skiprate, hann = _frame_params(fs, frameLen, overlap)
    order = 10 if fs < 10000 else 16
    clean = extractOverlappedWindows(clean_speech, winlength, winlength - skiprate, hann)
    proc = extractOverlappedWindows(processed_speech, winlength, winlength - skiprate, hann)
    n = clean.shape[0]
    if n == 0:
        return None
    numerators = np.zeros((n - 1,))
    denominators = np.zeros((n - 1,)) + EPS
    for i in range(n - 1):
        a_clean, r_clean = lpcoeff(clean[i, :], order)
        a_proc, _ = lpcoeff(proc[i, :], order)
        t = toeplitz(r_clean)
        numerators[i] = a_proc.dot(t.dot(a_proc.T))
        denominators[i] = a_clean.dot(t.dot(a_clean.T)) + EPS
    frac = numerators / denominators
    frac[frac <= 0] = 1000
    distortion = np.sort(np.log(frac))
    return np.mean(distortion[: int(round(len(distortion) * 0.95))])


def findLocPeaks(slope, energy):
    """For each band the energy of the nearest spectral peak (Klatt's WSS)."""
    num_crit = len(energy)
    loc_peaks = np.zeros_like(slope)
    for ii in range(len(slope)):
        n = ii
        if slope[ii] > 0:
            while (n < num_crit - 1) and (slope[n] > 0):
                n = n + 1
            loc_peaks[ii] = energy[n - 1]
        else:
            while (n >= 0) and (slope[n] <= 0):
                n = n - 1
            loc_peaks[ii] = energy[n + 1]
    return loc_peaks


def _log_band_energy(x, fs, winlength, skiprate, hann, n_fft, filters) -> np.ndarray:
    scale = np.sqrt(1.0 / hann.sum() ** 2)
    spec = np.power(_magnitudes(x, fs, winlength, skiprate, hann, n_fft) / scale, 2)
    return np.maximum(10 * np.log10(filters.dot(spec)), -100)


def _wss_weights(log_energy: np.ndarray, kmax: float = 20, klocmax: float = 1) -> np.ndarray:
    slope = np.diff(log_energy, axis=0)
    peaks = np.stack([findLocPeaks(slope[:, i], log_energy[:, i]) for i in range(slope.shape[-1])], axis=1) \
        if slope.shape[-1] else np.zeros_like(slope)
    w_max = kmax / (kmax + np.max(log_energy, axis=0) - log_energy[:-1, :])
    w_locmax = klocmax / (klocmax + peaks - log_energy[:-1, :])
    return w_max * w_locmax


def wss(clean_speech, processed_speech, fs, frameLen=0.03, overlap=0.75):
    """Weighted spectral slope distance (lowest 95 % of frames)."""
    _check_pair(clean_speech, processed_speech)
    clean = clean_speech.astype(np.float64) + EPS
    proc = processed_speech.astype(np.float64) + EPS
    winlength, skiprate, hann = _frame_params(fs, frameLen, overlap)
    filters, n_fft = _critical_band_filters(fs, winlength)
    log_clean = _log_band_energy(clean, fs, winlength, skiprate, hann, n_fft, filters)
    log_proc = _log_band_energy(proc, fs, winlength, skiprate, hann, n_fft, filters)
    w = (_wss_weights(log_clean) + _wss_weights(log_proc)) / 2.0
    distortion = np.sum(w * (np.diff(log_clean, axis=0) - np.diff(log_proc, axis=0)) ** 2, axis=0) / np.sum(w, axis=0)
    distortion = np.sort(distortion)
    return np.mean(distortion[: int(round(len(distortion) * 0.95))])


def composite(clean_speech, processed_speech, fs):
    """PESQ (wide band), CSIG, CBAK, COVL (each clipped to [1, 5]) and segmental SNR at 16 kHz."""
    from pesq import pesq

    if fs != 16000:
        raise ValueError(f"composite measures need 16 kHz audio, got {fs} Hz")
    wss_dist = wss(clean_speech, processed_speech, fs)
    llr_mean = llr(clean_speech, processed_speech, fs)
    if llr_mean is None:
        logger.warning("Error computing llr")
        llr_mean = 0
    seg_snr = SNRseg(clean_speech, processed_speech, fs)
    pesq_mos = pesq(fs, clean_speech, processed_speech, "wb")
    csig = np.clip(3.093 - 1.029 * llr_mean + 0.603 * pesq_mos - 0.009 * wss_dist, 1, 5)
    cbak = np.clip(1.634 + 0.478 * pesq_mos - 0.007 * wss_dist + 0.063 * seg_snr, 1, 5)
    covl = np.clip(1.594 + 0.805 * pesq_mos - 0.512 * llr_mean - 0.007 * wss_dist, 1, 5)
    return pesq_mos, csig, cbak, covl, seg_snr
