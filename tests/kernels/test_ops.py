"""kernels/ops.py: one declaration per op gives the custom ops, their autograd, and the eager fast path.

The eager path (the forward body called directly, or a generated ``autograd.Function``) and the
``torch.library`` path (what ``torch.compile`` traces) run the same bodies, so their outputs and
gradients must be *identical*, not close: every comparison here is ``torch.equal``.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from peftfast.devtools import tune
from peftfast.kernels import dora_triton, grouped_lora_triton, ia3_triton, lora_triton, ops, prefix_attention_triton, weights
from peftfast.kernels.lora import lora_linear
from peftfast.kernels.nf4 import Quant4bit

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = torch.float32


def _rand(*shape, dtype=FP32, grad=False):
    t = torch.randn(*shape, device=DEVICE, dtype=dtype) / max(shape[-1], 1) ** 0.5
    return t.requires_grad_(grad)


def _quant(n, k, nested=True):
    return tune.random_quant4bit(n, k, quant_type="nf4", blocksize=64, nested=nested, device=DEVICE)


def _seed():
    return torch.tensor([12345], device=DEVICE, dtype=torch.int64)


# Each case: (op, a function building fresh declared inputs). Odd sizes; dropout and bias where the op has them.
def _lora(weight_kind, m):
    def make():
        k, n, r = 128, 40, 5
        w = _quant(n, k) if weight_kind == "nf4" else (None if weight_kind == "none" else _rand(n, k))
        return [_rand(m, k, grad=True), w, _rand(r, k, grad=True), _rand(n, r, grad=True), _rand(n, grad=True),
                _seed(), 1.75, 0.2]
    return lora_triton.LORA_LINEAR, make


def _dora(weight_kind):
    def make():
        k, n, r = 64, 24, 3
        w = _quant(n, k, nested=False) if weight_kind == "nf4" else _rand(n, k)
        mag = (torch.rand(n, device=DEVICE) + 0.5).requires_grad_()
        return [_rand(2, 9, k, grad=True), w, _rand(r, k, grad=True), _rand(n, r, grad=True), mag,
                _rand(n, grad=True), _seed(), 0.5, 0.1]
    return dora_triton.DORA_LINEAR, make


def _ia3(feedforward):
    def make():
        k, n = 64, 33
        scale_dim = k if feedforward else n
        l_vec = (torch.rand(scale_dim, 1, device=DEVICE) + 0.5).requires_grad_()
        return [_rand(13, k, grad=True), _quant(n, k), l_vec, _rand(n), feedforward]
    return ia3_triton.IA3_LINEAR, make


def _prefix():
    def make():
        b, hq, hkv, n, p, d = 2, 4, 2, 7, 5, 16
        mask = torch.ones(b, n, device=DEVICE, dtype=torch.int64)
        mask[1, :2] = 0
        return [_rand(b, hq, n, d, grad=True), _rand(b, hkv, n, d, grad=True), _rand(b, hkv, n, d, grad=True),
                _rand(hkv, p, d, grad=True), _rand(hkv, p, d, grad=True), mask, True, 0.25]
    return prefix_attention_triton.PREFIX_ATTENTION, make


def _grouped(ids_dtype):
    def make():
        s, d1, r, d2, e = 41, 19, 3, 23, 5
        ids = torch.randint(-1, e + 1, (s,), device=DEVICE, dtype=ids_dtype)  # -1, e: rows of no expert
        return [_rand(s, d1, grad=True), _rand(e, d1, r, grad=True), _rand(e, r, d2, grad=True), ids, 1.7]
    return grouped_lora_triton.GROUPED_LORA, make


CASES = {
    "lora-dense": _lora("dense", 37), "lora-none": _lora("none", 37),
    "lora-nf4-decode": _lora("nf4", 3), "lora-nf4-gemm": _lora("nf4", 70),
    "dora-dense": _dora("dense"), "dora-fp4": _dora("nf4"),
    "ia3-out": _ia3(False), "ia3-ffn": _ia3(True), "prefix": _prefix(),
    "grouped-int64": _grouped(torch.int64), "grouped-int32": _grouped(torch.int32),
}


def _run(call, values, grad_out):
    leaves = [v for v in values if torch.is_tensor(v) and v.requires_grad]
    for t in leaves:
        t.grad = None
    y = call(*values)
    y.backward(grad_out)
    return y.detach(), [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("case", list(CASES))
def test_eager_function_equals_custom_op(case):
    """Same output, same gradient of every input, bit for bit; and the eager call skips the dispatcher."""
    op, make = CASES[case]
    torch.manual_seed(0)
    values = make()
    with torch.no_grad():
        y0 = op.call_op(*values)
    grad_out = torch.randn_like(y0)

    y_op, g_op = _run(op.call_op, values, grad_out)
    y_eager, g_eager = _run(op, values, grad_out)
    assert torch.equal(y_eager, y_op) and torch.isfinite(y_op).all()
    assert len(g_eager) == len(g_op) > 0
    for a, b in zip(g_eager, g_op):
        assert a.dtype == b.dtype and torch.equal(a, b)

    out = op(*values)
    assert type(out.grad_fn).__name__.startswith(op.function.__name__), type(out.grad_fn).__name__
    with torch.no_grad():  # no grad wanted: the forward body itself, nothing saved
        y_nograd = op(*values)
    assert y_nograd.grad_fn is None and torch.equal(y_nograd, y_op)


def test_eager_path_never_calls_the_custom_op(monkeypatch):
    op, make = CASES["lora-dense"]
    calls = []
    real = op.op
    monkeypatch.setattr(op, "op", lambda *a: calls.append(1) or real(*a))
    values = make()
    op(*values).sum().backward()
    with torch.no_grad():
        op(*values)
    assert calls == []
    op.call_op(*values)
    assert calls == [1]


def test_fake_tensors_take_the_custom_op():
    """Outside torch.compile a fake (or other subclass) tensor still goes through the op and its fake."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op, make = CASES["lora-nf4-gemm"]
    values = make()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(values[0])
        y = op(x, *values[1:])
    assert tuple(y.shape) == (values[0].shape[0], values[3].shape[0])


