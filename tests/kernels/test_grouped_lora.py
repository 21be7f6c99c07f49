"""Triton grouped LoRA term (kernels/grouped_lora.py, grouped_lora_triton.py) against the float64 reference.

flash-attention's rule (``helpers.dtype_error_bound``): the kernel's error against float64 may be at most twice
that of the same computation run by PyTorch in the test dtype. Odd sizes, unsorted ids, empty experts and
out-of-range ids (expert-parallel sentinels) are covered; outputs are NaN-poisoned (``nan_empty``) so an
unwritten row fails. bf16 only on GPU (the interpreter's bf16 ``tl.dot`` is wrong).
"""
from __future__ import annotations

import pytest
import torch

from peftfast.kernels import grouped_lora_triton
from peftfast.kernels.grouped_lora import expert_ids_from_offsets, grouped_lora, grouped_lora_reference
from helpers import assert_rel_close, dtype_error_bound

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _all(x, lhs, rhs, ids, dy, scaling):
    leaves = [t.detach().requires_grad_() for t in (x, lhs, rhs)]
    y = grouped_lora_reference(leaves[0], leaves[1], leaves[2], ids, scaling)
    if not y.requires_grad:  # no row routed to any expert: every gradient is zero
        return (y.detach(), *(torch.zeros_like(t) for t in leaves))
    grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    return (y.detach(), *(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)))


