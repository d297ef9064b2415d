"""df_mlx.quantization: the quantized layers compute exactly what float layers with the
round-tripped (quantized, then dequantized) weights compute; the pretrained DFN3 shrinks by the
expected bytes and its enhanced audio stays close to the float model's; bad arguments fail."""

import copy
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from df_mlx import quantization as q
from df_mlx.enhance import enhance, init_df
from df_mlx.io import load_audio
from df_mlx.layers import GRU
from df_mlx.modules import GroupedLinearEinsum
from df_mlx.streaming import StreamingEnhancer

DATA = os.path.join(os.path.dirname(__file__), "data")
# A quantized matmul against a float matmul with the dequantized weight: MLX's CPU backend
# dequantizes and runs the same GEMM (measured error exactly 0 for layers and the whole model);
# its Metal and CUDA kernels sum the same products in another order, so allow float32 rounding
# on O(1) outputs (layers) and through the recurrences of the whole enhancement (model).
LAYER_ATOL = 1e-5
MODEL_ATOL = 5e-5
# Enhanced audio of the quantized DFN3 against the float DFN3 (3 s, speech at 5 dB SNR), SNR of
# float over difference: measured 49.8 dB at 8 bits / group 64 (the defaults), 14.1 dB at 4 bits
# / group 64 and 20.9 dB at 4 bits / group 32; the bounds leave 10, 4 and 5 dB for other audio
# and BLAS builds.
MIN_SNR_DB = {(8, 64): 40.0, (4, 64): 10.0, (4, 32): 15.0}
# Streaming against offline runs the same frames in other blocks: measured 0 here, tests/test_streaming.py
# allows 2e-6 for matmul blocking and FFT sizes; the quantized model adds no rounding of its own.
STREAM_ATOL = 2e-6


def dequantized(w, scales, biases, module):
    return mx.dequantize(w, scales, biases, group_size=module.group_size, bits=module.bits)


def float_twin(original: nn.Module, quantized: nn.Module) -> nn.Module:
    """`original` with every weight that `quantized` holds packed replaced by its dequantized value."""
    twin = copy.deepcopy(original)
    floats = dict(twin.named_modules())
    for path, m in quantized.named_modules():
        if isinstance(m, q.QuantizedGRU):
            for name in [k for k in m if k.startswith("weight_") and not k.endswith(("_scales", "_biases"))]:
                floats[path][name] = dequantized(m[name], m[name + "_scales"], m[name + "_biases"], m)
        elif isinstance(m, q.QuantizedGroupedLinearEinsum):
            floats[path].weight = dequantized(m.weight, m.scales, m.biases, m).swapaxes(1, 2)
        elif isinstance(m, nn.QuantizedLinear):
            floats[path].weight = dequantized(m.weight, m.scales, m.biases, m)
    return twin


@pytest.mark.parametrize("kw", [dict(num_layers=2), dict(bidirectional=True), dict(bias=False, batch_first=True)])
@pytest.mark.usefixtures("recurrence_path")  # the native scan runs on the dequantized weight
def test_quantized_gru(kw):
    mx.random.seed(1)
    gru = GRU(64, 64, **kw)
    qgru = q.quantize_dynamic(gru, bits=4, group_size=32)
    assert isinstance(qgru, q.QuantizedGRU) and not isinstance(gru, q.QuantizedGRU)
    x = mx.random.normal((3, 12, 64))
    h0 = mx.random.normal((gru.num_layers * gru.num_directions, 12 if not gru.batch_first else 3, 64))
    out, h = qgru(x, h0)
    ref_out, ref_h = float_twin(gru, qgru)(x, h0)
    assert mx.abs(out - ref_out).max().item() < LAYER_ATOL
    assert mx.abs(h - ref_h).max().item() < LAYER_ATOL
    assert mx.abs(out - gru(x, h0)[0]).max().item() > 1e-3  # 4 bits do change the output


def test_quantized_grouped_linear():
    mx.random.seed(2)
    model = nn.Sequential(GroupedLinearEinsum(256, 64, groups=4), nn.Linear(64, 8))
    qmodel = q.quantize_dynamic(model, bits=8, group_size=64)
    assert isinstance(qmodel.layers[0], q.QuantizedGroupedLinearEinsum)
    assert isinstance(qmodel.layers[1], nn.QuantizedLinear)
    x = mx.random.normal((2, 5, 256))
    assert mx.abs(qmodel(x) - float_twin(model, qmodel)(x)).max().item() < LAYER_ATOL


def test_group_size_must_divide_the_inputs():
    """GroupedLinearEinsum with 32 inputs per group stays float at group size 64."""
    layer = q.quantize_dynamic(GroupedLinearEinsum(64, 64, groups=2), group_size=64)
    assert isinstance(layer, GroupedLinearEinsum)


