"""The Triton LoRA linear: ``peftfast::lora_linear`` / ``peftfast::lora_linear_backward`` and the decode kernel.

The formulas, dtypes and dropout convention are in :mod:`.lora` (the front end that dispatches here);
the GEMM building blocks are in :mod:`.matmul`, and the in-loop 4-bit GEMM, selectable with
``PEFTFAST_QLORA_GEMM=inloop`` until a GPU measurement picks it, in :mod:`.experimental.qmatmul`.
"""
from __future__ import annotations

import math

from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch
from . import ops
from . import plans as _plans
from . import matmul as _mm
from . import nf4_triton as _nf4k
from .dispatch import settings
from .experimental import qmatmul as _qmm
from .nf4_triton import decode_4bit_tile, to_bf16_rtne
from .tiles import dot
from .nf4 import Quant4bit
from .weights import dense_base, kernel_operand

# Decode-sized batches read a 4-bit weight once with the fused dequant-GEMV instead of writing and
# re-reading a dense copy (see _decode_lora_4bit_kernel).
DECODE_MAX_M = 64

# ==================================================================================================
# Triton path
#
# Forward (large M):  xa = dropout(x) @ A^T                 [M, r], kept for dB
#                     y  = x @ W^T + (xa) @ (s B^T) + bias   one GEMM, LoRA in its epilogue
# Backward:           g  = s * dY @ B                        [M, r], once, for dA and dX
#                     dX = dY @ W + keep * (g @ A) / (1-p)   the same fused GEMM, W read with swapped strides
#                     dA = g^T @ dropout(x)                  dB = s * dY^T @ xa   (+ dbias = dY.sum(0))
# Saved: x, xa, the seed and the base weight *as stored* (a 4-bit weight is dequantized again in the
# backward: keeping its dense copy would cost 4x the 4-bit storage for the whole step).
# ==================================================================================================



def _qlora_inloop(m: int, n: int, k: int, dtype, weight, layout: str, device) -> bool:
    """Whether this 4-bit GEMM (forward ``"nk"`` or dX ``"kn"``) decodes W in its K loop (see experimental.qmatmul)."""
    if not isinstance(weight, Quant4bit) or m <= DECODE_MAX_M:
        return False
    return _qmm.qlora_gemm_variant(m, n, k, dtype, weight.meta, weight.quant_type, weight.nested, layout,
                                   device) == "inloop"


def _lora_forward(x, weight, lora_A, lora_B, bias, seed, scaling, dropout_p):
    """``(y, xa)``; ``weight`` is dense [N, K], a ``Quant4bit`` or None."""
    k, n = x.shape[-1], lora_B.shape[0]
    flat = x.dim() == 2  # (each no-op reshape or view still costs a dispatch, per layer and token)
    # A view whenever the leading dims merge; the kernels take any 2-D strides.
    x2 = x if flat else x.reshape(-1, k)
    xa = _mm.lowrank_project(x2, lora_A.t(), dropout_p=dropout_p, seed=seed)
    quant = isinstance(weight, Quant4bit)
    if (quant and x2.shape[0] <= DECODE_MAX_M and _decode_supported(weight.meta, weight.quant_type)
            and x2.shape[0] > 0):
        y = _decode_lora_4bit(x2, weight, xa, lora_B, bias, scaling)
    elif quant and _qlora_inloop(x2.shape[0], n, k, x.dtype, weight, "nk", x.device):
        y = _qmm.matmul_lowrank_4bit(x2, weight, xa, lora_B.t(), scaling,
                                     bias=bias, layout="nk", out_dtype=x.dtype)
    else:
        w = dense_base(weight, x.dtype)
        y = _mm.matmul_lowrank(x2, None if w is None else w.t(), xa, lora_B.t(), scaling, bias=bias,
                               out_dtype=x.dtype)
    # xa stays [M, r]: an internal product for dB, which reads it as rows anyway
    return (y if flat else y.view(*x.shape[:-1], n)), xa


