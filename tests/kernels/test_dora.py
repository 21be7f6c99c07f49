"""Triton DoRA linear (kernels/dora.py) against the PyTorch reference, run with ``backend="triton"``.

Tolerances follow flash-attention's rule (``helpers.dtype_error_bound``): the kernel's relative RMS
error against the float64 reference may be at most twice that of the same computation run by PyTorch
autograd in the test dtype. That bound scales with the dtype's rounding and with how ill-conditioned each
output is (dm is a long reduction over M), so it needs no per-output hand-tuned constant, and a real
bug (a missing factor c, a wrong mask, an unwritten tile) is orders of magnitude above it. fp32 uses the
same rule (the floor is 1e-7, ~1 ulp of fp32). On CPU the kernels run in Triton's interpreter, so
shapes are small; bf16 is covered only by the ``gpu`` test (the interpreter's bf16 ``tl.dot`` is wrong).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import triton

from peftfast.kernels import dora as dora_mod
from peftfast.kernels import dora_triton, launch, weights  # noqa: E402
from peftfast.kernels.dora import dora_linear, dora_linear_reference, dora_weight_norm
from peftfast.kernels.weights import dense_weight
from helpers import assert_rel_close, dtype_error_bound, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALING = 1.75
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
NAMES = ["y", "dx", "dA", "dB", "dm", "dbias"]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _reference_all(x, w, a, b, m, bias, dy, keep=None, p=0.0):
    """Reference output and grads (dx, dA, dB, dm[, dbias]) in the inputs' dtype.

    ``keep`` (bool [M, K]) replays a known dropout mask; the formula is dora_linear_reference's with
    ``F.dropout(x)`` replaced by ``x * keep / (1 - p)``.
    """
    leaves = [t.detach().requires_grad_() for t in (x, a, b, m)]
    if bias is not None:
        leaves.append(bias.detach().requires_grad_())
    xx, aa, bb, mm = leaves[:4]
    bias_ = leaves[4] if bias is not None else None
    if keep is None:
        y = dora_linear_reference(xx, w, aa, bb, SCALING, mm, bias=bias_)
    else:
        x_d = xx * keep.reshape(xx.shape).to(xx.dtype) / (1.0 - p)
        c = (mm / dora_weight_norm(w, aa, bb, SCALING)).view(1, -1)
        lora = F.linear(F.linear(x_d.to(aa.dtype), aa), bb)
        base = F.linear(xx, w, bias_)
        y = base + ((c - 1) * F.linear(x_d, w) + c * lora * SCALING).to(base.dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    return (y.detach(), *grads)


def _check(x, w_kernel, w_dense, a, b, m, bias, *, dtype, keep=None, p=0.0, seed=None, what=""):
    """backend="triton" forward + backward; every output against the float64 reference (2x rule)."""
    x, a, b, m = (t.detach().requires_grad_() for t in (x, a, b, m))
    bias = None if bias is None else bias.detach().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    y = dora_linear(x, w_kernel, a, b, SCALING, m, bias=bias, dropout_p=p, backend="triton")
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], b.shape[0])
    dy = torch.randn_like(y)
    y.backward(dy)
    got = [y, x.grad, a.grad, b.grad, m.grad] + ([bias.grad] if bias is not None else [])
    for t, leaf in ((x.grad, x), (a.grad, a), (b.grad, b), (m.grad, m)):
        assert t.dtype == leaf.dtype
    if bias is not None:
        assert bias.grad.dtype == bias.dtype

    def as64(t):
        return None if t is None else t.detach().double()

    inputs64 = [as64(x), as64(w_dense), as64(a), as64(b), as64(m), as64(bias), dy.double()]
    for i, g in enumerate(got):
        def fn(*args, _i=i):
            return _reference_all(*args, keep=keep, p=p)[_i]

        tol = dtype_error_bound(fn, inputs64, dtype)
        assert_rel_close(g, fn(*inputs64), tol, f"{what} {NAMES[i]} ({dtype})")


def _make(lead, k, n, r, dtype, adapter_dtype=None, bias=True, weight="dense"):
    """Random inputs; B is random (the LoRA term contributes) and c = m / norm spans [0.5, 1.5], so the
    ``(c - 1)`` terms are not zero."""
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*lead, k, device=DEVICE, dtype=dtype)
    a = torch.randn(r, k, device=DEVICE, dtype=adapter_dtype) / k**0.5
    b = torch.randn(n, r, device=DEVICE, dtype=adapter_dtype) / r**0.5
    bb = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    if weight == "dense":
        w = wd = torch.randn(n, k, device=DEVICE, dtype=dtype) / k**0.5
    elif weight == "transposed":
        # GPT-2 Conv1D stores [K, N]; the layer passes weight.t(): a view the kernels read through strides.
        w = wd = (torch.randn(k, n, device=DEVICE, dtype=dtype) / k**0.5).t()
    elif weight == "fp32-master":
        # A wider stored base than x: cast in-kernel, as the reference's w.to(x.dtype).
        w = torch.randn(n, k, device=DEVICE) / k**0.5
        wd = w.to(dtype)
    elif weight == "nf4":
        bnb = pytest.importorskip("bitsandbytes")
        w = bnb.nn.Params4bit(torch.randn(n, k) / k**0.5, requires_grad=False, quant_type="nf4",
                              compress_statistics=True, blocksize=64)._quantize("cpu")
        if DEVICE != "cpu":
            w = w.to(DEVICE)
        wd = dense_weight(w, torch.float32, backend="reference")
    else:
        raise ValueError(weight)
    norm = dora_weight_norm(wd.float(), a.float(), b.float(), SCALING)
    m = (norm * (0.5 + torch.rand(n, device=DEVICE))).to(adapter_dtype)
    return x, w, wd, a, b, m, bb


# --------------------------------------------------------------------------------------------------
# forward + backward vs reference
# --------------------------------------------------------------------------------------------------

SHAPES = [
    pytest.param((37,), 51, 45, 3, FP32, id="odd-37x51x45-r3-fp32"),
    pytest.param((37,), 51, 45, 3, FP16, id="odd-37x51x45-r3-fp16"),
    pytest.param((3, 7), 51, 45, 3, FP32, id="3d-3x7-fp32"),
    # More than one 64-block along M, N and K (grid, K loop, masks of the last tiles) and r > 64
    # (the low-rank epilogue's loop); fp32 only, to keep the interpreter's time down.
    pytest.param((70,), 130, 67, 20, FP32, id="multiblock-70x130x67-r20-fp32"),
    pytest.param((9,), 40, 30, 70, FP32, id="r70-epilogue-loops-fp32"),
]


@pytest.mark.parametrize("lead,k,n,r,dtype", SHAPES)
def test_forward_backward_shapes(lead, k, n, r, dtype, nan_empty):
    x, w, wd, a, b, m, bias = _make(lead, k, n, r, dtype)
    _check(x, w, wd, a, b, m, bias, dtype=dtype, what=f"{lead}x{k}x{n} r{r}")


VARIANTS = [
    pytest.param("dense", False, FP32, None, id="no-bias-fp32"),
    pytest.param("dense", False, FP16, None, id="no-bias-fp16"),
    pytest.param("transposed", True, FP16, None, id="transposed-weight-view-fp16"),
    pytest.param("fp32-master", True, FP16, None, id="fp32-weight-fp16-x"),
    pytest.param("dense", True, FP16, FP32, id="fp16-x-fp32-adapters"),
    pytest.param("nf4", True, FP32, None, id="nf4-fp32"),
    pytest.param("nf4", False, FP16, None, id="nf4-fp16"),
    pytest.param("nf4", True, FP16, FP32, id="nf4-fp16-x-fp32-adapters"),
    pytest.param("dense", True, BF16, None, id="dense-bf16"),
    pytest.param("nf4", True, BF16, FP32, id="qdora-bf16-x-fp32-adapters"),
]


@pytest.mark.parametrize("weight,bias,dtype,adapter_dtype", VARIANTS)
def test_forward_backward_variants(weight, bias, dtype, adapter_dtype, nan_empty):
    x, w, wd, a, b, m, bb = _make((37,), 64, 45, 3, dtype, adapter_dtype=adapter_dtype, bias=bias, weight=weight)
    _check(x, w, wd, a, b, m, bb, dtype=dtype, what=weight)


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
def test_strided_x(dtype, nan_empty):
    # Every other feature of a wider tensor, then a transposed batch: [9, 4, 51], stride 2 along K.
    x = torch.randn(51 * 2, 4, 9, device=DEVICE, dtype=dtype)[::2].permute(2, 1, 0)
    assert not x.is_contiguous()
    _, w, wd, a, b, m, bias = _make((1,), 51, 45, 3, dtype)
    _check(x, w, wd, a, b, m, bias, dtype=dtype, what="strided x")


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
def test_weight_norm_kernel(dtype, nan_empty):
    """The row-norm kernel against dora_weight_norm, including a strided (transposed-view) W and r > 64."""
    for n, k, r, transposed in ((45, 51, 3, False), (70, 130, 70, True)):
        w = torch.randn(k, n, device=DEVICE, dtype=dtype).t() if transposed else torch.randn(n, k, device=DEVICE,
                                                                                             dtype=dtype)
        a = torch.randn(r, k, device=DEVICE, dtype=dtype) / k**0.5
        b = torch.randn(n, r, device=DEVICE, dtype=dtype)
        got = dora_triton.dora_weight_norm_triton(w, a, b, SCALING, dtype)
        assert got.dtype == dtype
        inputs64 = [w.double(), a.double(), b.double()]
        tol = dtype_error_bound(lambda w, a, b: dora_weight_norm(w, a, b, SCALING), inputs64, dtype)
        assert_rel_close(got, dora_weight_norm(*inputs64, SCALING), tol, f"norm {n}x{k} r{r}")


def test_only_some_grads(nan_empty):
    """x frozen (first layer) and, separately, only the magnitude training: each grad still right."""
    x, w, _, a, b, m, bias = _make((37,), 51, 45, 3, FP32)
    ref_inputs = [t.double() for t in (x, w, a, b, m, bias)]
    for trainable in ((a, b, m), (m,)):
        leaves = [t.detach().requires_grad_(any(t is u for u in trainable)) for t in (a, b, m)]
        y = dora_linear(x, w, *leaves[:2], SCALING, leaves[2], bias=bias, backend="triton")
        dy = torch.randn_like(y)
        y.backward(dy)
        ref = _reference_all(*ref_inputs, dy.double())
        for leaf, want, name in zip(leaves, ref[2:5], ("dA", "dB", "dm")):
            if leaf.requires_grad:
                # fp32 kernel vs float64: a few fp32 ulps of reductions over <= 51 terms.
                assert_rel_close(leaf.grad, want, 1e-5, name)
            else:
                assert leaf.grad is None


def test_empty_batch():
    x, w, _, a, b, m, bias = _make((0,), 51, 45, 3, FP32)
    m.requires_grad_()
    y = dora_linear(x, w, a, b, SCALING, m, bias=bias, backend="triton")
    assert y.shape == (0, 45)
    y.sum().backward()
    assert torch.equal(m.grad, torch.zeros_like(m))


# --------------------------------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------------------------------


def _recover_mask(rows, k, p, seed):
    """The keep-mask of an [rows, k] input under ``torch.manual_seed(seed)``, through the public op.

    With W = 0, A = B = I (N = K), scaling 1 and m = 1, the row norms are 1, so c = 1 and
    ``y = x W^T + 0 * (x_d W^T) + x_d = x_d`` exactly: the zeros are the dropped entries.
    """
    x = torch.rand(rows, k, device=DEVICE) + 0.5  # never zero
    eye = torch.eye(k, device=DEVICE)
    torch.manual_seed(seed)
    y = dora_linear(x, torch.zeros(k, k, device=DEVICE), eye, eye, 1.0, torch.ones(k, device=DEVICE),
                    dropout_p=p, backend="triton")
    keep = y != 0
    # Kept entries are scaled by 1/(1-p), as F.dropout does (fp32 rounding of one division).
    torch.testing.assert_close(y[keep], x[keep] / (1 - p), rtol=1e-6, atol=0)
    return keep


@pytest.mark.parametrize("dtype,weight", [(FP32, "dense"), (FP16, "dense"), (FP16, "nf4")],
                         ids=["fp32-dense", "fp16-dense", "fp16-nf4"])
def test_dropout_matches_reference_with_same_mask(dtype, weight, nan_empty):
    """Forward and backward regenerate one mask: all outputs match the reference replaying it."""
    p, seed = 0.35, 123
    x, w, wd, a, b, m, bias = _make((3, 13), 64, 45, 3, dtype, weight=weight)
    keep = _recover_mask(39, 64, p, seed)
    frac = keep.float().mean().item()
    assert 0.5 < frac < 0.8, frac  # 2496 draws at p = 0.35: std of the kept fraction ~0.01
    _check(x, w, wd, a, b, m, bias, dtype=dtype, keep=keep, p=p, seed=seed, what="dropout")


def test_dropout_deterministic_with_seed():
    x, w, _, a, b, m, bias = _make((37,), 51, 45, 3, FP32)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(dora_linear(x, w, a, b, SCALING, m, bias=bias, dropout_p=0.4, backend="triton"))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_dropout_off_draws_nothing():
    """p = 0 (or eval mode) takes no dropout path: the RNG is untouched and the result is deterministic."""
    x, w, _, a, b, m, bias = _make((37,), 51, 45, 3, FP32)
    state = torch.get_rng_state()
    y0 = dora_linear(x, w, a, b, SCALING, m, bias=bias, dropout_p=0.0, backend="triton")
    y_eval = dora_linear(x, w, a, b, SCALING, m, bias=bias, dropout_p=0.5, training=False, backend="triton")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(y0, y_eval)


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------


def test_unsupported_falls_back_or_raises():
    x, w, _, a, b, m, bias = _make((5,), 8, 6, 2, FP32)
    # base_output (8-bit bases, second adapter): "auto" runs the reference, explicit "triton" names why.
    base = F.linear(x, w, bias) + 0.25
    y = dora_linear(x, w, a, b, 2.0, m, bias=bias, base_output=base, backend="auto")
    torch.testing.assert_close(y, dora_linear_reference(x, w, a, b, 2.0, m, bias=bias, base_output=base))
    with pytest.raises(NotImplementedError, match="base_output"):
        dora_linear(x, w, a, b, 2.0, m, bias=bias, base_output=base, backend="triton")
    x64, w64, a64, b64, m64 = (t.double() for t in (x, w, a, b, m))
    y = dora_linear(x64, w64, a64, b64, 2.0, m64, backend="auto")
    torch.testing.assert_close(y, dora_linear_reference(x64, w64, a64, b64, 2.0, m64))
    with pytest.raises(NotImplementedError, match="float64"):
        dora_linear(x64, w64, a64, b64, 2.0, m64, backend="triton")
    ok, why = dora_mod._triton_supports(x, w.clone().requires_grad_(), a, b, m, bias, None, 0.0)
    assert not ok and "dW" in why
    with pytest.raises(ValueError, match="magnitude"):
        dora_linear(x, w, a, b, 2.0, m[:-1], backend="triton")


def test_autotune_pruning_counts_dora_operands():
    """CUDA-only pruning logic (runs on CPU): dropout forward stages two X tiles, and the two-accumulator
    launches drop tiles whose fp32 accumulators would not fit the registers."""

    y = torch.empty(1, 1, dtype=torch.bfloat16)
    operands = {"M": 8192, "p_x": y, "p_w": y, "p_l": y, "p_r": y}
    configs = launch.gemm_configs("sm90")
    prune = dora_triton._make_pruner(227 * 1024)
    for mode in (dora_triton._FWD, dora_triton._DX, dora_triton._DM):
        for dropout in (False, True):
            kept = prune(configs, operands, BLOCK_R=16, MODE=mode, DROPOUT=dropout)
            assert kept
            if dropout and mode != dora_triton._DM:
                assert all(2 * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 4096 * c.num_warps for c in kept)
    assert len(prune(configs, operands, BLOCK_R=16, MODE=0, DROPOUT=True)) < len(
        prune(configs, operands, BLOCK_R=16, MODE=0, DROPOUT=False))
    # fp32 adapters: the epilogue's L/R tiles count at 4 bytes (BM=128, BN=256, BR=64: 96 KB, over sm89's 99 KB
    # with nothing else; at 2 bytes it would be counted as 48 KB).
    big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=1, num_warps=8)
    lr32 = dict(operands, p_r=torch.empty(1, 1, dtype=torch.float32), BLOCK_R=64, MODE=dora_triton._DX, DROPOUT=False)
    assert dora_triton._smem_bytes(big, lr32) == 98304
    assert dora_triton._smem_bytes(big, dict(lr32, p_r=y)) == 49152


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------


def _op_args(weight_kind, dropout):
    torch.manual_seed(0)
    m, k, n, r = 7, 24, 20, 3
    x = torch.randn(m, k, device=DEVICE, requires_grad=True)
    a = torch.randn(r, k, device=DEVICE, requires_grad=True)
    b = torch.randn(n, r, device=DEVICE, requires_grad=True)
    mag = (torch.rand(n, device=DEVICE) + 0.5).requires_grad_()
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
    return (x, w, a, b, mag, bias, seed, absmax, code, code2, absmax2, offset, meta, qt, SCALING,
            0.25 if dropout else 0.0)


@pytest.mark.parametrize("weight_kind,dropout", [("dense", True), ("nf4", False)])
def test_opcheck(weight_kind, dropout):
    torch.library.opcheck(torch.ops.peftfast.dora_linear.default, _op_args(weight_kind, dropout))


def test_opcheck_backward_op():
    x, w, a, b, mag, bias, seed, *_ = _op_args("dense", True)
    xa, norm, dy = torch.randn(7, 3), torch.rand(20) + 1.0, torch.randn(7, 20)
    args = (dy, x.detach(), xa, norm, w, a.detach(), b.detach(), mag.detach(), seed, None, None, None, None, None,
            [], "", SCALING, 0.25, [True, True, True, True, True])
    torch.library.opcheck(torch.ops.peftfast.dora_linear_backward.default, args)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compile_fullgraph_no_graph_break():
    """torch.compile traces the public call (dense base, dropout) into one graph, backward included."""
    x, w, _, a, b, m, bias = _make((2, 5), 24, 20, 3, FP32)
    a.requires_grad_()
    m.requires_grad_()

    def f(x, w, a, b, m, bias):
        return dora_linear(x, w, a, b, SCALING, m, bias=bias, dropout_p=0.25, backend="triton")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    y = compiled(x, w, a, b, m, bias)
    y.sum().backward()
    ga, gm = a.grad.clone(), m.grad.clone()
    a.grad = m.grad = None
    torch.manual_seed(3)
    y_eager = f(x, w, a, b, m, bias)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(ga, a.grad)
    torch.testing.assert_close(gm, m.grad)


# --------------------------------------------------------------------------------------------------
# model level: a DoRA-patched tiny Llama, Triton vs reference
# --------------------------------------------------------------------------------------------------


def test_tiny_llama_dora_triton_matches_reference(monkeypatch):
    import peftfast
    from peftfast.layers import AdapterLayer
    from tiny import tiny_llama

    ref = tiny_llama().to(DEVICE)
    ids = torch.randint(1, 64, (2, 9), device=DEVICE)
    with torch.no_grad():
        plain = ref(input_ids=ids).logits
    peftfast.patch(ref, peftfast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            use_dora=True, init_lora_weights=False), backend="reference")
    fast = copy.deepcopy(ref)
    layers = [mod for mod in fast.modules() if isinstance(mod, AdapterLayer)]
    assert len(layers) == 6
    for mod in layers:
        mod.backend = "triton"
    calls = []
    real = dora_mod._triton_dora_linear
    monkeypatch.setattr(dora_mod, "_triton_dora_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    outs = []
    for model in (ref, fast):
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert len(calls) == 6, "not every DoRA layer ran the Triton path"
    (l_ref, g_ref), (l_fast, g_fast) = outs
    assert rel_err(l_ref, plain) > 1e-3, "the DoRA adapters do not change the logits: the test would prove nothing"
    assert g_ref.keys() == g_fast.keys() and any("magnitude" in n for n in g_ref)
    # fp32 both ways, same math in a different summation order: errors are ~1e-7 and compound through
    # two layers and the backward; 1e-5 is ~100x that and far below a real difference (a missing c, the
    # wrong norm) that moves logits or grads by 1e-2 or more.
    assert_rel_close(l_fast, l_ref, 1e-5, "logits")
    for name in g_ref:
        assert_rel_close(g_fast[name], g_ref[name], 1e-5, name)


# --------------------------------------------------------------------------------------------------
# GPU: Llama-3-8B shape, bf16
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("m,k,n", [pytest.param(2048, 4096, 1024, id="k_v-2048x4096x1024"),
                                   pytest.param(1, 4096, 14336, id="decode-1x4096x14336")])
def test_gpu_llama_bf16(m, k, n, p):
    dtype = torch.bfloat16
    x, w, wd, a, b, mag, bias = _make((m,), k, n, 16, dtype, adapter_dtype=torch.float32)
    keep = _recover_mask(m, k, p, seed=7) if p > 0 else None
    _check(x, w, wd, a, b, mag, bias, dtype=dtype, keep=keep, p=p, seed=7 if p > 0 else None,
           what=f"llama {m}x{k}x{n}")
