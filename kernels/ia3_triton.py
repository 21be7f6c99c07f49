"""The Triton IA3 linear: ``peftfast::ia3_linear`` / ``peftfast::ia3_linear_backward`` and the IA3 GEMM
kernel. Formulas and the front end are in :mod:`.ia3`.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import launch
from . import ops
from . import tuning as _tuning
from .tiles import dot, gemm_tile, load_xw, store_row_partials
from .weights import dense_base, kernel_operand


# ==================================================================================================
# Triton path
# ==================================================================================================

# Row granularity of the dl partial sums: every config's BLOCK_M is a multiple of it, so the partials
# buffer ([cdiv(M, 16), N] fp32) is fully written whichever config the autotuner picks.
_SUB_M = 16


@triton.jit
def _ia3_matmul_kernel(
    p_a, p_b, p_s, p_bias, p_g, p_y, p_part,
    M, N, K, M_KEY,
    stride_am, stride_ak, stride_bk, stride_bn, stride_s, stride_gm, stride_gn, stride_ym, stride_yn,
    stride_pp,
    SCALE_A: tl.constexpr, SCALE_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Y: tl.constexpr,
    COLDOT: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr, SUB_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = (A[M, K] * s[K]) @ B[K, N] + bias[N]; then optionally

    * ``COLDOT``: ``part[r, n] = sum_{m in sub-block r} C[m, n] * G[m, n]`` (fp32, before the
      output scale): the per-column reductions of dl, without ever writing C;
    * ``SCALE_OUT``: ``C *= s[N]``;
    * ``STORE_Y``: ``Y = C`` in Y's dtype.

    ``s`` scales A's columns when ``SCALE_A`` and C's columns when ``SCALE_OUT`` (never both). The
    compute dtype is A's: B (the base weight, any float dtype) is cast to it in-kernel, and a scaled
    A tile is rounded back to it before the dot, as PyTorch's ``(x * l).to(x.dtype)`` does.
    ``M_KEY`` (M rounded up to a power of two) is only an autotuning key.
    """
    i_m, i_n, o_m, o_n, m_m, m_n, o_m64 = gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    o_k = tl.arange(0, BLOCK_K)
    dtype = p_a.dtype.element_ty

    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    p_ab = p_a + o_m64[:, None] * stride_am + o_k[None, :] * stride_ak
    p_bb = p_b + o_k[:, None] * stride_bk + o_n[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        m_k, b_a, b_b = load_xw(p_ab, p_bb, k0, o_k, K, m_m, m_n, dtype)
        if SCALE_A:
            # Input scaling at the operand load: the scaled A is never written to memory.
            b_s = tl.load(p_s + (k0 + o_k) * stride_s, mask=m_k, other=0.0).to(tl.float32)
            b_a = (b_a.to(tl.float32) * b_s[None, :]).to(dtype)
        b_acc = dot(b_a, b_b, b_acc, DOT_F32, IEEE)  # [BM, BK] @ [BK, BN] -> [BM, BN]
        p_ab += BLOCK_K * stride_ak
        p_bb += BLOCK_K * stride_bk

    if HAS_BIAS:
        b_acc += tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    if COLDOT:
        # Rows past M hold the bias, but their G is loaded as 0, so they add nothing.
        store_row_partials(b_acc, p_g, p_part, i_m, o_m64, o_n, m_m, m_n, M, stride_gm, stride_gn, stride_pp,
                           SUB_M, BLOCK_M, BLOCK_N)
    if SCALE_OUT:
        # Output scaling in the epilogue, after the bias (PEFT's order).
        b_acc *= tl.load(p_s + o_n * stride_s, mask=m_n, other=0.0).to(tl.float32)[None, :]
    if STORE_Y:
        tl.store(p_y + o_m64[:, None] * stride_ym + o_n[None, :] * stride_yn, b_acc.to(p_y.dtype.element_ty),
                 mask=m_m[:, None] & m_n[None, :])

def _make_pruner(max_smem: int):
    """matmul.py's pruning (shared memory, then row blocks that fit M) with this kernel's names.

    The epilogue's extra tile (G) lives in registers, not shared memory, so it is counted as none.
    """
    base = launch.make_gemm_pruner(max_smem)

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        a, b = args["p_a"], args["p_b"]  # no low-rank epilogue (BLOCK_R=0): L and R stand in as A and B
        return base(configs, {"M": args["M"], "p_y": a, "p_w": b, "p_l": a, "p_r": b}, BLOCK_R=0)

    return prune

@functools.lru_cache(maxsize=None)
def _tuned_ia3_matmul(device_index: int):
    """The autotuned kernel for one CUDA device, built on first use so import never touches CUDA.

    Configs: the per-GPU-family table of the LoRA GEMM (``configs/lora_matmul.json``): the main
    loop is the same X-by-W tile loop, only the epilogue differs. The flags are part of the key, so
    forward, dX and dl GEMMs of one shape are tuned separately.
    """
    return triton.autotune(
        configs=launch.gemm_configs(launch.device_family(device_index)),
        key=["M_KEY", "N", "K", "SCALE_A", "SCALE_OUT", "HAS_BIAS", "STORE_Y", "COLDOT"],
        prune_configs_by={"early_config_prune": _tuning.limited_pruner(
            _make_pruner(launch.max_shared_memory(device_index)))},
        **launch.autotune_options(),
    )(_ia3_matmul_kernel)


def _launch_args(a, b, scale, scale_a, scale_out, bias, coldot, y, part) -> Tuple[tuple, dict]:
    """The kernel's positional arguments and constexpr flags (all but the tuned config) for one
    :func:`ia3_matmul` call; ``y`` and ``part`` are its outputs (None where not written)."""
    m, k = a.shape
    n = b.shape[1]
    want_colsum = coldot is not None
    store = y is not None
    dummy = y if store else part
    args = (
        a, b, scale, bias if bias is not None else dummy, coldot if want_colsum else dummy, dummy,
        part if want_colsum else dummy,
        m, n, k, triton.next_power_of_2(m),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), scale.stride(0),
        coldot.stride(0) if want_colsum else 0, coldot.stride(1) if want_colsum else 0,
        y.stride(0) if store else 0, y.stride(1) if store else 0, part.stride(0) if want_colsum else 0,
    )
    flags = dict(SCALE_A=bool(scale_a), SCALE_OUT=bool(scale_out), HAS_BIAS=bias is not None, STORE_Y=store,
                 COLDOT=want_colsum, SUB_M=_SUB_M, **launch.dot_flags(a.dtype))
    return args, flags


