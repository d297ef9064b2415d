"""The four `torch.optim` optimizers `df.train.load_opt` builds (Adam, AdamW, SGD, RMSprop), for
MLX parameter trees, following torch's update formulas operation by operation.

Why not `mlx.optimizers`: its AdamW has no amsgrad (df always trains with amsgrad=True), adds
eps to sqrt(v) before bias correction, and keeps the learning rate as a float32 array, so bias
corrections are rounded differently; its SGD applies weight decay and momentum differently from
torch's on the first step (torch's momentum buffer starts as the gradient itself). Any of these
changes the trained weights, so training on MLX would not reproduce df's.

The interface mirrors torch where df.train touches it: `param_groups` (a list with one dict of
hyper-parameters plus the trained parameter names under "params", edited in place by the lr/wd
schedules), `zero_grad`, and `step(model, grads)`. A parameter whose gradient is None (absent
from the loss graph) is skipped, as torch skips `p.grad is None`. `state` is a tree of arrays
(per-parameter moments and step counters under the torch parameter name), which
`df_mlx.checkpoint.write_cp`/`read_cp` save and restore as df does with `opt.state_dict()`.

Precision: scalar coefficients (bias corrections, step sizes, 1 - lr * wd) are computed in
Python floats as torch does, then applied to float32 arrays in torch's operation order. torch's
CPU kernels fuse some multiply-adds (lerp, add with alpha) which MLX cannot express, so single
elements may differ by one float32 rounding; torch's CPU sqrt is not correctly rounded either
(off by up to ~1.5 ulp where MLX's is exact). Measured in parity/test_train.py.
"""

from typing import Dict, Iterable, List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

Grads = Dict[str, Optional[mx.array]]


class Optimizer:
    """torch.optim.Optimizer's bookkeeping: one parameter group over named parameters."""

    def __init__(self, params: Iterable[str], defaults: dict):
        names = list(params)
        if not names:
            raise ValueError("optimizer got an empty parameter list")
        self.defaults = dict(defaults)
        self.param_groups: List[dict] = [dict(defaults, params=names)]
        self._state: Dict[str, Dict[str, mx.array]] = {}

    def __repr__(self) -> str:
        hyper = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return f"{type(self).__name__}({len(self.param_groups[0]['params'])} parameters, {hyper})"

    @property
    def state(self) -> Dict[str, Dict[str, mx.array]]:
        """Per-parameter state arrays, by torch parameter name."""
        return self._state

    @state.setter
    def state(self, tree):
        """Accepts the nested tree `tree_unflatten` makes of saved names (lists where the
        parameter names have numeric parts): re-flattened, each key is `<param>.<kind>`."""
        state: Dict[str, Dict[str, mx.array]] = {}
        for key, value in tree_flatten(tree):
            name, kind = key.rsplit(".", 1)
            state.setdefault(name, {})[kind] = value
        self._state = state

    def zero_grad(self, set_to_none: bool = True):
        """Gradients are returned by `nn.value_and_grad`, not accumulated on parameters: nothing
        to clear; kept so df.train's step sequence reads the same."""

    def step(self, model, grads: Grads):
        """Apply one update to `model` from `grads` ({name: array or None}, or a gradient
        tree as `nn.value_and_grad` returns it)."""
        flat_g = dict(tree_flatten(grads))
        params = dict(tree_flatten(model.parameters()))
        new = []
        for group in self.param_groups:
            for name in group["params"]:
                g = flat_g.get(name)
                if g is None:
                    continue
                state = self._state.setdefault(name, {})
                new.append((name, self.update_one(params[name], g, state, group)))
        if new:
            model.update(tree_unflatten(new))

    def update_one(self, param: mx.array, grad: mx.array, state: Dict[str, mx.array], group: dict) -> mx.array:
        raise TypeError(f"{type(self).__name__} is abstract: use Adam, AdamW, SGD or RMSprop")


