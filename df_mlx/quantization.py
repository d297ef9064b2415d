"""Weight quantization of DeepFilterNet models in MLX, as the DFNet4 fork's `df.quantization`.

The fork's post-training path, `quantize_dynamic`, stores Linear, LSTM and GRU weights as int8
and leaves everything else in float. The MLX equivalent quantizes weights with `mx.quantize`
(affine, `bits` per weight, one float scale and bias per `group_size` consecutive inputs) and
multiplies with `mx.quantized_matmul`; activations stay float (torch's dynamic quantization also
rounds the activations to int8 per batch, MLX has no such kernel). Quantized here: `nn.Linear`
and `nn.Embedding` (MLX's own `to_quantized`), `df_mlx.layers.GRU` (its input and hidden
projections, `QuantizedGRU`) and `GroupedLinearEinsum` (`QuantizedGroupedLinearEinsum`), which
together hold most of DeepFilterNet3's weights. A layer whose input size is not a multiple of
`group_size` stays float. Convolutions stay float: MLX has no quantized convolution.

`get_model_size_mb` and `compare_model_sizes` count every array of the model (the fork counts
parameters and buffers, the same arrays for a float model: parity/test_fork_hardware.py checks
DFN3 and DFN4 to the byte). On a quantized model they count the packed weights, scales and
biases; the fork's torch count misses packed int8 weights (they are neither parameters nor
buffers), so quantized sizes are not comparable with the fork's.

Left out, because MLX has nothing they could honestly stand for: quantization-aware training
(`prepare_model_for_qat`, `convert_qat_model`, `QATCallback`), static quantization with
calibrated int8 activations (`quantize_static`, `QuantizedModelWrapper`, `get_qconfig`,
`QuantizationConfig` and its fbgemm/x86/qnnpack backends), module fusion for torch's int8
kernels (`fuse_modules`, `find_fusable_patterns`, `FUSABLE_MODULES`), TorchScript/ONNX export
(`export_quantized_model`) and the torch availability probe (`QUANTIZATION_AVAILABLE`,
`check_quantization_available`).
"""

import copy
import functools
from typing import Dict, Optional, Set, Type

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from loguru import logger
from mlx.utils import tree_flatten, tree_map_with_path

from df_mlx import _native
from df_mlx.layers import GRU, _gru_gates, gru_scan, scan_steps
from df_mlx.modules import GroupedLinearEinsum

# mx.quantize's affine mode: these bit widths and group sizes only.
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
DEFAULT_MODULES: Set[Type[nn.Module]] = {nn.Linear, nn.Embedding, GRU, GroupedLinearEinsum}


class QuantizationError(ValueError):
    """Unsupported bits, group size or module type."""


@functools.lru_cache(maxsize=None)
def _quantized_gru_step(group_size: int, bits: int):
    """df_mlx.layers._gru_step with the hidden projection as a quantized matmul, compiled once
    per (group_size, bits)."""

    def step(xp, h, w, scales, biases, b_hh):
        hp = mx.quantized_matmul(h, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
        return _gru_gates(xp, hp + b_hh, h)

    return mx.compile(step)


class QuantizedGRU(GRU):
    """A GRU whose `weight_ih_*`, `weight_hh_*` are packed (with `<name>_scales`,
    `<name>_biases`); biases stay float. Same inputs, outputs and streaming state as GRU."""

    def __init__(self, gru: GRU, group_size: int, bits: int):
        super().__init__(gru.input_size, gru.hidden_size, gru.num_layers, gru.bias, gru.batch_first,
                         gru.dropout, gru.bidirectional)
        self.group_size, self.bits = group_size, bits
        for layer in range(gru.num_layers):
            for sfx in gru._suffixes(layer):
                for kind in ("weight_ih", "weight_hh"):
                    self[kind + sfx], self[kind + sfx + "_scales"], self[kind + sfx + "_biases"] = mx.quantize(
                        gru[kind + sfx], group_size=group_size, bits=bits)
                if gru.bias:
                    self["bias_ih" + sfx], self["bias_hh" + sfx] = gru["bias_ih" + sfx], gru["bias_hh" + sfx]
        self.freeze()
        self.train(gru.training)

    def _qmatmul(self, x: mx.array, name: str) -> mx.array:
        return mx.quantized_matmul(x, self[name], self[name + "_scales"], self[name + "_biases"], transpose=True,
                                   group_size=self.group_size, bits=self.bits)

    def _input_projection(self, x: mx.array, sfx: str) -> mx.array:
        xp = self._qmatmul(x, "weight_ih" + sfx)
        return xp + self["bias_ih" + sfx] if self.bias else xp

    def _recurrence(self, xp: mx.array, h: mx.array, sfx: str, reverse: bool):
        name = "weight_hh" + sfx
        w, scales, biases = self[name], self[name + "_scales"], self[name + "_biases"]
        b_hh = self["bias_hh" + sfx] if self.bias else mx.zeros((3 * self.hidden_size,), dtype=xp.dtype)
        if _native.usable(xp, h, scales, b_hh):  # the native scan on the dequantized weight: same products
            return gru_scan(xp, h, mx.dequantize(w, scales, biases, self.group_size, self.bits), b_hh, reverse)
        step = _quantized_gru_step(self.group_size, self.bits)
        return scan_steps(xp, h, lambda x_t, h_t: step(x_t, h_t, w, scales, biases, b_hh), reverse)


class QuantizedGroupedLinearEinsum(nn.Module):
    """GroupedLinearEinsum with its per-group weights packed as [G, H/G, I/G] (grouped along I/G)."""

    def __init__(self, layer: GroupedLinearEinsum, group_size: int, bits: int):
        super().__init__()
        self.input_size, self.hidden_size, self.groups, self.ws = (layer.input_size, layer.hidden_size,
                                                                   layer.groups, layer.ws)
        self.group_size, self.bits = group_size, bits
        self.weight, self.scales, self.biases = mx.quantize(layer.weight.swapaxes(1, 2), group_size=group_size,
                                                               bits=bits)
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        b, t, _ = x.shape
        x = x.reshape(b * t, self.groups, self.ws).swapaxes(0, 1)  # [G, B*T, I/G]
        y = mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True,
                                group_size=self.group_size, bits=self.bits)
        return y.swapaxes(0, 1).reshape(b, t, -1)


