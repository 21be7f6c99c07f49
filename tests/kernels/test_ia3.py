"""Triton IA3 linear (kernels/ia3.py) against the PyTorch reference.

Tolerances follow flash-attention's rule (``helpers.dtype_error_bound``): the kernel's relative RMS
error against the float64 reference may be at most twice that of the same computation run by PyTorch
in the test dtype (fp32 included: both then sit at ~1e-7, and a wrong index or a missed scale gives
errors of order 1). On CPU the kernels run in Triton's interpreter, so shapes are small; bf16 is
covered only by the ``gpu`` test (the interpreter's bf16 ``tl.dot`` is wrong).
"""
from __future__ import annotations

import pytest
import torch

from peftfast.kernels import ia3 as ia3_mod
from peftfast.kernels import ia3_triton, weights  # noqa: E402
from peftfast.kernels.ia3 import ia3_linear, ia3_linear_reference
from peftfast.kernels.weights import dense_weight
from helpers import assert_rel_close, dtype_error_bound

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
MODES = [pytest.param(False, id="out"), pytest.param(True, id="ff")]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _reference_all(x, w, l, bias, dy, feedforward, l_dtype=None):
    """Reference (y, dx, dl) computed in the inputs' dtype; ``l_dtype`` overrides l's (mixed precision)."""
    xx = x.detach().requires_grad_()
    ll = (l if l_dtype is None else l.to(l_dtype)).detach().requires_grad_()
    y = ia3_linear_reference(xx, w, ll, feedforward=feedforward, bias=bias)
    dx, dl = torch.autograd.grad(y, (xx, ll), dy.to(y.dtype))
    return y.detach(), dx, dl


def _check(x, w_kernel, w_dense, l, bias, *, feedforward, dtype, what="", mixed_l=False):
    """backend="triton" forward + backward vs the float64 reference, each output by the 2x rule.

    ``mixed_l``: l stays fp32 while x is half; the same-dtype PyTorch run keeps l fp32 too, so the
    bound measures exactly the computation the kernel performs.
    """
    x = x.detach().requires_grad_()
    l = l.detach().requires_grad_()
    y = ia3_linear(x, w_kernel, l, feedforward=feedforward, bias=bias, backend="triton")
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w_dense.shape[0])
    dy = torch.randn_like(y)
    y.backward(dy)
    assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
    assert l.grad.dtype == l.dtype and l.grad.shape == l.shape

    def as64(t):
        return None if t is None else t.detach().double()

    inputs64 = [as64(x), as64(w_dense), as64(l), as64(bias), dy.double()]
    for i, (got, name) in enumerate(zip((y, x.grad, l.grad), ("y", "dx", "dl"))):
        def fn(x_, w_, l_, b_, dy_, _i=i):
            l_dtype = torch.float32 if (mixed_l and x_.dtype != torch.float64) else None
            return _reference_all(x_, w_, l_, b_, dy_, feedforward, l_dtype)[_i]

        tol = dtype_error_bound(fn, inputs64, dtype)
        assert_rel_close(got, fn(*inputs64), tol, f"{what} {name} ({dtype}, ff={feedforward})")


def _make(lead, k, n, dtype, feedforward, *, bias=True, l_dtype=None):
    """Random x, W (dense, [N, K]), l (away from 1 so a missed scale shows) and bias."""
    x = torch.randn(*lead, k, device=DEVICE, dtype=dtype)
    w = torch.randn(n, k, device=DEVICE, dtype=dtype) / k**0.5
    l = torch.randn(*((1, k) if feedforward else (n, 1)), device=DEVICE, dtype=l_dtype or dtype)
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    return x, w, l, b


def _quantized(n, k, quant_type):
    """A bitsandbytes Params4bit (nested absmax, blocksize 64) and its exact dense fp32 value."""
    bnb = pytest.importorskip("bitsandbytes")
    w4 = bnb.nn.Params4bit(torch.randn(n, k) / k**0.5, requires_grad=False, quant_type=quant_type,
                           compress_statistics=True, blocksize=64)._quantize("cpu")
    if DEVICE != "cpu":
        w4 = w4.to(DEVICE)
    return w4, dense_weight(w4, torch.float32, backend="reference")


# --------------------------------------------------------------------------------------------------
# forward + backward vs reference
# --------------------------------------------------------------------------------------------------

