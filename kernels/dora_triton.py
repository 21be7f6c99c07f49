"""The Triton DoRA linear: ``peftfast::dora_linear`` / ``peftfast::dora_linear_backward``, the row-norm,
dropout and DoRA GEMM kernels. Formulas and the front end are in :mod:`.dora`.
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
from . import matmul as _mm
from .tiles import dot, dropout_keep, gemm_tile, load_xw, lowrank_tile, store_row_partials
from .weights import dense_base, kernel_operand


# ==================================================================================================
# Triton path
# ==================================================================================================

# Row granularity of the dm partial sums: every config's BLOCK_M is a multiple of it, so the partials
# buffer ([cdiv(M, 16), N] fp32) is fully written whichever config the autotuner picks.
_SUB_M = 16
# _dora_matmul_kernel's modes (the MODE constexpr; the kernel compares against these literal values).
_FWD, _DX, _DM = 0, 1, 2


@triton.jit
def _dora_norm_kernel(
    p_w, p_a, p_b, p_out,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scale,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[N] = ||W[n, :] + scale * (B[n, :] @ A)||_2, rounded to out's dtype (the compute dtype).

    W, A and B are rounded to the compute dtype on load, as the reference's ``.to(w.dtype)`` does;
    the product, sum and squares accumulate in fp32. Each program owns BLOCK_N whole rows, so the
    row sums need no cross-program reduction.
    """
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_n64 = o_n.to(tl.int64)
    dtype = p_out.dtype.element_ty

    b_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_w = tl.load(p_w + o_n64[:, None] * stride_wn + o_k[None, :] * stride_wk,
                      mask=m_n[:, None] & m_k[None, :], other=0.0).to(dtype).to(tl.float32)
        # B[o_n, :R] @ A[:R, o_k] -> [BN, BK], by the GEMM epilogues' unpipelined low-rank loop: its
        # stages of A tiles at the adapters' stored width (fp32: 64 KB per [64, 256] tile) took
        # 136 KB here when this loop was pipelined, past sm89's 99 KB.
        b_d = lowrank_tile(p_b, p_a, o_n64, o_k, m_n, m_k, R, stride_bn, stride_br, stride_ar, stride_ak,
                            dtype, DOT_F32, IEEE, BLOCK_N, BLOCK_K, BLOCK_R)
        b_v = b_w + scale * b_d
        b_sq += tl.sum(b_v * b_v, axis=1)
    tl.store(p_out + o_n, tl.sqrt(b_sq).to(dtype), mask=m_n)

