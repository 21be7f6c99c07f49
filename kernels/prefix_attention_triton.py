"""The Triton prefix attention: ``peftfast::prefix_attention`` / ``peftfast::prefix_attention_backward``,
the forward and backward kernels. The math and the front end are in :mod:`.prefix_attention`.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import launch
from . import ops
from . import tuning as _tuning
from .dispatch import interpreting


# ==================================================================================================
# Triton path
#
# Forward, per (query block, b, query head h), kv head h // G, scores in log2 units (s2 = qk * scale * log2 e):
#     prefix blocks (batch stride 0):  online softmax, no mask but the ragged last block
#     real blocks [0, causal end):     online softmax with causal + padding masks
#     O = acc / l,  LSE2 = m + log2(l)  (saved)
# Backward:  delta = rowsum(dO * O)
#     per (key block, b, kv head):  P^T = exp2(K Q^T s2 - LSE2), dV = sum_g P^T dO,
#                                   dK = scale * sum_g (P^T * (V dO^T - delta)) Q
#         prefix blocks -> fp32 workspace [B, Hkv, P, D] (summed over B afterwards), real -> dK, dV
#     per (query block, b, query head): dQ = scale * sum_keys (P * (dO V^T - delta)) K
# ==================================================================================================

_LOG2E = 1.4426950408889634


# Modes of the key loops: the prefix's whole blocks need no mask at all, its last block only the
# column bound; real keys get the column bound, the causal diagonal and the padding mask.
_PREFIX_FULL = tl.constexpr(0)
_PREFIX_TAIL = tl.constexpr(1)
_REAL = tl.constexpr(2)

# Dots: ``tl.dot(a, b, acc, input_precision=PRECISION)``, "ieee" for fp32 inputs (no TF32, as
# PyTorch), "tf32" (Triton's CUDA default, ignored for fp16/bf16) otherwise. Under ``DOT_F32``
# (interpreter + bf16) q is widened to fp32 right after its load and every other dot operand is
# cast to q's register dtype, a no-op on the GPU; P and dS are first rounded to the inputs' dtype, as
# the GPU kernel does. The loops call one helper per key block (:func:`_key_block_scores`) and no
# other: in the interpreter each device function call re-patches triton.language (~3 ms), which
# would dominate the CPU tests.

@triton.jit
def _query_block(NQ, HQ, G, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's query block of (b, query head), last row block first (under causality it sees the
    most keys, so the long programs start early): ``(i_m, i_bh, i_b, i_h, i_kvh, o_m, o_d, m_m, m_d)``."""
    n_mb = tl.cdiv(NQ, BLOCK_M)
    i_m = n_mb - 1 - tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // HQ).to(tl.int64)
    i_h = (i_bh % HQ).to(tl.int64)
    i_kvh = i_h // G
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    return i_m, i_bh, i_b, i_h, i_kvh, o_m, o_d, o_m < NQ, o_d < D


