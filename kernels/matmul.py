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

Before that search, a CUDA launch asks :mod:`.tuning` for a config without one: the shipped table
``configs/<gpu-slug>.json`` (written by ``peftfast tune``) first, then the on-disk cache of earlier
searches' winners; a hit launches that single config. A search's winner goes into that cache, so a
later process skips it. ``PEFTFAST_TUNING=off`` leaves only the search. ``PEFTFAST_AUTOTUNE_CONFIGS=N``
limits every search here (and IA3's, DoRA's, the 4-bit GEMM's, prefix attention's) to the first N
candidates that survive pruning, for a GPU correctness run with no time to search; such a search's
winner is not cached (:func:`.tuning.limited_pruner`).
"""
from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import tuning as _tuning
from .dispatch import interpreting

_CONFIG_FILE = os.path.join(os.path.dirname(__file__), "configs", "lora_matmul.json")


# --------------------------------------------------------------------------------------------------
# Triton helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _grouped_tile(i_pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of program ``i_pid`` in grouped launch order: GROUP_M row blocks sweep
    the columns together, so their row tiles and the column tiles they share stay in L2."""
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    n_in_group = GROUP_M * n_n
    first_m = (i_pid // n_in_group) * GROUP_M
    group_size = min(n_m - first_m, GROUP_M)
    return first_m + ((i_pid % n_in_group) % group_size), (i_pid % n_in_group) // group_size


@triton.jit
def _dot(b_a, b_b, b_acc, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """``b_acc + b_a @ b_b`` in fp32; ``IEEE`` keeps fp32 operands off TF32 (PyTorch's default too)."""
    if DOT_F32:
        b_a = b_a.to(tl.float32)
        b_b = b_b.to(tl.float32)
    if IEEE:
        return tl.dot(b_a, b_b, b_acc, input_precision="ieee")
    return tl.dot(b_a, b_b, b_acc)


@triton.jit
def _lowrank_tile(p_l, p_r, o_m64, o_n, m_m, m_n, R, stride_lm, stride_lr, stride_rr, stride_rn,
                  dtype: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """``L[o_m, :R] @ R[:R, o_n]`` in fp32 ([BM, BN]): the low-rank term of the GEMM epilogues
    (LoRA, in-loop 4-bit, DoRA), computed while their output tile is still in registers.

    Operands are cast to ``dtype`` (x's) first: adapters may be fp32 while x is bf16/fp16, and the
    branch runs in x's dtype as the GEMM does. The loop is not software-pipelined (num_stages=1): one
    or two iterations gain nothing from it, and its stages of L and R tiles at their stored width (fp32
    adapters) took more shared memory than the main loop (BLOCK_R 64 > BLOCK_K 32): up to 208 KB,
    past sm80/sm89's limits (found by compiling: tests/kernels/aot_lora_cases.py).
    """
    b_lr = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        o_r = r0 + tl.arange(0, BLOCK_R)
        m_r = o_r < R
        b_l = tl.load(p_l + o_m64[:, None] * stride_lm + o_r[None, :] * stride_lr,
                      mask=m_m[:, None] & m_r[None, :], other=0.0).to(dtype)
        b_r = tl.load(p_r + o_r[:, None] * stride_rr + o_n[None, :] * stride_rn,
                      mask=m_r[:, None] & m_n[None, :], other=0.0).to(dtype)
        b_lr = _dot(b_l, b_r, b_lr, DOT_F32, IEEE)  # [BM, BR] @ [BR, BN] -> [BM, BN]
    return b_lr


@triton.jit
def _dropout_keep(p_seed, o_row, o_col, n_cols, dropout_p):
    """Keep-mask of the dropout on the LoRA input for rows ``o_row`` x columns ``o_col``.

    int64 offsets: ``row * n_cols`` overflows int32 past 2^31 elements, and for offsets below 2^32
    Philox gives the same numbers for int32 and int64, so small and large calls agree.
    """
    seed = tl.load(p_seed)
    o_rand = o_row.to(tl.int64)[:, None] * n_cols + o_col[None, :]
    return tl.rand(seed, o_rand) >= dropout_p


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


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
    i_m, i_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N
    # int64 row offsets: M * stride overflows int32 for long sequences times wide layers.
    o_m64 = o_m.to(tl.int64)
    dtype = p_y.dtype.element_ty

    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_W:
        o_k = tl.arange(0, BLOCK_K)
        p_xb = p_x + o_m64[:, None] * stride_xm + o_k[None, :] * stride_xk
        p_wb = p_w + o_k[:, None] * stride_wk + o_n[None, :] * stride_wn
        for k0 in range(0, K, BLOCK_K):
            m_k = (k0 + o_k) < K
            b_x = tl.load(p_xb, mask=m_m[:, None] & m_k[None, :], other=0.0)
            # The base weight may be stored in another dtype (fp32 master copy, fp16 checkpoint).
            b_w = tl.load(p_wb, mask=m_k[:, None] & m_n[None, :], other=0.0).to(dtype)
            b_acc = _dot(b_x, b_w, b_acc, DOT_F32, IEEE)  # [BM, BK] @ [BK, BN] -> [BM, BN]
            p_xb += BLOCK_K * stride_xk
            p_wb += BLOCK_K * stride_wk

    # Low-rank epilogue: while the tile is still in registers, so Y is written once.
    b_lr = _lowrank_tile(p_l, p_r, o_m64, o_n, m_m, m_n, R, stride_lm, stride_lr, stride_rr, stride_rn,
                         dtype, DOT_F32, IEEE, BLOCK_M, BLOCK_N, BLOCK_R) * scale
    if DROPOUT:
        # Backward of dropout on the LoRA input: dX's LoRA part only passes where the input was kept.
        b_keep = _dropout_keep(p_seed, o_m, o_n, N, dropout_p)
        b_lr = tl.where(b_keep, b_lr / (1.0 - dropout_p), 0.0)
    b_acc += b_lr
    if HAS_BIAS:
        b_acc += tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]

    tl.store(p_y + o_m64[:, None] * stride_ym + o_n[None, :] * stride_yn, b_acc.to(dtype),
             mask=m_m[:, None] & m_n[None, :])


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
            b_x = tl.where(_dropout_keep(p_seed, o_m, k0 + o_k, K, dropout_p), b_x, 0.0)
        b_a = tl.load(p_a + (k0 + o_k)[:, None] * stride_ak + o_r[None, :] * stride_ar,
                      mask=m_k[:, None] & m_r[None, :], other=0.0).to(dtype)
        b_acc = _dot(b_x, b_a, b_acc, DOT_F32, IEEE)  # [BM, BK] @ [BK, BR] -> [BM, BR]

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
            b_x = tl.where(_dropout_keep(p_seed, o_m, o_c, C, dropout_p), b_x, 0.0)
        b_acc = _dot(b_lt, b_x, b_acc, DOT_F32, IEEE)  # [BR, BM] @ [BM, BC] -> [BR, BC]

    tl.store(p_o + i_s * stride_os + o_r[:, None] * stride_or + o_c[None, :] * stride_oc,
             (b_acc * scale).to(p_o.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])
    if HAS_COLSUM:
        if i_r == 0:
            tl.store(p_colsum + i_s * stride_cs + o_c, b_colsum.to(p_colsum.dtype.element_ty), mask=m_c)


# --------------------------------------------------------------------------------------------------
# Configs and autotuning (CUDA only)
# --------------------------------------------------------------------------------------------------

# One fixed config in the interpreter: big blocks keep the Python-level loop short, and a sweep would
# only time the interpreter.
_INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}


@functools.lru_cache(maxsize=None)
def _config_table() -> Dict[str, List[dict]]:
    with open(_CONFIG_FILE) as f:
        return json.load(f)


def _family(capability: tuple) -> str:
    """The config-table key for a CUDA capability.

    sm86/sm87 share sm89's ~100 KB of shared memory per block, so they use its list; anything older
    than sm80 gets sm80's, which the shared-memory pruning then trims.
    """
    major, minor = capability
    if major >= 9:
        return "sm90"
    if major == 8 and minor != 0:
        return "sm89"
    return "sm80"


def _max_shared_memory(device_index: int) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        return int(props["max_shared_mem"])
    except Exception:  # older Triton drivers: fall back to PyTorch's view of the device
        props = torch.cuda.get_device_properties(device_index)
        return int(getattr(props, "shared_memory_per_block_optin", 99 * 1024))


def _smem_bytes(kw: dict, num_stages: int, elem_bytes: int, block_r: int, lr_elem_bytes: Optional[int] = None) -> int:
    """Shared memory a config needs: the larger of the main loop's ``num_stages`` X and W tiles and the
    epilogue's L and R tiles (that loop is not pipelined; see the kernel). The L and R tiles are staged
    at their stored width, ``lr_elem_bytes`` (default ``elem_bytes``; see :func:`_staged_widths`): fp32
    adapters under a bf16 GEMM took 80 KB where counting them at 2 bytes said 72 KB. Checked against the
    compiler for every config of every family by tests/kernels/aot_lora_cases.py."""
    main = num_stages * (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * elem_bytes
    epilogue = (kw["BLOCK_M"] * block_r + block_r * kw["BLOCK_N"]) * (lr_elem_bytes or elem_bytes)
    return max(main, epilogue)


def _tile_widths(a: torch.Tensor, w: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> Tuple[int, int]:
    """Element sizes of the tiles a low-rank-epilogue GEMM stages in shared memory: the main loop's
    (the wider of ``a``'s and W's dtypes: a wider W is staged before its in-kernel cast), and the
    epilogue's L and R tiles (the widest of that and both adapters' dtypes)."""
    elem = max(a.element_size(), w.element_size())
    return elem, max(elem, left.element_size(), right.element_size())


def _staged_widths(named_args: dict, main: Tuple[str, str] = ("p_y", "p_w")) -> Tuple[int, int]:
    """:func:`_tile_widths` of a launch's named arguments, the main loop's two operands named ``main``."""
    return _tile_widths(named_args[main[0]], named_args[main[1]], named_args["p_l"], named_args["p_r"])


def _make_pruner(max_smem: int):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        m = int(args["M"])
        elem, lr_elem = _staged_widths(args)
        block_r = int(args["BLOCK_R"])

        def need(c):
            return _smem_bytes(c.kwargs, c.num_stages, elem, block_r, lr_elem)

        fits = [c for c in configs if need(c) <= max_smem]
        fits = fits or [min(configs, key=need)]
        return _keep_rows_fitting(fits, m)

    return prune


def _keep_rows_fitting(configs: list, rows: int) -> list:
    """The configs whose ``BLOCK_M`` is at most ``rows`` (rounded up to a power of two, at least 16), or
    those with the shortest ``BLOCK_M`` if none is: row blocks far taller than the problem (decode,
    short prompts) only multiply padding."""
    cap = max(16, triton.next_power_of_2(int(rows)))
    short = [c for c in configs if c.kwargs["BLOCK_M"] <= cap]
    if short:
        return short
    lowest = min(c.kwargs["BLOCK_M"] for c in configs)
    return [c for c in configs if c.kwargs["BLOCK_M"] == lowest]


def _as_triton_configs(entries: List[dict]) -> list:
    """Config-table entries (``configs/*.json``) as ``triton.Config`` objects."""
    return [triton.Config({k: e[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")},
                          num_warps=e["num_warps"], num_stages=e["num_stages"])
            for e in entries]


def _gemm_configs(family: str) -> list:
    """The autotuning candidates of the X-by-W tile loop (this GEMM's, and IA3's and DoRA's, which share
    its main loop) for one GPU family (``"sm80"``, ``"sm89"``, ``"sm90"``)."""
    return _as_triton_configs(_config_table()[family])


def _device_family(device_index: int) -> str:
    return _family(torch.cuda.get_device_capability(device_index))


def _autotune_options() -> dict:
    """Options every ``triton.autotune`` here gets: Triton >= 3.2 can keep each winner in its on-disk
    cache (JSON, not pickle) across processes."""
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}


@functools.lru_cache(maxsize=None)
def _tuned_matmul_lowrank(device_index: int):
    """The autotuned kernel for one CUDA device, built on first use so that import never touches CUDA."""
    return triton.autotune(
        configs=_gemm_configs(_device_family(device_index)),
        key=["M_KEY", "N", "K", "R"],
        prune_configs_by={"early_config_prune": _tuning.limited_pruner(
            _make_pruner(_max_shared_memory(device_index)))},
        **_autotune_options(),
    )(_matmul_lowrank_kernel)


@functools.lru_cache(maxsize=None)
def _kernel_hash() -> str:
    """Source hash of the kernel and its helpers: part of the tuning-cache key, so edits invalidate it."""
    return _tuning.source_hash(_matmul_lowrank_kernel, _dot, _dropout_keep, _grouped_tile, _lowrank_tile)


@functools.lru_cache(maxsize=None)
def _device_info(device_index: int) -> Tuple[str, int]:
    """(GPU name, shared memory per block) of a CUDA device; asked on first launch, never at import."""
    return torch.cuda.get_device_name(device_index), _max_shared_memory(device_index)


def select_matmul_config(m: int, n: int, k: int, dtype, weight: str, *, gpu_name: str, max_smem: int,
                         elem: int, block_r: int, lr_elem: Optional[int] = None) -> Optional[Tuple[dict, str]]:
    """The config a CUDA launch of ``matmul_lowrank`` uses without searching, and where it came from.

    Args:
        m, n, k: the GEMM's shape (M is bucketed by :func:`tuning.bucket_m`); ``k`` is 0 with no base.
        dtype: compute dtype. weight: :func:`tuning.weight_format` of the base operand.
        gpu_name: ``torch.cuda.get_device_name``. max_smem: shared memory per block, in bytes.
        elem, lr_elem: element sizes of the main loop's and the epilogue's staged tiles (see
            :func:`_staged_widths`; ``lr_elem`` defaults to ``elem``); block_r: the launch's ``BLOCK_R``.

    Returns:
        ``(config, "table" | "cache")``, or None when the shape is untuned here (the caller searches).
        A config that would not fit in shared memory at this call's rank/dtype is passed over.
    """
    key = _tuning.shape_key(_tuning.OP_LORA_MATMUL, m, n, k, dtype, weight)
    use_table, use_cache = _tuning.tuning_enabled()
    if not (use_table or use_cache):
        return None

    def fits(cfg: dict) -> bool:
        return _smem_bytes(cfg, cfg["num_stages"], elem, block_r, lr_elem) <= max_smem

    return _tuning.select_config(key, gpu_name=gpu_name, kernel_hash=_kernel_hash(), fits=fits,
                                 use_table=use_table, use_cache=use_cache)


# (device, M bucket, N, K, dtype, weight format, elem, lr_elem, BLOCK_R) -> config dict, or None for "search".
# Cleared with the tuning module's own memory (tuning.clear_memory_caches), as a new process would be.
_SELECTED: Dict[tuple, Optional[dict]] = {}
_MISSING = object()
_tuning.on_clear(_SELECTED.clear)


def _record_search_winner(kernel, timings_before, gpu_name: str, key: str,
                          kernel_hash: Optional[str] = None) -> Optional[dict]:
    """After an autotuned launch: the config it ran, written to the tuning cache with its time, under
    ``kernel_hash`` (default: this GEMM's; qmatmul passes the in-loop kernel's).

    ``best_config`` is set by every Triton 3.x autotuner run; ``configs_timings`` is only replaced when
    this run benchmarked (a stale dict from an earlier key is not this key's timing), so the time is
    recorded only then.
    """
    best = getattr(kernel, "best_config", None)
    if best is None:
        return None
    try:
        cfg = _tuning.config_to_dict(best)
    except (KeyError, TypeError, ValueError):
        return None
    ms = None
    timings = getattr(kernel, "configs_timings", None)
    if isinstance(timings, dict) and timings is not timings_before and best in timings:
        t = timings[best]
        t = t[0] if isinstance(t, (list, tuple)) else t
        if isinstance(t, (int, float)) and t == t and t != float("inf"):
            ms = float(t)
    if not _tuning.tuning_enabled()[1]:
        return None
    if _tuning.search_limit() is not None:
        # A search over a few candidates found the best of those, not this shape's winner: caching it would
        # make every later process (a benchmark run, say) skip the full search.
        return None
    _tuning.cache_write(gpu_name, kernel_hash or _kernel_hash(), key, cfg, ms)
    return cfg


def _launch_cuda(args: tuple, flags: dict, m: int, n: int, k: int, dtype, wt, y, widths: Tuple[int, int]) -> None:
    device_index = y.device.index if y.device.index is not None else torch.cuda.current_device()
    weight = _tuning.weight_format(wt)
    elem, lr_elem = widths
    memo_key = (device_index, _tuning.bucket_m(m), n, k, dtype, weight, elem, lr_elem, flags["BLOCK_R"])
    cfg = _SELECTED.get(memo_key, _MISSING)
    if cfg is _MISSING:
        gpu_name, max_smem = _device_info(device_index)
        hit = select_matmul_config(m, n, k, dtype, weight, gpu_name=gpu_name, max_smem=max_smem, elem=elem,
                                   block_r=flags["BLOCK_R"], lr_elem=lr_elem)
        cfg = hit[0] if hit is not None else None
        _SELECTED[memo_key] = cfg
    if cfg is not None:
        _launch_config(args, flags, m, n, cfg)
        return
    kernel = _tuned_matmul_lowrank(device_index)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    timings_before = getattr(kernel, "configs_timings", None)
    kernel[grid](*args, **flags)
    key = _tuning.shape_key(_tuning.OP_LORA_MATMUL, m, n, k, dtype, weight)
    _SELECTED[memo_key] = _record_search_winner(kernel, timings_before, _device_info(device_index)[0], key)


def _dot_flags(dtype: torch.dtype) -> dict:
    return {"DOT_F32": interpreting() and dtype == torch.bfloat16, "IEEE": dtype == torch.float32}


def _block_r(r: int) -> int:
    # tl.dot needs every dimension >= 16; ranks above 64 loop in chunks rather than grow registers.
    return max(16, min(64, triton.next_power_of_2(max(r, 1))))


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _launch_args(x, wt, left, right, scale, bias, dropout_p, seed, y) -> Tuple[tuple, dict]:
    """The kernel's positional arguments and constexpr flags for one ``matmul_lowrank`` call into ``y``."""
    m, r = left.shape
    n = right.shape[1]
    has_w = wt is not None
    k = wt.shape[0] if has_w else 0
    xx = x if has_w else left
    ww = wt if has_w else right
    args = (
        xx, ww, left, right, bias if bias is not None else y, seed if dropout_p > 0 else y, y,
        m, n, k, r, triton.next_power_of_2(m),
        xx.stride(0), xx.stride(1) if has_w else 0, ww.stride(0) if has_w else 0, ww.stride(1) if has_w else 0,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1), y.stride(0), y.stride(1),
        float(scale), float(dropout_p),
    )
    flags = dict(HAS_W=has_w, HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0, BLOCK_R=_block_r(r),
                 **_dot_flags(y.dtype))
    return args, flags


def _launch_config(args: tuple, flags: dict, m: int, n: int, cfg: dict) -> None:
    """Launch the kernel with one explicit config (a table/cache hit, or a candidate being timed)."""
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _matmul_lowrank_kernel[grid](
        *args, **flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


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
    has_w = wt is not None
    k = wt.shape[0] if has_w else 0
    dtype = out_dtype or (x.dtype if has_w else left.dtype)
    y = torch.empty((m, n), device=left.device, dtype=dtype)
    if m == 0 or n == 0:
        return y
    args, flags = _launch_args(x, wt, left, right, scale, bias, dropout_p, seed, y)
    ww = wt if has_w else right
    if y.device.type == "cuda":
        _launch_cuda(args, flags, m, n, k, dtype, wt if has_w else None, y, _tile_widths(y, ww, left, right))
    else:
        cfg = _INTERPRET_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _matmul_lowrank_kernel[grid](*args, **flags, **cfg)
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
    out = torch.empty((m, r), device=x.device, dtype=out_dtype or x.dtype)
    if m == 0 or r == 0:
        return out
    if dropout_p > 0:
        scale = scale / (1.0 - dropout_p)
    block_r = _block_r(r)
    elem = max(x.element_size(), at.element_size())
    block_m, block_k, warps = _project_blocks(m, elem, x.device.type == "cuda")
    grid = (triton.cdiv(m, block_m), triton.cdiv(r, block_r))
    _lowrank_project_kernel[grid](
        x, at, seed if dropout_p > 0 else out, out, m, k, r,
        x.stride(0), x.stride(1), at.stride(0), at.stride(1), out.stride(0), out.stride(1),
        float(scale), float(dropout_p),
        DROPOUT=dropout_p > 0, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=warps,
        **_dot_flags(x.dtype),
    )
    return out


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


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
    if dropout_p > 0:
        scale = scale / (1.0 - dropout_p)
    block_r = _block_r(r)
    block_m, block_c, warps = _wgrad_blocks(max(left.element_size(), x.element_size()), x.device.type == "cuda")
    n_tiles = triton.cdiv(c, block_c) * triton.cdiv(r, block_r)
    if splits is None:
        splits = max(1, min(triton.cdiv(m, 4 * block_m), triton.cdiv(2 * _num_sms(x.device), n_tiles)))
    splits = max(1, min(splits, triton.cdiv(max(m, 1), block_m)))
    rows_per_split = triton.cdiv(triton.cdiv(max(m, 1), splits), block_m) * block_m
    if splits == 1:
        # One program per tile owns the whole reduction: write the final dtype and layout directly.
        dst, dst_strides = out, (0, out.stride(0), out.stride(1))
        cs, cs_stride = colsum, 0
    else:
        dst = torch.empty((splits, r, c), device=x.device, dtype=torch.float32)
        dst_strides = dst.stride()
        cs = torch.empty((splits, c), device=x.device, dtype=torch.float32) if colsum is not None else None
        cs_stride = c
    grid = (triton.cdiv(c, block_c), triton.cdiv(r, block_r), splits)
    _lowrank_wgrad_kernel[grid](
        left, x, seed if dropout_p > 0 else dst, dst, cs if cs is not None else dst,
        m, c, r, rows_per_split,
        left.stride(0), left.stride(1), x.stride(0), x.stride(1), *dst_strides, cs_stride,
        float(scale), float(dropout_p),
        DROPOUT=dropout_p > 0, HAS_COLSUM=colsum is not None, BLOCK_M=block_m, BLOCK_C=block_c,
        BLOCK_R=block_r, num_warps=warps, **_dot_flags(x.dtype),
    )
    if splits > 1:
        out.copy_(dst.sum(0))
        if colsum is not None:
            colsum.copy_(cs.sum(0))