def ia3_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    *,
    scale_a: bool = False,
    scale_out: bool = False,
    bias: Optional[torch.Tensor] = None,
    coldot: Optional[torch.Tensor] = None,
    store: bool = True,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``C = (a * scale[K] if scale_a) @ b + bias``; returns ``(C * scale[N] if scale_out, colsum)``.

    Args:
        a: [M, K], any strides, fp32/fp16/bf16: the compute dtype.
        b: [K, N], any strides and float dtype (pass ``W.t()`` for ``a @ W^T``, ``W`` for ``a @ W``).
        scale: 1-D (any stride), [K] with ``scale_a`` or [N] with ``scale_out``; any float dtype.
        bias: optional [N], added before the output scale.
        coldot: optional [M, N]; then ``colsum[n] = sum_m C[m, n] * coldot[m, n]`` (fp32, before the
            output scale) is returned as well.
        store: write C (False when only ``colsum`` is wanted: C is then never materialized).
        out_dtype: C's dtype; defaults to a's.

    Returns:
        ``(y, colsum)``: y [M, N] contiguous or None; colsum [N] fp32 or None.
    """
    m, k = a.shape
    n = b.shape[1]
    dev = a.device
    y = torch.empty((m, n), device=dev, dtype=out_dtype or a.dtype) if store else None
    want_colsum = coldot is not None
    n_part = triton.cdiv(m, _SUB_M)
    part = torch.empty((n_part, n), device=dev, dtype=torch.float32) if want_colsum else None
    if m == 0 or n == 0:
        colsum = torch.zeros(n, device=dev, dtype=torch.float32) if want_colsum else None
        return y, colsum
    args, flags = _launch_args(a, b, scale, scale_a, scale_out, bias, coldot, y, part)
    launch.launch_tiled_gemm(_tuned_ia3_matmul, _ia3_matmul_kernel, dev, m, n, args, flags)
    # Deterministic: fixed-order partials summed by PyTorch (no atomics).
    return y, (part.sum(0) if want_colsum else None)


# --------------------------------------------------------------------------------------------------
# Forward / backward bodies. With g = dY [M, N], s = ia3_l flattened, all through ia3_matmul:
#
#   output scaling (feedforward=False)            input scaling (feedforward=True)
#   fwd: y  = (x @ W^T + bias) * s[n]   SCALE_OUT  y  = (x * s[k]) @ W^T + bias    SCALE_A
#   dX:  dx = (g * s[n]) @ W            SCALE_A    gW = g @ W; dx = gW * s[k]       SCALE_OUT
#   dl:  dl = colsum((x @ W^T + bias) * g) COLDOT  dl = colsum(gW * x)  (same launch COLDOT)
#
# W is read as [N, K] or [K, N] purely through strides: no transposed copy. Saved for the backward:
# x, ia3_l and the base weight *as stored* (and bias). Nothing of size M x N is kept:
# * dl (output scaling) needs the pre-scale output y_pre = x W^T + bias. Saving it would hold an
#   M x N activation per layer for the whole step (for Llama's gate/up at 8K tokens, 235 MB in bf16
#   per layer): IA3 exists to make training light, so it is recomputed instead, one extra GEMM that
#   writes only [cdiv(M, 16), N] fp32 partials (8x less than y_pre in bf16, and freed at once).
#   Recovering y_pre as y / l from the saved output would be cheaper but wrong where l is 0 or tiny
#   (and y is rounded), so it is not done.
# * a 4-bit base is dequantized again in the backward (once, for both GEMMs): keeping the dense copy
#   would cost 4x the 4-bit storage for the whole step.
# --------------------------------------------------------------------------------------------------


def _ia3_forward(x, weight, ia3_l, bias, feedforward):
    """``y``; ``weight`` is dense [N, K] or a ``Quant4bit``."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # a view whenever the leading dims merge; the kernel takes any 2-D strides
    w = dense_base(weight, x.dtype)
    n = w.shape[0]
    s = ia3_l.reshape(-1)
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias with unit stride; [N], so a copy is negligible
    y, _ = ia3_matmul(x2, w.t(), s, scale_a=feedforward, scale_out=not feedforward, bias=bias)
    return y.view(*lead, n)


