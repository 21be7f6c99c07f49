"""Triton LoRA linear (kernels/lora.py, lora_triton.py, matmul.py) against the PyTorch reference.

Every comparison uses flash-attention's rule (``tests.helpers.dtype_error_bound``): the kernel's error
against the float64 reference may be at most twice that of the same computation run by PyTorch in the
test dtype. On CPU the kernels run in Triton's interpreter, so shapes are small; bf16 is covered only
by the ``gpu`` tests (the interpreter's bf16 ``tl.dot`` is wrong and its fp32->bf16 casts truncate).
"""
from __future__ import annotations

import pytest
import torch

from peftfast.kernels import lora as lora_mod
from peftfast.kernels import launch, lora_triton, weights  # noqa: E402
from peftfast.kernels.lora import lora_linear, lora_linear_reference
from peftfast.kernels.weights import dense_weight
from helpers import assert_rel_close, dtype_error_bound

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALING = 1.75


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _reference_all(x, w, a, b, bias, dy, scaling=SCALING, keep=None, p=0.0):
    """Reference output and grads (dx, dA, dB[, dbias]) for the dtype of the inputs.

    ``keep`` (bool [M, K]) replays a known dropout mask: the LoRA branch sees ``x * keep / (1 - p)``.
    """
    leaves = [t.detach().requires_grad_() for t in (x, a, b)]
    if bias is not None:
        leaves.append(bias.detach().requires_grad_())
    xx, aa, bb = leaves[:3]
    bb_ = leaves[3] if bias is not None else None
    if keep is None:
        y = lora_linear_reference(xx, w, aa, bb, scaling, bias=bb_)
    else:
        x_drop = xx * keep.reshape(xx.shape).to(xx.dtype) / (1.0 - p)
        lora = (x_drop.to(aa.dtype) @ aa.t() @ bb.t()) * scaling
        y = (xx @ w.t() if w is not None else 0) + lora.to(xx.dtype)
        if bb_ is not None:
            y = y + bb_.to(xx.dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    return (y.detach(), *grads)


def _check_against_reference(x, w_kernel, w_dense, a, b, bias, *, dtype, scaling=SCALING, keep=None, p=0.0,
                             seed=None, what=""):
    """Run backend="triton" (forward + backward) and compare every output to the float64 reference."""
    x = x.detach().requires_grad_()
    a = a.detach().requires_grad_()
    b = b.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    y = lora_linear(x, w_kernel, a, b, scaling, bias=bias, dropout_p=p, backend="triton")
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], b.shape[0])
    dy = torch.randn_like(y)
    y.backward(dy)
    got = [y, x.grad, a.grad, b.grad] + ([bias.grad] if bias is not None else [])
    assert a.grad.dtype == a.dtype and b.grad.dtype == b.dtype and x.grad.dtype == x.dtype
    if bias is not None:
        assert bias.grad.dtype == bias.dtype

    def as64(t):
        return None if t is None else t.detach().double()

    inputs64 = [as64(x), as64(w_dense), as64(a), as64(b), as64(bias), dy.double()]
    names = ["y", "dx", "dA", "dB", "dbias"]
    for i, g in enumerate(got):
        def fn(*args, _i=i):
            return _reference_all(*args, scaling=scaling, keep=keep, p=p)[_i]

        tol = dtype_error_bound(fn, inputs64, dtype)
        assert_rel_close(g, fn(*inputs64), tol, f"{what} {names[i]} ({dtype})")


