"""Mamba selective state-space layers in MLX, mirroring the DFNet4 fork's `df.mamba`
(`sealad886/DeepFilterNet4`, a pure-PyTorch Mamba with a sequential selective scan).

Same classes, constructor arguments, parameter names (flattened names equal the fork's torch
`state_dict` keys: `in_proj.weight`, `conv1d.weight` [D, 1, K], `x_proj.weight`,
`dt_proj.{weight,bias}`, `A_log`, `D`, `out_proj.weight`) and shapes, so a fork checkpoint
loads without per-parameter code. Sequences are [B, L, D] as in the fork.

The selective scan runs the recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,
y_t = <h_t, C_t> one step at a time (as the fork), each step a compiled function of that
step's inputs, so memory stays O(B D N) per step instead of materialising [B, L, D, N].
`selective_scan` takes and returns the state, for streaming. On the CPU the whole scan is one
native primitive where it is built (df_mlx._native; same op order and exp, gradients from the
pure-MLX steps).
"""

import math
from typing import Callable, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from df_mlx import _native
from df_mlx.layers import conv2d
from df_mlx.modules import GroupedLinearEinsum, Identity, Sequential

# torch's F.softplus switches to the identity above this input (beta = 1).
SOFTPLUS_THRESHOLD = 20.0


def softplus(x: mx.array, beta: float = 1.0, threshold: float = SOFTPLUS_THRESHOLD) -> mx.array:
    """torch's `F.softplus`: log(1 + exp(beta x)) / beta, and x where beta x > threshold. The
    exponential sees at most `threshold`, so neither branch nor its gradient overflows."""
    bx = x * beta
    soft = mx.log1p(mx.exp(mx.minimum(bx, threshold))) / beta
    return mx.where(bx > threshold, x, soft)


def _init_A_log(d_inner: int, d_state: int) -> mx.array:
    """A = -exp(A_log) initialised to -[1, 2, ..., N] for every channel (S4D-real), [D, N]."""
    a = mx.arange(1, d_state + 1, dtype=mx.float32)
    return mx.log(mx.broadcast_to(a[None], (d_inner, d_state)))


def _init_dt_bias(d_inner: int, dt_min: float = 0.001, dt_max: float = 0.1) -> mx.array:
    """A bias whose softplus is log-uniform in [dt_min, dt_max] (floored at 1e-4): the inverse
    softplus dt + log(-expm1(-dt))."""
    log_min, log_max = math.log(dt_min), math.log(dt_max)
    dt = mx.maximum(mx.exp(mx.random.uniform(shape=(d_inner,)) * (log_max - log_min) + log_min), 1e-4)
    return dt + mx.log(-mx.expm1(-dt))


