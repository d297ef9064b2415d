"""torch.nn layers that df uses, in MLX, with torch's parameter names.

The flattened MLX parameter names equal the torch `state_dict` keys. Linear and GRU tensors
keep torch's shapes. Convolutions compute channels-last (NHWC, [B, T, F, C] in DeepFilterNet)
and store their weights in MLX's layout; `TORCH_LAYOUT` tells the converters how each maps to
torch's, so a converter needs no per-model code.
"""

import contextlib
import functools
import math
import numbers
from typing import Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from loguru import logger

from df_mlx import _native, distributed


def matmul(a: mx.array, b: mx.array) -> mx.array:
    """a [..., K] @ b [K, N], or batched a [G, M, K] @ b [G, K, N]. Where MLX's own matmuls are
    left on the Linux wheel's reference BLAS (df_mlx._native.products: mlx.core imported before
    df_mlx), these run on the native op's BLAS instead, so the speed does not depend on import
    order; the gradient is MLX's matmul's."""
    if _native.products and a.size and b.size and _native.usable(a, b):
        if b.ndim == 2 and a.ndim >= 1:
            y = _native_matmul(a.reshape(-1, a.shape[-1]), b)
            return y.reshape(*a.shape[:-1], b.shape[1])
        if b.ndim == 3 and a.ndim == 3 and a.shape[0] == b.shape[0]:
            return _native_matmul(a, b)
    return a @ b


@_native.differentiable
def _native_matmul(a: mx.array, b: mx.array) -> mx.array:
    return _native.module.matmul(a, b)


@_native_matmul.vjp
def _native_matmul_vjp(primals, cotangent, _output):
    a, b = primals
    return cotangent @ b.swapaxes(-1, -2), a.swapaxes(-1, -2) @ cotangent


# Products of fewer rows than this (a streaming hop's few frames) read a transposed weight
# where it is; longer ones copy it row-major first, which measured slightly faster offline. A
# hop cannot repay the copy: a GRU(256) input weight (0.75 MB) takes ~170 us to copy, its
# 1-row product 15 us, and DFN3 copied 2 ms of weights per 10 ms hop.
COPY_WEIGHT_FROM_ROWS = 128


def _weight_operand(w: mx.array, rows: int) -> mx.array:
    """A transposed or reshaped weight as the right operand of a product of `rows` rows."""
    return w if rows < COPY_WEIGHT_FROM_ROWS else mx.contiguous(w)


def linear(x: mx.array, weight: mx.array, bias: Optional[mx.array] = None) -> mx.array:
    """torch's `F.linear` (x @ weight.T + bias) on the last axis of x [..., I] with a torch-layout
    weight [O, I] (copied as [I, O] first for long products: COPY_WEIGHT_FROM_ROWS). Short
    ones run on the native op where it can, which reads the weight as it is: no transposed
    view in the graph, one op fewer per product of a streaming hop."""
    rows = x.size // max(x.shape[-1], 1)
    if _runs_native_linear(x, weight, rows):
        y = _native_linear(x, weight)
    else:
        y = matmul(x, _weight_operand(weight.T, rows))
    return y if bias is None else y + bias


def _runs_native_linear(x: mx.array, weight: mx.array, rows: int) -> bool:
    """Whether a product of `rows` rows runs on the native linear: a short, non-empty one."""
    return 0 < rows < COPY_WEIGHT_FROM_ROWS and weight.size > 0 and _native.usable(x, weight)


@_native.differentiable
def _native_linear(x: mx.array, weight: mx.array) -> mx.array:
    return _native.module.linear(x, weight)


@_native_linear.vjp
def _native_linear_vjp(primals, cotangent, _output):
    x, weight = primals
    w = weight.reshape(weight.shape[0], x.shape[-1])
    rows = cotangent.reshape(-1, cotangent.shape[-1])
    return cotangent @ w, (rows.T @ x.reshape(-1, x.shape[-1])).reshape(weight.shape)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """`mx.softmax`; over the last axis on the native primitive where it can run: MLX's CPU
    exp is scalar, so mx.softmax is about 7x slower (DFNet4's attention). The gradient is the analytic one,
    y (g - sum(g y)), as mx.softmax's."""
    if axis in (-1, x.ndim - 1) and x.size and _native.usable(x):
        return _native_softmax(x)
    return mx.softmax(x, axis=axis)


@_native.differentiable
def _native_softmax(x: mx.array) -> mx.array:
    return _native.module.softmax(x)


@_native_softmax.vjp
def _native_softmax_vjp(primals, cotangent, output):
    return (output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True)),)


def tanh(x: mx.array) -> mx.array:
    """`mx.tanh`, on the native primitive where it can run (MLX's CPU tanh is scalar: about 7x
    slower); the gradient is the analytic one, g (1 - y^2)."""
    return _native_tanh(x) if x.size and _native.usable(x) else mx.tanh(x)