@triton.jit
def _dropout_kernel(
    p_x, p_seed, p_o,
    M, K,
    stride_xm, stride_xk, stride_om, stride_ok,
    dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """O[M, K] = keep * X / (1 - p), keep regenerated from the seed (matmul.py's mask convention)."""
    i_m, i_k = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m = (o_m < M)[:, None] & (o_k < K)[None, :]
    o_m64 = o_m.to(tl.int64)
    b_x = tl.load(p_x + o_m64[:, None] * stride_xm + o_k[None, :] * stride_xk, mask=m, other=0.0)
    b_keep = dropout_keep(p_seed, o_m, o_k, K, dropout_p)
    b_o = tl.where(b_keep, b_x.to(tl.float32) / (1.0 - dropout_p), 0.0)
    tl.store(p_o + o_m64[:, None] * stride_om + o_k[None, :] * stride_ok, b_o.to(p_o.dtype.element_ty), mask=m)

@triton.jit
def _dora_matmul_kernel(
    p_x, p_xd, p_w, p_c, p_l, p_r, p_bias, p_seed, p_g, p_y, p_part,
    M, N, K, R, M_KEY,
    stride_xm, stride_xk, stride_xdm, stride_xdk, stride_wk, stride_wn, stride_lm, stride_lr,
    stride_rr, stride_rn, stride_gm, stride_gn, stride_ym, stride_yn, stride_pp,
    lr_scale, dropout_p,
    MODE: tl.constexpr, DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    IEEE: tl.constexpr, SUB_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One GEMM ``X[M, K] @ Wt[K, N]`` with DoRA's epilogues; ``LR = lr_scale * L[M, R] @ R[R, N]``.

    MODE 0 (_FWD), ``c`` over N:   no dropout: ``Y = c * (X Wt + LR) + bias``
                                   dropout:    ``Y = X Wt + (c - 1) * (Xd Wt) + c * LR + bias``
    MODE 1 (_DX),  ``c`` over K:   no dropout: ``Y = (X * c) Wt + LR``
                                   dropout:    ``Y = X Wt + keep * ((X * (c - 1)) Wt + LR) / (1 - p)``
    MODE 2 (_DM):                  ``part[s, n] = sum over the 16 rows of sub-block s of (X Wt + LR) * G``
                                   (fp32, Y never written)

    The two-accumulator variants read each W tile once for both products. The compute dtype is
    X's; W, c-scaled X tiles and L/R are cast to it in-kernel, accumulation is fp32.
    ``M_KEY`` (M rounded up to a power of two) is only an autotuning key.
    """
    i_m, i_n, o_m, o_n, m_m, m_n, o_m64 = gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    o_k = tl.arange(0, BLOCK_K)
    dtype = p_x.dtype.element_ty

    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    b_acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    p_xb = p_x + o_m64[:, None] * stride_xm + o_k[None, :] * stride_xk
    p_wb = p_w + o_k[:, None] * stride_wk + o_n[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        m_k, b_x, b_w = load_xw(p_xb, p_wb, k0, o_k, K, m_m, m_n, dtype)
        if MODE == 1:
            # dX: dY's columns (the reduction dim here) carry the per-output-feature factor.
            b_c = tl.load(p_c + k0 + o_k, mask=m_k, other=0.0)
            if DROPOUT:
                b_acc = dot(b_x, b_w, b_acc, DOT_F32, IEEE)  # [BM, BK] @ [BK, BN] -> [BM, BN]
                b_xc = (b_x.to(tl.float32) * (b_c - 1.0)[None, :]).to(dtype)
                b_acc2 = dot(b_xc, b_w, b_acc2, DOT_F32, IEEE)  # [BM, BK] @ [BK, BN] -> [BM, BN]
            else:
                b_xc = (b_x.to(tl.float32) * b_c[None, :]).to(dtype)
                b_acc = dot(b_xc, b_w, b_acc, DOT_F32, IEEE)  # [BM, BK] @ [BK, BN] -> [BM, BN]
        else:
            b_acc = dot(b_x, b_w, b_acc, DOT_F32, IEEE)  # [BM, BK] @ [BK, BN] -> [BM, BN]
            if DROPOUT:  # _FWD only: the launcher never sets DROPOUT for _DM
                b_xd = tl.load(p_xd + o_m64[:, None] * stride_xdm + (k0 + o_k)[None, :] * stride_xdk,
                               mask=m_m[:, None] & m_k[None, :], other=0.0)
                b_acc2 = dot(b_xd, b_w, b_acc2, DOT_F32, IEEE)  # [BM, BK] @ [BK, BN] -> [BM, BN]
        p_xb += BLOCK_K * stride_xk
        p_wb += BLOCK_K * stride_wk

    # Low-rank term while the tile is still in registers, so the output is written once.
    b_lr = lowrank_tile(p_l, p_r, o_m64, o_n, m_m, m_n, R, stride_lm, stride_lr, stride_rr, stride_rn,
                         dtype, DOT_F32, IEEE, BLOCK_M, BLOCK_N, BLOCK_R) * lr_scale

    if MODE == 2:
        # Rows past M are 0 in X and L, and their G is loaded as 0: they add nothing.
        store_row_partials(b_acc + b_lr, p_g, p_part, i_m, o_m64, o_n, m_m, m_n, M, stride_gm, stride_gn, stride_pp,
                           SUB_M, BLOCK_M, BLOCK_N)
    else:
        if MODE == 0:
            b_c = tl.load(p_c + o_n, mask=m_n, other=0.0)[None, :]
            if DROPOUT:
                b_acc = b_acc + (b_c - 1.0) * b_acc2 + b_c * b_lr
            else:
                b_acc = b_c * (b_acc + b_lr)
            if HAS_BIAS:
                b_acc += tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        else:
            if DROPOUT:
                # Only the LoRA input was dropped: its gradient passes where the input was kept.
                b_keep = dropout_keep(p_seed, o_m, o_n, N, dropout_p)
                b_acc += tl.where(b_keep, (b_acc2 + b_lr) / (1.0 - dropout_p), 0.0)
            else:
                b_acc += b_lr
        tl.store(p_y + o_m64[:, None] * stride_ym + o_n[None, :] * stride_yn, b_acc.to(p_y.dtype.element_ty),
                 mask=m_m[:, None] & m_n[None, :])

def _smem_bytes(config, args: dict) -> int:
    """Shared memory the pruner counts for ``config`` at these launch arguments (named, flags included)."""
    kw, block_r = config.kwargs, int(args["BLOCK_R"])
    # The main loop stages X and W tiles (Y is absent in the dm pass); L and R count at the adapters'
    # width (fp32 adapters took 80 KB where counting them at x's said 72 KB: sm80 compile).
    elem, lr_elem = launch.staged_widths(args, main=("p_x", "p_w"))
    n_x = 2 if (int(args["MODE"]) == _FWD and bool(args["DROPOUT"])) else 1
    main = config.num_stages * (n_x * kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * elem
    epilogue = (kw["BLOCK_M"] * block_r + block_r * kw["BLOCK_N"]) * lr_elem
    return max(main, epilogue)

def _make_pruner(max_smem: int):
    """matmul.py's pruning (shared memory, then row blocks that fit M), counting DoRA's extra operands.

    The dropout forward stages two X tiles (x and x_d) per W tile; the two-accumulator variants
    hold 2 x BLOCK_M x BLOCK_N fp32 in registers, so tiles that would need more than ~128 registers
    per thread for them (and spill) are dropped.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        m = int(args["M"])
        two_acc = bool(args["DROPOUT"]) and int(args["MODE"]) != _DM

        def smem(c):
            return _smem_bytes(c, args)

        def regs_ok(c):
            return not two_acc or 2 * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 32 * c.num_warps

        fits = [c for c in configs if smem(c) <= max_smem and regs_ok(c)]
        fits = fits or [min(configs, key=lambda c: (smem(c), c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]))]
        return launch.keep_rows_fitting(fits, m)

    return prune

@functools.lru_cache(maxsize=None)
def _tuned_dora_matmul(device_index: int):
    """The autotuned kernel for one CUDA device, built on first use so import never touches CUDA.

    Configs: the LoRA GEMM's per-GPU-family table (``configs/lora_matmul.json``): the main loop is
    the same X-by-W tile loop. MODE and DROPOUT are in the key: forward, dX and dm launches of one
    shape have different operand counts and epilogues, so they are tuned separately.
    """
    return triton.autotune(
        configs=launch.gemm_configs(launch.device_family(device_index)),
        key=["M_KEY", "N", "K", "R", "MODE", "DROPOUT", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _tuning.limited_pruner(
            _make_pruner(launch.max_shared_memory(device_index)))},
        **launch.autotune_options(),
    )(_dora_matmul_kernel)


def dora_weight_norm_triton(w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                            dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """:func:`dora_weight_norm` as one Triton launch: row norms of ``W + scaling * B A``, [N] in ``dtype``.

    ``dtype`` (default: W's) is the compute dtype: W, A and B are rounded to it as the reference's casts
    do; everything after that accumulates in fp32, and the norms are rounded to it at the end.
    """
    blocks = _norm_blocks(w.device, max(lora_A.element_size(), lora_B.element_size()))
    return _weight_norm_launch(w, lora_A, lora_B, scaling, dtype or w.dtype, blocks)


def _norm_blocks(device: torch.device, adapter_elem: int = 2) -> Tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of :func:`_dora_norm_kernel` on this device, for adapters of ``adapter_elem`` bytes."""
    # On GPUs: 16-row programs so that even N = 1024 gives 64 programs reading W (memory-bound); half as
    # wide K blocks for fp32 adapters keep the [BLOCK_R, BLOCK_K] A tile at 32 KB. The interpreter
    # prefers few, large blocks.
    if device.type != "cuda":
        return 64, 64
    return 16, (256 if adapter_elem <= 2 else 128)


def _weight_norm_launch(w, lora_A, lora_B, scaling, dtype, blocks) -> torch.Tensor:
    n, k = w.shape
    r = lora_A.shape[0]
    out = torch.empty(n, device=w.device, dtype=dtype)
    if n == 0:
        return out
    block_r = launch.block_r(r)
    block_n, block_k = blocks
    _dora_norm_kernel[(triton.cdiv(n, block_n),)](
        w, lora_A, lora_B, out, n, k, r,
        w.stride(0), w.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(scaling),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4, **launch.dot_flags(dtype),
    )
    return out


def _dropout(x2: torch.Tensor, seed: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """``keep * x / (1 - p)`` [M, K] contiguous, with the mask matmul.py's kernels regenerate from ``seed``."""
    m, k = x2.shape
    out = torch.empty((m, k), device=x2.device, dtype=x2.dtype)
    if m == 0 or k == 0:
        return out
    block_m, block_k = 32, 128
    _dropout_kernel[(triton.cdiv(m, block_m), triton.cdiv(k, block_k))](
        x2, seed, out, m, k, x2.stride(0), x2.stride(1), out.stride(0), out.stride(1), float(dropout_p),
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
    )
    return out


def _launch_args(x, wt, left, right, c, mode, lr_scale, xd, bias, g, dropout_p, seed, y, part) -> Tuple[tuple, dict]:
    """The kernel's positional arguments and constexpr flags (all but the tuned config) for one
    :func:`dora_matmul` call; ``y`` (``_FWD``/``_DX``) or ``part`` (``_DM``) is its output."""
    m, k = x.shape
    n = wt.shape[1]
    r = left.shape[1]
    dropping = dropout_p > 0
    dummy = y if y is not None else part
    xd_ = xd if (mode == _FWD and dropping) else x
    args = (
        x, xd_, wt, c if mode != _DM else dummy, left, right, bias if bias is not None else dummy,
        seed if (mode == _DX and dropping) else dummy, g if mode == _DM else dummy, dummy,
        dummy if part is None else part,
        m, n, k, r, triton.next_power_of_2(m),
        x.stride(0), x.stride(1), xd_.stride(0), xd_.stride(1), wt.stride(0), wt.stride(1),
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        g.stride(0) if mode == _DM else 0, g.stride(1) if mode == _DM else 0,
        y.stride(0) if y is not None else 0, y.stride(1) if y is not None else 0,
        part.stride(0) if part is not None else 0,
        float(lr_scale), float(dropout_p),
    )
    flags = dict(MODE=mode, DROPOUT=dropping and mode != _DM, HAS_BIAS=bias is not None and mode == _FWD,
                 SUB_M=_SUB_M, BLOCK_R=launch.block_r(r), **launch.dot_flags(x.dtype))
    return args, flags


def dora_matmul(
    x: torch.Tensor,
    wt: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    c: torch.Tensor,
    *,
    mode: int,
    lr_scale: float = 1.0,
    xd: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    g: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Launch :func:`_dora_matmul_kernel` (formulas in its docstring).

    Args:
        x: [M, K], any strides: the compute dtype. wt: [K, N], any strides and float dtype.
        left: [M, R]. right: [R, N]. lr_scale: multiplies ``left @ right``.
        c: fp32 per-feature factor, contiguous: [N] for ``_FWD``, [K] for ``_DX``; unused by ``_DM``.
        xd: [M, K] dropped-out x (``_FWD`` with ``dropout_p > 0``).
        bias: [N], unit stride (``_FWD`` only).
        g: [M, N] (``_DM``): the tensor the pre-scale output is reduced against.
        dropout_p, seed: ``_FWD`` uses only whether ``dropout_p > 0``; ``_DX`` regenerates the keep-mask
            of its [M, N] output from ``seed``.
        out_dtype: Y's dtype; defaults to x's.

    Returns:
        ``_FWD``/``_DX``: Y [M, N] contiguous. ``_DM``: [N] fp32, ``sum_m (x Wt + LR)[m, n] * g[m, n]``.
    """
    m, k = x.shape
    n = wt.shape[1]
    dev = x.device
    if mode == _DM:
        n_part = triton.cdiv(m, _SUB_M)
        part = torch.empty((n_part, n), device=dev, dtype=torch.float32)
        y = None
        if m == 0 or n == 0:
            return torch.zeros(n, device=dev, dtype=torch.float32)
    else:
        part = None
        y = torch.empty((m, n), device=dev, dtype=out_dtype or x.dtype)
        if m == 0 or n == 0:
            return y
    args, flags = _launch_args(x, wt, left, right, c, mode, lr_scale, xd, bias, g, dropout_p, seed, y, part)
    launch.launch_tiled_gemm(_tuned_dora_matmul, _dora_matmul_kernel, dev, m, n, args, flags)
    if mode == _DM:
        # Deterministic: fixed-order partials summed by PyTorch (no atomics).
        return part.sum(0)
    return y


# --------------------------------------------------------------------------------------------------
# Forward / backward bodies. With c = m / n (fp32, n the detached row norm), s the scaling, g = dY,
# x_d = dropout(x) (x itself when p = 0) and xa = x_d A^T:
#
#   fwd   p = 0: y  = c * (x W^T + s xa B^T) + bias                  one _FWD GEMM
#         p > 0: y  = x W^T + (c - 1) * (x_d W^T) + c * s xa B^T + bias   one _FWD GEMM, two accumulators
#   gl  = s * (g * c) B = s * g (c B)                                [M, r], c folded into B's rows
#   dX    p = 0: dx = (g * c) W + gl A                               one _DX GEMM
#         p > 0: dx = g W + keep * ((g * (c - 1)) W + gl A) / (1-p)  one _DX GEMM, two accumulators
#   dA  = gl^T x_d          dB = c[n] * s * (g^T xa)    (+ dbias = colsum(g), same pass over g)
#   dm  = colsum(g * (x_d W^T + s xa B^T)) / n                       one _DM GEMM (recompute)
#
# Saved for the backward: x, xa [M, r], the norms n [N], the dropout seed, the adapters and magnitude,
# and the base weight *as stored*. Nothing of size M x N, and no x_d:
# * dm needs the pre-scale output P = x_d W^T + s xa B^T. Saving it would hold an M x N activation per
#   DoRA layer for the whole step (235 MB in bf16 for one Llama-8B gate_proj at 8K tokens), on top of
#   the x that LoRA keeps anyway; it is recomputed instead, one extra GEMM that writes only
#   [cdiv(M, 16), N] fp32 partials. Recovering P as (y - bias) / c from the output would be cheaper but
#   is wrong where the magnitude is 0 or tiny (and y is rounded; with dropout y - bias is not c * P at all).
# * x_d is regenerated from the seed (one elementwise pass) rather than kept: M x K per layer.
# * the norms are kept (N values): recomputing them would re-read W and redo the [N, r] x [r, K] product.
# * a 4-bit base is dequantized again in the backward (once, for both GEMMs), as LoRA does.
# --------------------------------------------------------------------------------------------------


def _dora_forward(x, weight, lora_A, lora_B, magnitude, bias, seed, scaling, dropout_p):
    """``(y, xa, norm)``; ``weight`` is dense [N, K] or a ``Quant4bit``."""
    k = x.shape[-1]
    r, n = lora_A.shape[0], lora_B.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # a view whenever the leading dims merge; the kernels take any 2-D strides
    w = dense_base(weight, x.dtype)
    norm = dora_weight_norm_triton(w, lora_A, lora_B, scaling, x.dtype)
    c = magnitude.reshape(-1).float() / norm.float()
    xd = _dropout(x2, seed, dropout_p) if dropout_p > 0 else None
    xa = _mm.lowrank_project(x2 if xd is None else xd, lora_A.t())
    if bias is not None:
        bias = bias.contiguous()  # [N] read with unit stride; a copy, if any, is negligible
    y = dora_matmul(x2, w.t(), xa, lora_B.t(), c, mode=_FWD, lr_scale=scaling, xd=xd, bias=bias,
                    dropout_p=dropout_p)
    return y.view(*lead, n), xa.view(*lead, r), norm


def _dora_backward(dy, x, xa, norm, weight, lora_A, lora_B, magnitude, seed, scaling, dropout_p, needs):
    """``(dx, dA, dB, dmagnitude, dbias_fp32)``; an entry whose ``needs`` flag is False is None."""
    k = x.shape[-1]
    r, n = lora_A.shape[0], lora_B.shape[0]
    dtype = x.dtype
    x2, xa2, dy2 = ops.as_rows(x, k), ops.as_rows(xa, r), ops.as_rows(dy, n, dtype)
    need_dx, need_da, need_db, need_dm, need_dbias = needs
    dx = da = db = dm = dbias = None  # None where not needed (see ops._as_op_grads)
    c = magnitude.reshape(-1).float() / norm.float()
    w = None
    if need_dx or need_dm:
        w = dense_base(weight, dtype)
    xd = x2
    if dropout_p > 0 and (need_da or need_dm):
        xd = _dropout(x2, seed, dropout_p)
    if need_dx or need_da:
        # gl = s * (dY * c) @ B, with c folded into B's rows ([N, r]: negligible) so dY is read as is.
        gl = _mm.lowrank_project(dy2, c[:, None] * lora_B.float(), scale=scaling)
        if need_dx:
            dx = dora_matmul(dy2, w, gl, lora_A, c, mode=_DX, dropout_p=dropout_p, seed=seed, out_dtype=dtype)
            dx = dx.view(x.shape)
        if need_da:
            da = torch.empty(lora_A.shape, device=x.device, dtype=lora_A.dtype)
            _mm.lowrank_wgrad(gl, xd, da)
    if need_db or need_dbias:
        # s * g^T xa in fp32 (written through the transposed view), then the per-row factor c and one
        # rounding to B's dtype; dbias rides on the same read of dY.
        db32 = torch.empty((n, r), device=x.device, dtype=torch.float32)
        if need_dbias:
            dbias = torch.empty(n, device=x.device, dtype=torch.float32)
        _mm.lowrank_wgrad(xa2, dy2, db32.t(), scale=scaling, colsum=dbias if need_dbias else None)
        if need_db:
            db = (db32 * c[:, None]).to(lora_B.dtype)
    if need_dm:
        colsum = dora_matmul(xd, w.t(), xa2, lora_B.t(), c, mode=_DM, lr_scale=scaling, g=dy2)
        dm = (colsum / norm.float()).to(magnitude.dtype).view(magnitude.shape)
    return dx, da, db, dm, dbias


def _dora_fake(x, weight, lora_A, lora_B, magnitude, bias, seed, scaling, dropout_p):
    lead = x.shape[:-1]
    n = lora_B.shape[0]
    return x.new_empty((*lead, n)), x.new_empty((*lead, lora_A.shape[0])), x.new_empty((n,))


def _dora_backward_fake(dy, x, xa, norm, weight, lora_A, lora_B, magnitude, seed, scaling, dropout_p, needs):
    return ops.fake_grads(needs, x, x, lora_A, lora_B, magnitude, ((lora_B.shape[0],), torch.float32))


# ``peftfast::dora_linear`` -> (y, xa, norm) and ``peftfast::dora_linear_backward``: ``xa`` [..., r] and
# the row norms [N] (x's dtype; detached, as in PEFT) are internal outputs kept for the backward.
# ``seed`` (int64 [1]) drives the dropout mask; None when p == 0.
DORA_LINEAR = ops.declare(
    "dora_linear", __name__, "DORA_LINEAR",
    inputs="Tensor x, Weight weight, Tensor lora_A, Tensor lora_B, Tensor magnitude, Tensor? bias, Tensor? seed, "
           "float scaling, float dropout_p",
    outputs=("y", "xa", "norm"), grads=("x", "lora_A", "lora_B", "magnitude", "bias"),
    saved=("x", "xa", "norm", "weight", "lora_A", "lora_B", "magnitude", "seed"),
    forward=_dora_forward, backward=_dora_backward, fake=_dora_fake, backward_fake=_dora_backward_fake,
)


def triton_dora_linear(x: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                       magnitude: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                       dropout_p: float = 0.0) -> torch.Tensor:
    """The Triton DoRA linear (the body of ``dora_linear(..., backend="triton")``).

    ``dropout_p`` is the effective probability (0 outside training); the mask's seed is :func:`ops.dropout_seed`.
    """
    seed = ops.dropout_seed(x, dropout_p)
    return DORA_LINEAR(x, kernel_operand(weight), lora_A, lora_B, magnitude, bias, seed, float(scaling),
                       float(dropout_p))
