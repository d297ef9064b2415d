"""df_mlx.speaker_encoder against resemblyzer's torch VoiceEncoder (the speaker model of the
DFNet4 fork's SpeakerContrastiveLoss), and df_mlx.loss.SpeakerContrastiveLoss against the fork's
formula on the reference embeddings and against the fork's class itself (the committed fixture
of parity/fork_speaker_loss.py, live with $DFMLX_FORK_DIR). resemblyzer's package `__init__`
imports webrtcvad, which only its silence trimming uses; a stand-in module is registered so it
imports without it."""

import importlib.util
import sys
import types

import mlx.core as mx
import numpy as np
import pytest
import torch

from parity import fork_speaker_loss
from parity.dsp import signals_for
from parity.fork_recorder import live
from parity.report import Report, Tolerance, compare

pytestmark = pytest.mark.skipif(importlib.util.find_spec("resemblyzer") is None,
                                reason="needs resemblyzer (pip install --no-deps resemblyzer==0.1.4)")

# float32 through a 3-layer LSTM(256) over 160 steps and a linear layer; unit-norm outputs.
EMBEDDING = Tolerance(1e-5, 0.0, "float32 LSTM(256) x 3 over 160 steps, unit-norm embeddings")
MEL = Tolerance(0.0, 0.0, "the same librosa computation")
LOSS = Tolerance(1e-6, 0.0, "cosines of unit-norm float32 embeddings")


def _reference():
    sys.modules.setdefault("webrtcvad", types.ModuleType("webrtcvad"))
    from resemblyzer import VoiceEncoder, audio

    return VoiceEncoder(device="cpu", verbose=False), audio


@pytest.fixture(scope="module")
def encoders():
    from df_mlx.speaker_encoder import VoiceEncoder

    return VoiceEncoder(), *_reference()


@pytest.fixture(scope="module")
def speech():
    """4 s of real audio at 16 kHz: speech in noise, and the noise alone."""
    return signals_for(16000, seconds=4.0)[1][1]


def test_voice_encoder(encoders, speech):
    from df_mlx.speaker_encoder import mel_spectrogram, partial_slices

    ours, ref, ref_audio = encoders
    report = Report("speaker_encoder.VoiceEncoder", "resemblyzer 0.1.4 VoiceEncoder")
    wav = speech[0]
    report.add(compare("mel", mel_spectrogram(wav), ref_audio.wav_to_mel_spectrogram(wav), MEL))
    assert partial_slices(len(wav)) == ref.compute_partial_slices(len(wav), 1.3, 0.75)
    mel = mel_spectrogram(wav)
    mels = np.stack([mel[s] for s in partial_slices(len(wav))[1]])
    with torch.no_grad():
        want = ref(torch.from_numpy(mels)).numpy()
    report.add(compare("partial embeddings", ours(mx.array(mels)), want, EMBEDDING))
    for i, channel in enumerate(speech):
        report.add(compare(f"utterance embedding {i}", ours.embed_utterance(channel), ref.embed_utterance(channel),
                           EMBEDDING))
    print(report.table())
    assert report.passed, report.summary()


@pytest.mark.parametrize("with_noisy", [False, True])
def test_speaker_contrastive_loss(encoders, speech, with_noisy):
    """The fork's value on the reference embeddings, and no gradient (the fork embeds detached
    copies)."""
    from df_mlx.loss import SpeakerContrastiveLoss

    _, ref, _ = encoders
    clean = np.stack([speech[0], speech[0][::-1].copy()])
    enhanced = clean + 0.3 * np.stack([speech[1], speech[1]])
    noisy = clean + np.stack([speech[1], speech[1]])
    loss = SpeakerContrastiveLoss(factor=0.1, negative_weight=0.25)
    args = (mx.array(enhanced), mx.array(clean)) + ((mx.array(noisy),) if with_noisy else ())
    got = loss(*args)

    def emb(batch):
        return torch.stack([torch.from_numpy(ref.embed_utterance(w)) for w in batch])

    cos = torch.nn.functional.cosine_similarity
    want = -cos(emb(enhanced), emb(clean), dim=-1).mean()
    if with_noisy:
        want = want + 0.25 * cos(emb(enhanced), emb(noisy), dim=-1).mean()
    want = 0.1 * want
    report = Report("loss.SpeakerContrastiveLoss", "DFNet4 fork formula, resemblyzer embeddings")
    report.add(compare("loss", got, want.numpy(), LOSS))
    print(report.table())
    assert report.passed, report.summary()
    grad = mx.grad(lambda e: loss(e, *args[1:]))(args[0])
    assert float(mx.abs(grad).max()) == 0.0


def _check_fork_values(recorded: dict):
    from df_mlx.loss import SpeakerContrastiveLoss

    x = {k: mx.array(v) for k, v in fork_speaker_loss.speaker_loss_inputs().items()}
    loss = SpeakerContrastiveLoss(recorded["factor"], recorded["negative_weight"])
    report = Report("loss.SpeakerContrastiveLoss", f"DFNet4 fork {recorded['fork']['commit'][:12]}")
    for case, noisy in fork_speaker_loss.CASES.items():
        got = loss(x["enhanced"], x["clean"], x["noisy"] if noisy else None)
        report.add(compare(case, got, np.float32(recorded["loss"][case]), LOSS))
    print(report.table())
    assert report.passed, report.summary()


def test_fork_fixture():
    _check_fork_values(fork_speaker_loss.load())


@live
def test_fork_live(tmp_path):
    recorded = fork_speaker_loss.record_in_subprocess(tmp_path)
    _check_fork_values(recorded)
    committed = fork_speaker_loss.load()
    if recorded["fork"]["commit"] == committed["fork"]["commit"]:
        assert recorded["loss"] == committed["loss"]


def test_bad_weights_file(tmp_path):
    from df_mlx.speaker_encoder import SpeakerEncoderError, VoiceEncoder

    bad = tmp_path / "pretrained.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SpeakerEncoderError, match="not a resemblyzer checkpoint"):
        VoiceEncoder(bad)
    torch.save({"model_state": {"linear.weight": torch.zeros(2, 2)}}, bad)
    with pytest.raises(SpeakerEncoderError, match="missing lstm.weight_ih_l0"):
        VoiceEncoder(bad)
