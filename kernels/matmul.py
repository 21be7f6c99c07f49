"""Triton matmul building blocks for LoRA: a GEMM with a low-rank epilogue and the two skinny GEMMs.

* :func:`matmul_lowrank`  ``Y = X @ Wt + mask * (scale * L @ R) + bias``: the base GEMM with the LoRA
  term folded into its epilogue, so ``Y`` is written once. ``Wt`` [K, N] is read through strides, so
  ``W.t()`` (forward) and ``W`` (backward, ``dY @ W``) are the same kernel with no copy.
* :func:`lowrank_project` ``L = scale * mask(X) @ At``: ``x @ A^T`` ([M, r]) and ``dY @ B``.
* :func:`lowrank_wgrad`   ``O = scale * L^T @ mask(X)`` (+ column sums of X): ``dA``, ``dB`` (and ``dbias``).

``mask`` is inverted dropout regenerated from a seed: element (row, col) of the LoRA input [M, K] is
kept when ``tl.rand(seed, row * K + col) >= p``. The offset is the *logical* index, so every kernel
(whatever its blocks or strides) regenerates the same mask, and no mask tensor is ever stored.

Operands are cast to the compute dtype (the activations' dtype) inside the kernels, so fp32 adapters on
a bf16 base need no cast copies; accumulation is fp32. In Triton's CPU interpreter, ``tl.dot`` on bf16
operands is wrong, so there (only) dot operands are widened to fp32 under the ``DOT_F32`` constexpr.

Autotuning: CUDA launches of :func:`matmul_lowrank` are tuned over per-GPU-family config lists
(``configs/lora_matmul.json``, keyed ``sm80``/``sm89``/``sm90``) pruned by shared memory and by M;
the interpreter runs one fixed large-block config. Nothing here touches CUDA at import time.

Before that search, a CUDA launch asks :mod:`.tuning` for the shipped table's config
(``configs/<gpu-slug>.json``, written by ``peftfast tune``); a hit launches that single config, a miss
runs Triton's search, whose winner Triton's own on-disk cache keeps for later processes. The choice is
made once per launch signature and kept in the launcher's plan (:mod:`.plans`). ``PEFTFAST_TUNING=off``
leaves only the search. ``PEFTFAST_AUTOTUNE_CONFIGS=N`` limits every search here (and IA3's, DoRA's,
the 4-bit GEMM's, prefix attention's) to the first N candidates that survive pruning, for a GPU
correctness run with no time to search (:func:`.tuning.limited_pruner`).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import launch
from . import plans as _plans
from . import tuning as _tuning
from .tiles import dot, dropout_keep, gemm_tile, grouped_tile, load_xw, lowrank_epilogue, lowrank_tile


@triton.jit
def _matmul_lowrank_kernel(
    p_x, p_w, p_l, p_r, p_bias, p_seed, p_y,
    M, N, K, R, M_KEY,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_lm, stride_lr, stride_rr, stride_rn, stride_ym, stride_yn,
    scale, dropout_p,
    HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y[M, N] = X[M, K] @ Wt[K, N] + keep * (scale * L[M, R] @ R[R, N]) / (1 - p) + bias[N].

    ``M_KEY`` (M rounded up to a power of two) is only an autotuning key: keying on M itself would
    re-tune for every new sequence length.
    """
    i_m, i_n, o_m, o_n, m_m, m_n, o_m64 = gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    dtype = p_y.dtype.element_ty

    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_W:
        o_k = tl.arange(0, BLOCK_K)
        p_xb = p_x + o_m64[:, None] * stride_xm + o_k[None, :] * stride_xk
        p_wb = p_w + o_k[:, None] * stride_wk + o_n[None, :] * stride_wn
        for k0 in range(0, K, BLOCK_K):
            m_k, b_x, b_w = load_xw(p_xb, p_wb, k0, o_k, K, m_m, m_n, dtype)
            b_acc = dot(b_x, b_w, b_acc, DOT_F32, IEEE)  # [BM, BK] @ [BK, BN] -> [BM, BN]
            p_xb += BLOCK_K * stride_xk
            p_wb += BLOCK_K * stride_wk

    lowrank_epilogue(b_acc, p_l, p_r, p_bias, p_seed, p_y, o_m, o_m64, o_n, m_m, m_n, N, R,
                     stride_lm, stride_lr, stride_rr, stride_rn, stride_ym, stride_yn, scale, dropout_p,
                     dtype, HAS_BIAS, DROPOUT, DOT_F32, IEEE, BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _lowrank_project_kernel(
    p_x, p_a, p_seed, p_o,
    M, K, R,
    stride_xm, stride_xk, stride_ak, stride_ar, stride_om, stride_or,
    scale, dropout_p,
    DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """O[M, R] = scale * keep(X)[M, K] @ At[K, R] (with 1/(1-p) folded into ``scale``)."""
    i_m, i_r = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_k = tl.arange(0, BLOCK_K)
    m_m = o_m < M
    m_r = o_r < R
    o_m64 = o_m.to(tl.int64)
    dtype = p_x.dtype.element_ty

    b_acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        m_k = (k0 + o_k) < K
        b_x = tl.load(p_x + o_m64[:, None] * stride_xm + (k0 + o_k)[None, :] * stride_xk,
                      mask=m_m[:, None] & m_k[None, :], other=0.0)
        if DROPOUT:
            # Zeroing instead of scaling here: the 1/(1-p) goes into the fp32 ``scale`` at the end.
            b_x = tl.where(dropout_keep(p_seed, o_m, k0 + o_k, K, dropout_p), b_x, 0.0)
        b_a = tl.load(p_a + (k0 + o_k)[:, None] * stride_ak + o_r[None, :] * stride_ar,
                      mask=m_k[:, None] & m_r[None, :], other=0.0).to(dtype)
        b_acc = dot(b_x, b_a, b_acc, DOT_F32, IEEE)  # [BM, BK] @ [BK, BR] -> [BM, BR]

    tl.store(p_o + o_m64[:, None] * stride_om + o_r[None, :] * stride_or,
             (b_acc * scale).to(p_o.dtype.element_ty), mask=m_m[:, None] & m_r[None, :])


@triton.jit
def _lowrank_wgrad_kernel(
    p_l, p_x, p_seed, p_o, p_colsum,
    M, C, R, rows_per_split,
    stride_lm, stride_lr, stride_xm, stride_xc, stride_os, stride_or, stride_oc, stride_cs,
    scale, dropout_p,
    DROPOUT: tl.constexpr, HAS_COLSUM: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """O[s, R, C] = scale * L[rows_s, R]^T @ keep(X)[rows_s, C] for the M-split s (grid axis 2).

    The reduction runs over M (tokens), which is long while R x C is small, so M is split across
    programs that write fp32 partials, summed afterwards: deterministic, unlike atomics. With
    ``HAS_COLSUM`` the same pass sums X's columns (``dbias = dY.sum(0)``), so dY is read once for both.
    """
    i_c, i_r, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_mb = tl.arange(0, BLOCK_M)
    m_c = o_c < C
    m_r = o_r < R
    dtype = p_x.dtype.element_ty
    row_start = i_s * rows_per_split
    row_end = min(row_start + rows_per_split, M)

    b_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    b_colsum = tl.zeros([BLOCK_C], dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        o_m = m0 + o_mb
        m_m = o_m < row_end
        o_m64 = o_m.to(tl.int64)
        # L loaded transposed through its strides: no L^T copy.
        b_lt = tl.load(p_l + o_r[:, None] * stride_lr + o_m64[None, :] * stride_lm,
                       mask=m_r[:, None] & m_m[None, :], other=0.0).to(dtype)
        b_x = tl.load(p_x + o_m64[:, None] * stride_xm + o_c[None, :] * stride_xc,
                      mask=m_m[:, None] & m_c[None, :], other=0.0)
        if HAS_COLSUM:
            b_colsum += tl.sum(b_x.to(tl.float32), axis=0)
        if DROPOUT:
            b_x = tl.where(dropout_keep(p_seed, o_m, o_c, C, dropout_p), b_x, 0.0)
        b_acc = dot(b_lt, b_x, b_acc, DOT_F32, IEEE)  # [BR, BM] @ [BM, BC] -> [BR, BC]

    tl.store(p_o + i_s * stride_os + o_r[:, None] * stride_or + o_c[None, :] * stride_oc,
             (b_acc * scale).to(p_o.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])
    if HAS_COLSUM:
        if i_r == 0:
            tl.store(p_colsum + i_s * stride_cs + o_c, b_colsum.to(p_colsum.dtype.element_ty), mask=m_c)


# --------------------------------------------------------------------------------------------------
# Configs and autotuning (CUDA only)
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tuned_matmul_lowrank(device_index: int):
    """The autotuned kernel for one CUDA device, built on first use so that import never touches CUDA."""
    return triton.autotune(
        configs=launch.gemm_configs(launch.device_family(device_index)),
        key=["M_KEY", "N", "K", "R"],
        prune_configs_by={"early_config_prune": _tuning.limited_pruner(
            launch.make_gemm_pruner(launch.max_shared_memory(device_index)))},
        **launch.autotune_options(),
    )(_matmul_lowrank_kernel)


@functools.lru_cache(maxsize=None)
def _kernel_hash() -> str:
    """Source hash of the kernel and its helpers, recorded beside each table entry ``peftfast tune`` writes."""
    return _tuning.source_hash(_matmul_lowrank_kernel, dot, dropout_keep, gemm_tile, grouped_tile, load_xw,
                               lowrank_epilogue, lowrank_tile)


def select_matmul_config(m: int, n: int, k: int, dtype, weight: str, *, gpu_name: str, max_smem: int,
                         elem: int, block_r: int, lr_elem: Optional[int] = None) -> Optional[Tuple[dict, str]]:
    """The config a CUDA launch of ``matmul_lowrank`` uses without searching, and where it came from.

    Args:
        m, n, k: the GEMM's shape (M is bucketed by :func:`tuning.bucket_m`); ``k`` is 0 with no base.
        dtype: compute dtype. weight: :func:`tuning.weight_format` of the base operand.
        gpu_name: ``torch.cuda.get_device_name``. max_smem: shared memory per block, in bytes.
        elem, lr_elem: element sizes of the main loop's and the epilogue's staged tiles (see
            :func:`launch.staged_widths`; ``lr_elem`` defaults to ``elem``); block_r: the launch's ``BLOCK_R``.

    Returns:
        ``(config, "table")``, or None when the shape is untuned here (the caller searches).
        A config that would not fit in shared memory at this call's rank/dtype is passed over.
    """
    key = _tuning.shape_key(_tuning.OP_LORA_MATMUL, m, n, k, dtype, weight)

    def fits(cfg: dict) -> bool:
        return launch.gemm_smem_bytes(cfg, cfg["num_stages"], elem, block_r, lr_elem) <= max_smem

    return _tuning.select_config(key, gpu_name=gpu_name, fits=fits)


def _cuda_config(m: int, n: int, k: int, dtype, weight: str, widths: Tuple[int, int], block_r: int,
                 device_index: int):
    """``(autotuner or None, config kwargs)`` of a CUDA launch: the table's config, else Triton's search.

    Decided once per launch plan; the search's winner is Triton's to keep (``cache_results``)."""
    gpu_name, max_smem = launch.device_info(device_index)
    hit = select_matmul_config(m, n, k, dtype, weight, gpu_name=gpu_name, max_smem=max_smem, elem=widths[0],
                               block_r=block_r, lr_elem=widths[1])
    if hit is not None:
        return None, launch.config_kwargs(hit[0])
    return _tuned_matmul_lowrank(device_index), {}


# --------------------------------------------------------------------------------------------------
# Launchers
#
# Each launcher keeps a plan per operand signature (kernels/plans.py): grid, block sizes, constexpr flags
# and config are computed on the first call of a signature; later calls read the per-call values
# (pointers, input strides, scalars) and launch. The launch itself is ``kernel[grid](...)`` on the module's
# kernel object, looked up at call time (bench/bench_host_overhead.py stubs those objects).
# --------------------------------------------------------------------------------------------------


def _launch_args(x, wt, left, right, scale, bias, dropout_p, seed, y) -> Tuple[tuple, dict]:
    """The kernel's positional arguments and constexpr flags for one ``matmul_lowrank`` call into ``y``
    (``peftfast tune`` times candidate configs with these)."""
    m, r = left.shape
    n = right.shape[1]
    has_w = wt is not None
    k = wt.shape[0] if has_w else 0
    xx = x if has_w else left
    ww = wt if has_w else right
    args = (
        xx, ww, left, right, bias if bias is not None else y, seed if dropout_p > 0 else y, y,
        m, n, k, r, _plans.next_power_of_2(m),
        xx.stride(0), xx.stride(1) if has_w else 0, ww.stride(0) if has_w else 0, ww.stride(1) if has_w else 0,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1), y.stride(0), y.stride(1),
        float(scale), float(dropout_p),
    )
    flags = dict(HAS_W=has_w, HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0, BLOCK_R=launch.block_r(r),
                 **launch.dot_flags(y.dtype))
    return args, flags


def _launch_config(args: tuple, flags: dict, m: int, n: int, cfg: dict) -> None:
    """Launch the kernel with one explicit config (``peftfast tune`` timing a candidate)."""
    grid = (_plans.cdiv(m, cfg["BLOCK_M"]) * _plans.cdiv(n, cfg["BLOCK_N"]),)
    _matmul_lowrank_kernel[grid](*args, **flags, **launch.config_kwargs(cfg))


def _matmul_plan(m: int, n: int, k: int, r: int, dtype, wt, left, right, has_bias: bool, dropout: bool, device):
    """``(autotuner or None, grid, kwargs, M_KEY)`` of one ``matmul_lowrank`` signature."""
    block_r = launch.block_r(r)
    kwargs = dict(HAS_W=wt is not None, HAS_BIAS=has_bias, DROPOUT=dropout, BLOCK_R=block_r, **launch.dot_flags(dtype))
    m_key = _plans.next_power_of_2(m)
    if device.type != "cuda":
        cfg = launch.INTERPRET_CONFIG
        kwargs.update(cfg)
        return None, (_plans.cdiv(m, cfg["BLOCK_M"]) * _plans.cdiv(n, cfg["BLOCK_N"]),), kwargs, m_key
    device_index = device.index if device.index is not None else torch.cuda.current_device()
    ww = wt if wt is not None else right
    elem = max(dtype.itemsize, ww.element_size())
    widths = elem, max(elem, left.element_size(), right.element_size())  # launch.tile_widths
    tuned, cfg = _cuda_config(m, n, k, dtype, _tuning.weight_format(wt), widths, block_r, device_index)
    kwargs.update(cfg)
    if tuned is None:
        return None, (_plans.cdiv(m, cfg["BLOCK_M"]) * _plans.cdiv(n, cfg["BLOCK_N"]),), kwargs, m_key
    return tuned, lambda meta: (_plans.cdiv(m, meta["BLOCK_M"]) * _plans.cdiv(n, meta["BLOCK_N"]),), kwargs, m_key


def matmul_lowrank(
    x: Optional[torch.Tensor],
    wt: Optional[torch.Tensor],
    left: torch.Tensor,
    right: torch.Tensor,
    scale: float,
    *,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``x @ wt + keep * (scale * left @ right) / (1 - p) + bias`` in one kernel.

    Args:
        x: [M, K], any strides; None for the low-rank term alone (then ``wt`` must be None too).
        wt: [K, N], any strides (pass ``W.t()`` for ``x @ W^T``), any float dtype; cast to x's in-kernel.
        left: [M, R]. right: [R, N], any strides and float dtype.
        scale: multiplies the low-rank product.
        bias: optional [N].
        dropout_p: when > 0, the low-rank term is masked with the dropout mask of an [M, N] input
            regenerated from ``seed`` (this is dX's LoRA part under dropout) and divided by ``1 - p``.
        seed: int64 tensor [1] on the device; required when ``dropout_p > 0``.
        out_dtype: output (and compute) dtype; defaults to x's (or left's when x is None).

    Returns:
        [M, N] contiguous tensor in ``out_dtype``.
    """
    m, r = left.shape
    n = right.shape[1]
    device = left.device
    if wt is not None:
        k = wt.shape[0]
        dtype = out_dtype or x.dtype
        xx, ww = x, wt
        sx, sw = x.stride(), wt.stride()
    else:
        k = 0
        dtype = out_dtype or left.dtype
        xx, ww = left, right
        sx, sw = (left.stride(0), 0), (0, 0)
    y = torch.empty((m, n), device=device, dtype=dtype)
    if m == 0 or n == 0:
        return y
    dropout = dropout_p > 0
    key = ("matmul_lowrank", m, n, k, r, dtype, None if wt is None else (wt.dtype, sw), left.dtype, right.dtype,
           bias is not None, dropout, device)
    plan = _plans.PLANS.get(key)
    if plan is None:
        plan = _plans.PLANS[key] = _matmul_plan(m, n, k, r, dtype, wt, left, right, bias is not None, dropout, device)
    tuned, grid, kwargs, m_key = plan
    sl, sr = left.stride(), right.stride()
    (tuned or _matmul_lowrank_kernel)[grid](
        xx, ww, left, right, y if bias is None else bias, seed if dropout else y, y,
        m, n, k, r, m_key,
        sx[0], sx[1], sw[0], sw[1], sl[0], sl[1], sr[0], sr[1], n, 1,
        float(scale), float(dropout_p), **kwargs,
    )
    return y


def _project_blocks(m: int, elem: int, on_gpu: bool) -> Tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_K, num_warps)`` of :func:`lowrank_project` for operands of at most ``elem``
    bytes; its own function so that the GPU choice can be compiled ahead of time on a machine without
    one (tests/kernels/aot_lora_cases.py)."""
    if on_gpu:
        # Each pipeline stage holds an X and an At tile at their stored width: with 4-byte operands
        # (fp32 x, or fp32 adapters on a bf16 x) BLOCK_K 128 needs 112-160 KB, over sm86/sm89's 99 KB.
        return (16 if m <= 16 else 64), (128 if elem <= 2 else 64), 4
    return 64, 64, 1


def lowrank_project(
    x: torch.Tensor,
    at: torch.Tensor,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``scale * dropout(x) @ at``: [M, K] @ [K, R] -> [M, R] (``x @ A^T`` with ``at = A.t()``, ``dY @ B``).

    Args:
        x: [M, K], any strides. at: [K, R], any strides and float dtype (cast to x's in-kernel).
        scale: output multiplier (fp32, applied before the final rounding).
        dropout_p, seed: inverted dropout on x, mask regenerated from ``seed`` (see module docstring).
        out_dtype: defaults to x's dtype.

    Returns:
        [M, R] contiguous.
    """
    m, k = x.shape
    r = at.shape[1]
    device = x.device
    dtype = out_dtype or x.dtype
    out = torch.empty((m, r), device=device, dtype=dtype)
    if m == 0 or r == 0:
        return out
    dropout = dropout_p > 0
    key = ("lowrank_project", m, r, x.dtype, at.dtype, dropout, device)
    plan = _plans.PLANS.get(key)
    if plan is None:
        block_r = launch.block_r(r)
        block_m, block_k, warps = _project_blocks(m, max(x.element_size(), at.element_size()), device.type == "cuda")
        plan = _plans.PLANS[key] = (
            (_plans.cdiv(m, block_m), _plans.cdiv(r, block_r)),
            dict(DROPOUT=dropout, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=warps,
                 **launch.dot_flags(x.dtype)),
        )
    grid, kwargs = plan
    if dropout:
        scale = scale / (1.0 - dropout_p)
    sx, sa = x.stride(), at.stride()
    _lowrank_project_kernel[grid](
        x, at, seed if dropout else out, out, m, k, r,
        sx[0], sx[1], sa[0], sa[1], r, 1, float(scale), float(dropout_p), **kwargs,
    )
    return out


def _wgrad_blocks(elem: int, on_gpu: bool) -> Tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_C, num_warps)`` of :func:`lowrank_wgrad` for operands of at most ``elem`` bytes
    (see :func:`_project_blocks`)."""
    if on_gpu:
        # fp32 L^T and X tiles at BLOCK_M 64 need 104-128 KB: over sm86/sm89's 99 KB.
        return (64 if elem <= 2 else 32), 128, 4
    return 64, 64, 1


def lowrank_wgrad(
    left: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    colsum: Optional[torch.Tensor] = None,
    splits: Optional[int] = None,
) -> None:
    """``out[R, C] = scale * left[M, R]^T @ dropout(x)[M, C]``; optionally ``colsum[C] = x.sum(0)``.

    Args:
        left: [M, R]. x: [M, C]; both any strides. ``left`` is cast to x's dtype in-kernel.
        out: [R, C] destination, any strides and dtype (pass ``dB.t()`` to write dB [C, R] directly).
        scale: fp32 output multiplier (``1/(1-p)`` is folded in when ``dropout_p > 0``).
        dropout_p, seed: dropout mask on x, regenerated from ``seed``.
        colsum: optional [C] destination for the column sums of x (before dropout).
        splits: how many programs share the M reduction; default: enough to fill the GPU.
    """
    m, r = left.shape
    c = x.shape[1]
    device = x.device
    dropout = dropout_p > 0
    has_colsum = colsum is not None
    key = ("lowrank_wgrad", m, c, r, left.dtype, x.dtype, dropout, has_colsum, splits, device)
    plan = _plans.PLANS.get(key)
    if plan is None:
        plan = _plans.PLANS[key] = _wgrad_plan(m, c, r, left, x, dropout, has_colsum, splits, device)
    grid, n_splits, rows_per_split, kwargs = plan
    if dropout:
        scale = scale / (1.0 - dropout_p)
    if n_splits == 1:
        # One program per tile owns the whole reduction: write the final dtype and layout directly.
        dst, (so_r, so_c), cs = out, out.stride(), colsum
        dst_strides = (0, so_r, so_c)
        cs_stride = 0
    else:
        dst = torch.empty((n_splits, r, c), device=device, dtype=torch.float32)
        dst_strides = (r * c, c, 1)
        cs = torch.empty((n_splits, c), device=device, dtype=torch.float32) if has_colsum else None
        cs_stride = c
    sl, sx = left.stride(), x.stride()
    _lowrank_wgrad_kernel[grid](
        left, x, seed if dropout else dst, dst, cs if cs is not None else dst,
        m, c, r, rows_per_split,
        sl[0], sl[1], sx[0], sx[1], *dst_strides, cs_stride,
        float(scale), float(dropout_p), **kwargs,
    )
    if n_splits > 1:
        out.copy_(dst.sum(0))
        if has_colsum:
            colsum.copy_(cs.sum(0))


def _wgrad_plan(m: int, c: int, r: int, left, x, dropout: bool, has_colsum: bool, splits: Optional[int], device):
    """``(grid, splits, rows_per_split, kwargs)`` of one ``lowrank_wgrad`` signature."""
    cdiv = _plans.cdiv
    block_r = launch.block_r(r)
    block_m, block_c, warps = _wgrad_blocks(max(left.element_size(), x.element_size()), device.type == "cuda")
    n_tiles = cdiv(c, block_c) * cdiv(r, block_r)
    if splits is None:
        splits = max(1, min(cdiv(m, 4 * block_m), cdiv(2 * launch.num_sms(device), n_tiles)))
    splits = max(1, min(splits, cdiv(max(m, 1), block_m)))
    rows_per_split = cdiv(cdiv(max(m, 1), splits), block_m) * block_m
    grid = (cdiv(c, block_c), cdiv(r, block_r), splits)
    kwargs = dict(DROPOUT=dropout, HAS_COLSUM=has_colsum, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r,
                  num_warps=warps, **launch.dot_flags(x.dtype))
    return grid, splits, rows_per_split, kwargs
