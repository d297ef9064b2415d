"""The recurrent and grouped-linear blocks of df_mlx.modules against df.modules: outputs,
states, gradients, parameter names."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import pytest

import df_mlx.modules as ours
from df_mlx.modules import Identity
from parity.reference import import_ref
from parity.test_layers import (BATCH, STEPS, Case, assert_passes, copy_weights, failures, module_report, random_case,
                                real_features)


# T = 100 of all module configurations together take > 10 s (a Python step per group and step)
STEP_PARAMS = [pytest.param(t, marks=pytest.mark.slow) if t >= 100 else t for t in STEPS]


def _ref():
    return import_ref("modules")


def _factories(act, skip, skip_sizes):
    """(torch kwargs, MLX kwargs) for SqueezedGRU(_S)'s linear_act_layer and gru_skip_op."""
    import torch

    t_kw, m_kw = {}, {}
    if act == "relu":
        t_kw["linear_act_layer"], m_kw["linear_act_layer"] = partial(torch.nn.ReLU, inplace=True), nn.ReLU
    if skip == "identity":
        t_kw["gru_skip_op"], m_kw["gru_skip_op"] = torch.nn.Identity, Identity
    elif skip == "linear":
        kw = dict(zip(("input_size", "hidden_size", "groups"), skip_sizes))
        t_kw["gru_skip_op"] = partial(_ref().GroupedLinearEinsum, **kw)
        m_kw["gru_skip_op"] = partial(ours.GroupedLinearEinsum, **kw)
    return t_kw, m_kw


def build(cls_name: str, args: dict, act=None, skip=None, skip_sizes=None, seed: int = 0):
    """The reference module and its MLX port, from the same arguments."""
    import torch

    t_kw, m_kw = _factories(act, skip, skip_sizes)
    torch.manual_seed(seed)
    return getattr(_ref(), cls_name)(**args, **t_kw), getattr(ours, cls_name)(**args, **m_kw)


def _id(value) -> str:
    return ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value)


def _state_shape(cls_name: str, args: dict):
    directions = 2 if args.get("bidirectional") else 1
    if cls_name == "GroupedGRULayer":
        return args["groups"] * directions, args["hidden_size"] // args["groups"]
    if cls_name == "GroupedGRU":
        groups = args.get("groups", 4)
        return args.get("num_layers", 1) * groups * directions, args["hidden_size"] // groups
    return args.get("num_layers", 1), args["hidden_size"]  # SqueezedGRU(_S): a plain GRU


def recurrent_case(cls_name: str, args: dict, steps: int, with_h0: bool, seed: int = 0):
    batch_first = args.get("batch_first", True)  # every df recurrent block defaults to True
    shape = (BATCH, steps) if batch_first else (steps, BATCH)
    states, hidden = _state_shape(cls_name, args)
    return random_case(shape + (args["input_size"],), (states, BATCH, hidden) if with_h0 else None, seed)


GROUPED_GRU_LAYER = [
    dict(input_size=16, hidden_size=32, groups=1),
    dict(input_size=16, hidden_size=32, groups=2),
    dict(input_size=16, hidden_size=64, groups=4, batch_first=False),
    dict(input_size=32, hidden_size=128, groups=8, bias=False),
    dict(input_size=16, hidden_size=32, groups=2, bidirectional=True),
]
GROUPED_GRU = [
    dict(input_size=16, hidden_size=32, groups=1),
    dict(input_size=16, hidden_size=32, num_layers=2, groups=2),
    dict(input_size=16, hidden_size=32, num_layers=2, groups=2, shuffle=False),
    dict(input_size=16, hidden_size=64, num_layers=2, groups=4, add_outputs=True),
    dict(input_size=32, hidden_size=128, num_layers=2, groups=8, add_outputs=True, batch_first=False),
    dict(input_size=16, hidden_size=32, groups=2, bidirectional=True),
]
# (args, act, skip, skip sizes for SqueezedGRU, skip sizes for SqueezedGRU_S)
SQUEEZED = [
    (dict(input_size=32, hidden_size=16), None, None, None, None),
    (dict(input_size=32, hidden_size=16, output_size=24, num_layers=2, linear_groups=4), "relu", None, None, None),
    (dict(input_size=16, hidden_size=16, output_size=16, linear_groups=2), "relu", "identity", None, None),
    (dict(input_size=32, hidden_size=16, output_size=24, linear_groups=4), "relu", "linear", (16, 16, 4), (32, 24, 4)),
    (dict(input_size=32, hidden_size=16, linear_groups=1, batch_first=False), None, "linear", (16, 16, 1), (32, 16, 1)),
]