SHAPES = [
    pytest.param((37,), 51, 45, id="odd-37x51x45"),
    pytest.param((3, 13), 51, 45, id="3d-3x13x51x45"),
    pytest.param((70,), 130, 67, id="multiblock-70x130x67"),
    pytest.param((1,), 51, 45, id="M1"),
]


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("feedforward", MODES)
def test_forward_backward_shapes(lead, k, n, dtype, feedforward, nan_empty):
    x, w, l, b = _make(lead, k, n, dtype, feedforward)
    _check(x, w, w, l, b, feedforward=feedforward, dtype=dtype, what=f"{lead}x{k}x{n}")


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("feedforward", MODES)
def test_no_bias(dtype, feedforward, nan_empty):
    x, w, l, _ = _make((37,), 51, 45, dtype, feedforward, bias=False)
    _check(x, w, w, l, None, feedforward=feedforward, dtype=dtype, what="no bias")


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("feedforward", MODES)
def test_strided_x(dtype, feedforward, nan_empty):
    # Every other feature of a wider tensor, then a transposed batch: strides the kernel reads as is.
    base = torch.randn(51 * 2, 4, 9, device=DEVICE, dtype=dtype)
    x = base[::2].permute(2, 1, 0)  # [9, 4, 51], non-contiguous, stride 2 along K
    assert not x.is_contiguous()
    _, w, l, b = _make((1,), 51, 45, dtype, feedforward)
    _check(x, w, w, l, b, feedforward=feedforward, dtype=dtype, what="strided x")


def test_strided_2d_x_and_transposed_weight_are_not_copied(monkeypatch):
    """A 2-D strided x and a [K, N]-stored weight viewed as [N, K] reach the kernel as the same storage."""
    x = torch.randn(51, 37, device=DEVICE).t()
    w = (torch.randn(51, 45, device=DEVICE) / 51**0.5).t()  # GPT-2 Conv1D layout, passed as weight.t()
    l = torch.randn(45, 1, device=DEVICE)
    seen = []
    real = ia3_triton.ia3_matmul

    def spy(a, b, *args, **kwargs):
        seen.append((a.data_ptr(), b.data_ptr()))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(ia3_triton, "ia3_matmul", spy)
    y = ia3_linear(x, w, l, feedforward=False, backend="triton")
    assert seen == [(x.data_ptr(), w.data_ptr())]
    # fp32: 2x the error of PyTorch's own fp32 GEMM vs float64 (see the module docstring).
    tol = dtype_error_bound(lambda x_, w_, l_: ia3_linear_reference(x_, w_, l_, feedforward=False),
                            [x.double(), w.double(), l.double()], FP32)
    assert_rel_close(y, ia3_linear_reference(x.double(), w.double(), l.double(), feedforward=False), tol, "y")


@pytest.mark.parametrize("feedforward", MODES)
def test_fp32_l_with_fp16_x(feedforward, nan_empty):
    """Adapters kept fp32 on a half base: y and dx come back fp16, dl fp32."""
    x, w, l, b = _make((37,), 51, 45, FP16, feedforward, l_dtype=FP32)
    _check(x, w, w, l, b, feedforward=feedforward, dtype=FP16, what="fp32 l", mixed_l=True)


@pytest.mark.parametrize("feedforward", MODES)
def test_fp32_base_under_fp16_x(feedforward, nan_empty):
    """An fp32 base weight and bias (master copy) under fp16 activations: cast in-kernel, no copies.

    The reference casts W and bias to fp16 first, so the bound's same-dtype run (everything fp16)
    is exactly the computation the kernel must match to within 2x.
    """
    x, w, l, b = _make((37,), 51, 45, FP16, feedforward)
    _check(x, w.float(), w, l, b.float(), feedforward=feedforward, dtype=FP16, what="fp32 base")


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("feedforward", MODES)
def test_4bit_weight(quant_type, feedforward, dtype, nan_empty):
    """Params4bit base: compared with the reference on the exactly dequantized weight."""
    k, n = 64, 40
    w4, wd = _quantized(n, k, quant_type)
    x, _, l, b = _make((37,), k, n, dtype, feedforward)
    _check(x, w4, wd, l, b, feedforward=feedforward, dtype=dtype, what=quant_type)


