"""Prefix-tuning attention (kernels/prefix_attention.py): Triton path against the PyTorch reference.

The reference (expand + concatenate + masked SDPA) defines the semantics; it is itself checked against
an explicit per-row loop in float64. Kernel outputs and all five gradients are compared with float64
autograd of the reference. fp32 runs must agree to ~1e-5 relative RMS; half precision follows
flash-attention's rule (``helpers.dtype_error_bound``): at most twice the error of the same attention
computed naively by PyTorch in that dtype (flash-attention's ``attention_ref(upcast=False)``).
On CPU the kernels run in Triton's interpreter with 32-wide blocks, so the shapes are small but chosen
to leave ragged tails (37 keys, P = 5, 33 or 40), several causal row blocks, GQA ratios 1/2/4 and
head dims 16/40/64 (40: a masked, non-power-of-two head). bf16 runs only in the ``gpu`` tests.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from helpers import assert_rel_close, dtype_error_bound

from peftfast.kernels import prefix_attention, prefix_attention_reference
from peftfast.kernels import prefix_attention_triton  # noqa: E402

# The package attribute of that name is the function; the module is fetched by its full name.
pa_mod = importlib.import_module("peftfast.kernels.prefix_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 kernel vs float64: the kernel's own rounding (sums of <= ~100 fp32 terms, exp2 with a folded
# scale) measures ~3e-7 relative RMS here; 1e-5 leaves room for other shapes while any masking or
# indexing slip (a wrong key seen or missed) shows up at 1e-3 or more.
FP32_TOL = 1e-5
NAMES = ("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _make(b, hq, hkv, nq, nk, p, d, dtype=torch.float32, layout="contiguous", prefix_dtype=None):
    """Random q, k, v, prefix_k, prefix_v; ``layout="bnhd"`` gives transposed views of [B, N, H, D]."""
    if layout == "bnhd":
        q = torch.randn(b, nq, hq, d, device=DEVICE, dtype=dtype).transpose(1, 2)
        k = torch.randn(b, nk, hkv, d, device=DEVICE, dtype=dtype).transpose(1, 2)
        v = torch.randn(b, nk, hkv, d, device=DEVICE, dtype=dtype).transpose(1, 2)
        assert not q.is_contiguous() and not k.is_contiguous()
    else:
        q = torch.randn(b, hq, nq, d, device=DEVICE, dtype=dtype)
        k = torch.randn(b, hkv, nk, d, device=DEVICE, dtype=dtype)
        v = torch.randn(b, hkv, nk, d, device=DEVICE, dtype=dtype)
    pdt = prefix_dtype or dtype
    pk = torch.randn(hkv, p, d, device=DEVICE, dtype=pdt)
    pv = torch.randn(hkv, p, d, device=DEVICE, dtype=pdt)
    return q, k, v, pk, pv


def _mask(b, nk, pads, kind):
    """[B, Nk] padding mask: ``pads[i]`` zeros on the left of row i (negative: on the right)."""
    if pads is None:
        return None
    m = torch.ones(b, nk, dtype=torch.int64, device=DEVICE)
    for i, n in enumerate(pads):
        if n > 0:
            m[i, :n] = 0
        elif n < 0:
            m[i, n:] = 0
    return m.bool() if kind == "bool" else m.to(kind)


def _naive(q, k, v, pk, pv, mask, causal=True, scale=None):
    """Materialized attention in the inputs' dtype (flash-attention's ``attention_ref(upcast=False)``)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    p = pk.shape[1]
    g = hq // hkv
    kk = torch.cat([pk.to(k.dtype).expand(b, -1, -1, -1), k], 2).repeat_interleave(g, 1)
    vv = torch.cat([pv.to(v.dtype).expand(b, -1, -1, -1), v], 2).repeat_interleave(g, 1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = (q * scale) @ kk.transpose(-1, -2)
    o_q = torch.arange(nq, device=q.device)[:, None]
    o_k = torch.arange(nk, device=q.device)[None, :]
    keep = torch.ones(b, nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep & (o_k <= o_q + nk - nq)
    if mask is not None:
        keep = keep & (mask != 0)[:, None, :]
    keep = torch.cat([torch.ones(b, nq, p, dtype=torch.bool, device=q.device), keep], -1)
    s = s.masked_fill(~keep[:, None], float("-inf"))
    return torch.softmax(s, -1) @ vv


def _all(fn, q, k, v, pk, pv, mask, do, causal):
    """fn's output and its gradients wrt (q, k, v, prefix_k, prefix_v) for ``do``."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v, pk, pv)]
    out = fn(*leaves, mask, causal)
    return (out.detach(), *torch.autograd.grad(out, leaves, do))


def _triton_all(q, k, v, pk, pv, mask, causal, do=None):
    leaves = [t.detach().requires_grad_() for t in (q, k, v, pk, pv)]
    out = prefix_attention(*leaves, causal=causal, attention_mask=mask, backend="triton")
    assert out.dtype == q.dtype and out.shape == q.shape
    if do is None:
        do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    for g, t in zip(grads, leaves):
        assert g.dtype == t.dtype and g.shape == t.shape
    return (out, *grads), do


def _ref(q, k, v, pk, pv, mask, causal):
    return prefix_attention_reference(q, k, v, pk, pv, causal=causal, attention_mask=mask)


def _naive_fn(q, k, v, pk, pv, mask, causal):
    return _naive(q, k, v, pk, pv, mask, causal)


# (B, Hq, Hkv, Nq, Nk, P, D, causal, pads, mask kind, layout); blocks are 32 wide in the interpreter.
CASES = [
    pytest.param(2, 4, 2, 37, 37, 5, 40, True, None, None, "bnhd", id="odd37-P5-D40-gqa2-strided"),
    pytest.param(2, 2, 2, 37, 37, 1, 16, True, [0, 9], "bool", "contiguous", id="P1-D16-mha-leftpad-bool"),
    pytest.param(2, 4, 1, 1, 37, 5, 64, True, [3, 0], torch.int64, "contiguous", id="decode-Nq1-gqa4-D64-pad"),
    pytest.param(2, 4, 2, 7, 37, 40, 16, True, [0, 20], torch.int64, "bnhd", id="chunk-Nq7-P40-gqa2-pad"),
    pytest.param(2, 4, 2, 37, 37, 5, 40, False, [5, 0], torch.int32, "contiguous", id="noncausal-gqa2-D40-pad"),
    pytest.param(1, 2, 1, 1, 20, 3, 16, False, None, None, "contiguous", id="noncausal-decode-gqa2"),
    # Nk - Nq = 1 puts the causal frontier one key past a block edge (row block 0 needs key 32).
    pytest.param(1, 2, 2, 69, 70, 33, 64, True, None, None, "contiguous", id="multiblock-69of70-P33-D64"),
    pytest.param(2, 2, 1, 20, 20, 4, 16, True, [-6, 0], torch.uint8, "contiguous", id="rightpad-uint8-gqa2"),
    pytest.param(1, 2, 2, 9, 5, 3, 16, True, None, None, "contiguous", id="Nq-gt-Nk"),
    pytest.param(1, 2, 1, 3, 0, 6, 16, True, None, None, "contiguous", id="Nk0-prefix-only"),
]


# --------------------------------------------------------------------------------------------------
# semantics of the reference
# --------------------------------------------------------------------------------------------------


def test_reference_matches_explicit_rows():
    """The reference equals a per-row loop over the visible keys (prefix always; causal bottom-right;
    padding masks real keys only), in float64; GQA maps q head h to kv head h // G."""
    b, hq, hkv, nq, nk, p, d = 2, 4, 2, 5, 9, 3, 8
    q, k, v, pk, pv = (t.double() for t in _make(b, hq, hkv, nq, nk, p, d))
    mask = _mask(b, nk, [4, -2], torch.int64)
    for causal in (True, False):
        out = prefix_attention_reference(q, k, v, pk, pv, causal=causal, attention_mask=mask)
        expected = torch.empty_like(out)
        for ib in range(b):
            for ih in range(hq):
                kvh = ih // (hq // hkv)
                for i in range(nq):
                    seen = [j for j in range(nk) if (not causal or j <= i + nk - nq) and mask[ib, j] != 0]
                    keys = torch.cat([pk[kvh], k[ib, kvh, seen]])
                    vals = torch.cat([pv[kvh], v[ib, kvh, seen]])
                    w = torch.softmax(keys @ q[ib, ih, i] / math.sqrt(d), 0)
                    expected[ib, ih, i] = w @ vals
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(_naive(q, k, v, pk, pv, mask, causal), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Triton vs reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,hq,hkv,nq,nk,p,d,causal,pads,kind,layout", CASES)
def test_forward_backward_fp32(b, hq, hkv, nq, nk, p, d, causal, pads, kind, layout, nan_empty):
    q, k, v, pk, pv = _make(b, hq, hkv, nq, nk, p, d, layout=layout)
    mask = _mask(b, nk, pads, kind)
    got, do = _triton_all(q, k, v, pk, pv, mask, causal)
    want = _all(_ref, q.double(), k.double(), v.double(), pk.double(), pv.double(), mask, do.double(), causal)
    for name, g, w in zip(NAMES, got, want):
        assert_rel_close(g, w, FP32_TOL, f"fp32 {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "b,hq,hkv,nq,nk,p,d,causal,pads,prefix_dtype",
    [
        pytest.param(2, 4, 2, 37, 37, 5, 40, True, [0, 9], None, id="odd37-gqa2-D40-pad"),
        pytest.param(2, 4, 1, 1, 37, 40, 64, True, [3, 0], None, id="decode-gqa4-P40-D64"),
        pytest.param(1, 2, 2, 37, 37, 5, 16, False, None, torch.float32, id="noncausal-fp32-prefix"),
    ],
)
def test_forward_backward_half(b, hq, hkv, nq, nk, p, d, causal, pads, prefix_dtype, dtype, nan_empty):
    """fp16/bf16 inputs (optionally fp32 prefix parameters, cast as PEFT does): 2x PyTorch's error."""
    q, k, v, pk, pv = _make(b, hq, hkv, nq, nk, p, d, dtype=dtype, prefix_dtype=prefix_dtype)
    mask = _mask(b, nk, pads, torch.int64)
    got, do = _triton_all(q, k, v, pk, pv, mask, causal)
    inputs64 = [t.double() for t in (q, k, v, pk, pv)] + [mask, do.double(), causal]
    for i, (name, g) in enumerate(zip(NAMES, got)):
        def fn(*args, _i=i):
            return _all(_naive_fn, *args)[_i]

        # fp32 prefix parameters are rounded to x's dtype by the kernel (PEFT's cast), exactly as the
        # all-half naive run rounds them, so the same bound applies.
        tol = dtype_error_bound(fn, inputs64, dtype)
        assert_rel_close(g, fn(*inputs64), tol, f"{dtype} {name}")


def test_backward_is_deterministic(nan_empty):
    """Prefix grads are reduced over batch and head groups without atomics: reruns are bitwise equal."""
    q, k, v, pk, pv = _make(2, 4, 2, 37, 37, 40, 16)
    mask = _mask(2, 37, [0, 7], torch.int64)
    first, do = _triton_all(q, k, v, pk, pv, mask, True)
    second, _ = _triton_all(q, k, v, pk, pv, mask, True, do=do)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_explicit_scale_and_no_grad():
    q, k, v, pk, pv = _make(1, 2, 1, 5, 9, 3, 16)
    with torch.no_grad():
        out = prefix_attention(q, k, v, pk, pv, scale=0.3, backend="triton")
    ref = prefix_attention_reference(q.double(), k.double(), v.double(), pk.double(), pv.double(), scale=0.3)
    assert_rel_close(out, ref, FP32_TOL, "scale=0.3")


# --------------------------------------------------------------------------------------------------
# errors and dispatch
# --------------------------------------------------------------------------------------------------


def _bad(what):
    q, k, v, pk, pv = _make(2, 4, 2, 5, 7, 3, 16)
    mask = torch.ones(2, 7, dtype=torch.bool, device=DEVICE)
    if what == "q3d":
        q = q[0]
    elif what == "k_batch":
        k = k[:1]
    elif what == "v_shape":
        v = v[:, :, :6]
    elif what == "heads":
        q = torch.randn(2, 3, 5, 16, device=DEVICE)
    elif what == "head_dim":
        k = torch.randn(2, 2, 7, 8, device=DEVICE)
        v = k
    elif what == "prefix_heads":
        pk = pk[:1]
    elif what == "prefix_v":
        pv = pv[:, :2]
    elif what == "mask_shape":
        mask = mask[:, :5]
    elif what == "mask_float":
        mask = mask.float()
    return q, k, v, pk, pv, mask


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize(
    "what,match",
    [
        ("q3d", r"q must be \[B, Hq, Nq, D\], got shape \(4, 5, 16\)"),
        ("k_batch", r"k must be \[B=2, Hkv, Nk, D=16\].*got shape \(1, 2, 7, 16\)"),
        ("v_shape", r"v must have k's shape .*\(2, 2, 7, 16\), got shape \(2, 2, 6, 16\)"),
        ("heads", r"Hq=3 must be a multiple of k's Hkv=2"),
        ("head_dim", r"k must be \[B=2, Hkv, Nk, D=16\].*got shape \(2, 2, 7, 8\)"),
        ("prefix_heads", r"prefix_k must be \[Hkv=2, P, D=16\], got shape \(1, 3, 16\)"),
        ("prefix_v", r"prefix_v must have prefix_k's shape .*\(2, 3, 16\), got shape \(2, 2, 16\)"),
        ("mask_shape", r"attention_mask must be \[B=2, Nk=7\].*got shape \(2, 5\)"),
        ("mask_float", r"attention_mask must be bool or integer"),
    ],
)
def test_bad_shapes(what, match, backend):
    q, k, v, pk, pv, mask = _bad(what)
    with pytest.raises(ValueError, match=match):
        prefix_attention(q, k, v, pk, pv, attention_mask=mask, backend=backend)


def test_unsupported_falls_back_or_raises():
    q, k, v, pk, pv = (t.double() for t in _make(1, 2, 1, 5, 9, 3, 16))
    ok, why = pa_mod._triton_supports(q, k, v, pk, pv, None)
    assert not ok and "float64" in why
    torch.testing.assert_close(prefix_attention(q, k, v, pk, pv, backend="auto"),
                               prefix_attention_reference(q, k, v, pk, pv))
    with pytest.raises(NotImplementedError, match="float64"):
        prefix_attention(q, k, v, pk, pv, backend="triton")


def test_empty_prefix_runs_the_reference():
    """P = 0 is plain attention: "auto" runs the reference (right), "triton" says why it cannot."""
    q, k, v, _, _ = _make(1, 2, 1, 5, 9, 3, 16)
    pk = pv = torch.zeros(1, 0, 16, device=DEVICE)
    out = prefix_attention(q, k, v, pk, pv, backend="auto")
    kk = k.repeat_interleave(2, 1)
    vv = v.repeat_interleave(2, 1)
    causal = torch.ones(5, 9, dtype=torch.bool, device=DEVICE).tril(diagonal=4)
    expected = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=causal)
    torch.testing.assert_close(out, expected)
    with pytest.raises(NotImplementedError, match="P=0"):
        prefix_attention(q, k, v, pk, pv, backend="triton")


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------


def _op_inputs():
    q, k, v, pk, pv = _make(1, 2, 1, 5, 7, 3, 16)
    mask = _mask(1, 7, [2], torch.int64)
    return [t.requires_grad_() for t in (q, k, v, pk, pv)], mask


def test_opcheck_forward():
    (q, k, v, pk, pv), mask = _op_inputs()
    torch.library.opcheck(torch.ops.peftfast.prefix_attention.default, (q, k, v, pk, pv, mask, True, 0.25))


def test_opcheck_backward():
    (q, k, v, pk, pv), mask = _op_inputs()
    out, lse = torch.ops.peftfast.prefix_attention(q, k, v, pk, pv, mask, True, 0.25)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), pk.detach(), pv.detach(), mask,
            out.detach(), lse.detach(), True, 0.25, [True] * 5)
    torch.library.opcheck(torch.ops.peftfast.prefix_attention_backward.default, args)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compile_fullgraph_no_graph_break():
    """torch.compile traces the public call (padding mask, GQA) into one graph, backward included."""
    q, k, v, pk, pv = _make(1, 2, 1, 5, 7, 3, 16)
    mask = _mask(1, 7, [2], torch.int64)
    pk.requires_grad_()

    def f(q, k, v, pk, pv, mask):
        return prefix_attention(q, k, v, pk, pv, attention_mask=mask, backend="triton")

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, pk, pv, mask)
    out.sum().backward()
    grad = pk.grad.clone()
    pk.grad = None
    out_eager = f(q, k, v, pk, pv, mask)
    out_eager.sum().backward()
    torch.testing.assert_close(out, out_eager)
    torch.testing.assert_close(grad, pk.grad)