def _input_sizes(module: nn.Module):
    """The sizes that the quantization groups run along (one per weight)."""
    if isinstance(module, GRU):
        return [module.input_size if layer == 0 else module.hidden_size * module.num_directions
                for layer in range(module.num_layers)] + [module.hidden_size]
    if isinstance(module, GroupedLinearEinsum):
        return [module.ws]
    return [module.weight.shape[-1]]


def _quantized(module: nn.Module, group_size: int, bits: int) -> nn.Module:
    if isinstance(module, GRU):
        return QuantizedGRU(module, group_size, bits)
    if isinstance(module, GroupedLinearEinsum):
        return QuantizedGroupedLinearEinsum(module, group_size, bits)
    return module.to_quantized(group_size=group_size, bits=bits)


def quantize_dynamic(model: nn.Module, bits: int = 8, group_size: int = 64,
                     modules_to_quantize: Optional[Set[Type[nn.Module]]] = None, inplace: bool = False) -> nn.Module:
    """Weight-quantize every layer of the `modules_to_quantize` types (default: Linear,
    Embedding, GRU, GroupedLinearEinsum) whose input size is a multiple of `group_size`; the
    model is switched to eval mode. Returns the quantized model (a copy unless `inplace`)."""
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"bits={bits} is not supported by mx.quantize (use one of {SUPPORTED_BITS})")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise QuantizationError(f"group_size={group_size} is not supported by mx.quantize "
                                f"(use one of {SUPPORTED_GROUP_SIZES})")
    types = tuple(DEFAULT_MODULES if modules_to_quantize is None else modules_to_quantize)
    unknown = [t.__name__ for t in types if not any(issubclass(t, k) for k in DEFAULT_MODULES)]
    if unknown:
        raise QuantizationError(f"cannot quantize {', '.join(unknown)} (supported: "
                                f"{', '.join(sorted(k.__name__ for k in DEFAULT_MODULES))})")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    counts = {"quantized": 0, "kept float": 0}

    def swap(path: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, types) or isinstance(module, QuantizedGRU):
            return module
        if any(size % group_size for size in _input_sizes(module)):
            logger.debug(f"{path}: input size not a multiple of group_size={group_size}, kept float")
            counts["kept float"] += 1
            return module
        counts["quantized"] += 1
        return _quantized(module, group_size, bits)

    if model.children():
        model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    else:  # a single layer: update_modules cannot replace the root
        model = swap("", model)
    logger.info(f"Quantized {counts['quantized']} layers to {bits} bits (group size {group_size}), "
                f"{counts['kept float']} kept float")
    return model


def get_model_size_mb(model: nn.Module) -> float:
    """Bytes of every array the model holds (weights, packed weights, scales, statistics), in MiB."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1024 / 1024


def compare_model_sizes(original: nn.Module, quantized: nn.Module) -> Dict[str, float]:
    """Sizes in MiB, their ratio and the reduction in percent (the fork's keys)."""
    original_size = get_model_size_mb(original)
    quantized_size = get_model_size_mb(quantized)
    return {
        "original_mb": original_size,
        "quantized_mb": quantized_size,
        "compression_ratio": original_size / quantized_size if quantized_size > 0 else 0,
        "size_reduction_pct": (1 - quantized_size / original_size) * 100 if original_size > 0 else 0,
    }


def compare_outputs(reference, other) -> Dict[str, float]:
    """How far `other` (e.g. a quantized model's enhanced audio) is from `reference`: SNR in dB
    (reference power over error power) and the largest absolute error. Not in the fork."""
    ref, out = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if ref.shape != out.shape:
        raise QuantizationError(f"outputs differ in shape: {ref.shape} vs {out.shape}")
    err = np.sum((ref - out) ** 2)
    snr = float("inf") if err == 0 else 10 * np.log10(np.sum(ref**2) / err)
    return {"snr_db": float(snr), "max_abs_error": float(np.max(np.abs(ref - out), initial=0.0))}