def test_4bit_dense_copy_not_saved_for_backward(monkeypatch):
    """The dequantized weight is a temporary: the backward dequantizes again (once for dx and dl)."""
    w4, _ = _quantized(40, 64, "nf4")
    calls = []
    real = weights.dense_base

    def spy(w, *args):
        calls.append(type(w).__name__)
        return real(w, *args)

    monkeypatch.setattr(ia3_triton, "dense_base", spy)
    x = torch.randn(9, 64, device=DEVICE, requires_grad=True)
    l = torch.randn(40, 1, device=DEVICE, requires_grad=True)
    y = ia3_linear(x, w4, l, feedforward=False, backend="triton")
    assert len(calls) == 1
    y.sum().backward()
    assert calls == ["Quant4bit", "Quant4bit"]  # the 4-bit storage, never a dense copy, reaches both


@pytest.mark.parametrize("feedforward", MODES)
def test_zeros_in_l(feedforward, nan_empty):
    """dl where l is 0 is still right: it comes from the recomputed pre-scale output, never y / l."""
    x, w, l, b = _make((37,), 51, 45, FP32, feedforward)
    with torch.no_grad():
        l.view(-1)[::3] = 0.0
    _check(x, w, w, l, b, feedforward=feedforward, dtype=FP32, what="zeros in l")


@pytest.mark.parametrize("feedforward", MODES)
def test_single_gradient(feedforward, nan_empty):
    """Only dl (x without grad, e.g. the first layer), or only dx (frozen l): the other is skipped."""
    x, w, l, b = _make((37,), 51, 45, FP32, feedforward)
    dy = torch.randn(37, 45, device=DEVICE)
    ref = _reference_all(x.double(), w.double(), l.double(), b.double(), dy.double(), feedforward)
    ll = l.clone().requires_grad_()
    ia3_linear(x, w, ll, feedforward=feedforward, bias=b, backend="triton").backward(dy)
    # fp32 throughout: 1e-5 is ~100x the ~1e-7 fp32 rounding of K=51 / M=37 sums; a bug is O(1).
    assert_rel_close(ll.grad, ref[2], 1e-5, "dl only")
    xx = x.clone().requires_grad_()
    ia3_linear(xx, w, l, feedforward=feedforward, bias=b, backend="triton").backward(dy)
    assert_rel_close(xx.grad, ref[1], 1e-5, "dx only")


def test_colsum_partials_cover_every_row(nan_empty):
    """The dl partials buffer ([cdiv(M, 16), N]) is fully written, M just past a block included."""
    for m in (1, 16, 17, 65):
        a = torch.randn(m, 24, device=DEVICE)
        w = torch.randn(30, 24, device=DEVICE)
        g = torch.randn(m, 30, device=DEVICE)
        s = torch.ones(30, device=DEVICE)
        y, colsum = ia3_triton.ia3_matmul(a, w.t(), s, coldot=g, store=False)
        assert y is None
        # fp32: ~1e-7 rounding; 1e-5 catches any missing or double-counted row block.
        assert_rel_close(colsum, ((a.double() @ w.double().t()) * g.double()).sum(0), 1e-5, f"colsum M={m}")


# --------------------------------------------------------------------------------------------------
# dispatch and errors
# --------------------------------------------------------------------------------------------------


def test_bad_shapes():
    w = torch.randn(45, 51, device=DEVICE)
    x = torch.randn(3, 51, device=DEVICE)
    with pytest.raises(ValueError, match="ia3_l has 51 values"):
        ia3_linear(x, w, torch.ones(1, 51, device=DEVICE), feedforward=False, backend="triton")
    with pytest.raises(ValueError, match="ia3_l has 45 values"):
        ia3_linear(x, w, torch.ones(45, 1, device=DEVICE), feedforward=True, backend="triton")
    with pytest.raises(ValueError, match="x has 50 features"):
        ia3_linear(torch.randn(3, 50, device=DEVICE), w, torch.ones(45, 1, device=DEVICE), feedforward=False,
                   backend="triton")