class Conv1d(nn.Module):
    """`torch.nn.Conv1d` (zero padding) on torch's layout: input [B, C, L] (or unbatched
    [C, L]), weight [O, I/groups, K] stored as torch stores it, so no layout conversion is
    needed. Computed by `layers.conv2d` as a convolution of width 1 (MLX's CPU grouped
    convolutions are slow)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.groups = groups
        bound = 1 / math.sqrt(in_channels // groups * kernel_size)  # torch's default init bound
        self.weight = mx.random.uniform(-bound, bound, (out_channels, in_channels // groups, kernel_size))
        if bias:
            self.bias = mx.random.uniform(-bound, bound, (out_channels,))

    def __call__(self, x: mx.array) -> mx.array:
        if x.ndim not in (2, 3) or x.shape[-2] != self.in_channels:
            raise ValueError(f"Conv1d expects [B, {self.in_channels}, L] or [{self.in_channels}, L], got {x.shape}")
        unbatched = x.ndim == 2
        x = (x[None] if unbatched else x).swapaxes(1, 2)  # [B, L, C]
        k, s, d, p = self.kernel_size, self.stride, self.dilation, self.padding
        if (x.shape[1] + 2 * p - d * (k - 1) - 1) // s + 1 < 1:
            raise ValueError(f"Conv1d input of length {x.shape[1]} is shorter than the kernel")
        # [B, L, C] -> [B, L, 1, C]; weight [O, I, K] -> [O, K, 1, I]
        y = conv2d(x[:, :, None, :], self.weight.swapaxes(1, 2)[:, :, None, :], (s, 1), (p, 0), (d, 1),
                   self.groups)[:, :, 0, :]
        if "bias" in self:
            y = y + self.bias
        y = y.swapaxes(1, 2)
        return y[0] if unbatched else y


# expf as Cephes computes it: Cody-Waite reduction by ln 2 in two parts, a degree-6 polynomial,
# and 2^n built in the exponent bits.
_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_EXP_RANGE = (-86.64, 88.72283)  # 2^(n-1) stays a normal float32; the top is float32's max
# 1.5 * 2^23: adding it rounds to an integer n held in the low mantissa bits (bits 0x4B400000 + n),
# which needs no floor: MLX's compiled CPU kernels call floorf per element.
_ROUND = 12582912.0
_ROUND_BITS = 0x4B400000


def _exp(x: mx.array) -> mx.array:
    """exp for float32, within 1 ulp of torch's; compiled into the scan step it makes the step
    1.5x faster than `mx.exp`, whose Linux CPU kernel is scalar and up to 16 ulp off. Outside
    [-86.64, 88.72] it returns the value at the nearer end (2.4e-38, 3.4e38) instead of
    smaller numbers or inf; the scan only takes exp of dt A <= 0."""
    x = mx.clip(x, *_EXP_RANGE)
    shifted = mx.stop_gradient(x * _LOG2E + _ROUND)  # n is piecewise constant in x
    n = shifted - _ROUND
    r = x - n * _LN2_HI - n * _LN2_LO
    p = _EXP_POLY[0]
    for coef in _EXP_POLY[1:]:
        p = p * r + coef
    # 2^(n-1) from n's bits (`view` has no gradient in MLX, none is needed)
    n_bits = mx.view(shifted, mx.int32) - _ROUND_BITS
    half_two_n = mx.view(mx.left_shift(n_bits + 126, 23), mx.float32)
    return (p * r * r + r + 1.0) * half_two_n * 2.0


@mx.compile
def _scan_step(h: mx.array, dt: mx.array, x: mx.array, b: mx.array, c: mx.array, a: mx.array):
    """One selective-scan step, in the fork's op order: exp(dt A) h + (dt B) x, then <h, C>.
    h [B, D, N]; dt, x [B, D]; b, c [B, N]; a [D, N]."""
    dt = dt[..., None]
    h = _exp(dt * a) * h + (dt * b[:, None, :]) * x[..., None]
    return h, (h * c[:, None, :]).sum(-1)


def selective_scan(x: mx.array, delta: mx.array, A: mx.array, B: mx.array, C: mx.array,
                   h0: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
    """y_t = <h_t, C_t> with h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t, from h0 (zeros).

    x, delta [B, L, D]; A [D, N]; B, C [B, L, N]; h0 [B, D, N]. Returns (y [B, L, D], h_L)."""
    batch, length, d_inner = x.shape
    if length == 0:
        raise ValueError("selective_scan needs at least one time step")
    h = mx.zeros((batch, d_inner, A.shape[1]), dtype=x.dtype) if h0 is None else h0
    if _native.usable(x, delta, A, B, C, h):
        return _native_scan(x, delta, A, B, C, h)
    return _pure_scan(x, delta, A, B, C, h)


def _pure_scan(x: mx.array, delta: mx.array, A: mx.array, B: mx.array, C: mx.array,
               h: mx.array) -> Tuple[mx.array, mx.array]:
    x_t, dt_t, b_t, c_t = (v.swapaxes(0, 1) for v in (x, delta, B, C))
    ys = []
    for i in range(x.shape[1]):
        h, y = _scan_step(h, dt_t[i], x_t[i], b_t[i], c_t[i], A)
        ys.append(y)
    return mx.stack(ys, axis=1), h


@_native.differentiable
def _native_scan(x, delta, A, B, C, h0):
    """The native scan primitive, with the pure-MLX scan's gradient."""
    y, h = _native.module.selective_scan(x, delta, A, B, C, h0)
    return y, h


@_native_scan.vjp
def _native_scan_vjp(primals, cotangents, _outputs):
    return tuple(mx.vjp(_pure_scan, list(primals), list(cotangents))[1])