@pytest.mark.parametrize("s, d1, d2, e, r", [(37, 19, 23, 5, 3), (1, 8, 5, 1, 1), (70, 33, 9, 7, 17)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ["sorted", "random"])
def test_forward_backward_against_fp64(s, d1, d2, e, r, dtype, order, nan_empty):
    g = torch.Generator().manual_seed(s + d1 + e)
    x = torch.randn(s, d1, generator=g).to(DEVICE, dtype)
    lhs = (torch.randn(e, d1, r, generator=g) / d1 ** 0.5).to(DEVICE, dtype)
    rhs = torch.randn(e, r, d2, generator=g).to(DEVICE, dtype)
    ids = torch.randint(-1, e + 1, (s,), generator=g)  # -1 and e: rows of no expert
    if order == "sorted":
        ids = ids.sort().values
    ids = ids.to(DEVICE)
    xg, lg, rg = (t.detach().requires_grad_() for t in (x, lhs, rhs))
    y = grouped_lora(xg, lg, rg, ids, 1.7, backend="triton")
    assert y.dtype == dtype and y.shape == (s, d2)
    dy = torch.randn(s, d2, generator=g).to(DEVICE, dtype)
    got = [y, *torch.autograd.grad(y, (xg, lg, rg), dy)]
    inputs64 = [x.double(), lhs.double(), rhs.double(), ids, dy.double(), 1.7]
    for i, name in enumerate(["y", "dx", "d_lhs", "d_rhs"]):
        def fn(*args, _i=i):
            return _all(*args)[_i]

        tol = dtype_error_bound(fn, inputs64, dtype)
        assert_rel_close(got[i], fn(*inputs64), tol, f"{name} {dtype} {order} s={s}")
    dead = (ids < 0) | (ids >= e)
    assert torch.all(y[dead] == 0) and torch.all(got[1][dead] == 0)


def test_fp32_adapters_on_half_rows(nan_empty):
    """Factors in fp32 with fp16 rows (PEFT-style fp32 adapters on a half base): computed in fp32."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(29, 12, generator=g).to(DEVICE, torch.float16)
    lhs = torch.randn(3, 12, 4, generator=g).to(DEVICE)
    rhs = torch.randn(3, 4, 10, generator=g).to(DEVICE)
    ids = torch.randint(0, 3, (29,), generator=g).to(DEVICE)
    y = grouped_lora(x, lhs, rhs, ids, 0.5, backend="triton")
    want = grouped_lora_reference(x.double(), lhs.double(), rhs.double(), ids, 0.5)
    assert y.dtype == torch.float16
    # fp32 compute, one fp16 rounding of the output: 2x fp16's half-ulp (relative RMS)
    assert_rel_close(y, want, 2 * torch.finfo(torch.float16).eps, "fp16 rows, fp32 factors")


def test_offsets_to_ids_and_dispatch(monkeypatch):
    offs = torch.tensor([3, 3, 7, 8], dtype=torch.int32)
    assert expert_ids_from_offsets(offs, 10).tolist() == [0, 0, 0, 2, 2, 2, 2, 3, 4, 4]
    calls = []
    real = grouped_lora_triton.triton_grouped_lora
    monkeypatch.setattr(grouped_lora_triton, "triton_grouped_lora", lambda *a: calls.append(1) or real(*a))
    x, lhs, rhs = torch.randn(4, 3), torch.randn(2, 3, 2), torch.randn(2, 2, 5)
    ids = torch.tensor([0, 1, 1, 0])
    grouped_lora(x.to(DEVICE), lhs.to(DEVICE), rhs.to(DEVICE), ids.to(DEVICE), 1.0, backend="triton")
    grouped_lora(x, lhs, rhs, ids, 1.0, backend="reference")
    assert calls == [1]


@pytest.mark.parametrize("args, match", [
    ((torch.randn(4, 3), torch.randn(2, 5, 2), torch.randn(2, 2, 5), torch.zeros(4, dtype=torch.long)), "features"),
    ((torch.randn(4, 3), torch.randn(2, 3, 2), torch.randn(2, 3, 5), torch.zeros(4, dtype=torch.long)), "rhs"),
    ((torch.randn(4, 3), torch.randn(2, 3, 2), torch.randn(2, 2, 5), torch.zeros(3, dtype=torch.long)), "one id"),
    ((torch.randn(4, 3), torch.randn(2, 3, 2), torch.randn(2, 2, 5), torch.zeros(4)), "int32 or int64"),
])
def test_shape_errors_name_the_operand(args, match):
    with pytest.raises(ValueError, match=match):
        grouped_lora(*args, 1.0)


# --------------------------------------------------------------------------------------------------
# The torch.library op (kernels/ops.py declaration): opcheck, torch.compile, partial gradients
# --------------------------------------------------------------------------------------------------


def _op_inputs(seed=0, s=29, d1=13, d2=11, e=4, r=3, ids_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, d1, generator=g).to(DEVICE)
    lhs = (torch.randn(e, d1, r, generator=g) / d1 ** 0.5).to(DEVICE)
    rhs = torch.randn(e, r, d2, generator=g).to(DEVICE)
    ids = torch.randint(-1, e + 1, (s,), generator=g).to(DEVICE, ids_dtype)
    return x, lhs, rhs, ids


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_opcheck_forward(ids_dtype):
    x, lhs, rhs, ids = _op_inputs(ids_dtype=ids_dtype)
    x.requires_grad_()
    lhs.requires_grad_()
    rhs.requires_grad_()
    torch.library.opcheck(torch.ops.peftfast.grouped_lora.default, (x, lhs, rhs, ids, 1.7))


@pytest.mark.parametrize("needs", [[True, True, True], [False, True, True], [True, False, False]])
def test_opcheck_backward(needs):
    x, lhs, rhs, ids = _op_inputs(1)
    xa = torch.randn(x.shape[0], lhs.shape[2], device=DEVICE)
    dy = torch.randn(x.shape[0], rhs.shape[2], device=DEVICE)
    torch.library.opcheck(torch.ops.peftfast.grouped_lora_backward.default, (dy, x, lhs, rhs, ids, xa, 1.7, needs))


def _one_graph_then_compiled_and_eager(f, x, lhs, rhs, ids, dy, compile_backend: str) -> list:
    """Assert ``f`` traces as one graph without a break; then ``[y, dx, d_lhs, d_rhs]`` of ``f`` compiled
    (fullgraph) and of ``f`` eager, in that order."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(x, lhs, rhs, ids)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    results = []
    for fn in (torch.compile(f, backend=compile_backend, fullgraph=True), f):
        leaves = [t.detach().clone().requires_grad_() for t in (x, lhs, rhs)]
        y = fn(*leaves, ids)
        y.backward(dy)
        results.append([y.detach(), *(t.grad for t in leaves)])
    return results


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compile_fullgraph_no_graph_break():
    """torch.compile traces the public call into one graph (fullgraph raises on a break), backward included;
    compiled == eager bit for bit (the same bodies)."""
    x, lhs, rhs, ids = _op_inputs(2)
    dy = torch.randn(x.shape[0], rhs.shape[2], device=DEVICE)

    def f(x, lhs, rhs, ids):
        return grouped_lora(x, lhs, rhs, ids, 1.7, backend="triton")

    results = _one_graph_then_compiled_and_eager(f, x, lhs, rhs, ids, dy, "aot_eager")
    for got, want in zip(*results):
        assert torch.isfinite(got).all() and torch.equal(got, want)


def test_reference_compiles_without_graph_break():
    """The reference's eager loop syncs with the host (the experts present) and gathers data-dependent rows;
    traced, it runs the masked form instead: one graph, and the eager loop's values and gradients (float64,
    unsorted ids with rows of no expert)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(29, 13, generator=g, dtype=torch.float64)
    lhs = torch.randn(4, 13, 3, generator=g, dtype=torch.float64)
    rhs = torch.randn(4, 3, 7, generator=g, dtype=torch.float64)
    ids = torch.randint(-1, 5, (29,), generator=g)  # -1 and 4: no expert
    dy = torch.randn(29, 7, generator=g, dtype=torch.float64)

    def f(x, lhs, rhs, ids):
        return grouped_lora(x, lhs, rhs, ids, 0.7, backend="reference")

    results = _one_graph_then_compiled_and_eager(f, x, lhs, rhs, ids, dy, "eager")
    for got, want, name in zip(*results, ("y", "dx", "d_lhs", "d_rhs")):
        assert_rel_close(got, want, 1e-13, f"compiled reference {name}")
    dead = (ids < 0) | (ids >= 4)
    assert dead.any() and torch.all(results[0][0][dead] == 0) and torch.all(results[0][1][dead] == 0)


def test_partial_gradients_match_the_reference():
    """Only the factors need gradients (frozen hidden states): dx is not computed, d_lhs and d_rhs still are."""
    x, lhs, rhs, ids = _op_inputs(3)
    lg, rg = lhs.detach().requires_grad_(), rhs.detach().requires_grad_()
    y = grouped_lora(x, lg, rg, ids, 0.9, backend="triton")
    assert y.grad_fn is not None and type(y.grad_fn).__name__.startswith("GroupedLora")
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (lg, rg), dy)
    l64, r64 = lhs.double().requires_grad_(), rhs.double().requires_grad_()
    want = torch.autograd.grad(grouped_lora_reference(x.double(), l64, r64, ids, 0.9), (l64, r64), dy.double())
    for a, b, name in zip(got, want, ("d_lhs", "d_rhs")):
        assert a.dtype == torch.float32
        # fp32 products of length <= S (29) summed in fp32: well inside 1e-5 relative RMS
        assert_rel_close(a, b, 1e-5, name)
    with torch.no_grad():
        y0 = grouped_lora(x, lhs, rhs, ids, 0.9, backend="triton")
    assert y0.grad_fn is None and torch.equal(y0, y.detach())