@triton.jit
def _key_block_scores(
    b_q, p_kb, p_pad, stride_kn, stride_kd, stride_pn,
    o_m, o_n, o_d, m_d, n_keys, causal_off, qk_scale,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """K^T tile ([BD, BN], in q's register dtype), log2-unit scores ``S2 = q K^T * qk_scale`` ([BM, BN],
    fp32), their visibility mask and the key bound ``m_n`` for the key columns ``o_n``:
    ``(b_kt, b_s, m_s, m_n)``. Under ``_PREFIX_FULL`` every key is visible and callers ignore ``m_s``.
    """
    m_n = o_n < n_keys
    if MODE == _PREFIX_FULL:
        b_kt = tl.load(p_kb + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd, mask=m_d[:, None], other=0.0)
    else:
        b_kt = tl.load(p_kb + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd,
                       mask=m_d[:, None] & m_n[None, :], other=0.0)
    b_kt = b_kt.to(b_q.dtype)
    b_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    b_s = tl.dot(b_q, b_kt, b_s, input_precision=PRECISION) * qk_scale  # [BM, BD] @ [BD, BN] -> [BM, BN]
    m_s = m_n[None, :] & (o_m[:, None] >= 0)
    if MODE == _REAL:
        if CAUSAL:
            m_s = m_s & (o_n[None, :] <= o_m[:, None] + causal_off)
        if HAS_PAD:
            m_s = m_s & (tl.load(p_pad + o_n * stride_pn, mask=m_n, other=0) != 0)[None, :]
    return b_kt, b_s, m_s, m_n


@triton.jit
def _fwd_inner(
    b_acc, b_l, b_m, b_q, p_kb, p_vb, p_pad,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
    o_m, o_d, m_d, n_lo, n_hi, n_keys, causal_off, qk_scale,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online-softmax sweep over key blocks ``[n_lo, n_hi)`` of one key/value sequence."""
    dtype = p_vb.dtype.element_ty
    o_nb = tl.arange(0, BLOCK_N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        o_n = n0 + o_nb
        b_kt, b_s, m_s, m_n = _key_block_scores(b_q, p_kb, p_pad, stride_kn, stride_kd, stride_pn,
                                                o_m, o_n, o_d, m_d, n_keys, causal_off, qk_scale,
                                                MODE, CAUSAL, HAS_PAD, PRECISION, BLOCK_M, BLOCK_N)
        if MODE == _PREFIX_FULL:
            b_v = tl.load(p_vb + o_n[:, None] * stride_vn + o_d[None, :] * stride_vd, mask=m_d[None, :], other=0.0)
        else:
            b_v = tl.load(p_vb + o_n[:, None] * stride_vn + o_d[None, :] * stride_vd,
                          mask=m_n[:, None] & m_d[None, :], other=0.0)
            b_s = tl.where(m_s, b_s, float("-inf"))
        b_v = b_v.to(b_q.dtype)
        # b_m is finite after the first prefix block (it always holds a visible key), so fully
        # masked later blocks give exp2(-inf) = 0, never -inf - -inf.
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None]
        b_pd = b_p.to(dtype).to(b_v.dtype)
        b_acc = tl.dot(b_pd, b_v, b_acc, input_precision=PRECISION)  # [BM, BN] @ [BN, BD] -> [BM, BD]
        b_m = b_m_new
    return b_acc, b_l, b_m

@triton.jit
def _prefix_attn_fwd_kernel(
    p_q, p_k, p_v, p_pk, p_pv, p_pad, p_o, p_lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkh, stride_pkn, stride_pkd, stride_pvh, stride_pvn, stride_pvd,
    stride_padb, stride_padn,
    stride_ob, stride_oh, stride_om, stride_od,
    HQ, G, NQ, NK, P, D, NQ_KEY, qk_scale,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """O[b, h, rows] and LSE2[b, h, rows] for one block of query rows.

    ``NQ_KEY`` (Nq bucketed) is only an autotuning key. Query blocks are launched last row block
    first (:func:`_query_block`).
    """
    i_m, i_bh, i_b, i_h, i_kvh, o_m, o_d, m_m, m_d = _query_block(NQ, HQ, G, D, BLOCK_M, BLOCK_D)
    causal_off = NK - NQ

    b_q = tl.load(p_q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qm + o_d[None, :] * stride_qd,
                  mask=m_m[:, None] & m_d[None, :], other=0.0)
    if DOT_F32:
        b_q = b_q.to(tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # The prefix: batch stride 0, never masked; its whole blocks first, then the ragged tail.
    p_pkb = p_pk + i_kvh * stride_pkh
    p_pvb = p_pv + i_kvh * stride_pvh
    p_full = (P // BLOCK_N) * BLOCK_N
    b_acc, b_l, b_m = _fwd_inner(b_acc, b_l, b_m, b_q, p_pkb, p_pvb, p_pad,
                                 stride_pkn, stride_pkd, stride_pvn, stride_pvd, 0,
                                 o_m, o_d, m_d, 0, p_full, P, causal_off, qk_scale,
                                 _PREFIX_FULL, CAUSAL, False, PRECISION, BLOCK_M, BLOCK_N)
    b_acc, b_l, b_m = _fwd_inner(b_acc, b_l, b_m, b_q, p_pkb, p_pvb, p_pad,
                                 stride_pkn, stride_pkd, stride_pvn, stride_pvd, 0,
                                 o_m, o_d, m_d, p_full, P, P, causal_off, qk_scale,
                                 _PREFIX_TAIL, CAUSAL, False, PRECISION, BLOCK_M, BLOCK_N)

    # The real keys, up to the last one the block's last row can see.
    n_hi = NK
    if CAUSAL:
        n_hi = tl.minimum(NK, (i_m + 1) * BLOCK_M + causal_off)
    b_acc, b_l, b_m = _fwd_inner(b_acc, b_l, b_m, b_q, p_k + i_b * stride_kb + i_kvh * stride_kh,
                                 p_v + i_b * stride_vb + i_kvh * stride_vh, p_pad + i_b * stride_padb,
                                 stride_kn, stride_kd, stride_vn, stride_vd, stride_padn,
                                 o_m, o_d, m_d, 0, n_hi, NK, causal_off, qk_scale,
                                 _REAL, CAUSAL, HAS_PAD, PRECISION, BLOCK_M, BLOCK_N)

    b_o = b_acc / b_l[:, None]
    tl.store(p_o + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_om + o_d[None, :] * stride_od,
             b_o.to(p_o.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    tl.store(p_lse + i_bh.to(tl.int64) * NQ + o_m, b_m + tl.log2(b_l), mask=m_m)

@triton.jit
def _bwd_delta_kernel(
    p_o, p_do, p_delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    HQ, NQ, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, m] = sum_d dO * O, in fp32 (the softmax backward's row term)."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // HQ).to(tl.int64)
    i_h = (i_bh % HQ).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_md = (o_m < NQ)[:, None] & (o_d < D)[None, :]
    b_o = tl.load(p_o + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_om + o_d[None, :] * stride_od,
                  mask=m_md, other=0.0).to(tl.float32)
    b_do = tl.load(p_do + i_b * stride_dob + i_h * stride_doh + o_m[:, None] * stride_dom
                   + o_d[None, :] * stride_dod, mask=m_md, other=0.0).to(tl.float32)
    tl.store(p_delta + i_bh.to(tl.int64) * NQ + o_m, tl.sum(b_o * b_do, 1), mask=o_m < NQ)

@triton.jit
def _bwd_dkdv_inner(
    b_dk, b_dv, b_k, b_v, p_qg, p_dog, p_lseg, p_deltag, p_pad,
    stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, stride_pn,
    o_n, o_d, m_d, m_lo, n_keys, NQ, G, causal_off, qk_scale,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK/dV of one key block, summed over the G query heads of its group and rows [m_lo, NQ).

    Works on transposed scores ([BN, BM]) so that the key block is the left operand throughout.
    Rows past NQ load LSE2 = +inf, hence P = 0 there; for the prefix nothing else is masked (a key
    column never mixes with another, so a ragged tail only produces rows that are not stored).
    """
    dtype = p_qg.dtype.element_ty
    o_mb = tl.arange(0, BLOCK_M)
    if MODE == _REAL:
        m_n = o_n < n_keys
        m_pad = m_n
        if HAS_PAD:
            m_pad = m_n & (tl.load(p_pad + o_n * stride_pn, mask=m_n, other=0) != 0)
    for i_g in range(G):
        for m0 in range(m_lo, NQ, BLOCK_M):
            o_m = m0 + o_mb
            m_m = o_m < NQ
            b_qt = tl.load(p_qg + i_g * stride_qh + o_m[None, :] * stride_qm + o_d[:, None] * stride_qd,
                           mask=m_d[:, None] & m_m[None, :], other=0.0).to(b_k.dtype)
            b_do = tl.load(p_dog + i_g * stride_doh + o_m[:, None] * stride_dom + o_d[None, :] * stride_dod,
                           mask=m_m[:, None] & m_d[None, :], other=0.0).to(b_k.dtype)
            b_lse = tl.load(p_lseg + i_g * NQ + o_m, mask=m_m, other=float("inf"))
            b_delta = tl.load(p_deltag + i_g * NQ + o_m, mask=m_m, other=0.0)
            b_st = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            b_st = tl.dot(b_k, b_qt, b_st, input_precision=PRECISION) * qk_scale  # [BN, BD] @ [BD, BM] -> [BN, BM]
            b_pt = tl.exp2(b_st - b_lse[None, :])
            if MODE == _REAL:
                m_st = m_pad[:, None] & (o_m[None, :] >= 0)
                if CAUSAL:
                    m_st = m_st & (o_n[:, None] <= o_m[None, :] + causal_off)
                b_pt = tl.where(m_st, b_pt, 0.0)
            b_ptd = b_pt.to(dtype).to(b_k.dtype)
            b_dv = tl.dot(b_ptd, b_do, b_dv, input_precision=PRECISION)  # [BN, BM] @ [BM, BD] -> [BN, BD]
            b_dpt = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            b_dpt = tl.dot(b_v, tl.trans(b_do), b_dpt, input_precision=PRECISION)  # [BN, BD] @ [BD, BM] -> [BN, BM]
            b_dst = (b_pt * (b_dpt - b_delta[None, :])).to(dtype).to(b_k.dtype)
            b_dk = tl.dot(b_dst, tl.trans(b_qt), b_dk, input_precision=PRECISION)  # [BN, BM] @ [BM, BD] -> [BN, BD]
    return b_dk, b_dv

@triton.jit
def _prefix_attn_bwd_dkdv_kernel(
    p_q, p_k, p_v, p_pk, p_pv, p_pad, p_do, p_lse, p_delta,
    p_dk, p_dv, p_wk, p_wv,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkh, stride_pkn, stride_pkd, stride_pvh, stride_pvn, stride_pvd,
    stride_padb, stride_padn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    HKV, G, NQ, NK, P, D, scale, qk_scale,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK/dV for one key block of (b, kv head); grid axis 0 = prefix blocks, then real blocks.

    Prefix blocks write fp32 partials to the workspace ``W[b, kv_head, P, D]`` (contiguous); the
    launcher sums them over b. Real blocks write dK/dV directly.
    """
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // HKV).to(tl.int64)
    i_kvh = (i_bh % HKV).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_nb = tl.arange(0, BLOCK_N)
    causal_off = NK - NQ
    # The G query heads of this kv head are consecutive: q head i_kvh * G + g.
    i_h0 = i_kvh * G
    p_qg = p_q + i_b * stride_qb + i_h0 * stride_qh
    p_dog = p_do + i_b * stride_dob + i_h0 * stride_doh
    p_lseg = p_lse + (i_b * HKV * G + i_h0) * NQ
    p_deltag = p_delta + (i_b * HKV * G + i_h0) * NQ
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    n_pb = tl.cdiv(P, BLOCK_N)
    if i_n < n_pb:
        o_n = i_n * BLOCK_N + o_nb
        m_nd = (o_n < P)[:, None] & m_d[None, :]
        b_k = tl.load(p_pk + i_kvh * stride_pkh + o_n[:, None] * stride_pkn + o_d[None, :] * stride_pkd,
                      mask=m_nd, other=0.0)
        b_v = tl.load(p_pv + i_kvh * stride_pvh + o_n[:, None] * stride_pvn + o_d[None, :] * stride_pvd,
                      mask=m_nd, other=0.0)
        if DOT_F32:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        b_dk, b_dv = _bwd_dkdv_inner(b_dk, b_dv, b_k, b_v, p_qg, p_dog, p_lseg, p_deltag, p_pad,
                                     stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, 0,
                                     o_n, o_d, m_d, 0, P, NQ, G, causal_off, qk_scale,
                                     _PREFIX_FULL, CAUSAL, False, PRECISION, BLOCK_M, BLOCK_N)
        o_w = (i_bh.to(tl.int64) * P + o_n)[:, None] * D + o_d[None, :]
        tl.store(p_wk + o_w, b_dk * scale, mask=m_nd)
        tl.store(p_wv + o_w, b_dv, mask=m_nd)
    else:
        o_n = (i_n - n_pb) * BLOCK_N + o_nb
        m_nd = (o_n < NK)[:, None] & m_d[None, :]
        b_k = tl.load(p_k + i_b * stride_kb + i_kvh * stride_kh + o_n[:, None] * stride_kn
                      + o_d[None, :] * stride_kd, mask=m_nd, other=0.0)
        b_v = tl.load(p_v + i_b * stride_vb + i_kvh * stride_vh + o_n[:, None] * stride_vn
                      + o_d[None, :] * stride_vd, mask=m_nd, other=0.0)
        if DOT_F32:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        # Causal: rows before the first one that sees this block's first key contribute nothing.
        m_lo = 0
        if CAUSAL:
            m_lo = (tl.maximum(0, (i_n - n_pb) * BLOCK_N - causal_off) // BLOCK_M) * BLOCK_M
        b_dk, b_dv = _bwd_dkdv_inner(b_dk, b_dv, b_k, b_v, p_qg, p_dog, p_lseg, p_deltag,
                                     p_pad + i_b * stride_padb,
                                     stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
                                     stride_padn, o_n, o_d, m_d, m_lo, NK, NQ, G, causal_off, qk_scale,
                                     _REAL, CAUSAL, HAS_PAD, PRECISION, BLOCK_M, BLOCK_N)
        tl.store(p_dk + i_b * stride_dkb + i_kvh * stride_dkh + o_n[:, None] * stride_dkn
                 + o_d[None, :] * stride_dkd, (b_dk * scale).to(p_dk.dtype.element_ty), mask=m_nd)
        tl.store(p_dv + i_b * stride_dvb + i_kvh * stride_dvh + o_n[:, None] * stride_dvn
                 + o_d[None, :] * stride_dvd, b_dv.to(p_dv.dtype.element_ty), mask=m_nd)

@triton.jit
def _bwd_dq_inner(
    b_dq, b_q, b_do, b_lse, b_delta, p_kb, p_vb, p_pad,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
    o_m, o_d, m_d, n_lo, n_hi, n_keys, causal_off, qk_scale,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ (unscaled) of one row block from key blocks ``[n_lo, n_hi)``."""
    dtype = p_kb.dtype.element_ty
    o_nb = tl.arange(0, BLOCK_N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        o_n = n0 + o_nb
        b_kt, b_s, m_s, m_n = _key_block_scores(b_q, p_kb, p_pad, stride_kn, stride_kd, stride_pn,
                                                o_m, o_n, o_d, m_d, n_keys, causal_off, qk_scale,
                                                MODE, CAUSAL, HAS_PAD, PRECISION, BLOCK_M, BLOCK_N)
        b_p = tl.exp2(b_s - b_lse[:, None])
        if MODE == _PREFIX_FULL:
            b_vt = tl.load(p_vb + o_n[None, :] * stride_vn + o_d[:, None] * stride_vd, mask=m_d[:, None], other=0.0)
        else:
            b_vt = tl.load(p_vb + o_n[None, :] * stride_vn + o_d[:, None] * stride_vd,
                           mask=m_d[:, None] & m_n[None, :], other=0.0)
            b_p = tl.where(m_s, b_p, 0.0)
        b_vt = b_vt.to(b_q.dtype)
        b_dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        b_dp = tl.dot(b_do, b_vt, b_dp, input_precision=PRECISION)  # [BM, BD] @ [BD, BN] -> [BM, BN]
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(dtype).to(b_q.dtype)
        b_dq = tl.dot(b_ds, tl.trans(b_kt), b_dq, input_precision=PRECISION)  # [BM, BN] @ [BN, BD] -> [BM, BD]
    return b_dq

@triton.jit
def _prefix_attn_bwd_dq_kernel(
    p_q, p_k, p_v, p_pk, p_pv, p_pad, p_do, p_lse, p_delta, p_dq,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkh, stride_pkn, stride_pkd, stride_pvh, stride_pvn, stride_pvd,
    stride_padb, stride_padn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    HQ, G, NQ, NK, P, D, scale, qk_scale,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ for one block of query rows of (b, query head): prefix keys, then visible real keys."""
    i_m, i_bh, i_b, i_h, i_kvh, o_m, o_d, m_m, m_d = _query_block(NQ, HQ, G, D, BLOCK_M, BLOCK_D)
    m_md = m_m[:, None] & m_d[None, :]
    causal_off = NK - NQ

    b_q = tl.load(p_q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qm + o_d[None, :] * stride_qd,
                  mask=m_md, other=0.0)
    b_do = tl.load(p_do + i_b * stride_dob + i_h * stride_doh + o_m[:, None] * stride_dom
                   + o_d[None, :] * stride_dod, mask=m_md, other=0.0)
    if DOT_F32:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    b_lse = tl.load(p_lse + i_bh.to(tl.int64) * NQ + o_m, mask=m_m, other=float("inf"))
    b_delta = tl.load(p_delta + i_bh.to(tl.int64) * NQ + o_m, mask=m_m, other=0.0)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    p_pkb = p_pk + i_kvh * stride_pkh
    p_pvb = p_pv + i_kvh * stride_pvh
    p_full = (P // BLOCK_N) * BLOCK_N
    b_dq = _bwd_dq_inner(b_dq, b_q, b_do, b_lse, b_delta, p_pkb, p_pvb, p_pad,
                         stride_pkn, stride_pkd, stride_pvn, stride_pvd, 0,
                         o_m, o_d, m_d, 0, p_full, P, causal_off, qk_scale,
                         _PREFIX_FULL, CAUSAL, False, PRECISION, BLOCK_M, BLOCK_N)
    b_dq = _bwd_dq_inner(b_dq, b_q, b_do, b_lse, b_delta, p_pkb, p_pvb, p_pad,
                         stride_pkn, stride_pkd, stride_pvn, stride_pvd, 0,
                         o_m, o_d, m_d, p_full, P, P, causal_off, qk_scale,
                         _PREFIX_TAIL, CAUSAL, False, PRECISION, BLOCK_M, BLOCK_N)
    n_hi = NK
    if CAUSAL:
        n_hi = tl.minimum(NK, (i_m + 1) * BLOCK_M + causal_off)
    b_dq = _bwd_dq_inner(b_dq, b_q, b_do, b_lse, b_delta, p_k + i_b * stride_kb + i_kvh * stride_kh,
                         p_v + i_b * stride_vb + i_kvh * stride_vh, p_pad + i_b * stride_padb,
                         stride_kn, stride_kd, stride_vn, stride_vd, stride_padn,
                         o_m, o_d, m_d, 0, n_hi, NK, causal_off, qk_scale,
                         _REAL, CAUSAL, HAS_PAD, PRECISION, BLOCK_M, BLOCK_N)
    tl.store(p_dq + i_b * stride_dqb + i_h * stride_dqh + o_m[:, None] * stride_dqm + o_d[None, :] * stride_dqd,
             (b_dq * scale).to(p_dq.dtype.element_ty), mask=m_md)


# --------------------------------------------------------------------------------------------------
# Configs (CUDA: forward autotuned over a few configs, backward fixed by head_dim; interpreter: fixed)
# --------------------------------------------------------------------------------------------------

# Large blocks keep the interpreter's Python-level loops short; 32 still leaves ragged tails and
# several causal blocks at test sizes.
_INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}

# (BLOCK_M, BLOCK_N, num_warps, num_stages). Wider heads hold larger tiles, so they get smaller
# blocks and fewer pipeline stages (D=256 at 128x64x3 stages would not fit shared memory). The 16-row
# configs are for decode (Nq = 1) and short chunks, where taller blocks would only compute padding.
# Configs whose tiles exceed the GPU's shared memory are pruned at launch (:func:`_fwd_smem_bytes`);
# 128's (64, 32, 4, 2) is the one that fits fp32 inputs on a 99 KB GPU (sm86/sm89).
_FWD_CONFIGS = {
    64: [(128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (16, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (16, 64, 4, 3)],
    256: [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
}
# Backward (BLOCK_M, BLOCK_N, num_warps, num_stages): the dK/dV kernel runs BLOCK_M query rows against
# BLOCK_N keys, the dQ kernel the transpose (BLOCK_N rows, BLOCK_M keys), so the side that carries the
# fp32 accumulators (dK and dV: [BN, D] each; dQ: [BN, D]) is the 64-wide one. Fixed per head-dim
# bucket, from flash-attention's Triton tutorial proportions; not yet measured or tuned on a GPU.
# Every entry fits the smallest shared memory among the targeted GPUs (99 KB, sm86/sm89; compiled sizes
# are checked by tests/kernels/test_aot_adapters.py). fp32 inputs get their own, smaller blocks: their
# dots run on FMA units with both operands staged in shared memory at 4 bytes, so the 16-bit configs
# need 104 KB (D=128) and 132 KB (D=256) there.
_BWD_CONFIGS = {64: (32, 64, 4, 3), 128: (32, 64, 4, 2), 256: (32, 32, 8, 1)}
_BWD_CONFIGS_FP32 = {64: (32, 64, 4, 3), 128: (32, 32, 4, 2), 256: (16, 16, 4, 1)}


def _dot_flags(dtype: torch.dtype) -> dict:
    """``DOT_F32``: widen dot operands (interpreter + bf16 only); ``PRECISION``: no TF32 for fp32 inputs."""
    return {"DOT_F32": interpreting() and dtype == torch.bfloat16,
            "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def _d_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def _fwd_smem_bytes(config, args: dict, capability: int) -> int:
    """Upper bound of the forward kernel's shared memory for ``config`` at these launch arguments.

    The Q tile, the P tile (counted always: Triton stages it for the second dot in most layouts), the
    K and V tiles times their buffer count, and 2 KB for the row reductions' cross-warp scratch. Triton's
    pipeliner keeps ``num_stages`` K/V buffers where Hopper's wgmma reads 16-bit operands from shared
    memory, ``num_stages - 1`` (at least one) for mma.sync and for fp32 (FMA) dots. The bound is checked
    against the compiler's figure for every config by tests/kernels/aot_adapter_cases.py; it is exact for
    Hopper's 16-bit tiles and overcounts pre-Hopper ones by the P tile where it stays in registers.
    """
    kw = config.kwargs
    bm, bn, d = kw["BLOCK_M"], kw["BLOCK_N"], int(args["BLOCK_D"])
    elem = args["p_q"].element_size()
    bufs = config.num_stages if (capability >= 90 and elem == 2) else max(1, config.num_stages - 1)
    return elem * (bm * d + bm * bn + 2 * bufs * bn * d) + 2048


def _fwd_pruner(max_smem: int, capability: int):
    """Drop configs that would not fit the GPU's shared memory, then the row blocks far taller than Nq."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        fits = [c for c in configs if _fwd_smem_bytes(c, args, capability) <= max_smem]
        fits = fits or [min(configs, key=lambda c: _fwd_smem_bytes(c, args, capability))]
        return _prune_by_rows(fits, named_args, **kwargs)

    return prune


def _prune_by_rows(configs, named_args, **kwargs):
    """Row blocks far taller than Nq are wasted work; keep those that fit (or the shortest)."""
    return launch.keep_rows_fitting(configs, int({**named_args, **kwargs}["NQ_KEY"]))


def _fwd_configs(d_bucket: int):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in _FWD_CONFIGS[d_bucket]]


@functools.lru_cache(maxsize=None)
def _tuned_fwd(d_bucket: int, device_index: int):
    """The autotuned forward for one head-dim bucket and CUDA device, built on first use (import stays
    CUDA-free); its pruner knows that device's shared memory."""
    major, minor = torch.cuda.get_device_capability(device_index)
    prune = _fwd_pruner(launch.max_shared_memory(device_index), 10 * major + minor)
    return triton.autotune(configs=_fwd_configs(d_bucket), key=["BLOCK_D", "CAUSAL", "NQ_KEY"],
                           prune_configs_by={"early_config_prune": _tuning.limited_pruner(prune)},
                           **launch.autotune_options())(_prefix_attn_fwd_kernel)


def _bwd_config(block_d: int, dtype: torch.dtype):
    """The CUDA backward's ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``."""
    table = _BWD_CONFIGS_FP32 if dtype == torch.float32 else _BWD_CONFIGS
    return table[_d_bucket(block_d)]


def _pad_args(attention_mask, like):
    """(pointer tensor, batch stride, key stride) of the padding mask; bool is read as uint8, no copy."""
    if attention_mask is None:
        return like, 0, 0
    m = attention_mask.view(torch.uint8) if attention_mask.dtype == torch.bool else attention_mask
    return m, m.stride(0), m.stride(1)


def _strides4(t):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _fwd_launch_args(q, k, v, prefix_k, prefix_v, attention_mask, causal, scale, out, lse):
    """The forward kernel's positional arguments and constexpr flags (all but the tuned blocks)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    p = prefix_k.shape[1]
    pad, stride_padb, stride_padn = _pad_args(attention_mask, q)
    args = (
        q, k, v, prefix_k, prefix_v, pad, out, lse,
        *_strides4(q), *_strides4(k), *_strides4(v),
        *prefix_k.stride(), *prefix_v.stride(), stride_padb, stride_padn, *_strides4(out),
        hq, hq // hkv, nq, nk, p, d, min(128, triton.next_power_of_2(nq)), float(scale) * _LOG2E,
    )
    flags = dict(CAUSAL=bool(causal), HAS_PAD=attention_mask is not None,
                 BLOCK_D=max(16, triton.next_power_of_2(d)), **_dot_flags(q.dtype))
    return args, flags


def _prefix_attn_forward_impl(q, k, v, prefix_k, prefix_v, attention_mask, causal, scale):
    b, hq, nq, d = q.shape
    out = torch.empty((b, hq, nq, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, hq, nq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    args, flags = _fwd_launch_args(q, k, v, prefix_k, prefix_v, attention_mask, causal, scale, out, lse)
    if q.device.type == "cuda":
        grid = lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * hq)  # noqa: E731
        device_index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        _tuned_fwd(_d_bucket(flags["BLOCK_D"]), device_index)[grid](*args, **flags)
    else:
        blocks = _INTERPRET_BLOCKS
        _prefix_attn_fwd_kernel[(triton.cdiv(nq, blocks["BLOCK_M"]), b * hq)](*args, **flags, **blocks)
    return out, lse


def _prefix_attn_backward_impl(do, q, k, v, prefix_k, prefix_v, attention_mask, out, lse, causal, scale):
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    if q.device.type == "cuda":
        config = _bwd_config(block_d, q.dtype)
    else:
        config = (_INTERPRET_BLOCKS["BLOCK_M"], _INTERPRET_BLOCKS["BLOCK_N"], 1, 1)
    return _prefix_attn_backward_launch(do, q, k, v, prefix_k, prefix_v, attention_mask, out, lse, causal, scale,
                                        config)


def _prefix_attn_backward_launch(do, q, k, v, prefix_k, prefix_v, attention_mask, out, lse, causal, scale, config):
    """The backward's launches with one ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    p = prefix_k.shape[1]
    g = hq // hkv
    dq = torch.empty((b, hq, nq, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((b, hkv, nk, d), device=q.device, dtype=k.dtype)
    dv = torch.empty((b, hkv, nk, d), device=q.device, dtype=v.dtype)
    if nq == 0 or b == 0:
        return dq, dk.zero_(), dv.zero_(), torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    block_d = max(16, triton.next_power_of_2(d))
    block_m, block_n, warps, stages = config
    launch = dict(num_warps=warps, num_stages=stages)
    dots = _dot_flags(q.dtype)
    pad, stride_padb, stride_padn = _pad_args(attention_mask, q)
    has_pad = attention_mask is not None

    delta = torch.empty((b, hq, nq), device=q.device, dtype=torch.float32)
    _bwd_delta_kernel[(triton.cdiv(nq, block_m), b * hq)](
        out, do, delta, *_strides4(out), *_strides4(do), hq, nq, d,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )

    # Per-batch partials of the prefix gradients (reduced over the G heads in-kernel), summed below.
    wk = torch.empty((b, hkv, p, d), device=q.device, dtype=torch.float32)
    wv = torch.empty((b, hkv, p, d), device=q.device, dtype=torch.float32)
    common = (*_strides4(q), *_strides4(k), *_strides4(v), *prefix_k.stride(), *prefix_v.stride(),
              stride_padb, stride_padn, *_strides4(do))
    n_blocks = triton.cdiv(p, block_n) + triton.cdiv(nk, block_n)
    _prefix_attn_bwd_dkdv_kernel[(n_blocks, b * hkv)](
        q, k, v, prefix_k, prefix_v, pad, do, lse, delta, dk, dv, wk, wv,
        *common, *_strides4(dk), *_strides4(dv),
        hkv, g, nq, nk, p, d, float(scale), float(scale) * _LOG2E,
        CAUSAL=bool(causal), HAS_PAD=has_pad, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **dots, **launch,
    )
    # dQ uses the transposed block shape: its rows are the long side there.
    _prefix_attn_bwd_dq_kernel[(triton.cdiv(nq, block_n), b * hq)](
        q, k, v, prefix_k, prefix_v, pad, do, lse, delta, dq,
        *common, *_strides4(dq),
        hq, g, nq, nk, p, d, float(scale), float(scale) * _LOG2E,
        CAUSAL=bool(causal), HAS_PAD=has_pad, BLOCK_M=block_n, BLOCK_N=block_m, BLOCK_D=block_d, **dots, **launch,
    )
    dpk = wk.sum(0).to(prefix_k.dtype)
    dpv = wv.sum(0).to(prefix_v.dtype)
    return dq, dk, dv, dpk, dpv


def _prefix_attn_fake(q, k, v, prefix_k, prefix_v, attention_mask, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _prefix_attn_backward(dout, q, k, v, prefix_k, prefix_v, attention_mask, out, lse, causal, scale, needs):
    # One pass of launches gives all five gradients; ``needs`` only lets autograd drop the unwanted ones.
    return _prefix_attn_backward_impl(dout, q, k, v, prefix_k, prefix_v, attention_mask, out, lse, causal, scale)


def _prefix_attn_backward_fake(dout, q, k, v, prefix_k, prefix_v, attention_mask, out, lse, causal, scale, needs):
    # Every gradient is computed (and returned) whatever ``needs`` says.
    return ops.fake_grads([True] * 5, q, q, k, v, prefix_k, prefix_v)


# ``peftfast::prefix_attention`` -> (out, lse2) and ``peftfast::prefix_attention_backward`` ->
# (dq, dk, dv, dprefix_k, dprefix_v), the prefix grads summed over batch and head groups. ``lse2``
# [B, Hq, Nq] fp32 in log2 units is an internal output kept for the backward; ``prefix_k``/``prefix_v``
# are already in k's dtype (the public function casts them).
PREFIX_ATTENTION = ops.declare(
    "prefix_attention", __name__, "PREFIX_ATTENTION",
    inputs="Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? attention_mask, "
           "bool causal, float scale",
    outputs=("out", "lse"), grads=("q", "k", "v", "prefix_k", "prefix_v"),
    saved=("q", "k", "v", "prefix_k", "prefix_v", "attention_mask", "out", "lse"),
    forward=_prefix_attn_forward_impl, backward=_prefix_attn_backward, fake=_prefix_attn_fake,
    backward_fake=_prefix_attn_backward_fake,
)


def triton_prefix_attention(q, k, v, prefix_k, prefix_v, *, causal=True, attention_mask=None, scale=None):
    """The body of ``prefix_attention(..., backend="triton")`` (shapes already checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # PEFT casts the prefix to the model's dtype; autograd brings its gradient back to the parameter's.
    pk = prefix_k if prefix_k.dtype == k.dtype else prefix_k.to(k.dtype)
    pv = prefix_v if prefix_v.dtype == k.dtype else prefix_v.to(k.dtype)
    return PREFIX_ATTENTION(q, k, v, pk, pv, attention_mask, bool(causal), scale)