def _lora_backward(dy, x, xa, weight, lora_A, lora_B, seed, scaling, dropout_p, needs):
    """``(dx, dA, dB, dbias_fp32)``; an entry whose ``needs`` flag is False is None."""
    k = x.shape[-1]
    r, n = lora_A.shape[0], lora_B.shape[0]
    dtype = x.dtype
    x2, xa2, dy2 = ops.as_rows(x, k), ops.as_rows(xa, r), ops.as_rows(dy, n, dtype)
    need_dx, need_da, need_db, need_dbias = needs
    dx = da = db = dbias = None  # None where not needed (see ops._as_op_grads)
    if need_dx or need_da:
        # g carries the scaling, so neither consumer multiplies by it again.
        g = _mm.lowrank_project(dy2, lora_B, scale=scaling)
        if need_dx:
            if _qlora_inloop(dy2.shape[0], k, n, dtype, weight, "kn", x.device):
                dx = _qmm.matmul_lowrank_4bit(dy2, weight, g, lora_A, 1.0,
                                              dropout_p=dropout_p, seed=seed, layout="kn", out_dtype=dtype)
            else:
                w = dense_base(weight, dtype)
                dx = _mm.matmul_lowrank(dy2, w, g, lora_A, 1.0, dropout_p=dropout_p, seed=seed, out_dtype=dtype)
            dx = dx.view(x.shape)
        if need_da:
            da = torch.empty(lora_A.shape, device=x.device, dtype=lora_A.dtype)
            _mm.lowrank_wgrad(g, x2, da, dropout_p=dropout_p, seed=seed)
    if need_db or need_dbias:
        db = torch.empty(lora_B.shape, device=x.device, dtype=lora_B.dtype)
        if need_dbias:
            dbias = torch.empty(n, device=x.device, dtype=torch.float32)
        # dB^T = s * xa^T @ dY, written through dB's transposed view; dbias rides on the same read of dY.
        _mm.lowrank_wgrad(xa2, dy2, db.t(), scale=scaling, colsum=dbias if need_dbias else None)
        if not need_db:
            db = None
    return dx, da, db, dbias


def _lora_fake(x, weight, lora_A, lora_B, bias, seed, scaling, dropout_p):
    lead = x.shape[:-1]
    return x.new_empty((*lead, lora_B.shape[0])), x.new_empty((math.prod(lead), lora_A.shape[0]))


def _lora_backward_fake(dy, x, xa, weight, lora_A, lora_B, seed, scaling, dropout_p, needs):
    return ops.fake_grads(needs, x, x, lora_A, lora_B, ((lora_B.shape[0],), torch.float32))


# ``peftfast::lora_linear`` -> (y, xa) and ``peftfast::lora_linear_backward``. ``weight`` is the dense
# [N, K] base, a 4-bit one, or None; ``seed`` (int64 [1]) drives the dropout mask, None when p == 0.
LORA_LINEAR = ops.declare(
    "lora_linear", __name__, "LORA_LINEAR",
    inputs="Tensor x, Weight? weight, Tensor lora_A, Tensor lora_B, Tensor? bias, Tensor? seed, "
           "float scaling, float dropout_p",
    outputs=("y", "xa"), grads=("x", "lora_A", "lora_B", "bias"),
    saved=("x", "xa", "weight", "lora_A", "lora_B", "seed"),
    forward=_lora_forward, backward=_lora_backward, fake=_lora_fake, backward_fake=_lora_backward_fake,
)


