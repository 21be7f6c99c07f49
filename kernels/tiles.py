"""Device-side building blocks (``triton.jit`` functions) that several kernels share.

* :func:`grouped_tile`: grouped launch order of the output tiles (L2 reuse);
* :func:`dot`: ``tl.dot`` with the interpreter's bf16 widening (``DOT_F32``) and IEEE fp32 (``IEEE``);
* :func:`lowrank_tile`: the ``L @ R`` low-rank term of the GEMM epilogues (LoRA, in-loop 4-bit, DoRA);
* :func:`dropout_keep`: the dropout keep-mask regenerated from a seed at logical offsets;
* :func:`gemm_tile`: a GEMM program's output-tile offsets and masks (LoRA, 4-bit, IA3, DoRA GEMMs);
* :func:`load_xw`: the X and W tiles of one step of their ``X @ Wt`` main loop;
* :func:`lowrank_epilogue`: the LoRA epilogue (low-rank term, dropout, bias, store) of the dense and 4-bit GEMMs;
* :func:`store_row_partials`: the per-column ``sum(C * G)`` partials of the IA3 and DoRA vector gradients.

The 4-bit tile decode lives with the dequantization kernel in :mod:`.nf4_triton`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(i_pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of program ``i_pid`` in grouped launch order: GROUP_M row blocks sweep
    the columns together, so their row tiles and the column tiles they share stay in L2."""
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    n_in_group = GROUP_M * n_n
    first_m = (i_pid // n_in_group) * GROUP_M
    group_size = min(n_m - first_m, GROUP_M)
    return first_m + ((i_pid % n_in_group) % group_size), (i_pid % n_in_group) // group_size


@triton.jit
def dot(b_a, b_b, b_acc, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """``b_acc + b_a @ b_b`` in fp32; ``IEEE`` keeps fp32 operands off TF32 (PyTorch's default too)."""
    if DOT_F32:
        b_a = b_a.to(tl.float32)
        b_b = b_b.to(tl.float32)
    if IEEE:
        return tl.dot(b_a, b_b, b_acc, input_precision="ieee")
    return tl.dot(b_a, b_b, b_acc)


@triton.jit
def lowrank_tile(p_l, p_r, o_m64, o_n, m_m, m_n, R, stride_lm, stride_lr, stride_rr, stride_rn,
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
        b_lr = dot(b_l, b_r, b_lr, DOT_F32, IEEE)  # [BM, BR] @ [BR, BN] -> [BM, BN]
    return b_lr


@triton.jit
def dropout_keep(p_seed, o_row, o_col, n_cols, dropout_p):
    """Keep-mask of the dropout on the LoRA input for rows ``o_row`` x columns ``o_col``.

    int64 offsets: ``row * n_cols`` overflows int32 past 2^31 elements, and for offsets below 2^32
    Philox gives the same numbers for int32 and int64, so small and large calls agree.
    """
    seed = tl.load(p_seed)
    o_rand = o_row.to(tl.int64)[:, None] * n_cols + o_col[None, :]
    return tl.rand(seed, o_rand) >= dropout_p


@triton.jit
def gemm_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Offsets and masks of this program's [BLOCK_M, BLOCK_N] output tile of an [M, N] GEMM (grouped
    launch order, :func:`grouped_tile`): ``(i_m, i_n, o_m, o_n, m_m, m_n, o_m64)``.

    ``o_m64``: int64 row offsets, as M * stride overflows int32 for long sequences times wide layers.
    """
    i_m, i_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return i_m, i_n, o_m, o_n, o_m < M, o_n < N, o_m.to(tl.int64)


@triton.jit
def load_xw(p_xb, p_wb, k0, o_k, K, m_m, m_n, dtype: tl.constexpr):
    """The X [BM, BK] and W [BK, BN] tiles at K offset ``k0`` of an ``X @ Wt`` main loop (``p_xb`` and
    ``p_wb`` point at them): ``(m_k, b_x, b_w)``, zero past the edges.

    W is cast to ``dtype`` (X's): the base weight may be stored in another dtype (fp32 master copy,
    fp16 checkpoint).
    """
    m_k = (k0 + o_k) < K
    b_x = tl.load(p_xb, mask=m_m[:, None] & m_k[None, :], other=0.0)
    b_w = tl.load(p_wb, mask=m_k[:, None] & m_n[None, :], other=0.0).to(dtype)
    return m_k, b_x, b_w


@triton.jit
def lowrank_epilogue(b_acc, p_l, p_r, p_bias, p_seed, p_y, o_m, o_m64, o_n, m_m, m_n, N, R,
                     stride_lm, stride_lr, stride_rr, stride_rn, stride_ym, stride_yn, scale, dropout_p,
                     dtype: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                     DOT_F32: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Stores ``Y = acc + keep * (scale * L @ R) / (1 - p) + bias`` for this output tile: the LoRA
    epilogue of the dense and 4-bit GEMMs, run while the tile is still in registers so Y is written once.
    """
    b_lr = lowrank_tile(p_l, p_r, o_m64, o_n, m_m, m_n, R, stride_lm, stride_lr, stride_rr, stride_rn,
                         dtype, DOT_F32, IEEE, BLOCK_M, BLOCK_N, BLOCK_R) * scale
    if DROPOUT:
        # Backward of dropout on the LoRA input: dX's LoRA part only passes where the input was kept.
        b_keep = dropout_keep(p_seed, o_m, o_n, N, dropout_p)
        b_lr = tl.where(b_keep, b_lr / (1.0 - dropout_p), 0.0)
    b_acc += b_lr
    if HAS_BIAS:
        b_acc += tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(p_y + o_m64[:, None] * stride_ym + o_n[None, :] * stride_yn, b_acc.to(dtype),
             mask=m_m[:, None] & m_n[None, :])


@triton.jit
def store_row_partials(b_c, p_g, p_part, i_m, o_m64, o_n, m_m, m_n, M, stride_gm, stride_gn, stride_pp,
                       SUB_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``part[s, n] = sum over the SUB_M rows of sub-block s of C[m, n] * G[m, n]`` (fp32) for this
    [BLOCK_M, BLOCK_N] tile ``b_c`` of C, which is never written: the per-column reductions of the
    IA3 and DoRA vector gradients. Rows past M add nothing, as their G is loaded as 0.
    """
    b_g = tl.load(p_g + o_m64[:, None] * stride_gm + o_n[None, :] * stride_gn,
                  mask=m_m[:, None] & m_n[None, :], other=0.0).to(tl.float32)
    b_prod = tl.reshape(b_c * b_g, [BLOCK_M // SUB_M, SUB_M, BLOCK_N])
    b_part = tl.sum(b_prod, axis=1)  # [BM // SUB_M, BN]
    o_p = i_m * (BLOCK_M // SUB_M) + tl.arange(0, BLOCK_M // SUB_M)
    tl.store(p_part + o_p.to(tl.int64)[:, None] * stride_pp + o_n[None, :], b_part,
             mask=(o_p < tl.cdiv(M, SUB_M))[:, None] & m_n[None, :])