@pytest.mark.parametrize("path", ["eager", "op"])
def test_saves_no_none_and_no_scale_slots_for_a_dense_weight(path):
    """A dense weight without dropout: x, xa, W, A and B are all that is kept (the five 4-bit scale
    slots and the seed were saved as None before); both paths save the same tensors."""
    op = lora_triton.LORA_LINEAR
    x, a, b = _rand(9, 24, grad=True), _rand(3, 24, grad=True), _rand(20, 3, grad=True)
    w = _rand(20, 24)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        call = op if path == "eager" else op.call_op
        y = call(x, w, a, b, None, None, 2.0, 0.0)
    ptrs = sorted(t.data_ptr() for t in saved)
    xa_like = [t for t in saved if tuple(t.shape) == (9, 3)]
    assert len(saved) == 5 and len(xa_like) == 1
    assert ptrs == sorted([x.data_ptr(), w.data_ptr(), a.data_ptr(), b.data_ptr(), xa_like[0].data_ptr()])
    y.sum().backward()
    assert x.grad is not None and a.grad is not None and b.grad is not None


def test_generated_schema_is_the_hand_written_one():
    """The op boundary did not move: opcheck tests and saved graphs use this argument order."""
    assert str(torch.ops.peftfast.lora_linear.default._schema) == (
        "peftfast::lora_linear(Tensor x, Tensor? weight, Tensor lora_A, Tensor lora_B, Tensor? bias, Tensor? seed, "
        "Tensor? absmax, Tensor? code, Tensor? code2, Tensor? absmax2, Tensor? offset, int[] meta, str quant_type, "
        "float scaling, float dropout_p) -> (Tensor, Tensor)")
    assert str(torch.ops.peftfast.ia3_linear_backward.default._schema) == (
        "peftfast::ia3_linear_backward(Tensor dy, Tensor x, Tensor weight, Tensor ia3_l, Tensor? bias, "
        "Tensor? absmax, Tensor? code, Tensor? code2, Tensor? absmax2, Tensor? offset, int[] meta, str quant_type, "
        "bool feedforward, bool[] needs) -> (Tensor, Tensor)")


@pytest.mark.parametrize("nested", [True, False])
def test_quant4bit_round_trips_through_the_op_boundary(nested):
    q = _quant(40, 96, nested=nested)
    flat = weights.quant_args(q)
    assert flat[-2:] == ([64, 256, 40, 96], "nf4") and all(t is None or torch.is_tensor(t) for t in flat[:6])
    back = weights.from_quant_args(*flat, dtype=q.dtype)
    assert isinstance(back, Quant4bit)
    for f in dataclasses.fields(Quant4bit):
        a, b = getattr(q, f.name), getattr(back, f.name)
        assert (a is b) if torch.is_tensor(a) else a == b, f.name
    dense = _rand(5, 7)
    assert weights.from_quant_args(*weights.quant_args(dense)) is dense
    assert weights.from_quant_args(*weights.quant_args(None)) is None


def test_float_offset_becomes_a_tensor():
    """Some bitsandbytes versions keep the nested offset as a Python float; the kernels read a pointer."""
    q = _quant(8, 64, nested=True)
    qf = dataclasses.replace(q, offset=float(q.offset))
    op_q = weights.kernel_operand(qf)
    assert torch.is_tensor(op_q.offset) and op_q.offset.dtype == FP32 and float(op_q.offset) == float(q.offset)
    x = _rand(3, 64)
    a, b = _rand(2, 64), _rand(8, 2)
    torch.testing.assert_close(lora_linear(x, qf, a, b, 1.0, backend="triton"),
                               lora_linear(x, q, a, b, 1.0, backend="triton"), rtol=0, atol=0)


def test_declaration_errors_name_the_problem():
    def noop(*a):
        return a

    common = dict(outputs=("y",), grads=("x",), saved=("x",), forward=noop, backward=noop, fake=noop,
                  backward_fake=noop)
    with pytest.raises(ValueError, match="tensors before the scalars"):
        ops.Op("bad_order_op", inputs="Tensor x, float s, Tensor y", **common)
    with pytest.raises(ValueError, match="unknown input type"):
        ops.Op("bad_type_op", inputs="Tensor x, double s", **common)
    with pytest.raises(ValueError, match="neither an input nor an output"):
        ops.Op("bad_saved_op", inputs="Tensor x, float s", **{**common, "saved": ("z",)})


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compile_4bit_fullgraph_matches_eager():
    """A Quant4bit input is flattened inside the traced graph, no break; compiled == eager (same bodies)."""
    op, make = CASES["lora-nf4-gemm"]
    values = make()
    x, q, a, b, bias, seed = values[:6]

    def f(x, a, b, bias):
        return op(x, q, a, b, bias, seed, 1.75, 0.2)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    grad_out = torch.randn(x.shape[0], b.shape[0], device=DEVICE)
    y_c, g_c = _run(compiled, (x, a, b, bias), grad_out)
    y_e, g_e = _run(f, (x, a, b, bias), grad_out)
    assert torch.equal(y_c, y_e)
    for gc, ge in zip(g_c, g_e):
        assert torch.equal(gc, ge)
