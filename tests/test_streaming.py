"""Streaming enhancement equals offline enhancement for any chunking."""

import os
import subprocess
import sys

import numpy as np
import pytest

from df_mlx.config import config
from df_mlx.enhance import enhance
from df_mlx.libdf import DF
from df_mlx.streaming import StreamingEnhancer

# Streaming runs the same float32 layers on different frame blocks: matmul blocking and the
# FFT of different block sizes round differently, never more than a few float32 ulps.
ATOL = 2e-6

RELEASE_LIKE = """[train]
model = deepfilternet3
[df]
df_lookahead = 2
[deepfilternet]
conv_lookahead = 2
conv_ch = 16
emb_hidden_dim = 64
df_hidden_dim = 64
conv_kernel = 2,3
df_pathway_kernel_size_t = 3
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import mlx.core as mx

    from df_mlx.deepfilternet3 import init_model

    path = tmp_path_factory.mktemp("cfg") / "config.ini"
    path.write_text(RELEASE_LIKE)
    config.load(str(path), allow_reload=True)
    mx.random.seed(0)
    model = init_model()
    df_state = DF(48000, 960, 480, 32, 2)
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal((2, 48000 + 123)) * 0.1).astype(np.float32)
    offline = np.array(enhance(model, df_state, audio, pad=True))
    offline_nopad = np.array(enhance(model, df_state, audio, pad=False))
    yield model, df_state, audio, offline, offline_nopad
    config.use_defaults(allow_reload=True)


def _stream(model, df_state, audio, chunk, atten=None):
    s = StreamingEnhancer(model, df_state, atten)
    parts = [s.process(audio[:, i : i + chunk]) for i in range(0, audio.shape[1], chunk)]
    return np.concatenate(parts + [s.flush()], axis=1), s


@pytest.mark.parametrize("chunk", [1, 479, 480, 4096, 100000])
def test_stream_equals_offline(setup, chunk):
    model, df_state, audio, offline, offline_nopad = setup
    out, s = _stream(model, df_state, audio, chunk)
    d = df_state.fft_size() - df_state.hop_size()
    np.testing.assert_allclose(out[:, d : d + audio.shape[1]], offline, atol=ATOL)
    # Without padding, offline's last lookahead frames see zero features where the stream saw
    # the flushed signal; every earlier sample is the same.
    n = offline_nopad.shape[1] - 4 * df_state.hop_size()
    np.testing.assert_allclose(out[:, :n], offline_nopad[:, :n], atol=ATOL)


def test_stream_is_causal_with_stated_latency(setup):
    """Output produced before the end only depends on input up to `latency` samples later."""
    model, df_state, audio, _, _ = setup
    s = StreamingEnhancer(model, df_state)
    first = s.process(audio[:, :20000])
    s2 = StreamingEnhancer(model, df_state)
    changed = audio.copy()
    changed[:, 20000:] = 0
    again = s2.process(changed[:, :20000])
    np.testing.assert_array_equal(first, again)
    assert first.shape[1] >= 20000 - s.latency


def test_attenuation_limit_streams(setup):
    model, df_state, audio, _, _ = setup
    out, _ = _stream(model, df_state, audio, 4096, atten=12.0)
    offline = np.array(enhance(model, df_state, audio, pad=True, atten_lim_db=12.0))
    d = df_state.fft_size() - df_state.hop_size()
    np.testing.assert_allclose(out[:, d : d + audio.shape[1]], offline, atol=ATOL)


def test_offline_calls_stay_stateless_after_streaming(setup):
    """A stream lends its states to the layers only during its own calls: offline enhance on
    the same model afterwards (twice, mid-stream too) is the plain offline result."""
    model, df_state, audio, offline, _ = setup
    s = StreamingEnhancer(model, df_state)
    s.process(audio[:, :10000])
    for _ in range(2):
        np.testing.assert_array_equal(np.array(enhance(model, df_state, audio, pad=True)), offline)
    s.process(audio[:, 10000:])
    s.flush()
    np.testing.assert_array_equal(np.array(enhance(model, df_state, audio, pad=True)), offline)


def test_two_streams_on_one_model(setup):
    """Interleaved streams keep their own states: each equals the offline result of its input."""
    model, df_state, audio, offline, _ = setup
    other = audio[::-1].copy()  # the channels swapped
    a, b = StreamingEnhancer(model, df_state), StreamingEnhancer(model, df_state)
    outs = {id(a): [], id(b): []}
    for i in range(0, audio.shape[1], 4096):
        outs[id(a)].append(a.process(audio[:, i : i + 4096]))
        outs[id(b)].append(b.process(other[:, i : i + 4096]))
    d = df_state.fft_size() - df_state.hop_size()
    for s, want in ((a, offline), (b, offline[::-1])):
        out = np.concatenate(outs[id(s)] + [s.flush()], axis=1)
        np.testing.assert_allclose(out[:, d : d + audio.shape[1]], want, atol=ATOL)


def test_long_inputs_run_in_blocks(setup, monkeypatch):
    """enhance() of an input longer than BLOCK_SECONDS streams it in blocks with the
    whole-signal result; models that cannot stream keep the whole-signal path."""
    import df_mlx.offline as enhance_module  # enhance's pipeline

    model, df_state, audio, offline, _ = setup
    calls = []
    run_blocks = enhance_module._enhance_in_blocks
    monkeypatch.setattr(enhance_module, "_enhance_in_blocks", lambda *a: calls.append(1) or run_blocks(*a))
    monkeypatch.setattr(enhance_module, "BLOCK_SECONDS", 0.3)
    np.testing.assert_allclose(np.array(enhance(model, df_state, audio)), offline, atol=ATOL)
    assert calls
    monkeypatch.setattr(enhance_module, "why_not_streamable", lambda m: "no")
    np.testing.assert_array_equal(np.array(enhance(model, df_state, audio)), offline)
    assert len(calls) == 1


def _hops(stream, audio, hop=480):
    return np.concatenate([stream.process(audio[:, i : i + hop]) for i in range(0, audio.shape[1], hop)], axis=1)


def test_compiled_hops_equal_plain_ones_and_follow_weight_updates(setup, monkeypatch):
    """Hop-sized calls replay compiled graphs (the network, then mask and deep filter): the same
    output as the plain calls, and weights changed between calls are used (the parameters are
    inputs of the graphs)."""
    import mlx.core as mx

    model, df_state, audio, _, _ = setup
    compiled, plain = StreamingEnhancer(model, df_state), StreamingEnhancer(model, df_state, compile_hops=False)
    replays, applies = [], []
    run, apply = compiled._estimate_compiled, compiled._apply_compiled
    monkeypatch.setattr(compiled, "_estimate_compiled", lambda *a: replays.append(1) or run(*a))
    monkeypatch.setattr(compiled, "_apply_compiled", lambda *a: applies.append(1) or apply(*a))
    half = audio.shape[1] // 2
    np.testing.assert_array_equal(_hops(compiled, audio[:, :half]), _hops(plain, audio[:, :half]))
    assert len(replays) > 10 and len(applies) > 10
    old = model.erb_dec.conv0_out[1].weight
    try:
        model.erb_dec.conv0_out[1].weight = old * 0.5
        a, b = _hops(compiled, audio[:, half:]), _hops(plain, audio[:, half:])
        np.testing.assert_array_equal(a, b)
        assert np.abs(a).max() > 0
    finally:
        model.erb_dec.conv0_out[1].weight = old
    mx.eval(model.parameters())


def test_bad_chunk_shape(setup):
    model, df_state, *_ = setup
    with pytest.raises(ValueError, match="chunks must be"):
        StreamingEnhancer(model, df_state).process(np.zeros(480, np.float32))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="thread affinity is Linux's")
def test_run_on_one_core_pins_every_thread_mlx_worker_included():
    code = ("import os, mlx.core as mx\n"
            "from df_mlx.streaming import run_on_one_core\n"
            "mx.eval(mx.ones(3) + 1)  # MLX's CPU stream worker runs\n"
            "cpu = run_on_one_core()\n"
            "tasks = os.listdir('/proc/self/task')\n"
            "assert len(tasks) > 1, tasks\n"
            "assert all(os.sched_getaffinity(int(t)) == {cpu} for t in tasks)\n"
            "print(float((mx.ones(3) * 2).sum()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "6.0"