def _make(lead, k, n, r, dtype, adapter_dtype=None, bias=True, weight="dense"):
    """Random inputs (never zero: lora_B is random so the LoRA branch contributes)."""
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*lead, k, device=DEVICE, dtype=dtype)
    a = torch.randn(r, k, device=DEVICE, dtype=adapter_dtype) / k**0.5
    b = torch.randn(n, r, device=DEVICE, dtype=adapter_dtype)
    bb = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    if weight == "dense":
        w = torch.randn(n, k, device=DEVICE, dtype=dtype) / k**0.5
        return x, w, w, a, b, bb
    if weight == "transposed":
        # GPT-2 Conv1D stores [K, N]; the layer passes weight.t(): a view, never a copy.
        w = (torch.randn(k, n, device=DEVICE, dtype=dtype) / k**0.5).t()
        return x, w, w, a, b, bb
    if weight == "none":
        return x, None, None, a, b, bb
    if weight == "nf4":
        bnb = pytest.importorskip("bitsandbytes")
        w32 = torch.randn(n, k) / k**0.5
        w4 = bnb.nn.Params4bit(w32, requires_grad=False, quant_type="nf4", compress_statistics=True,
                               blocksize=64)._quantize("cpu")
        if DEVICE != "cpu":
            w4 = w4.to(DEVICE)
        return x, w4, dense_weight(w4, torch.float32, backend="reference"), a, b, bb
    raise ValueError(weight)


# --------------------------------------------------------------------------------------------------
# forward + backward vs reference
# --------------------------------------------------------------------------------------------------