def test_unsupported_falls_back_or_raises():
    x = torch.randn(4, 8, dtype=torch.float64, device=DEVICE)
    w = torch.randn(6, 8, dtype=torch.float64, device=DEVICE)
    l = torch.randn(6, 1, dtype=torch.float64, device=DEVICE)
    ok, why = ia3_mod._triton_supports(x, w, l, None)
    assert not ok and "float64" in why
    y = ia3_linear(x, w, l, feedforward=False, backend="auto")
    torch.testing.assert_close(y, ia3_linear_reference(x, w, l, feedforward=False))
    with pytest.raises(NotImplementedError, match="float64"):
        ia3_linear(x, w, l, feedforward=False, backend="triton")
    # An 8-bit (int8) base weight, and a base that wants a gradient the Triton path would not give.
    ok, why = ia3_mod._triton_supports(x.float(), w.to(torch.int8), l.float(), None)
    assert not ok and "8-bit" in why
    ok, why = ia3_mod._triton_supports(x.float(), w.float().requires_grad_(), l.float(), None)
    assert not ok and "dW" in why


def test_auto_uses_triton(monkeypatch):
    """backend="auto" takes the Triton path on CUDA and in the interpreter."""
    monkeypatch.delenv("PEFTFAST_BACKEND", raising=False)
    calls = []
    real = ia3_mod._triton_ia3_linear
    monkeypatch.setattr(ia3_mod, "_triton_ia3_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, w, l, b = _make((5,), 24, 20, FP32, False)
    ia3_linear(x, w, l, feedforward=False, bias=b, backend="auto")
    assert calls == [1]


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------


def _op_args(weight_kind, feedforward):
    torch.manual_seed(0)
    m, k, n = 7, 64, 20
    x = torch.randn(m, k, device=DEVICE, requires_grad=True)
    l = torch.randn(*((1, k) if feedforward else (n, 1)), device=DEVICE, requires_grad=True)
    bias = torch.randn(n, device=DEVICE)
    if weight_kind == "nf4":
        w4, _ = _quantized(n, k, "nf4")
        w, absmax, code, code2, absmax2, offset, meta, qt = weights.quant_args(w4)
    else:
        w = torch.randn(n, k, device=DEVICE)
        absmax = code = code2 = absmax2 = offset = None
        meta, qt = [], ""
    return (x, w, l, bias, absmax, code, code2, absmax2, offset, meta, qt, feedforward)


@pytest.mark.parametrize("weight_kind,feedforward", [("dense", False), ("dense", True), ("nf4", False)])
def test_opcheck(weight_kind, feedforward):
    torch.library.opcheck(torch.ops.peftfast.ia3_linear.default, _op_args(weight_kind, feedforward))


@pytest.mark.parametrize("feedforward", MODES)
def test_opcheck_backward_op(feedforward):
    x, w, l, bias, *_ = _op_args("dense", feedforward)
    dy = torch.randn(7, 20, device=DEVICE)
    args = (dy, x.detach(), w, l.detach(), bias, None, None, None, None, None, [], "", feedforward, [True, True])
    torch.library.opcheck(torch.ops.peftfast.ia3_linear_backward.default, args)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compile_fullgraph_no_graph_break():
    """torch.compile traces the public call into one graph, backward included."""
    x, w, l, b = _make((2, 5), 24, 20, FP32, False)
    x.requires_grad_()
    l.requires_grad_()

    def f(x, w, l, b):
        return ia3_linear(x, w, l, feedforward=False, bias=b, backend="triton")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y = compiled(x, w, l, b)
    y.sum().backward()
    gl, gx = l.grad.clone(), x.grad.clone()
    l.grad = x.grad = None
    y_eager = f(x, w, l, b)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(gl, l.grad)
    torch.testing.assert_close(gx, x.grad)


# --------------------------------------------------------------------------------------------------
# GPU: Llama-3-8B shapes
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("feedforward", MODES)
def test_gpu_llama_bf16(feedforward):
    """bf16, M=4096 tokens through a 4096 -> 14336 layer (gate/up), fp32 l as PEFT keeps it."""
    m, k, n = 4096, 4096, 14336
    x, w, l, b = _make((m,), k, n, torch.bfloat16, feedforward, l_dtype=FP32)
    _check(x, w, w, l, b, feedforward=feedforward, dtype=torch.bfloat16, what="llama", mixed_l=True)


@pytest.mark.gpu
def test_gpu_odd_shapes_all_dtypes():
    for dtype in (torch.bfloat16, FP16, FP32):
        for feedforward in (False, True):
            x, w, l, b = _make((3, 333), 1000, 771, dtype, feedforward)
            _check(x, w, w, l, b, feedforward=feedforward, dtype=dtype, what="gpu odd")