def _f32(x: float) -> mx.array:
    """A Python scalar rounded to float32, as torch's CPU kernels cast scalar arguments."""
    return mx.array(x, dtype=mx.float32)


def _add_scaled(a: mx.array, b: mx.array, alpha: float) -> mx.array:
    """torch's `a.add(b, alpha=alpha)`."""
    return a + _f32(alpha) * b


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient), optionally amsgrad."""

    decoupled_weight_decay = False

    def __init__(self, params: Iterable[str], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, decoupled_weight_decay=self.decoupled_weight_decay))

    def update_one(self, param, grad, state, group):
        if not state:
            state["step"] = _f32(0.0)
            state["exp_avg"] = mx.zeros_like(param)
            state["exp_avg_sq"] = mx.zeros_like(param)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = mx.zeros_like(param)
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        state["step"] = state["step"] + 1
        if wd != 0:
            if group["decoupled_weight_decay"]:
                param = param * _f32(1 - lr * wd)
            else:
                grad = _add_scaled(grad, param, wd)
        m = state["exp_avg"]
        state["exp_avg"] = m = m + _f32(1 - beta1) * (grad - m)  # lerp_(grad, 1 - beta1)
        state["exp_avg_sq"] = v = state["exp_avg_sq"] * _f32(beta2) + _f32(1 - beta2) * grad * grad  # addcmul_
        step = float(state["step"].item())
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / bias_correction1
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = v = mx.maximum(state["max_exp_avg_sq"], v)
        denom = mx.sqrt(v) / _f32(bias_correction2_sqrt) + _f32(eps)
        return param + _f32(-step_size) * m / denom  # addcdiv_(m, denom, value=-step_size)


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay `p *= 1 - lr * wd` before the step."""

    decoupled_weight_decay = True

    def __init__(self, params: Iterable[str], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


class SGD(Optimizer):
    """torch.optim.SGD with momentum, dampening, Nesterov and L2 weight decay."""

    def __init__(self, params: Iterable[str], lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov))

    def update_one(self, param, grad, state, group):
        if group["weight_decay"] != 0:
            grad = _add_scaled(grad, param, group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:
            if "momentum_buffer" not in state:
                buf = grad
            else:
                buf = _add_scaled(state["momentum_buffer"] * _f32(momentum), grad, 1 - group["dampening"])
            state["momentum_buffer"] = buf
            grad = _add_scaled(grad, buf, momentum) if group["nesterov"] else buf
        return _add_scaled(param, grad, -group["lr"])


class RMSprop(Optimizer):
    """torch.optim.RMSprop (not centered) with momentum and L2 weight decay."""

    def __init__(self, params: Iterable[str], lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if alpha < 0.0:
            raise ValueError(f"Invalid alpha value: {alpha}")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      centered=centered))

    def update_one(self, param, grad, state, group):
        if not state:
            state["step"] = _f32(0.0)
            state["square_avg"] = mx.zeros_like(param)
            if group["momentum"] > 0:
                state["momentum_buffer"] = mx.zeros_like(param)
            if group["centered"]:
                state["grad_avg"] = mx.zeros_like(param)
        state["step"] = state["step"] + 1
        if group["weight_decay"] != 0:
            grad = _add_scaled(grad, param, group["weight_decay"])
        alpha = group["alpha"]
        state["square_avg"] = sq = state["square_avg"] * _f32(alpha) + _f32(1 - alpha) * grad * grad
        if group["centered"]:
            g_avg = state["grad_avg"]
            state["grad_avg"] = g_avg = g_avg + _f32(1 - alpha) * (grad - g_avg)
            avg = mx.sqrt(sq - g_avg * g_avg)
        else:
            avg = mx.sqrt(sq)
        avg = avg + _f32(group["eps"])
        if group["momentum"] > 0:
            state["momentum_buffer"] = buf = state["momentum_buffer"] * _f32(group["momentum"]) + grad / avg
            return _add_scaled(param, buf, -group["lr"])
        return param + _f32(-group["lr"]) * grad / avg
