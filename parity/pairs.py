"""Run one torch module and its MLX twin on the same inputs and weights; compare outputs,
every traced sub-module, and gradients (inputs and parameters)."""

from typing import Callable, Dict, Optional, Sequence

import mlx.core as mx
import numpy as np

from converters.layout import load_torch_state_dict, mlx_state_dict
from parity.report import Report, Tolerance, compare, compare_traces
from parity.tracer import trace_mlx, trace_torch


def state_dict_numpy(torch_module) -> Dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in torch_module.state_dict().items()}


def randomize_norm_stats(torch_module, seed: int = 0):
    """Give every BatchNorm non-trivial affine parameters and running statistics, so that
    eval-mode normalisation is actually exercised."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for m in torch_module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return torch_module


def before_batchnorm(names) -> set:
    """Parameters of a module whose next sibling is a BatchNorm (`X.k.*` with `X.(k+1).running_mean`),
    and the BatchNorm's own affine parameters. In training mode their gradients cancel: the
    weight's gradient sum(g * x_hat) sums terms whose x_hat is zero-mean over the batch, and the
    conv before it feeds a batch-mean subtraction; float32 rounding is amplified there."""
    out = set()
    for name in names:
        parts = name.split(".")
        if len(parts) >= 3 and parts[-2].isdigit():
            sibling = ".".join(parts[:-2] + [str(int(parts[-2]) + 1), "running_mean"])
            if sibling in names or ".".join(parts[:-1] + ["running_mean"]) in names:
                out.add(name)
    return out


def twin(torch_module, mlx_module, train: bool = False):
    """Copy the torch weights into the MLX module (strict) and set both modes."""
    load_torch_state_dict(mlx_module, state_dict_numpy(torch_module))
    torch_module.train(train)
    mlx_module.train(train)
    return torch_module, mlx_module


def _to_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def pair_report(
    title: str,
    torch_module,
    mlx_module,
    inputs: Sequence[np.ndarray],
    tol: Tolerance,
    to_mlx: Optional[Sequence[Callable]] = None,
    out_to_torch: Optional[Sequence[Callable]] = None,
    grads: bool = True,
    reference: str = "torch",
    seed: int = 0,
    grad_tol: Optional[Tolerance] = None,
    grad_inputs: Optional[Sequence[int]] = None,
) -> Report:
    """Outputs, traced sub-modules and (with `grads`) gradients of sum(out_i * w_i) with
    respect to the inputs (`grad_inputs`, default all float ones) and all trainable parameters.
    `to_mlx[i]` maps input i to the MLX module's layout (e.g. NCHW -> NHWC); `out_to_torch[i]`
    maps MLX output i back."""
    import torch

    to_mlx = to_mlx or [None] * len(inputs)
    float_idx = [i for i, x in enumerate(inputs) if x.dtype.kind == "f" and (grad_inputs is None or i in grad_inputs)]
    t_inputs = [torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(grads and i in float_idx)
                for i, x in enumerate(inputs)]
    m_inputs = [mx.array(f(x) if f else x) for x, f in zip(inputs, to_mlx)]

    report = Report(title, reference)
    with trace_torch(torch_module) as ref_trace:
        t_out = _to_tuple(torch_module(*t_inputs))
    with trace_mlx(mlx_module) as mlx_trace:
        m_out = _to_tuple(mlx_module(*m_inputs))
    back = out_to_torch or [None] * len(m_out)
    m_out_np = [np.array(f(o) if f else o) for o, f in zip(m_out, back)]
    compare_traces(report, mlx_trace, ref_trace, tol)  # execution order: first divergence first
    for i, (mo, to) in enumerate(zip(m_out_np, t_out)):
        report.add(compare(f"output.{i}", mo, to, tol))
    if not grads:
        return report

    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal(o.shape).astype(np.float32) for o in m_out_np]
    t_loss = sum((o * torch.from_numpy(w)).sum() for o, w in zip(t_out, weights) if o.is_floating_point())
    t_params = dict(torch_module.named_parameters())
    t_loss.backward()

    grad_tol = grad_tol or tol

    def loss_fn(params, *xs):
        mlx_module.update(params)
        out = _to_tuple(mlx_module(*xs))
        out = [f(o) if f else o for o, f in zip(out, back)]
        return sum((o * mx.array(w)).sum() for o, w in zip(out, weights))

    params = mlx_module.trainable_parameters()
    argnums = [0] + [1 + i for i in float_idx]
    grads_out = mx.grad(loss_fn, argnums=argnums)(params, *m_inputs)
    param_grads = grads_out[0]
    for j, i in enumerate(float_idx):
        g = np.array(grads_out[1 + j])
        # Gradient w.r.t. input i, brought to torch layout by inverting to_mlx through a probe.
        if to_mlx[i] is not None:
            g = _inverse_layout(to_mlx[i], inputs[i].shape, g)
        report.add(compare(f"grad.input.{i}", g, t_inputs[i].grad, grad_tol))
    mlx_module.update(param_grads)  # temporarily hold gradients to read them in torch layout
    g_sd = mlx_state_dict(mlx_module)
    for name, p in t_params.items():
        if p.grad is not None:
            report.add(compare(f"grad.{name}", g_sd[name], p.grad, grad_tol))
    mlx_module.update(params)
    return report


def _inverse_layout(to_mlx: Callable, shape, g: np.ndarray) -> np.ndarray:
    """Invert a pure axis permutation `to_mlx` by applying it to an index array."""
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    perm = np.asarray(to_mlx(idx)).ravel()
    out = np.empty(int(np.prod(shape)), dtype=g.dtype)
    out[perm] = g.ravel()
    return out.reshape(shape)


def nchw_to_nhwc(x):
    return x.transpose(0, 2, 3, 1)


def nhwc_to_nchw(x):
    return x.transpose(0, 3, 1, 2)