def sigmoid(x: mx.array) -> mx.array:
    """`mx.sigmoid`, on the native primitive where it can run; gradient g y (1 - y)."""
    return _native_sigmoid(x) if x.size and _native.usable(x) else mx.sigmoid(x)


@_native.differentiable
def _native_tanh(x: mx.array) -> mx.array:
    return _native.module.activation(x, 0)


@_native_tanh.vjp
def _native_tanh_vjp(primals, cotangent, output):
    return (cotangent * (1 - output * output),)


@_native.differentiable
def _native_sigmoid(x: mx.array) -> mx.array:
    return _native.module.activation(x, 1)


@_native_sigmoid.vjp
def _native_sigmoid_vjp(primals, cotangent, output):
    return (cotangent * output * (1 - output),)


class Tanh(nn.Module):
    """`torch.nn.Tanh` (mlx.nn's, on the native tanh)."""

    def __call__(self, x: mx.array) -> mx.array:
        return tanh(x)


class Sigmoid(nn.Module):
    """`torch.nn.Sigmoid` (mlx.nn's, on the native sigmoid)."""

    def __call__(self, x: mx.array) -> mx.array:
        return sigmoid(x)


def _gru_gates(xp: mx.array, hp: mx.array, h: mx.array) -> mx.array:
    """torch's GRU cell from the input and hidden projections (biases included), gate order
    r, z, n: n = tanh(x_n + r * (W_hn h + b_hn)), h' = (h - n) * z + n as torch computes it."""
    size = h.shape[-1]
    r = mx.sigmoid(xp[..., :size] + hp[..., :size])
    z = mx.sigmoid(xp[..., size : 2 * size] + hp[..., size : 2 * size])
    n = mx.tanh(xp[..., 2 * size :] + r * hp[..., 2 * size :])
    return (h - n) * z + n


@mx.compile
def _gru_step(xp: mx.array, h: mx.array, w_hh_t: mx.array, b_hh: mx.array) -> mx.array:
    """One time step: the hidden projection and the gate math compiled into one call, so the
    elementwise ops are fused and the Python loop pays one dispatch per step."""
    return _gru_gates(xp, h @ w_hh_t + b_hh, h)


def gru_scan(xp: mx.array, h: mx.array, w_hh: mx.array, b_hh: Optional[mx.array],
             reverse: bool = False) -> Tuple[mx.array, mx.array]:
    """The GRU recurrence over axis 0 of the input projection xp [T, B, 3H] (x @ W_ih.T + b_ih,
    computed for all steps at once by the caller) from h [B, H]; w_hh [3H, H] in torch layout.
    Returns (outputs [T, B, H], last hidden state [B, H]); `reverse` runs from the last step.
    The native primitive runs it where it can (df_mlx._native), else one compiled call a step."""
    if b_hh is None:  # adding an exact zero keeps a single compiled step function
        b_hh = mx.zeros((w_hh.shape[0],), dtype=xp.dtype)
    if _native.usable(xp, h, w_hh, b_hh):
        return _native_gru_scan(reverse)(xp, h, w_hh, b_hh)
    return _pure_gru_scan(xp, h, w_hh, b_hh, reverse)


def _pure_gru_scan(xp: mx.array, h: mx.array, w_hh: mx.array, b_hh: mx.array,
                   reverse: bool) -> Tuple[mx.array, mx.array]:
    w_hh_t = mx.contiguous(w_hh.T)
    return scan_steps(xp, h, lambda x_t, h_t: _gru_step(x_t, h_t, w_hh_t, b_hh), reverse)


@functools.lru_cache(maxsize=None)
def _native_gru_scan(reverse: bool):
    """The native GRU primitive as an MLX function whose gradient is the pure-MLX scan's."""

    @_native.differentiable
    def scan(xp, h, w_hh, b_hh):
        out, h_n = _native.module.gru_scan(xp, h, w_hh, b_hh, reverse)
        return out, h_n

    @scan.vjp
    def scan_vjp(primals, cotangents, _outputs):
        return tuple(mx.vjp(lambda *a: _pure_gru_scan(*a, reverse), list(primals), list(cotangents))[1])

    return scan


def scan_steps(xp: mx.array, h: mx.array, step, reverse: bool = False) -> Tuple[mx.array, mx.array]:
    """h = step(xp[t], h) over axis 0 of xp (from the last step if `reverse`); returns (every
    step's h stacked, the last h). Shared by the float and the quantized GRU."""
    steps = xp.shape[0]
    if steps == 0:
        raise ValueError("GRU input has no time steps")
    out = [None] * steps
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        h = step(xp[t], h)
        out[t] = h
    return mx.stack(out), h


def _dropout(x: mx.array, p: float) -> mx.array:
    """Inverted dropout as torch's (p = 1 gives zeros)."""
    if p >= 1:
        return mx.zeros_like(x)
    return mx.where(mx.random.bernoulli(1 - p, x.shape), x / (1 - p), mx.zeros_like(x))