@pytest.mark.parametrize("kw,match", [(dict(bits=7), "bits=7"), (dict(group_size=16), "group_size=16"),
                                      (dict(modules_to_quantize={nn.Conv2d}), "Conv2d")])
def test_bad_arguments(kw, match):
    with pytest.raises(q.QuantizationError, match=match):
        q.quantize_dynamic(nn.Linear(64, 4), **kw)


def test_compare_outputs_shape_mismatch():
    with pytest.raises(q.QuantizationError, match="shape"):
        q.compare_outputs(np.zeros(3), np.zeros(4))


@pytest.fixture(scope="module")
def dfn3():
    model, df_state, _ = init_df()
    speech, _ = load_audio(os.path.join(DATA, "speech_espeak_48k.wav"), sr=df_state.sr())
    noise, _ = load_audio(os.path.join(DATA, "noise_freesound_573577.wav"), sr=df_state.sr())
    n = 3 * df_state.sr()
    s, v = np.asarray(speech)[:, :n], np.asarray(noise)[:, :n]
    noisy = mx.array(s + v * np.sqrt((s**2).mean() / (v**2).mean()) * 10 ** (-5 / 20))  # 5 dB SNR
    return model, df_state, noisy, np.asarray(enhance(model, df_state, noisy))


def quantized_weight_bytes(quantized: nn.Module, bits: int, group_size: int):
    """(float bytes, quantized bytes) of the weights `quantized` holds packed: bits per weight
    plus a float32 scale and bias per group."""
    n = 0
    for path, m in quantized.named_modules():
        if isinstance(m, (q.QuantizedGRU, q.QuantizedGroupedLinearEinsum, nn.QuantizedLinear)):
            n += sum(v.size for k, v in tree_flatten(m.parameters()) if k.endswith("scales")) * group_size
    return 4 * n, n * bits // 8 + 2 * 4 * n // group_size


@pytest.mark.parametrize("bits,group_size", sorted(MIN_SNR_DB))
def test_pretrained_dfn3(dfn3, bits, group_size):
    model, df_state, noisy, ref = dfn3
    before = q.get_model_size_mb(model)
    qmodel = q.quantize_dynamic(model, bits=bits, group_size=group_size)
    assert q.get_model_size_mb(model) == before  # the original is left alone
    sizes = q.compare_model_sizes(model, qmodel)
    float_bytes, packed_bytes = quantized_weight_bytes(qmodel, bits, group_size)
    assert float_bytes > 0.7 * before * 2**20  # the GRUs and grouped linears hold most weights
    assert sizes["quantized_mb"] * 2**20 == before * 2**20 - float_bytes + packed_bytes
    out = np.asarray(enhance(qmodel, df_state, noisy))
    twin = np.asarray(enhance(float_twin(model, qmodel), df_state, noisy))
    err = q.compare_outputs(ref, out)
    print(f"{bits} bits, group {group_size}: {sizes['original_mb'] * 2**20:.0f} -> "
          f"{sizes['quantized_mb'] * 2**20:.0f} bytes (x{sizes['compression_ratio']:.2f}), "
          f"enhanced SNR vs float {err['snr_db']:.1f} dB, max error {err['max_abs_error']:.2e}, "
          f"vs dequantized float {np.abs(out - twin).max():.1e}")
    assert np.abs(out - twin).max() < MODEL_ATOL
    assert err["snr_db"] > MIN_SNR_DB[bits, group_size]


def test_quantized_dfn3_streams(dfn3):
    """StreamingEnhancer carries a QuantizedGRU's state across chunks like a GRU's: streaming
    the quantized model gives its offline result, delayed by fft_size - hop_size samples."""
    model, df_state, noisy, _ = dfn3
    qmodel = q.quantize_dynamic(model, bits=8, group_size=64)
    audio = np.asarray(noisy)[:, : df_state.sr()]
    offline = np.asarray(enhance(qmodel, df_state, mx.array(audio)))
    stream = StreamingEnhancer(qmodel, df_state)
    out = np.concatenate([stream.process(audio[:, i : i + 4800]) for i in range(0, audio.shape[1], 4800)]
                         + [stream.flush()], axis=1)
    d = df_state.fft_size() - df_state.hop_size()
    np.testing.assert_allclose(out[:, d : d + audio.shape[1]], offline, atol=STREAM_ATOL)


def test_quantized_weights_round_trip(tmp_path):
    """A quantized model saves as safetensors and loads (strictly) into the same model
    quantized again, with the same output."""
    mx.random.seed(3)
    qgru = q.quantize_dynamic(GRU(64, 64, num_layers=2), bits=4, group_size=64)
    qgru.save_weights(str(tmp_path / "q.safetensors"))
    other = q.quantize_dynamic(GRU(64, 64, num_layers=2), bits=4, group_size=64)
    other.load_weights(str(tmp_path / "q.safetensors"))
    x = mx.random.normal((2, 7, 64))
    assert mx.array_equal(qgru(x)[0], other(x)[0])