SHAPES = [
    pytest.param((37,), 45, 53, 5, id="odd-37x45x53-r5"),
    pytest.param((1,), 45, 53, 5, id="M1"),
    pytest.param((37,), 45, 53, 1, id="r1"),
    pytest.param((2, 3), 45, 53, 5, id="lead-2x3"),
    pytest.param((70,), 130, 67, 20, id="multiblock-70x130x67-r20"),
    pytest.param((20,), 40, 30, 70, id="r70-epilogue-loops"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,k,n,r", SHAPES)
def test_forward_backward_shapes(lead, k, n, r, dtype, nan_empty):
    x, w, wd, a, b, bias = _make(lead, k, n, r, dtype, bias=True)
    _check_against_reference(x, w, wd, a, b, bias, dtype=dtype, what=f"{lead}x{k}x{n} r{r}")


FP32 = torch.float32
FP16 = torch.float16
BF16 = torch.bfloat16
VARIANTS = [
    pytest.param("dense", False, FP32, None, id="no-bias-fp32"),
    pytest.param("dense", False, FP16, None, id="no-bias-fp16"),
    pytest.param("transposed", True, FP32, None, id="transposed-weight-view-fp32"),
    pytest.param("transposed", True, FP16, None, id="transposed-weight-view-fp16"),
    pytest.param("none", True, FP32, None, id="lora-term-only-fp32"),
    pytest.param("none", True, FP16, None, id="lora-term-only-fp16"),
    pytest.param("nf4", True, FP32, None, id="nf4-fp32"),
    pytest.param("nf4", True, FP16, None, id="nf4-fp16"),
    pytest.param("nf4", False, FP16, FP32, id="nf4-fp16-x-fp32-adapters"),
    pytest.param("dense", True, FP16, FP32, id="fp16-x-fp32-adapters"),
    # bf16 (conftest makes the interpreter's bf16 casts round as a GPU's do)
    pytest.param("dense", True, BF16, None, id="dense-bf16"),
    pytest.param("nf4", True, BF16, None, id="nf4-bf16"),
    pytest.param("nf4", False, BF16, FP32, id="qlora-bf16-x-fp32-adapters"),
]


@pytest.mark.parametrize("weight,bias,dtype,adapter_dtype", VARIANTS)
def test_forward_backward_variants(weight, bias, dtype, adapter_dtype, nan_empty):
    # M = 70 > DECODE_MAX_M: a 4-bit base goes through dequantize + the fused GEMM here.
    x, w, wd, a, b, bb = _make((70,), 64, 40, 6, dtype, adapter_dtype=adapter_dtype, bias=bias, weight=weight)
    _check_against_reference(x, w, wd, a, b, bb, dtype=dtype, what=weight)


@pytest.mark.parametrize(
    "m,nested,blocksize,dtype,quant_type",
    [
        pytest.param(1, True, 64, FP16, "nf4", id="M1-nested-bs64-fp16"),
        pytest.param(1, True, 64, FP32, "nf4", id="M1-nested-bs64-fp32"),
        pytest.param(5, False, 128, FP16, "nf4", id="M5-plain-bs128-fp16"),
        pytest.param(64, True, 32, FP32, "nf4", id="M64-nested-bs32-fp32"),
        pytest.param(3, False, 64, FP16, "fp4", id="M3-plain-bs64-fp16-fp4"),
        pytest.param(3, True, 64, BF16, "nf4", id="M3-nested-bs64-bf16"),
    ],
)
def test_decode_4bit(m, nested, blocksize, dtype, quant_type, nan_empty, monkeypatch):
    """M <= DECODE_MAX_M with a 4-bit base: the fused dequant-GEMV runs (forward), backward as usual."""
    bnb = pytest.importorskip("bitsandbytes")
    k, n, r = 256, 80, 5
    w4 = bnb.nn.Params4bit(torch.randn(n, k) / k**0.5, requires_grad=False, quant_type=quant_type,
                           compress_statistics=nested, blocksize=blocksize)._quantize("cpu")
    if DEVICE != "cpu":
        w4 = w4.to(DEVICE)
    calls = []
    real = lora_triton._decode_lora_4bit
    monkeypatch.setattr(lora_triton, "_decode_lora_4bit", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, _, _, a, b, bias = _make((m,), k, n, r, dtype)
    _check_against_reference(x, w4, dense_weight(w4, torch.float32, backend="reference"), a, b, bias,
                             dtype=dtype, what="decode")
    assert calls, "the decode kernel was not used"


@pytest.mark.parametrize("dtype,quant_type,nested", [(FP16, "nf4", True), (torch.bfloat16, "fp4", False)],
                         ids=["fp16-nf4-nested", "bf16-fp4"])
def test_decode_split_k(dtype, quant_type, nested, nan_empty):
    """The split-K partials path of the decode kernel (chosen on GPUs to fill the SMs)."""
    bnb = pytest.importorskip("bitsandbytes")
    k, n, r = 256, 80, 5
    w4 = bnb.nn.Params4bit(torch.randn(n, k), requires_grad=False, quant_type=quant_type, compress_statistics=nested,
                           blocksize=64)._quantize("cpu")
    if DEVICE != "cpu":
        w4 = w4.to(DEVICE)
    x, _, _, a, b, bias = _make((3,), k, n, r, dtype)
    q = weights.kernel_operand(w4)
    xa = lora_triton._mm.lowrank_project(x, a.t())
    wd = dense_weight(w4, torch.float32, backend="reference").double()

    def ref(x, a, b, bias):
        return lora_linear_reference(x, wd.to(x.dtype), a, b, SCALING, bias=bias)

    inputs64 = [x.double(), a.double(), b.double(), bias.double()]
    tol = dtype_error_bound(ref, inputs64, dtype)
    for splits in (1, 3):
        y = lora_triton._decode_lora_4bit(x, q, xa, b, bias, SCALING, splits=splits)
        assert_rel_close(y, ref(*inputs64), tol, f"decode splits={splits}")
        # The last split of each tile reduces in the kernel and resets its counter: a second call (a CUDA
        # graph replay, the next token) computes the same bits from the same state.
        counts = next(p[-1] for key, p in lora_triton._plans.PLANS.items()
                      if key[0] == "decode_lora_4bit" and key[-2] == splits and key[1] == x.shape[0])
        assert counts.numel() == (1 if splits == 1 else -(-n // 64)) and not counts.any()
        again = lora_triton._decode_lora_4bit(x, q, xa, b, bias, SCALING, splits=splits)
        assert torch.equal(again, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_strided_x(dtype, nan_empty):
    # Every other feature of a wider tensor, then a transposed batch: strides the kernel reads as is.
    base = torch.randn(45 * 2, 4, 9, device=DEVICE, dtype=dtype)
    x = base[::2].permute(2, 1, 0)  # [9, 4, 45], non-contiguous, stride 2 along K
    assert not x.is_contiguous()
    _, w, wd, a, b, bias = _make((1,), 45, 53, 5, dtype)
    _check_against_reference(x, w, wd, a, b, bias, dtype=dtype, what="strided x")


def test_strided_2d_x_is_not_copied(monkeypatch):
    """A 2-D strided x reaches the kernels as the same storage (no .contiguous() on the way)."""
    x = torch.randn(45, 37, device=DEVICE).t()
    _, w, _, a, b, _ = _make((1,), 45, 53, 5, torch.float32)
    seen = []
    real = lora_triton._mm.lowrank_project

    def spy(xx, *args, **kwargs):
        seen.append(xx.data_ptr())
        return real(xx, *args, **kwargs)

    monkeypatch.setattr(lora_triton._mm, "lowrank_project", spy)
    lora_linear(x, w, a, b, SCALING, backend="triton")
    assert seen == [x.data_ptr()]


def test_needs_only_adapter_grads(nan_empty):
    """x without grad (first layer): dA and dB still right, no dx computed."""
    x, w, wd, a, b, bias = _make((37,), 45, 53, 5, torch.float32)
    a.requires_grad_()
    b.requires_grad_()
    y = lora_linear(x, w, a, b, SCALING, bias=bias, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = _reference_all(x.double(), wd.double(), a.double(), b.double(), bias.double(), dy.double())
    assert_rel_close(a.grad, ref[2], 1e-5, "dA")
    assert_rel_close(b.grad, ref[3], 1e-5, "dB")


def test_wgrad_split_reduction():
    """The M-split (partials + sum) path of lowrank_wgrad, used on GPUs for long M, with dbias fused."""
    from peftfast.kernels.matmul import lowrank_wgrad

    left = torch.randn(300, 5, device=DEVICE)
    x = torch.randn(300, 70, device=DEVICE)
    for splits in (1, 3):
        out = torch.full((70, 5), float("nan"), device=DEVICE)
        colsum = torch.full((70,), float("nan"), device=DEVICE)
        lowrank_wgrad(left, x, out.t(), scale=0.5, colsum=colsum, splits=splits)
        assert_rel_close(out, 0.5 * (x.double().t() @ left.double()), 1e-6, f"wgrad splits={splits}")
        assert_rel_close(colsum, x.double().sum(0), 1e-6, f"colsum splits={splits}")


def test_autotune_config_tables_and_pruning():
    """CUDA config lists (data, per GPU family) load, and pruning keeps what fits shared memory and M."""

    assert launch.gpu_family((9, 0)) == "sm90" and launch.gpu_family((8, 9)) == "sm89" and launch.gpu_family((8, 6)) == "sm89"
    assert launch.gpu_family((8, 0)) == "sm80"
    y = torch.empty(1, 1, dtype=torch.bfloat16)
    adapter = torch.empty(1, 1, dtype=torch.float32)  # fp32 adapters under a bf16 GEMM: staged at 4 bytes
    # The epilogue's L and R tiles count at the adapters' width (BM=128, BN=256, BR=64: 24K elements).
    big = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32}
    assert launch.gemm_smem_bytes(big, 1, 2, 64) == 49152 and launch.gemm_smem_bytes(big, 1, 2, 64, 4) == 98304
    assert launch.staged_widths({"p_y": y, "p_w": y, "p_l": y, "p_r": adapter}) == (2, 4)
    for family in ("sm80", "sm89", "sm90"):
        configs = launch.gemm_configs(family)
        for smem in (99 * 1024, 227 * 1024):
            for m in (1, 40, 8192):
                kept = launch.make_gemm_pruner(smem)(configs, {"M": m, "p_y": y, "p_w": y, "p_l": y, "p_r": adapter},
                                             BLOCK_R=64)
                assert kept
                assert all(launch.gemm_smem_bytes(c.kwargs, c.num_stages, 2, 64, 4) <= smem for c in kept) or len(kept) == 1
                fitting = [c for c in configs if launch.gemm_smem_bytes(c.kwargs, c.num_stages, 2, 64, 4) <= smem]
                if m <= 16 and fitting:
                    # decode-sized M: only the shortest row blocks that fit are tried
                    shortest = max(16, min(c.kwargs["BLOCK_M"] for c in fitting))
                    assert all(c.kwargs["BLOCK_M"] <= shortest for c in kept)


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------


def test_unsupported_falls_back_or_raises():
    x = torch.randn(4, 8, dtype=torch.float64, device=DEVICE)
    w = torch.randn(6, 8, dtype=torch.float64, device=DEVICE)
    a = torch.randn(2, 8, dtype=torch.float64, device=DEVICE)
    b = torch.randn(6, 2, dtype=torch.float64, device=DEVICE)
    ok, why = lora_mod._triton_supports(x, w, a, b, 0.0)
    assert not ok and "float64" in why
    y = lora_linear(x, w, a, b, 2.0, backend="auto")
    torch.testing.assert_close(y, lora_linear_reference(x, w, a, b, 2.0))
    with pytest.raises(NotImplementedError, match="float64"):
        lora_linear(x, w, a, b, 2.0, backend="triton")
    # A base weight that wants a gradient would silently get none from the Triton path.
    w32 = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    ok, why = lora_mod._triton_supports(x.float(), w32, a.float(), b.float(), 0.0)
    assert not ok and "dW" in why
    # The bias is checked too (the Triton path computes its gradient, so a trainable one is fine).
    x32, w32, a32, b32 = x.float(), w32.detach(), a.float(), b.float()
    assert lora_mod._triton_supports(x32, w32, a32, b32, 0.0, torch.randn(6, device=DEVICE, requires_grad=True))[0]
    ok, why = lora_mod._triton_supports(x32, w32, a32, b32, 0.0, torch.ones(6, dtype=torch.int32, device=DEVICE))
    assert not ok and "bias is torch.int32" in why
    with pytest.raises(NotImplementedError, match="bias is torch.int32"):
        lora_linear(x32, w32, a32, b32, 2.0, bias=torch.ones(6, dtype=torch.int32, device=DEVICE), backend="triton")


# --------------------------------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------------------------------


def _recover_mask(m, k, p, seed):
    """The kernel's keep-mask for an [m, k] input under ``torch.manual_seed(seed)``.

    With A = B = I (r = N = K), no base weight and scaling 1, the op returns ``dropout(x)`` exactly,
    so the zeros are the dropped entries. The mask depends only on (seed, m, k), not on the layer.
    """
    x = torch.rand(m, k, device=DEVICE) + 0.5  # never zero
    eye = torch.eye(k, device=DEVICE)
    torch.manual_seed(seed)
    y = lora_linear(x, None, eye, eye, 1.0, dropout_p=p, backend="triton")
    keep = y != 0
    # Kept entries are scaled by 1/(1-p), as F.dropout does.
    torch.testing.assert_close(y[keep], x[keep] / (1 - p), rtol=1e-6, atol=0)
    return keep


def test_dropout_kept_fraction():
    p = 0.3
    keep = _recover_mask(512, 64, p, seed=11)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.02, frac  # 32768 draws: std of the fraction ~0.0025
    # No structure: rows and columns are not all kept/dropped together.
    assert keep.float().mean(1).std() < 0.2 and keep.float().mean(0).std() < 0.2


def test_dropout_deterministic_with_seed():
    x, w, _, a, b, bias = _make((37,), 45, 53, 5, torch.float32)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(lora_linear(x, w, a, b, SCALING, bias=bias, dropout_p=0.4, backend="triton"))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_dropout_off_draws_nothing():
    """p = 0 (or eval mode) takes no dropout path: the RNG is untouched and the result is deterministic."""
    x, w, _, a, b, bias = _make((37,), 45, 53, 5, torch.float32)
    state = torch.get_rng_state()
    y0 = lora_linear(x, w, a, b, SCALING, bias=bias, dropout_p=0.0, backend="triton")
    y_eval = lora_linear(x, w, a, b, SCALING, bias=bias, dropout_p=0.5, training=False, backend="triton")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(y0, y_eval)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("weight", ["dense", "nf4"])
def test_dropout_backward_matches_forward_mask(dtype, weight, nan_empty):
    """Forward and backward regenerate the same mask: all outputs match the reference replaying it."""
    p, seed = 0.35, 123
    x, w, wd, a, b, bias = _make((3, 23), 64, 40, 6, dtype, weight=weight)  # M = 69: the GEMM path
    keep = _recover_mask(69, 64, p, seed)
    _check_against_reference(x, w, wd, a, b, bias, dtype=dtype, keep=keep, p=p, seed=seed, what="dropout")


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------


def _op_args(weight_kind, dropout):
    torch.manual_seed(0)
    m, k, n, r = 7, 24, 20, 3
    x = torch.randn(m, k, device=DEVICE, requires_grad=True)
    a = torch.randn(r, k, device=DEVICE, requires_grad=True)
    b = torch.randn(n, r, device=DEVICE, requires_grad=True)
    bias = torch.randn(n, device=DEVICE, requires_grad=True)
    if weight_kind == "nf4":
        bnb = pytest.importorskip("bitsandbytes")
        w4 = bnb.nn.Params4bit(torch.randn(n, k), requires_grad=False, quant_type="nf4",
                               compress_statistics=True, blocksize=64)._quantize("cpu")
        w, absmax, code, code2, absmax2, offset, meta, qt = weights.quant_args(w4)
    else:
        w = torch.randn(n, k, device=DEVICE)
        absmax = code = code2 = absmax2 = offset = None
        meta, qt = [], ""
    seed = torch.tensor([987], device=DEVICE) if dropout else None
    return (x, w, a, b, bias, seed, absmax, code, code2, absmax2, offset, meta, qt, SCALING, 0.25 if dropout else 0.0)


@pytest.mark.parametrize("weight_kind,dropout", [("dense", True), ("nf4", False)])
def test_opcheck(weight_kind, dropout):
    args = _op_args(weight_kind, dropout)
    torch.library.opcheck(torch.ops.peftfast.lora_linear.default, args)


def test_opcheck_backward_op():
    x, w, a, b, bias, seed, *_ = _op_args("dense", True)
    xa = torch.randn(7, 3)
    dy = torch.randn(7, 20)
    args = (dy, x.detach(), xa, w, a.detach(), b.detach(), seed, None, None, None, None, None, [], "",
            SCALING, 0.25, [True, True, True, True])
    torch.library.opcheck(torch.ops.peftfast.lora_linear_backward.default, args)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compile_fullgraph_no_graph_break():
    """torch.compile traces the public call (dense base, dropout) into one graph, backward included."""
    x, w, _, a, b, bias = _make((2, 5), 24, 20, 3, torch.float32)
    a.requires_grad_()
    b.requires_grad_()

    def f(x, w, a, b, bias):
        return lora_linear(x, w, a, b, SCALING, bias=bias, dropout_p=0.25, backend="triton")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    y = compiled(x, w, a, b, bias)
    y.sum().backward()
    ga = a.grad.clone()
    a.grad = b.grad = None
    torch.manual_seed(3)
    y_eager = f(x, w, a, b, bias)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(ga, a.grad)


# --------------------------------------------------------------------------------------------------
# GPU: Llama-3-8B shapes
# --------------------------------------------------------------------------------------------------

LLAMA_SHAPES = [
    pytest.param(2048, 4096, 14336, id="gate_up-2048x4096x14336"),
    pytest.param(2048, 14336, 4096, id="down-2048x14336x4096"),
    pytest.param(2048, 4096, 1024, id="k_v-2048x4096x1024"),
    pytest.param(1, 4096, 14336, id="decode-1x4096x14336"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m,k,n", LLAMA_SHAPES)
@pytest.mark.parametrize("weight", ["dense", "nf4"])
def test_gpu_llama_shapes(m, k, n, dtype, weight):
    if weight == "nf4":
        bnb = pytest.importorskip("bitsandbytes")
        w32 = torch.randn(n, k, device="cuda") / k**0.5
        w = bnb.nn.Params4bit(w32.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                              blocksize=64).to("cuda")
        wd = dense_weight(w, torch.float32, backend="reference")
    else:
        w = wd = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    a = torch.randn(16, k, device="cuda", dtype=torch.float32) / k**0.5
    b = torch.randn(n, 16, device="cuda", dtype=torch.float32)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    _check_against_reference(x, w, wd, a, b, bias, dtype=dtype, what=f"llama {m}x{k}x{n}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_dropout_and_odd_shapes(dtype):
    p, seed = 0.1, 7
    x, w, wd, a, b, bias = _make((3, 333), 1000, 771, 16, dtype)
    keep = _recover_mask(999, 1000, p, seed)
    _check_against_reference(x, w, wd, a, b, bias, dtype=dtype, keep=keep, p=p, seed=seed, what="gpu dropout")