# (shared memory per block, compute capability) of A100, RTX 4090 (sm86/sm89 alike) and H100.
_GPUS = {"sm80": (166912, 80), "sm89": (101376, 89), "sm90": (232448, 90)}


@pytest.mark.parametrize("gpu", sorted(_GPUS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_configs_fit_shared_memory(gpu, dtype):
    """The forward's pruner always leaves a config its estimate says fits (never its fallback), and the
    backward's fixed blocks are the ones tests/kernels/test_aot_adapters.py compiles; the compiled sizes
    themselves are checked there."""
    smem, cap = _GPUS[gpu]
    for d in (16, 64, 80, 128, 256):
        block_d = max(16, 1 << (d - 1).bit_length())
        for nq in (1, 32, 4096):
            nq_key = min(128, 1 << (nq - 1).bit_length())
            named = {"p_q": torch.empty(0, dtype=dtype), "BLOCK_D": block_d, "NQ_KEY": nq_key}
            kept = prefix_attention_triton._fwd_pruner(smem, cap)(prefix_attention_triton._fwd_configs(prefix_attention_triton._d_bucket(block_d)), named)
            sizes = [prefix_attention_triton._fwd_smem_bytes(c, named, cap) for c in kept]
            assert kept and max(sizes) <= smem, (gpu, dtype, d, nq, sizes)
        bm, bn, _, _ = prefix_attention_triton._bwd_config(block_d, dtype)
        assert bm >= 16 and bn >= 16  # tl.dot's minimum


# --------------------------------------------------------------------------------------------------
# GPU: a real size, bf16 / fp16
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,nq,d",
    [
        pytest.param(torch.bfloat16, 512, 128, id="bf16-prefill-D128"),
        pytest.param(torch.float16, 512, 128, id="fp16-prefill-D128"),
        pytest.param(torch.bfloat16, 1, 128, id="bf16-decode-D128"),
        pytest.param(torch.bfloat16, 512, 80, id="bf16-prefill-D80"),
        pytest.param(torch.bfloat16, 256, 256, id="bf16-prefill-D256"),
        # fp32 has its own, smaller backward blocks (the 16-bit ones overflow 99 KB GPUs at D >= 128).
        pytest.param(torch.float32, 256, 256, id="fp32-prefill-D256"),
    ],
)
def test_gpu_real_size(dtype, nq, d):
    """B=2, Hq=32, Hkv=8, Nk=512, P=64 with left padding; all outputs within 2x PyTorch's own error."""
    b, hq, hkv, nk, p = 2, 32, 8, 512, 64
    q, k, v, pk, pv = _make(b, hq, hkv, nq, nk, p, d, dtype=dtype, layout="bnhd")
    mask = _mask(b, nk, [0, 100], torch.int64)
    got, do = _triton_all(q, k, v, pk, pv, mask, True)
    inputs64 = [t.double() for t in (q, k, v, pk, pv)] + [mask, do.double(), True]
    for i, (name, g) in enumerate(zip(NAMES, got)):
        def fn(*args, _i=i):
            return _all(_naive_fn, *args)[_i]

        tol = dtype_error_bound(fn, inputs64, dtype)
        assert_rel_close(g, fn(*inputs64), tol, f"{dtype} {name}")
