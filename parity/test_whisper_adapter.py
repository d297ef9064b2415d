"""df_mlx.whisper_adapter against PyTorch Whisper and against the DFNet4 fork's `df.whisper_adapter`.

No real Whisper weights are available offline, so a tiny Whisper with seeded random weights is
built in mlx-whisper's torch reference implementation (`mlx_whisper.torch_whisper`, openai-whisper's
model code), written to a model directory in mlx-whisper's format and loaded through the adapter.
The torch model is the reference for the encoder output and the logits; the log-mel is checked
against openai-whisper's torch.stft formula written out below, and greedy decoding against a
torch greedy loop with the same logit filters. With $DFMLX_FORK_DIR set, the fork's
MLXWhisperBackend (its Apple Silicon check bypassed: MLX runs on Linux too) is driven with the
same in-memory model and must give the same results.
"""

import importlib.util
import json
import os
import sys
from dataclasses import asdict

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mlx_whisper")

from mlx_whisper import torch_whisper  # noqa: E402
from mlx_whisper.audio import N_FFT, HOP_LENGTH, SAMPLE_RATE  # noqa: E402

import df_mlx.whisper_adapter as wa  # noqa: E402
from parity.fork_recorder import fork_dir, ForkUnavailable, live  # noqa: E402
from parity.report import Report, Tolerance, compare  # noqa: E402

# Full multilingual vocabulary (the tokenizer's 51865 ids) with a narrow text state keeps the
# model at ~7 MB while decode runs the real tokenizer, language and no-speech tokens.
DIMS = dict(n_mels=80, n_audio_ctx=50, n_audio_state=32, n_audio_head=2, n_audio_layer=2, n_vocab=51865,
            n_text_ctx=32, n_text_state=32, n_text_head=2, n_text_layer=2)
SECONDS = 2 * DIMS["n_audio_ctx"] * HOP_LENGTH / SAMPLE_RATE  # audio that fills the encoder exactly

# log10 of float32 STFT powers (measured worst 2.6e-6): quiet bins carry the FFT rounding of the
# loudest one, relatively larger, so the bound leaves headroom for other signals.
MEL = Tolerance(2e-5, 0.0, "float32 FFT rounding of quiet bins, in log10")
# Two conv layers, two attention blocks and LayerNorms on O(1) activations in float32 (measured
# worst 1.3e-6, from either log-mel).
ENCODER = Tolerance(2e-5, 0.0, "float32 rounding through 2 convs, 2 attention blocks and LayerNorms")
# Logits are a 32-wide dot with N(0, 1) embeddings: O(10) values, float32 relative ~1e-6
# (measured worst 9.5e-6 absolute).
LOGITS = Tolerance(1e-4, 1e-6, "float32 rounding of O(10) logits through 2 decoder blocks")
# avg_logprob and log(no_speech_prob) are log-softmax values of those logits over 51865 ids.
PROBS = Tolerance(1e-4, 0.0, "float32 log-softmax over 51865 logits")
# The fork's MLX backend runs the same mlx_whisper code on the same weights: bit for bit.
SAME = Tolerance(0.0, 0.0, "same mlx_whisper code on the same arrays")


def _torch_model(seed: int = 0) -> torch_whisper.Whisper:
    """The tiny Whisper with seeded weights; LayerNorm and positional parameters get random values
    too, so that a wrong mapping of any of them shows. Seed 0 decodes 16 tokens, 9 distinct."""
    torch.manual_seed(seed)
    model = torch_whisper.Whisper(torch_whisper.ModelDimensions(**DIMS)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.1 * torch.randn_like(module.weight))
                module.bias.copy_(0.1 * torch.randn_like(module.bias))
        # As large as the token embeddings: smaller ones let greedy decoding repeat one token.
        model.decoder.positional_embedding.copy_(2.0 * torch.randn_like(model.decoder.positional_embedding))
    return model


