"""Record every named sub-module's output on both sides, keyed by qualified name.

Because df_mlx models use the reference's module names (their flattened parameter names equal
the torch `state_dict` keys), the same name identifies the same layer in both traces.
A module called more than once gets `name#1`, `name#2`, ... for its later calls; tuple outputs
become `name.0`, `name.1`, .... MLX modules that compute channels-last declare
`trace_layout = "NHWC"`; their 4-D outputs, and those of their sub-modules, are moved to NCHW
before comparison.
"""

from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional

import numpy as np


class Trace(OrderedDict):
    """Outputs by layer name; `untraceable` names the torch sub-modules (TorchScript) whose
    outputs cannot be hooked, so their MLX twins are not reported as unmatched."""

    def __init__(self):
        super().__init__()
        self.untraceable = []


def _flatten(name: str, out, into: "OrderedDict[str, object]", convert: Callable):
    if out is None:
        return
    if isinstance(out, (tuple, list)):
        for i, o in enumerate(out):
            _flatten(f"{name}.{i}", o, into, convert)
        return
    key, n = name, 1
    while key in into:
        key = f"{name}#{n}"
        n += 1
    into[key] = convert(out)


def _torch_to_numpy(t):
    import torch

    if not isinstance(t, torch.Tensor):
        return None
    t = t.detach().cpu()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.contiguous().numpy().copy()


@contextmanager
def trace_torch(model, include: Optional[Callable[[str], bool]] = None) -> Iterator[Dict]:
    """Forward hooks on every named sub-module (not the root) of a torch model."""
    import torch

    trace = Trace()
    handles = []
    for name, module in model.named_modules():
        if not name or (include is not None and not include(name)):
            continue
        if any(name == s or name.startswith(s + ".") for s in trace.untraceable):
            continue
        if isinstance(module, torch.jit.ScriptModule):  # no hooks on TorchScript modules
            trace.untraceable.append(name)
            continue

        def hook(_mod, _inp, out, name=name):
            _flatten(name, out, trace, _torch_to_numpy)

        handles.append(module.register_forward_hook(hook))
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()
        for k in [k for k, v in trace.items() if v is None]:
            del trace[k]


def _mlx_to_numpy(layout: Optional[str]):
    def convert(x):
        import mlx.core as mx

        if not isinstance(x, mx.array):
            return None
        a = np.array(x)
        if np.iscomplexobj(a):
            a = np.stack([a.real, a.imag], axis=-1)
        if layout == "NHWC" and a.ndim == 4:
            a = a.transpose(0, 3, 1, 2)
        return a

    return convert


def _named_modules_in_order(module, prefix: str = ""):
    """(name, module) pairs in attribute definition order, as torch's `named_modules` lists
    them (MLX's own order differs), so a shared module gets the same first name."""
    import mlx.nn as nn

    yield prefix, module

    def walk(value, name):
        if isinstance(value, nn.Module):
            yield from _named_modules_in_order(value, name)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                yield from walk(v, f"{name}.{i}")
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, f"{name}.{k}")

    for key, value in module.items():
        yield from walk(value, f"{prefix}.{key}" if prefix else key)


def _layout(name: str, modules: Dict[str, object]) -> Optional[str]:
    """The `trace_layout` of the module or of its nearest ancestor that declares one."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        layout = getattr(modules.get(".".join(parts[:i])), "trace_layout", None)
        if layout is not None:
            return layout
    return None


@contextmanager
def trace_mlx(model, include: Optional[Callable[[str], bool]] = None) -> Iterator[Dict]:
    """Wrap `__call__` of every named sub-module (not the root) of an MLX model.

    Python looks `__call__` up on the type, so each traced instance temporarily gets a
    one-off subclass whose `__call__` records the output; the original class is restored.
    Blocks run layer by layer meanwhile (df_mlx.layers.layer_by_layer), so that every layer
    computes its own output.
    """
    from df_mlx.layers import layer_by_layer

    trace: "OrderedDict[str, object]" = OrderedDict()
    patched = []
    modules = dict(_named_modules_in_order(model))
    seen = set()  # a module shared by several parents is traced once, as torch's named_modules does
    for name, module in modules.items():
        if not name or (include is not None and not include(name)) or id(module) in seen:
            continue
        seen.add(id(module))
        cls = type(module)
        convert = _mlx_to_numpy(_layout(name, modules))

        def call(self, *args, __name=name, __cls=cls, __convert=convert, **kwargs):
            out = __cls.__call__(self, *args, **kwargs)
            _flatten(__name, out, trace, __convert)
            return out

        module.__class__ = type(cls.__name__, (cls,), {"__call__": call})
        patched.append((module, cls))
    try:
        with layer_by_layer():
            yield trace
    finally:
        for module, cls in patched:
            module.__class__ = cls
        for k in [k for k, v in trace.items() if v is None]:
            del trace[k]