def triton_lora_linear(x: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *,
                       bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """The Triton LoRA linear (the body of ``lora_linear(..., backend="triton")``).

    ``dropout_p`` is the effective probability (0 outside training); the mask's seed is :func:`ops.dropout_seed`.
    """
    seed = ops.dropout_seed(x, dropout_p)
    return LORA_LINEAR(x, kernel_operand(weight), lora_A, lora_B, bias, seed, float(scaling), float(dropout_p))


# --------------------------------------------------------------------------------------------------
# Decode: fused 4-bit dequant-GEMV
# --------------------------------------------------------------------------------------------------


def _decode_supported(meta, quant_type) -> bool:
    """The fused decode kernel needs rows that start on byte and scale-block boundaries."""
    blocksize, _, _, k = meta
    return k % 2 == 0 and k % blocksize == 0


@triton.jit
def _decode_lora_4bit_kernel(
    p_x, p_q, p_absmax, p_code, p_code2, p_absmax2, p_offset, p_l, p_r, p_bias, p_y, p_part, p_count,
    M, N, K, R, k_per_split, n_splits,
    stride_xm, stride_xk, stride_lm, stride_lr, stride_rr, stride_rn, stride_ym, stride_yn,
    scale,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr, PTX_MUL_RN: tl.constexpr, SOFT_BF16: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Y[M, N] = X @ dequant(Wq)^T + scale * L @ R + bias, K split over program_id(1) when SPLIT.

    Decode is bound by reading W, so W is read once, as 4-bit codes, and decoded by the same tile
    decode as the in-loop GEMM (nf4_triton.decode_4bit_tile: a register LUT, one scale per block and row,
    bitsandbytes' rounding). The output is computed transposed ([BN, BM]) so that the weight tile is
    the dot's left operand without a transpose, and small M pads only the 16-wide right side.
    Split-K (so that a few output tiles still fill the GPU; a split starts on a BLOCK_K boundary): each
    split writes its fp32 partial [BN, BM] to p_part[s] and counts itself in p_count[tile]; the split that
    arrives last sums the tile's partials in split order (deterministic, whatever the arrival order),
    writes Y and resets the count for the next call, so no reduction runs outside the kernel and the
    launch replays as is in a CUDA graph.
    """
    i_n, i_s = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_m = tl.arange(0, BLOCK_M)
    o_kb = tl.arange(0, BLOCK_K)
    m_n = o_n < N
    m_m = o_m < M
    o_n64 = o_n.to(tl.int64)
    dtype = p_x.dtype.element_ty
    k_start = i_s * k_per_split
    k_end = min(k_start + k_per_split, K)
    b_lut = tl.broadcast_to(tl.load(p_code + tl.arange(0, 16))[:, None], [16, BLOCK_K])  # [16, BK] fp32

    b_acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        # Columns past k_end (the next split's) decode too, but meet X entries masked to zero.
        b_w32 = decode_4bit_tile(p_q, p_absmax, b_lut, p_code2, p_absmax2, p_offset, o_n64, m_n, k0, K,
                                  BLOCK_N, BLOCK_K, BLOCKSIZE, BLOCKSIZE2, NESTED, PTX_MUL_RN)  # [BN, BK]
        if SOFT_BF16:
            b_w = to_bf16_rtne(b_w32)
        else:
            b_w = b_w32.to(dtype)
        o_k = k0 + o_kb
        b_xt = tl.load(p_x + o_k[:, None] * stride_xk + o_m[None, :] * stride_xm,
                       mask=(o_k < k_end)[:, None] & m_m[None, :], other=0.0)
        b_acc = dot(b_w, b_xt, b_acc, DOT_F32, IEEE)  # [BN, BK] @ [BK, BM] -> [BN, BM]

    if i_s == 0:
        b_lr = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            o_r = r0 + tl.arange(0, BLOCK_R)
            m_r = o_r < R
            b_rt = tl.load(p_r + o_r[None, :] * stride_rr + o_n[:, None] * stride_rn,
                           mask=m_n[:, None] & m_r[None, :], other=0.0).to(dtype)
            b_lt = tl.load(p_l + o_r[:, None] * stride_lr + o_m[None, :] * stride_lm,
                           mask=m_r[:, None] & m_m[None, :], other=0.0).to(dtype)
            b_lr = dot(b_rt, b_lt, b_lr, DOT_F32, IEEE)  # [BN, BR] @ [BR, BM] -> [BN, BM]
        b_acc += b_lr * scale
        if HAS_BIAS:
            b_acc += tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)[:, None]

    m_out = m_n[:, None] & m_m[None, :]
    p_out = p_y + o_m[None, :] * stride_ym + o_n64[:, None] * stride_yn
    if SPLIT:
        # partials laid out [S, M, N] contiguous
        o_part = o_m[None, :] * N + o_n64[:, None]
        tl.store(p_part + i_s * M * N + o_part, b_acc, mask=m_out)
        tl.debug_barrier()  # every thread's partial is stored before the count says so
        arrived = tl.atomic_add(p_count + i_n, 1, sem="acq_rel")
        if arrived == n_splits - 1:
            b_sum = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for s in range(0, n_splits):
                # .cg: read past this SM's L1, which may not see the other SMs' stores
                b_sum += tl.load(p_part + s * M * N + o_part, mask=m_out, other=0.0, cache_modifier=".cg")
            tl.store(p_out, b_sum.to(p_y.dtype.element_ty), mask=m_out)
            tl.atomic_xchg(p_count + i_n, 0)
    else:
        tl.store(p_out, b_acc.to(p_y.dtype.element_ty), mask=m_out)


# BLOCK_K of the decode kernel by x's element size, capped at the blocksize (so one scale per row and
# tile; QLoRA's default blocksize is 64 anyway). Not yet tuned on a GPU. With the LUT in registers the
# shared memory is the pipelined dot operands: compiled, bf16 at M=1 needs 25 KB at 64 and 50 KB at 128;
# fp32 at M=64 needs 54 KB at 64 and 108 KB at 128 (over sm86/sm89's 99 KB), hence 32 there.
_DECODE_BLOCK_K = {2: 64, 4: 32}


def _decode_plan(m: int, n: int, k: int, r: int, blocksize: int, blocksize2: int, nested: bool, has_bias: bool,
                 dtype, splits: Optional[int], device):
    """``(grid, splits, k_per_split, kwargs, counts)`` of one decode signature (integer arithmetic, once);
    ``counts`` is the split kernel's per-tile arrival counters (zero between calls: the kernel resets them)."""
    cdiv = _plans.cdiv
    block_m = max(16, _plans.next_power_of_2(m))
    block_n = 64
    block_k = min(blocksize, _DECODE_BLOCK_K[dtype.itemsize])
    n_tiles = cdiv(n, block_n)
    k_tiles = cdiv(k, block_k)
    if splits is None:
        splits = 1 if device.type != "cuda" else cdiv(2 * launch.num_sms(device), n_tiles)
    splits = max(1, min(splits, k_tiles))
    k_per_split = cdiv(k_tiles, splits) * block_k
    splits = cdiv(k, k_per_split)
    kwargs = dict(BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2 if nested else 1, NESTED=nested, HAS_BIAS=has_bias,
                  **launch.dot_flags(dtype), PTX_MUL_RN=_nf4k.ptx_mul_rn(device),
                  SOFT_BF16=dtype == torch.bfloat16 and settings().interpret, SPLIT=splits > 1,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=launch.block_r(r), num_warps=4)
    counts = torch.zeros(n_tiles if splits > 1 else 1, dtype=torch.int32, device=device)
    return (n_tiles, splits), splits, k_per_split, kwargs, counts


def _decode_lora_4bit(x2, weight: Quant4bit, xa, lora_B, bias, scaling, splits: Optional[int] = None) -> torch.Tensor:
    """Fused dequant-GEMV for M <= DECODE_MAX_M rows and a 4-bit base: [M, K] -> [M, N] in x's dtype."""
    packed, absmax, code, code2, absmax2, offset = (weight.packed, weight.absmax, weight.code, weight.code2,
                                                    weight.absmax2, weight.offset)
    blocksize, blocksize2, n, k = weight.meta
    m, r = x2.shape[0], xa.shape[1]
    dtype = x2.dtype
    device = x2.device
    nested = code2 is not None
    has_bias = bias is not None
    key = ("decode_lora_4bit", m, n, k, r, blocksize, blocksize2, nested, has_bias, dtype, splits, device)
    plan = _plans.PLANS.get(key)
    if plan is None:
        plan = _plans.PLANS[key] = _decode_plan(m, n, k, r, blocksize, blocksize2, nested, has_bias, dtype, splits,
                                                device)
    grid, n_splits, k_per_split, kwargs, counts = plan
    y = torch.empty((m, n), device=device, dtype=dtype)
    # The counters are the plan's, shared by calls of this signature: calls on one stream (or one CUDA
    # graph) run one after another, each leaving them at zero.
    part = torch.empty((n_splits, m, n), device=device, dtype=torch.float32) if n_splits > 1 else y
    right = lora_B.t()
    sx, sl, sr = x2.stride(), xa.stride(), right.stride()
    _decode_lora_4bit_kernel[grid](
        x2, packed, absmax, code, code2 if nested else code, absmax2 if nested else code,
        offset if nested else code, xa, right, bias if has_bias else code, y, part, counts,
        m, n, k, r, k_per_split, n_splits,
        sx[0], sx[1], sl[0], sl[1], sr[0], sr[1], n, 1,
        float(scaling), **kwargs,
    )
    return y