def _mlx_weights(model: torch_whisper.Whisper) -> dict:
    """The torch state dict in mlx-whisper's names and layouts (its convert script's mapping):
    `mlp.0`/`mlp.2` are `mlp1`/`mlp2`, conv kernels are (out, k, in); buffers are rebuilt."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "encoder.positional_embedding":
            continue
        value = t.detach().numpy()
        if name.startswith("encoder.conv") and name.endswith("weight"):
            value = value.transpose(0, 2, 1)
        out[name.replace("mlp.0", "mlp1").replace("mlp.2", "mlp2")] = mx.array(np.ascontiguousarray(value))
    return out


@pytest.fixture(scope="module")
def reference():
    return _torch_model()


@pytest.fixture(scope="module")
def model_dir(reference, tmp_path_factory):
    """The reference's weights as an mlx-whisper model directory."""
    path = tmp_path_factory.mktemp("tiny_whisper")
    (path / "config.json").write_text(json.dumps({"model_type": "whisper", **DIMS}))
    mx.save_safetensors(str(path / "weights.safetensors"), _mlx_weights(reference))
    return path


@pytest.fixture(scope="module")
def models(reference, model_dir):
    """(torch reference, adapter) on the same weights; the adapter loads them from the directory."""
    return reference, wa.load_whisper_model(str(model_dir), backend="mlx")