class MambaBlock(nn.Module):
    """Selective state-space block: in_proj to (x, z); causal depthwise conv + SiLU on x;
    input-dependent (dt, B, C) from x_proj, dt through dt_proj and softplus; selective scan
    with A = -exp(A_log); + D x; gated by SiLU(z); out_proj. [B, L, d_model] -> same."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Union[int, str] = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        bias: bool = False,
        conv_bias: bool = True,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.conv1d = Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, padding=d_conv - 1, groups=self.d_inner,
                             bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + d_state * 2, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            self.dt_proj.weight = mx.full(self.dt_proj.weight.shape, dt_init_std)
        elif dt_init == "random":
            self.dt_proj.weight = mx.random.uniform(-dt_init_std, dt_init_std, self.dt_proj.weight.shape)
        self.dt_proj.bias = _init_dt_bias(self.d_inner, dt_min, dt_max)
        self.A_log = _init_A_log(self.d_inner, d_state)
        self.D = mx.ones((self.d_inner,))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        y, _ = self.forward_with_state(x)
        return y

    def forward_with_state(self, x: mx.array, h0: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
        """The block from SSM state h0 [B, d_inner, d_state] (zeros); returns (y, last state).
        The convolution starts from zeros on every call."""
        length = x.shape[1]
        x_in, z = mx.split(self.in_proj(x), 2, axis=-1)
        x_conv = nn.silu(self.conv1d(x_in.swapaxes(1, 2))[:, :, :length].swapaxes(1, 2))
        ssm = self.x_proj(x_conv)
        delta = ssm[..., : self.dt_rank]
        B = ssm[..., self.dt_rank : self.dt_rank + self.d_state]
        C = ssm[..., self.dt_rank + self.d_state :]
        delta = softplus(self.dt_proj(delta))
        A = -mx.exp(self.A_log.astype(mx.float32))
        y, h = selective_scan(x_conv, delta, A, B, C, h0)
        y = y + x_conv * self.D
        y = y * nn.silu(z)
        return self.out_proj(y), h


class Mamba(nn.Module):
    """Pre-norm residual Mamba layer: x + MambaBlock(LayerNorm(x)), [B, L, d_model]."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, **kwargs):
        super().__init__()
        self.d_model = d_model
        self.norm = nn.LayerNorm(d_model)
        self.mamba = MambaBlock(d_model, d_state, d_conv, expand, **kwargs)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.mamba(self.norm(x))


def _linear_act(input_size: int, output_size: int, groups: int, act_layer: Callable[..., nn.Module]) -> Sequential:
    if groups > 1:
        return Sequential(GroupedLinearEinsum(input_size, output_size, groups), act_layer())
    return Sequential(nn.Linear(input_size, output_size), act_layer())


class SqueezedMamba(nn.Module):
    """Drop-in for `SqueezedGRU_S`: linear (grouped when linear_groups > 1) + act in, stacked
    Mamba layers, linear + act out (identity without output_size), optional skip of the block
    input added at the end. Returns (output, zeros [1, B, hidden_size]) like the GRU's state."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: Optional[int] = None,
        num_layers: int = 1,
        batch_first: bool = True,
        gru_skip_op: Optional[Callable[..., nn.Module]] = None,
        linear_groups: int = 1,
        linear_act_layer: Callable[..., nn.Module] = Identity,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
    ):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = output_size if output_size is not None else hidden_size
        self.batch_first = batch_first
        self.linear_in = _linear_act(input_size, hidden_size, linear_groups, linear_act_layer)
        self.mamba_layers = [Mamba(hidden_size, d_state, d_conv, expand) for _ in range(num_layers)]
        self.gru_skip = gru_skip_op() if gru_skip_op is not None else None
        if output_size is not None:
            self.linear_out = _linear_act(hidden_size, self.output_size, linear_groups, linear_act_layer)
        else:
            self.linear_out = Identity()

    def __call__(self, input: mx.array, h: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
        """`h` is ignored (GRU API compatibility), as in the fork."""
        if not self.batch_first:
            input = input.swapaxes(0, 1)
        x = self.linear_in(input)
        for layer in self.mamba_layers:
            x = layer(x)
        x = self.linear_out(x)
        if self.gru_skip is not None:
            x = x + self.gru_skip(input)
        if not self.batch_first:
            x = x.swapaxes(0, 1)
        return x, mx.zeros((1, input.shape[0], self.hidden_size), dtype=input.dtype)


class BidirectionalMamba(nn.Module):
    """A forward and a time-reversed Mamba layer, merged by "concat" ([B, L, 2D]), "add" or
    "proj" (a linear 2D -> D)."""

    def __init__(self, d_model: int, merge: str = "concat", **kwargs):
        super().__init__()
        if merge not in ("concat", "add", "proj"):
            raise ValueError(f"Unknown merge mode: {merge} (concat, add or proj)")
        self.d_model = d_model
        self.merge = merge
        self.forward_mamba = Mamba(d_model, **kwargs)
        self.backward_mamba = Mamba(d_model, **kwargs)
        self.out_proj = nn.Linear(d_model * 2, d_model) if merge == "proj" else None

    def __call__(self, x: mx.array) -> mx.array:
        y_fwd = self.forward_mamba(x)
        y_bwd = self.backward_mamba(x[:, ::-1])[:, ::-1]
        if self.merge == "add":
            return y_fwd + y_bwd
        y = mx.concatenate([y_fwd, y_bwd], axis=-1)
        return self.out_proj(y) if self.merge == "proj" else y