def _ia3_backward(dy, x, weight, ia3_l, bias, feedforward, needs):
    """``(dx, dl)``; an entry whose ``needs`` flag is False is None."""
    k = x.shape[-1]
    dtype = x.dtype
    need_dx, need_dl = needs
    dx = dl = None  # None where not needed (see ops._as_op_grads)
    if not (need_dx or need_dl):
        return dx, dl
    x2 = x.reshape(-1, k)
    w = dense_base(weight, dtype)
    dy2 = ops.as_rows(dy, w.shape[0], dtype)
    s = ia3_l.reshape(-1)
    if feedforward:
        # One GEMM gives both: gW = dY @ W stays in registers; dx = gW * s in the epilogue and
        # dl = colsum(gW * x) from the same tiles.
        dx2, colsum = ia3_matmul(dy2, w, s, scale_out=True, coldot=x2 if need_dl else None, store=need_dx)
    else:
        dx2 = colsum = None
        if need_dx:
            dx2, _ = ia3_matmul(dy2, w, s, scale_a=True)
        if need_dl:
            if bias is not None:
                bias = bias.contiguous()
            # Recompute y_pre = x W^T + bias tile by tile and reduce it against dY; y_pre is never written.
            _, colsum = ia3_matmul(x2, w.t(), s, bias=bias, coldot=dy2, store=False)
    if need_dx:
        dx = dx2.view(x.shape)
    if need_dl:
        dl = colsum.to(ia3_l.dtype).view(ia3_l.shape)
    return dx, dl


def _ia3_fake(x, weight, ia3_l, bias, feedforward):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _ia3_backward_fake(dy, x, weight, ia3_l, bias, feedforward, needs):
    return ops.fake_grads(needs, x, x, ia3_l)


# ``peftfast::ia3_linear`` and ``peftfast::ia3_linear_backward``. The bias is saved only for the
# recomputed pre-scale output of output scaling's dl (a reference to the module's own tensor).
IA3_LINEAR = ops.declare(
    "ia3_linear", __name__, "IA3_LINEAR",
    inputs="Tensor x, Weight weight, Tensor ia3_l, Tensor? bias, bool feedforward",
    outputs=("y",), grads=("x", "ia3_l"), saved=("x", "weight", "ia3_l", "bias"),
    forward=_ia3_forward, backward=_ia3_backward, fake=_ia3_fake, backward_fake=_ia3_backward_fake,
)


def triton_ia3_linear(
    x: torch.Tensor, weight, ia3_l: torch.Tensor, *, feedforward: bool, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The Triton IA3 linear (the body of ``ia3_linear(..., backend="triton")``)."""
    return IA3_LINEAR(x, kernel_operand(weight), ia3_l, bias, bool(feedforward))