@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("steps", STEP_PARAMS)
@pytest.mark.parametrize("args", GROUPED_GRU_LAYER, ids=_id)
@pytest.mark.usefixtures("recurrence_path")
def test_grouped_gru_layer(args, steps, with_h0):
    t, m = build("GroupedGRULayer", args)
    case = recurrent_case("GroupedGRULayer", args, steps, with_h0)
    assert_passes(module_report(f"GroupedGRULayer({_id(args)}) T={steps}", t, m, case))


@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("steps", STEP_PARAMS)
@pytest.mark.parametrize("args", GROUPED_GRU, ids=_id)
@pytest.mark.usefixtures("recurrence_path")
def test_grouped_gru(args, steps, with_h0):
    t, m = build("GroupedGRU", args)
    case = recurrent_case("GroupedGRU", args, steps, with_h0)
    assert_passes(module_report(f"GroupedGRU({_id(args)}) T={steps}", t, m, case))


def _squeezed_id(config):
    args, act, skip = config[:3]
    return f"{_id(args)},act={act},skip={skip}"


@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("steps", STEP_PARAMS)
@pytest.mark.parametrize("config", SQUEEZED, ids=_squeezed_id)
@pytest.mark.parametrize("cls_name", ["SqueezedGRU", "SqueezedGRU_S"])
@pytest.mark.usefixtures("recurrence_path")
def test_squeezed_gru(cls_name, config, steps, with_h0):
    args, act, skip, skip_sizes, skip_sizes_s = config
    t, m = build(cls_name, args, act, skip, skip_sizes_s if cls_name.endswith("_S") else skip_sizes)
    case = recurrent_case(cls_name, args, steps, with_h0)
    assert_passes(module_report(f"{cls_name}({_squeezed_id(config)}) T={steps}", t, m, case))


@pytest.mark.parametrize("shape", [(BATCH, 7), (BATCH, 100)], ids=_id)
@pytest.mark.parametrize("args", [dict(input_size=16, hidden_size=32, groups=1),
                                  dict(input_size=16, hidden_size=32, groups=4),
                                  dict(input_size=32, hidden_size=64, groups=8)], ids=_id)
def test_grouped_linear_einsum(args, shape):
    t, m = build("GroupedLinearEinsum", args)
    assert_passes(module_report(f"GroupedLinearEinsum({_id(args)})", t, m,
                                random_case(shape + (args["input_size"],))))


@pytest.mark.parametrize("shape", [(BATCH, 7), (BATCH, 3, 100)], ids=_id)
@pytest.mark.parametrize("args", [dict(input_size=16, hidden_size=32, groups=1),
                                  dict(input_size=16, hidden_size=32, groups=4),
                                  dict(input_size=16, hidden_size=32, groups=4, shuffle=False),
                                  dict(input_size=32, hidden_size=64, groups=8)], ids=_id)
def test_grouped_linear(args, shape):
    t, m = build("GroupedLinear", args)
    assert_passes(module_report(f"GroupedLinear({_id(args)})", t, m, random_case(shape + (args["input_size"],))))


@pytest.mark.parametrize("cls_name", ["SqueezedGRU_S", "GroupedGRU"])
@pytest.mark.usefixtures("recurrence_path")
def test_real_features(cls_name):
    """DFNet3's embedding GRU shape on the ERB features of real audio (and DFNet2's grouped one)."""
    if cls_name == "GroupedGRU":
        t, m = build(cls_name, dict(input_size=32, hidden_size=64, num_layers=2, groups=4, add_outputs=True))
    else:
        t, m = build(cls_name, dict(input_size=32, hidden_size=64, output_size=32, linear_groups=8), "relu",
                     "linear", (32, 32, 8))
    assert_passes(module_report(f"{cls_name} on real ERB features", t, m, Case(real_features())))


