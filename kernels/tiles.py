"""Device-side building blocks (``triton.jit`` functions) that several kernels share.

* :func:`grouped_tile`: grouped launch order of the output tiles (L2 reuse);
* :func:`dot`: ``tl.dot`` with the interpreter's bf16 widening (``DOT_F32``) and IEEE fp32 (``IEEE``);
* :func:`lowrank_tile`: the ``L @ R`` low-rank term of the GEMM epilogues (LoRA, in-loop 4-bit, DoRA);
* :func:`dropout_keep`: the dropout keep-mask regenerated from a seed at logical offsets.

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