class GRU(nn.Module):
    """`torch.nn.GRU`: parameters `weight_ih_l{k}` [3H, I], `weight_hh_l{k}` [3H, H],
    `bias_ih_l{k}`, `bias_hh_l{k}` [3H] (plus `_reverse` ones when bidirectional), gates r, z, n.

    Input [T, B, I] ([B, T, I] with `batch_first`, or unbatched [T, I]); h0 [L*D, B, H]
    ([L*D, H] unbatched). Returns (output [T, B, D*H] (batch_first: [B, T, D*H]), h_n like h0).
    The input projection of a layer is one matmul over all steps; only the hidden projection
    and the gate math run per step. Dropout is applied between layers in training mode only.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False):
        super().__init__()
        if not (isinstance(hidden_size, int) and hidden_size > 0):
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        if not (isinstance(num_layers, int) and num_layers > 0):
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            logger.warning(f"GRU: dropout={dropout} has no effect with num_layers=1 (dropout "
                           "acts between layers)")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        bound = 1 / math.sqrt(hidden_size)
        gates = 3 * hidden_size
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else hidden_size * self.num_directions
            for sfx in self._suffixes(layer):
                shapes = {"weight_ih": (gates, in_size), "weight_hh": (gates, hidden_size)}
                if bias:
                    shapes.update(bias_ih=(gates,), bias_hh=(gates,))
                for name, shape in shapes.items():
                    setattr(self, name + sfx, mx.random.uniform(-bound, bound, shape))

    def _suffixes(self, layer: int):
        return [f"_l{layer}", f"_l{layer}_reverse"][: self.num_directions]

    def _input_projection(self, x: mx.array, sfx: str) -> mx.array:
        """x @ W_ih.T + b_ih for every step at once (df_mlx.quantization.QuantizedGRU overrides it)."""
        return linear(x, self["weight_ih" + sfx], self.get("bias_ih" + sfx))

    def _recurrence(self, xp: mx.array, h: mx.array, sfx: str, reverse: bool) -> Tuple[mx.array, mx.array]:
        """The per-step recurrence with W_hh (QuantizedGRU overrides it)."""
        return gru_scan(xp, h, self["weight_hh" + sfx], self.get("bias_hh" + sfx), reverse=reverse)

    def _check(self, x: mx.array, h0: Optional[mx.array]) -> bool:
        """Validate shapes as torch does; returns whether the input is batched."""
        if x.ndim not in (2, 3):
            raise ValueError(f"GRU expects a 2-D (unbatched) or 3-D input, got shape {x.shape}")
        if x.shape[-1] != self.input_size:
            raise ValueError(f"GRU input has {x.shape[-1]} features, expected input_size={self.input_size}")
        batched = x.ndim == 3
        if h0 is not None:
            states = self.num_layers * self.num_directions
            if batched:
                expected = (states, x.shape[0 if self.batch_first else 1], self.hidden_size)
            else:
                expected = (states, self.hidden_size)
            if tuple(h0.shape) != expected:
                raise ValueError(f"GRU h0 has shape {tuple(h0.shape)}, expected {expected}")
        return batched

    def __call__(self, x: mx.array, h0: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
        batched = self._check(x, h0)
        if not batched:
            x, h0 = x[:, None], None if h0 is None else h0[:, None]
        elif self.batch_first:
            x = x.swapaxes(0, 1)
        stream = getattr(self, "stream", None)
        if h0 is None and stream is not None and stream.state is not None:
            h0 = stream.state
        if h0 is None:
            h0 = mx.zeros((self.num_layers * self.num_directions, x.shape[1], self.hidden_size), x.dtype)
        h_n = []
        for layer in range(self.num_layers):
            if layer > 0 and self.training and self.dropout > 0:
                x = _dropout(x, self.dropout)
            outs = []
            for d, sfx in enumerate(self._suffixes(layer)):
                xp = self._input_projection(x, sfx)
                out, h = self._recurrence(xp, h0[len(h_n)], sfx, reverse=d == 1)
                outs.append(out)
                h_n.append(h)
            x = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)
        h_n = mx.stack(h_n)
        if stream is not None:
            stream.state = h_n
        if not batched:
            return x[:, 0], h_n[:, 0]
        return (x.swapaxes(0, 1) if self.batch_first else x), h_n


_Pair = Union[int, Tuple[int, int]]


def _pair(x: _Pair) -> Tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


def _uniform(shape, fan_in: int) -> mx.array:
    """torch's default conv init bound 1/sqrt(fan_in) (kaiming_uniform with a=sqrt(5))."""
    bound = 1.0 / fan_in**0.5
    return mx.random.uniform(-bound, bound, shape)