def test_parameter_names_of_a_dfnet3_like_block():
    """The names a converter relies on, spelled out for the block DFNet3's encoder uses."""
    t, m = build("SqueezedGRU_S", dict(input_size=32, hidden_size=16, output_size=24, linear_groups=4),
                 "relu", "linear", (32, 24, 4))
    copy_weights(t, m)  # asserts the key sets are equal
    assert set(t.state_dict()) == {
        "linear_in.0.weight", "gru.weight_ih_l0", "gru.weight_hh_l0", "gru.bias_ih_l0", "gru.bias_hh_l0",
        "gru_skip.weight", "linear_out.0.weight"}


def test_copy_weights_rejects_other_names():
    t, _ = build("SqueezedGRU", dict(input_size=32, hidden_size=16, output_size=24))
    _, m = build("SqueezedGRU", dict(input_size=32, hidden_size=16))
    with pytest.raises(AssertionError, match="linear_out.0.weight"):
        copy_weights(t, m)


# Perturbations: each breaks one behaviour of the MLX side; the report must fail.

def _report_with(cls_name, args, mutate, steps=7, act=None, skip=None, skip_sizes=None):
    t, m = build(cls_name, args, act, skip, skip_sizes)
    mutate(m)
    return failures(module_report("perturbed", t, m, recurrent_case(cls_name, args, steps, True)
                                  if "GRU" in cls_name else random_case((BATCH, steps, args["input_size"]))))


def test_catches_missing_shuffle():
    assert "output" in _report_with("GroupedGRU", GROUPED_GRU[1], lambda m: setattr(m, "shuffle", False))


def test_catches_missing_add_outputs():
    assert "output" in _report_with("GroupedGRU", GROUPED_GRU[3], lambda m: setattr(m, "add_outputs", False))


def test_catches_missing_linear_shuffle():
    args = dict(input_size=16, hidden_size=32, groups=4)
    assert "output" in _report_with("GroupedLinear", args, lambda m: setattr(m, "shuffle", False))


def test_catches_wrong_group_weights(monkeypatch):
    """Each group multiplied by another group's weight, on either path (einsum, or the batched
    product where MLX's matmuls are on the reference BLAS)."""
    einsum, matmul = mx.einsum, ours.matmul
    monkeypatch.setattr(ours.mx, "einsum", lambda spec, x, w: einsum(spec, x, w[::-1]))
    monkeypatch.setattr(ours, "matmul", lambda x, w: matmul(x, w[::-1]))
    args = dict(input_size=16, hidden_size=32, groups=4)
    assert {"output", "grad.input", "grad.weight"} <= _report_with("GroupedLinearEinsum", args, lambda m: None)


def test_catches_h0_not_detached(monkeypatch):
    """Forward unchanged: only the h0 gradient (zero in df, which detaches it) differs."""
    monkeypatch.setattr(ours.mx, "stop_gradient", lambda x: x)
    bad = _report_with("GroupedGRU", GROUPED_GRU[1], lambda m: None)
    assert "grad.h0" in bad and "output" not in bad and "state" not in bad


def test_catches_skip_at_the_wrong_place(monkeypatch):
    monkeypatch.setattr(ours.SqueezedGRU_S, "__call__", ours.SqueezedGRU.__call__)
    args, act, skip = SQUEEZED[2][:3]
    assert "output" in _report_with("SqueezedGRU_S", args, lambda m: None, act=act, skip=skip)


def test_catches_missing_activation():
    args, act, skip = SQUEEZED[2][:3]
    no_act = lambda m: m.linear_in.__setitem__("1", Identity())  # noqa: E731
    assert "output" in _report_with("SqueezedGRU", args, no_act, act=act, skip=skip)