@pytest.fixture(scope="module")
def audio():
    """A chirp in noise filling the encoder: a spread of mel bins well above the floor."""
    rng = np.random.default_rng(1)
    t = np.arange(int(SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def torch_log_mel(audio: np.ndarray, n_mels: int = 80) -> torch.Tensor:
    """openai-whisper's log_mel_spectrogram in torch ops: (n_mels, n_frames)."""
    x = torch.from_numpy(audio)
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    filters = np.load(os.path.join(os.path.dirname(torch_whisper.__file__), "assets", "mel_filters.npz"))
    mel_spec = torch.from_numpy(filters[f"mel_{n_mels}"]) @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def torch_greedy(model, mel: torch.Tensor, tokenizer, sample_len: int):
    """Greedy decoding as openai-whisper's DecodingTask does it with language given, no
    timestamps, suppress_blank and suppress_tokens="-1": (tokens, avg_logprob, no_speech_prob,
    smallest top-1 margin)."""
    sot = list(tokenizer.sot_sequence_including_notimestamps)
    suppress = set(tokenizer.non_speech_tokens) | {tokenizer.transcribe, tokenizer.translate, tokenizer.sot,
                                                   tokenizer.sot_prev, tokenizer.sot_lm, tokenizer.no_speech}
    mask = torch.zeros(DIMS["n_vocab"])
    mask[sorted(suppress)] = -np.inf
    blank = torch.zeros(DIMS["n_vocab"])
    blank[tokenizer.encode(" ") + [tokenizer.eot]] = -np.inf
    features = model.embed_audio(mel)
    tokens, sum_logprob, margin, no_speech = list(sot), 0.0, np.inf, None
    for step in range(sample_len):
        all_logits = model.logits(torch.tensor([tokens]), features)[0]
        if step == 0:
            no_speech = float(torch.softmax(all_logits[sot.index(tokenizer.sot)], -1)[tokenizer.no_speech])
        logits = all_logits[-1] + mask + (blank if step == 0 else 0)
        top2 = torch.topk(logits, 2).values
        margin = min(margin, float(top2[0] - top2[1]))
        nxt = int(logits.argmax())
        sum_logprob += float(torch.log_softmax(logits, -1)[nxt])
        tokens.append(nxt)
        if nxt == tokenizer.eot:
            break
    sampled = tokens[len(sot):]
    if sampled and sampled[-1] == tokenizer.eot:
        sampled = sampled[:-1]
    return sampled, sum_logprob / (len(sampled) + 1), no_speech, margin


@torch.no_grad()
def test_log_mel_spectrogram(models, audio):
    _, backend = models
    ours = backend.log_mel_spectrogram(audio)
    ref = torch_log_mel(audio)
    assert tuple(ours.shape) == (2 * DIMS["n_audio_ctx"], DIMS["n_mels"])
    report = Report("whisper_adapter", "openai-whisper torch.stft log-mel")
    report.add(compare("log_mel_spectrogram", np.array(ours).T, ref, MEL))
    print(report.table())
    assert report.passed, report.summary()


def test_pad_or_trim(models, audio):
    """Against openai-whisper's torch pad_or_trim: zero padding at the end, or a cut."""
    _, backend = models
    x = torch.from_numpy(audio)
    for length in (audio.size // 2, audio.size + 123):
        ref = x[:length] if length < x.numel() else torch.nn.functional.pad(x, (0, length - x.numel()))
        np.testing.assert_array_equal(np.array(backend.pad_or_trim(audio, length)), ref.numpy())


@torch.no_grad()
def test_embed_audio_and_logits(models, audio):
    """Encoder output from either mel layout and the decoder logits, within float32 tolerances."""
    ref, backend = models
    mel = torch_log_mel(audio)[None]
    ref_features = ref.embed_audio(mel)
    report = Report("whisper_adapter", "torch_whisper")
    report.add(compare("embed_audio", backend.embed_audio(mel.numpy()), ref_features, ENCODER))
    report.add(compare("embed_audio.mlx_layout", backend.embed_audio(backend.log_mel_spectrogram(audio)),
                       ref_features, ENCODER))
    tokens = torch.tensor([list(backend.get_tokenizer().sot_sequence) + [440, 1025, 50257]])
    report.add(compare("logits", backend.logits(tokens.numpy(), ref_features.numpy()),
                       ref.logits(tokens, ref_features), LOGITS))
    print(report.table())
    assert report.passed, report.summary()


@torch.no_grad()
def test_flipped_conv_kernel_is_caught(reference, model_dir, audio):
    """A conv kernel loaded back to front (a layout slip) must fail the encoder comparison."""
    backend = wa.load_whisper_model(str(model_dir))
    conv = backend.model.encoder.conv2
    conv.weight = conv.weight[:, ::-1, :]
    mel = torch_log_mel(audio)[None]
    assert not compare("embed_audio", backend.embed_audio(mel.numpy()), reference.embed_audio(mel), ENCODER).passed


@torch.no_grad()
def test_greedy_decode_matches_torch(models, audio):
    """The same token sequence, text and probabilities as a torch greedy loop."""
    ref, backend = models
    mel = torch_log_mel(audio)
    tokenizer = backend.get_tokenizer(language="en", task="transcribe")
    sample_len = DIMS["n_text_ctx"] // 2
    ref_tokens, ref_avg, ref_no_speech, margin = torch_greedy(ref, mel[None], tokenizer, sample_len)
    assert margin > 100 * LOGITS.bound(30.0), f"top-1 margin {margin} too small for an exact token match"
    options = backend.create_decoding_options(language="en", without_timestamps=True)
    result = backend.decode(mel.numpy(), options)
    print(f"greedy: {ref_tokens}, {result.text!r}, smallest top-1 margin {margin:.3g}, avg_logprob "
          f"{result.avg_logprob:.6g} vs {ref_avg:.6g}, no_speech {result.no_speech_prob:.3g} vs {ref_no_speech:.3g}")
    assert isinstance(result, wa.WhisperDecodingResult)
    assert len(set(ref_tokens)) >= 3, f"a degenerate reference decode {ref_tokens}: a useless test case"
    assert result.tokens == ref_tokens
    assert result.text == tokenizer.decode(ref_tokens).strip()
    assert result.language == "en" and result.temperature == 0.0
    assert abs(result.avg_logprob - ref_avg) <= PROBS.atol
    assert abs(np.log(result.no_speech_prob) - np.log(ref_no_speech)) <= PROBS.atol  # it is ~1e-10


def test_in_memory_model_and_decoder(models):
    """An in-memory model is used as it is; the greedy decoder stops at the tokenizer's EOT."""
    _, backend = models
    again = wa.get_whisper_backend(backend.model)
    assert again.model is backend.model and again.backend_name == "mlx" and again.device is None
    assert again.is_multilingual and again.dims.n_vocab == DIMS["n_vocab"]
    assert again.get_decoder().eot == again.get_tokenizer().eot == 50257


# ----------------------------------------------------------------------------------------------
# Live against the fork's df.whisper_adapter


@pytest.fixture(scope="module")
def fork_adapter():
    """The fork's whisper_adapter module, loaded from its file alone (its df/__init__ needs
    packages df-mlx does not have)."""
    try:
        path = fork_dir() / "df" / "whisper_adapter.py"
    except ForkUnavailable as e:
        pytest.skip(str(e))
    spec = importlib.util.spec_from_file_location("dfn4_whisper_adapter", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


@pytest.fixture
def fork_backend(fork_adapter, models, monkeypatch):
    """The fork's MLXWhisperBackend holding our tiny model: its Apple Silicon check and its
    (downloading) model loader are replaced, everything else is the fork's code."""
    import mlx_whisper.load_models

    _, backend = models
    monkeypatch.setattr(fork_adapter, "is_apple_silicon", lambda: True)
    monkeypatch.setattr(mlx_whisper.load_models, "load_model", lambda repo_id: backend.model)
    return fork_adapter.get_whisper_backend("tiny", backend="mlx")


def test_fork_module_api(fork_adapter):
    assert fork_adapter.is_apple_silicon() == wa.is_apple_silicon()
    assert fork_adapter.MLX_WHISPER_MODEL_MAP == wa.MLX_WHISPER_MODEL_MAP
    for name in ("base", "large", "whisper-x", "org/repo"):
        assert fork_adapter._resolve_mlx_model_name(name) == wa.resolve_mlx_model_name(name)
    fields = [f for f in fork_adapter.WhisperDecodingResult.__dataclass_fields__]
    assert fields == list(wa.WhisperDecodingResult.__dataclass_fields__)


@live
@torch.no_grad()
def test_fork_backend(fork_backend, models, audio):
    """Every MLX backend method against the fork's on the same model, with the fork's defaults
    (language detection included in decode)."""
    _, ours = models
    assert fork_backend.backend_name == ours.backend_name and fork_backend.device == ours.device
    assert fork_backend.dims == ours.dims and fork_backend.is_multilingual == ours.is_multilingual
    report = Report("whisper_adapter", "fork MLXWhisperBackend")
    mel = fork_backend.log_mel_spectrogram(audio)
    report.add(compare("log_mel_spectrogram", ours.log_mel_spectrogram(audio), mel, SAME))
    report.add(compare("pad_or_trim", ours.pad_or_trim(audio, 1000), fork_backend.pad_or_trim(audio, 1000), SAME))
    report.add(compare("pad_or_trim.default", ours.pad_or_trim(audio), fork_backend.pad_or_trim(audio), SAME))
    torch_mel = torch.from_numpy(np.array(mel).T[None].copy())
    features = fork_backend.embed_audio(torch_mel)
    report.add(compare("embed_audio", ours.embed_audio(torch_mel), features, SAME))
    report.add(compare("embed_audio.mlx_layout", ours.embed_audio(mel[None]), fork_backend.embed_audio(mel[None]),
                       SAME))
    tokens = np.array([list(ours.get_tokenizer().sot_sequence) + [440, 1025]])
    report.add(compare("logits", ours.logits(tokens, features), fork_backend.logits(tokens, features), SAME))
    report.add(compare("to_backend_array", ours.to_backend_array(torch_mel), fork_backend.to_backend_array(torch_mel),
                       SAME))
    report.add(compare("to_numpy", ours.to_numpy(features), fork_backend.to_numpy(features), SAME))
    print(report.table())
    assert report.passed, report.summary()
    for language, task in (("en", "transcribe"), ("de", "translate")):
        assert ours.get_tokenizer(language, task).sot_sequence == fork_backend.get_tokenizer(language, task).sot_sequence
    assert ours.get_decoder(0.5).eot == fork_backend.get_decoder(0.5).eot
    assert ours.create_decoding_options(language="en") == fork_backend.create_decoding_options(language="en",
                                                                                              fp16=False)
    # assert_equal: a NaN avg_logprob (mlx-whisper's timestamp rules on a random model) equals NaN
    np.testing.assert_equal(asdict(ours.decode(mel[None])), asdict(fork_backend.decode(mel[None])))
    options = fork_backend.create_decoding_options(language="en", without_timestamps=True, fp16=False)
    np.testing.assert_equal(asdict(ours.decode(mel, options)), asdict(fork_backend.decode(mel, options)))