class Conv2d(nn.Module):
    """`torch.nn.Conv2d` on NHWC input; weight [O, kH, kW, I/groups]."""

    trace_layout = "NHWC"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Pair, stride: _Pair = 1,
                 padding: _Pair = 0, dilation: _Pair = 1, groups: int = 1, bias: bool = True):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
        kh, kw = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups = groups
        fan_in = in_channels // groups * kh * kw
        self.weight = _uniform((out_channels, kh, kw, in_channels // groups), fan_in)
        if bias:
            self.bias = _uniform((out_channels,), fan_in)

    def __call__(self, x: mx.array, time_pad=(0, 0)) -> mx.array:
        """time_pad: zero rows (top, bottom) that a preceding ConstantPad2d would add."""
        y = conv2d(x, self.weight, self.stride, self.padding, self.dilation, self.groups, time_pad)
        return y + self.bias if "bias" in self else y


# Above this many kernel taps a convolution goes to mx.conv2d rather than shifted products.
_MAX_SHIFTED_TAPS = 16
# Up to this many groups a grouped convolution runs as one dense matmul with a block-diagonal
# weight (at most this factor of wasted multiplies, against one matmul per group).
_MAX_DENSE_GROUPS = 4


def conv2d(x: mx.array, w: mx.array, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
           time_pad=(0, 0)) -> mx.array:
    """`mx.conv2d` semantics (NHWC, weight [O, kH, kW, I/groups]) for DeepFilterNet's small
    kernels, after `time_pad` (top, bottom) zero rows, which the native ops add without a padded
    copy. Small kernels run on the native primitives where they can (df_mlx._native): depthwise
    ones 3-5x faster than the MLX ops of `_conv2d_mlx`, which also give their gradient, grouped
    ones without a block-diagonal weight or a copy per tap (native/grouped_conv.h). Ungrouped
    1x1 convs stay one BLAS matmul."""
    _, kh, kw, _ = w.shape
    stride, padding, dilation, time_pad = _pair(stride), _pair(padding), _pair(dilation), tuple(time_pad)
    if kh * kw <= _MAX_SHIFTED_TAPS and not (kh * kw == 1 and groups == 1) and _native.usable(x, w):
        native = _native_depthwise_conv2d if _depthwise(x, w, groups) else _native_grouped_conv2d
        return native(stride, padding, dilation, groups, time_pad)(x, w)
    return _conv2d_mlx(pad_axis(x, 1, *time_pad), w, stride, padding, dilation, groups)


def _conv_geometry(kh: int, kw: int, stride, padding, dilation, time_pad) -> tuple:
    """(kh, kw, sh, sw, dh, dw, top, bottom, left, right) of a conv after time_pad rows."""
    (ph, pw), (top, bottom) = padding, time_pad
    return (kh, kw, *stride, *dilation, ph + top, ph + bottom, pw, pw)


def _padded_conv2d_mlx(stride, padding, dilation, groups: int, time_pad):
    """`conv2d` in MLX ops for one geometry: the native convs' gradient."""
    return lambda x, w: _conv2d_mlx(pad_axis(x, 1, *time_pad), w, stride, padding, dilation, groups)


@functools.lru_cache(maxsize=None)
def _native_depthwise_conv2d(stride, padding, dilation, groups: int, time_pad=(0, 0)):
    """The native depthwise conv for one geometry, with `_conv2d_mlx`'s gradient."""

    def geometry(kh, kw):
        kh, kw, sh, sw, dh, dw, *pads = _conv_geometry(kh, kw, stride, padding, dilation, time_pad)
        return (kh, kw, sh, sw, dh, dw, 1, 1, *pads)

    return _native_depthwise(geometry, _padded_conv2d_mlx(stride, padding, dilation, groups, time_pad), flip=False)


@functools.lru_cache(maxsize=None)
def _native_grouped_conv2d(stride, padding, dilation, groups: int, time_pad=(0, 0)):
    """The native grouped conv for one geometry, with `_conv2d_mlx`'s gradient."""
    pure = _padded_conv2d_mlx(stride, padding, dilation, groups, time_pad)

    @_native.differentiable
    def conv(x, w):
        _, kh, kw, _ = w.shape
        return _native.module.grouped_conv2d(x, w, _conv_geometry(kh, kw, stride, padding, dilation, time_pad),
                                             groups)

    @conv.vjp
    def conv_vjp(primals, cotangent, _output):
        return tuple(mx.vjp(pure, list(primals), [cotangent])[1])

    return conv


def _native_depthwise(geometry, pure, flip: bool):
    """The native depthwise primitive as an MLX function of (x, w [O, kH, kW, 1]), the kernel
    flipped for a transposed conv; geometry(kH, kW) gives its geometry (native/depthwise_conv.h)
    and `pure`, the same function in MLX ops, its gradient."""

    @_native.differentiable
    def conv(x, w):
        _, kh, kw, _ = w.shape
        return _native.module.depthwise_conv2d(x, w, geometry(kh, kw), flip)

    @conv.vjp
    def conv_vjp(primals, cotangent, _output):
        return tuple(mx.vjp(pure, list(primals), [cotangent])[1])

    return conv


def _conv2d_mlx(x: mx.array, w: mx.array, stride, padding, dilation, groups: int) -> mx.array:
    """`conv2d` in MLX ops: one matmul over the kernel's taps, or one fused multiply-add over
    the taps when depthwise (MLX's CPU grouped and depthwise convolutions are 10-100x slower).
    Grouped long kernels (the scale discriminator's 41 taps) run as one batched matmul over
    groups."""
    out_ch, kh, kw, in_per_group = w.shape
    depthwise = _depthwise(x, w, groups)
    if kh * kw > _MAX_SHIFTED_TAPS and (groups == 1 or depthwise):
        return mx.conv2d(x, w, stride, padding, dilation, groups)
    x = mx.pad(x, [(0, 0), (padding[0], padding[0]), (padding[1], padding[1]), (0, 0)]) if any(padding) else x
    (sh, sw), (dh, dw) = stride, dilation
    out_hw = ((x.shape[1] - dh * (kh - 1) - 1) // sh + 1, (x.shape[2] - dw * (kw - 1) - 1) // sw + 1)
    if depthwise:
        taps = _conv_taps(x, (kh, kw), out_hw, stride, dilation)
        return _weighted_sum(w.reshape(out_ch, kh * kw).T, *taps)
    if kh * kw > _MAX_SHIFTED_TAPS:
        return _grouped_conv2d(x, w, out_hw, stride, dilation, groups)
    if groups == 1 or groups <= _MAX_DENSE_GROUPS:
        return _dense_conv2d(x, _block_diagonal(w, groups), out_hw, stride, dilation)
    out_per_group = out_ch // groups
    if in_per_group == 1:  # depthwise with several outputs per channel: output o reads input o // m
        taps = _conv_taps(mx.repeat(x, out_per_group, axis=-1), (kh, kw), out_hw, stride, dilation)
        return _weighted_sum(w.reshape(out_ch, kh * kw).T, *taps)
    return mx.concatenate([
        _dense_conv2d(x[..., g * in_per_group : (g + 1) * in_per_group],
                      w[g * out_per_group : (g + 1) * out_per_group], out_hw, stride, dilation)
        for g in range(groups)], axis=-1)


def _conv_taps(x: mx.array, kernel, out_hw, stride, dilation) -> list:
    """The input window of each kernel tap (strided views of the padded input x)."""
    (kh, kw), (h_out, w_out), (sh, sw), (dh, dw) = kernel, out_hw, stride, dilation
    return [x[:, i * dh : i * dh + (h_out - 1) * sh + 1 : sh, j * dw : j * dw + (w_out - 1) * sw + 1 : sw]
            for i in range(kh) for j in range(kw)]


@mx.compile
def _weighted_sum(w: mx.array, *taps: mx.array) -> mx.array:
    """sum_k taps[k] * w[k], compiled into one elementwise kernel."""
    y = taps[0] * w[0]
    for k in range(1, len(taps)):
        y = y + taps[k] * w[k]
    return y


def _grouped_conv2d(x: mx.array, w: mx.array, out_hw, stride, dilation, groups: int) -> mx.array:
    """Grouped convolution of the padded x [B, H, W, I] as a sum over the kernel's taps of one
    matmul batched over the groups (each tap's window [G, N, I/G] times its [G, I/G, O/G]
    weight), reading only input-sized windows: mx.conv2d takes 2-10 s per 41-tap grouped layer
    of the scale discriminator on CPU, 5-20x longer."""
    out_ch, kh, kw, in_per_group = w.shape
    b, h, w_in, _ = x.shape
    (h_out, w_out), (sh, sw), (dh, dw) = out_hw, stride, dilation
    xg = mx.contiguous(x.reshape(b, h, w_in, groups, in_per_group).transpose(3, 0, 1, 2, 4))  # [G, B, H, W, I/G]
    # split, not indexing: the gradient of one index is a zero-filled weight, once per tap
    w_taps = mx.split(w.reshape(groups, out_ch // groups, kh * kw, in_per_group).transpose(2, 0, 3, 1), kh * kw)
    y = None
    for k, (i, j) in enumerate((i, j) for i in range(kh) for j in range(kw)):
        window = xg[:, :, i * dh : i * dh + (h_out - 1) * sh + 1 : sh, j * dw : j * dw + (w_out - 1) * sw + 1 : sw]
        tap = window.reshape(groups, -1, in_per_group) @ w_taps[k][0]
        y = tap if y is None else y + tap
    return y.transpose(1, 0, 2).reshape(b, h_out, w_out, out_ch)


def _block_diagonal(w: mx.array, groups: int) -> mx.array:
    """Grouped weight [O, kH, kW, I/groups] -> the equal dense weight [O, kH, kW, I]."""
    if groups == 1:
        return w
    out_ch, kh, kw, in_per_group = w.shape
    mask = mx.eye(groups, dtype=w.dtype).reshape(groups, 1, 1, 1, groups, 1)
    blocks = w.reshape(groups, out_ch // groups, kh, kw, 1, in_per_group) * mask
    return blocks.reshape(out_ch, kh, kw, groups * in_per_group)


def _dense_conv2d(x: mx.array, w: mx.array, out_hw, stride, dilation) -> mx.array:
    """Ungrouped convolution of the padded x [B, H, W, I] with w [O, kH, kW, I] as one matmul.
    Wide outputs stack the taps' windows along channels first (im2col); narrow ones multiply
    the input once by every tap's weight and sum the shifted products, which reads the large
    input once instead of once per tap. Weights are copied contiguous for long products
    (COPY_WEIGHT_FROM_ROWS)."""
    out_ch, kh, kw, in_ch = w.shape
    b, (h_out, w_out), (sh, sw), (dh, dw) = x.shape[0], out_hw, stride, dilation
    taps = kh * kw
    if out_ch < in_ch and taps > 1 and (sh, sw) == (1, 1):
        rows = x.size // in_ch
        w_all = _weight_operand(w.transpose(3, 1, 2, 0).reshape(in_ch, taps * out_ch), rows)
        z = matmul(x.reshape(rows, in_ch), w_all).reshape(*x.shape[:3], taps * out_ch)
        parts = [z[:, i * dh : i * dh + h_out, j * dw : j * dw + w_out, k * out_ch : (k + 1) * out_ch]
                 for k, (i, j) in enumerate((i, j) for i in range(kh) for j in range(kw))]
        return _weighted_sum(mx.ones((taps,), dtype=z.dtype), *parts)
    cols = _conv_taps(x, (kh, kw), out_hw, stride, dilation)
    cols = cols[0] if taps == 1 else mx.concatenate(cols, axis=-1)  # [B, H', W', taps I]
    rows = cols.size // (taps * in_ch)
    if _runs_native_linear(cols, w, rows):
        return _native_linear(cols, w)  # w [O, kH, kW, I] read as [O, taps I]
    y = matmul(cols.reshape(rows, taps * in_ch), _weight_operand(w.reshape(out_ch, taps * in_ch).T, rows))
    return y.reshape(b, h_out, w_out, out_ch)


def conv_transpose2d(x: mx.array, w: mx.array, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                     output_padding=(0, 0), groups: int = 1) -> mx.array:
    """`mx.conv_transpose2d` semantics (NHWC, weight [O, kH, kW, I/groups]). Depthwise ones
    (DeepFilterNet's frequency upsampling) run on the native depthwise primitive with its
    inputs spread apart where it can, else as zero insertion plus the depthwise `conv2d` with
    the flipped kernel: both faster than MLX's CPU kernel (5x for the latter)."""
    _, kh, kw, _ = w.shape
    stride, padding, dilation, output_padding = map(_pair, (stride, padding, dilation, output_padding))
    if not _depthwise(x, w, groups) or min(_transposed_pads((kh, kw), padding, dilation)) < 0:
        return mx.conv_transpose2d(x, w, stride, padding, dilation, output_padding, groups)
    if kh * kw <= _MAX_SHIFTED_TAPS and _native.usable(x, w):
        return _native_depthwise_conv_transpose2d(stride, padding, dilation, output_padding, groups)(x, w)
    return _depthwise_conv_transpose2d_mlx(x, w, stride, padding, dilation, output_padding, groups)


@functools.lru_cache(maxsize=None)
def _native_depthwise_conv_transpose2d(stride, padding, dilation, output_padding, groups: int):
    """The native depthwise transposed conv for one geometry, with the MLX ops' gradient."""

    def geometry(kh, kw):
        top, left = _transposed_pads((kh, kw), padding, dilation)
        return (kh, kw, 1, 1, *dilation, *stride, top, top + output_padding[0], left, left + output_padding[1])

    return _native_depthwise(geometry, lambda x, w: _depthwise_conv_transpose2d_mlx(
        x, w, stride, padding, dilation, output_padding, groups), flip=True)


def _depthwise_conv_transpose2d_mlx(x, w, stride, padding, dilation, output_padding, groups: int) -> mx.array:
    """A depthwise transposed conv as zero insertion, padding and `_conv2d_mlx`."""
    pads = _transposed_pads(w.shape[1:3], padding, dilation)
    for axis, s in ((1, stride[0]), (2, stride[1])):
        if s > 1:
            x = _insert_zeros(x, axis, s)
    x = mx.pad(x, [(0, 0), (pads[0], pads[0] + output_padding[0]), (pads[1], pads[1] + output_padding[1]), (0, 0)])
    return _conv2d_mlx(x, w[:, ::-1, ::-1, :], (1, 1), (0, 0), dilation, groups)


def _depthwise(x: mx.array, w: mx.array, groups: int) -> bool:
    """One input and one output channel a group: weight [C, kH, kW, 1] on [..., C]."""
    out_ch, _, _, in_per_group = w.shape
    return groups == x.shape[-1] == out_ch and in_per_group == 1


def _transposed_pads(kernel, padding, dilation) -> list:
    """The padding of the zero-spread input that turns a transposed conv with this (kH, kW)
    kernel into a plain one (negative: MLX's kernel has to crop)."""
    return [d * (k - 1) - p for d, k, p in zip(dilation, kernel, padding)]


def _insert_zeros(x: mx.array, axis: int, stride: int) -> mx.array:
    """stride - 1 zeros between neighbours along `axis` (a transposed convolution's input)."""
    n = x.shape[axis]
    zeros_shape = list(x.shape)
    zeros_shape.insert(axis + 1, stride - 1)
    up = mx.concatenate([mx.expand_dims(x, axis + 1), mx.zeros(zeros_shape, x.dtype)], axis=axis + 1)
    shape = list(x.shape)
    shape[axis] = n * stride
    return up.reshape(shape)[(slice(None),) * axis + (slice(0, (n - 1) * stride + 1),)]


class ConvTranspose2d(nn.Module):
    """`torch.nn.ConvTranspose2d` on NHWC input; weight [O, kH, kW, I/groups] (torch keeps
    [I, O/groups, kH, kW])."""

    trace_layout = "NHWC"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Pair, stride: _Pair = 1,
                 padding: _Pair = 0, output_padding: _Pair = 0, groups: int = 1, bias: bool = True,
                 dilation: _Pair = 1):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
        kh, kw = _pair(kernel_size)
        self.stride, self.padding = _pair(stride), _pair(padding)
        self.output_padding, self.dilation = _pair(output_padding), _pair(dilation)
        self.groups = groups
        fan_in = out_channels // groups * kh * kw  # torch computes it from weight.size(1)
        self.weight = _uniform((out_channels, kh, kw, in_channels // groups), fan_in)
        if bias:
            self.bias = _uniform((out_channels,), fan_in)

    def __call__(self, x: mx.array) -> mx.array:
        y = conv_transpose2d(x, self.weight, self.stride, self.padding, self.dilation,
                             self.output_padding, self.groups)
        return y + self.bias if "bias" in self else y


class BatchNorm2d(nn.Module):
    """`torch.nn.BatchNorm2d` on NHWC input, with torch's buffers and update rule: batch
    statistics with the biased variance for normalising, the unbiased one for `running_var`.
    Under mlx.launch the statistics are those of every rank's batch together (SyncBatchNorm)."""

    trace_layout = "NHWC"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = mx.ones((num_features,))
        self.bias = mx.zeros((num_features,))
        self.running_mean = mx.zeros((num_features,))
        self.running_var = mx.ones((num_features,))
        self.num_batches_tracked = mx.array(0, dtype=mx.int64)
        self.freeze(keys=["running_mean", "running_var", "num_batches_tracked"], recurse=False)

    def __call__(self, x: mx.array, relu: bool = False) -> mx.array:
        """With `relu`, the ReLU that follows in a block, in the same pass over x (eval mode)."""
        if self.training:
            mean, var, n = distributed.batch_moments(x, tuple(range(x.ndim - 1)))  # over every rank's batch
            m = self.momentum
            self.running_mean = (1 - m) * self.running_mean + m * mx.stop_gradient(mean)
            self.running_var = (1 - m) * self.running_var + m * mx.stop_gradient(var) * (n / max(n - 1, 1))
            self.num_batches_tracked = self.num_batches_tracked + 1
            y = _normalize(x, mean, self.weight * mx.rsqrt(var + self.eps), self.bias)
            return nn.relu(y) if relu else y
        # eval: one multiply-add per element; MLX's kernel for x * scale + shift runs at copy
        # speed, (x - mean) * scale + bias at 60 % of it (one broadcast operand more)
        scale = self.weight * mx.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return channel_affine(x, scale, shift, relu)


@mx.compile
def _normalize(x: mx.array, mean: mx.array, scale: mx.array, bias: mx.array) -> mx.array:
    """(x - mean) * scale + bias in one pass over x (three without compiling)."""
    return (x - mean) * scale + bias


def channel_affine(x: mx.array, scale: mx.array, shift: mx.array, relu: bool = False) -> mx.array:
    """x [..., C] * scale + shift, then a ReLU with `relu`: on the native primitive where it can
    run, in one pass; else MLX's compiled x * scale + shift, then its maximum uncompiled (a
    compiled maximum whose input buffer was donated to its output ran 15x slower)."""
    if x.size and _native.usable(x, scale, shift):
        return _native_affine_op(relu)(x, scale, shift)
    y = _scale_shift(x, scale, shift)
    return nn.relu(y) if relu else y


@mx.compile
def _scale_shift(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    return x * scale + shift


@functools.lru_cache(maxsize=None)
def _native_affine_op(relu: bool):
    """The native op with its gradient, for a ReLU or none."""

    @_native.differentiable
    def affine(x, scale, shift):
        return _native.module.channel_affine(x, scale, shift, relu)

    @affine.vjp
    def affine_vjp(primals, cotangent, output):
        x, scale, _ = primals
        g = mx.where(output > 0, cotangent, 0) if relu else cotangent
        axes = tuple(range(x.ndim - 1))
        return g * scale, (g * x).sum(axes), g.sum(axes)

    return affine


# Whether a block may fold one layer into the next (a zero time pad into its conv), computing
# the block's output without the intermediate one; off inside `layer_by_layer()`.
_fold_layers = True


def folds_layers() -> bool:
    """False inside `layer_by_layer()`."""
    return _fold_layers


@contextlib.contextmanager
def layer_by_layer():
    """Run every layer by itself, so each one's own output exists (the parity tracer compares
    them one by one); the folded path gives the same block outputs (tests/test_native.py)."""
    global _fold_layers
    before, _fold_layers = _fold_layers, False
    try:
        yield
    finally:
        _fold_layers = before


class ConstantPad2d(nn.Module):
    """`torch.nn.ConstantPad2d((left, right, top, bottom))` on NHWC: left/right pad W (F),
    top/bottom pad H (T). Negative padding crops, as in torch."""

    trace_layout = "NHWC"

    def __init__(self, padding: Tuple[int, int, int, int], value: float = 0.0):
        super().__init__()
        self.padding, self.value = tuple(padding), value

    def foldable_time_pad(self) -> Optional[Tuple[int, int]]:
        """(top, bottom) when this pad only adds zero rows that the next conv can add itself
        (Conv2d's time_pad): offline, with layer folding on (`layer_by_layer` turns it off)."""
        left, right, top, bottom = self.padding
        if not folds_layers() or getattr(self, "stream", None) is not None:
            return None
        return (top, bottom) if self.value == 0 and left == right == 0 and top >= 0 and bottom >= 0 else None

    def __call__(self, x: mx.array) -> mx.array:
        left, right, top, bottom = self.padding
        x = pad_axis(x, 2, left, right, self.value)
        stream = getattr(self, "stream", None)
        if stream is None:
            return pad_axis(x, 1, top, bottom, self.value)
        # Streaming: the past frames come from the previous call instead of zeros.
        past = stream.state if stream.state is not None else pad_axis(x[:, :0], 1, top, 0, self.value)
        x = mx.concatenate([past, x], axis=1)
        stream.state = x[:, x.shape[1] - top :]
        return x


class StreamState:
    """The state one layer carries from one call to the next while streaming (`layer.stream`):
    a GRU's hidden state, a causal pad's past frames. None until the first call."""

    def __init__(self):
        self.state = None


def pad_axis(x: mx.array, axis: int, before: int, after: int, value: float = 0.0) -> mx.array:
    """Pad (positive) or crop (negative) one axis, like torch's F.pad on that axis."""
    axis = axis % x.ndim
    if before < 0 or after < 0:
        stop = x.shape[axis] + min(after, 0)
        x = x[(slice(None),) * axis + (slice(max(-before, 0), stop),)]
        before, after = max(before, 0), max(after, 0)
    if before == 0 and after == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return mx.pad(x, widths, constant_values=value)


def _conv_to_torch(w: mx.array, _module) -> mx.array:
    return w.transpose(0, 3, 1, 2)


def _conv_from_torch(w: mx.array, _module) -> mx.array:
    return w.transpose(0, 2, 3, 1)


def _convt_to_torch(w: mx.array, module: ConvTranspose2d) -> mx.array:
    o, kh, kw, i_g = w.shape
    g = module.groups
    return w.reshape(g, o // g, kh, kw, i_g).transpose(0, 4, 1, 2, 3).reshape(g * i_g, o // g, kh, kw)


def _convt_from_torch(w: mx.array, module: ConvTranspose2d) -> mx.array:
    i, o_g, kh, kw = w.shape
    g = module.groups
    return w.reshape(g, i // g, o_g, kh, kw).transpose(0, 2, 3, 4, 1).reshape(g * o_g, kh, kw, i // g)


# {layer type: {parameter name: (mlx -> torch, torch -> mlx)}}; parameters not listed are equal.
TORCH_LAYOUT = {
    Conv2d: {"weight": (_conv_to_torch, _conv_from_torch)},
    ConvTranspose2d: {"weight": (_convt_to_torch, _convt_from_torch)},
}
