"""The Triton grouped LoRA term (front end, formulas and dtypes: :mod:`.grouped_lora`).

One kernel, :func:`_grouped_rows_matmul_kernel`, computes ``y[i] = scale * x[i] @ W[ids[i]]`` for a stack of
per-expert matrices ``W [E, K, N]``; the LoRA term is two launches of it:

    forward:   xa = x @ lhs[e]                    [S, r]   (fp32, kept for d_rhs)
               y  = s * xa @ rhs[e]               [S, D2]
    backward:  g  = s * dy @ rhs[e]^T             [S, r]
               dx = g @ lhs[e]^T                  [S, D1]   (the same kernel, factors read transposed)
               d_lhs[e] = x_e^T @ g_e,  d_rhs[e] = s * xa_e^T @ dy_e   (per-expert reductions, PyTorch)

Each program owns a [BLOCK_M, BLOCK_N] output tile and loops over the experts its rows are routed to
(``tl.min``/``tl.max`` of the tile's ids: one or two experts for sorted ids, correct for any order), each
a K loop masked to that expert's rows. Rows with an id outside [0, E) stay zero.

Declared once through :func:`.ops.declare` as ``peftfast::grouped_lora`` -> ``(y, xa)`` and
``peftfast::grouped_lora_backward``, so ``torch.compile`` traces it as one graph node; eager calls skip
the dispatcher (the same bodies, the same numbers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import ops
from .dispatch import interpreting
from .tiles import dot


@triton.jit
def _grouped_rows_matmul_kernel(
    p_x, p_w, p_ids, p_y,
    S, K, N, E,
    stride_xs, stride_xk, stride_we, stride_wk, stride_wn, stride_ys, stride_yn,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < S
    m_n = o_n < N
    b_ids = tl.load(p_ids + o_m, mask=m_m, other=-1).to(tl.int32)
    m_valid = m_m & (b_ids >= 0) & (b_ids < E)
    # int64 loop bounds: e * stride_we passes 2^31 for large expert stacks (gpt-oss: 128 x 2880 x 5760).
    e_lo = tl.min(tl.where(m_valid, b_ids, E), axis=0).to(tl.int64)
    e_hi = tl.max(tl.where(m_valid, b_ids, -1), axis=0).to(tl.int64)
    o_m64 = o_m.to(tl.int64)
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for e in range(e_lo, e_hi + 1):
        m_e = m_valid & (b_ids == e)
        p_we = p_w + e * stride_we
        for k0 in range(0, K, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < K
            b_x = tl.load(p_x + o_m64[:, None] * stride_xs + o_k[None, :] * stride_xk,
                          mask=m_e[:, None] & m_k[None, :], other=0.0)
            b_w = tl.load(p_we + o_k[:, None] * stride_wk + o_n[None, :] * stride_wn,
                          mask=m_k[:, None] & m_n[None, :], other=0.0).to(b_x.dtype)
            b_acc = dot(b_x, b_w, b_acc, DOT_F32, IEEE)  # [BM, BK] @ [BK, BN] -> [BM, BN]
    b_y = b_acc * scale
    tl.store(p_y + o_m64[:, None] * stride_ys + o_n[None, :] * stride_yn, b_y.to(p_y.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


def _block(n: int, cap: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def grouped_rows_matmul(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, scale: float = 1.0,
                        out_dtype: torch.dtype = None) -> torch.Tensor:
    """``y[i] = scale * x[i] @ w[ids[i]]`` ([S, K] x [E, K, N] -> [S, N]); zero rows for ids outside [0, E).

    The GEMM runs in the wider of x's and w's dtypes (w is cast on load), accumulating in fp32.
    """
    s, k = x.shape
    e, _, n = w.shape
    compute = torch.promote_types(x.dtype, w.dtype)
    x = x.to(compute)
    y = torch.empty(s, n, device=x.device, dtype=out_dtype or compute)
    if s == 0 or n == 0:
        return y
    # Fixed tiles: N is a rank (<= 64 mostly) or an expert's width; the interpreter wants few, big blocks.
    bm, bn, bk = 64, _block(n, 64 if interpreting() else 128), _block(k, 64)
    grid = (triton.cdiv(s, bm), triton.cdiv(n, bn))
    _grouped_rows_matmul_kernel[grid](
        x, w, ids, y, s, k, n, e,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
        float(scale),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        DOT_F32=interpreting() and compute == torch.bfloat16, IEEE=compute == torch.float32,
    )
    return y


def _per_expert_outer(a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``out[e] = a_e^T @ b_e`` over the rows routed to e ([E, A, B], fp32): the factors' gradients."""
    out = torch.zeros(num_experts, a.shape[1], b.shape[1], device=a.device, dtype=torch.float32)
    valid = (ids >= 0) & (ids < num_experts)
    for e in torch.unique(ids[valid]).tolist():
        rows = (ids == e).nonzero(as_tuple=True)[0]
        out[e] = a.index_select(0, rows).float().t() @ b.index_select(0, rows).float()
    return out


def _grouped_lora_forward(x, lhs, rhs, ids, scaling):
    """``(y, xa)``: y [S, D2] in x's dtype, xa = x @ lhs[e] [S, r] in fp32 (kept for d_rhs)."""
    xa = grouped_rows_matmul(x, lhs, ids, 1.0, out_dtype=torch.float32)  # [S, r]
    y = grouped_rows_matmul(xa, rhs, ids, scaling, out_dtype=x.dtype)  # [S, D2]
    return y, xa


def _grouped_lora_backward(dy, x, lhs, rhs, ids, xa, scaling, needs):
    """``(dx, d_lhs, d_rhs)``; an entry whose ``needs`` flag is False is None."""
    need_dx, need_dlhs, need_drhs = needs
    dx = d_lhs = d_rhs = None  # None where not needed (see ops._as_op_grads)
    dy = dy.contiguous()
    if need_dx or need_dlhs:
        # g carries the scaling, so neither consumer multiplies by it again.
        g = grouped_rows_matmul(dy, rhs.transpose(1, 2), ids, scaling, out_dtype=torch.float32)  # [S, r]
        if need_dx:
            dx = grouped_rows_matmul(g, lhs.transpose(1, 2), ids, 1.0, out_dtype=x.dtype)  # [S, D1]
        if need_dlhs:
            d_lhs = _per_expert_outer(x, g, ids, lhs.shape[0]).to(lhs.dtype)
    if need_drhs:
        d_rhs = (_per_expert_outer(xa, dy, ids, rhs.shape[0]) * scaling).to(rhs.dtype)
    return dx, d_lhs, d_rhs


def _grouped_lora_fake(x, lhs, rhs, ids, scaling):
    return x.new_empty((x.shape[0], rhs.shape[2])), x.new_empty((x.shape[0], lhs.shape[2]), dtype=torch.float32)


def _grouped_lora_backward_fake(dy, x, lhs, rhs, ids, xa, scaling, needs):
    return ops.fake_grads(needs, x, x, lhs, rhs)


# ``peftfast::grouped_lora`` -> (y, xa) and ``peftfast::grouped_lora_backward``. The backward's per-expert
# reductions sync with the host (the list of present experts) inside the op, out of the traced graph's sight.
GROUPED_LORA = ops.declare(
    "grouped_lora", __name__, "GROUPED_LORA",
    inputs="Tensor x, Tensor lhs, Tensor rhs, Tensor expert_ids, float scaling",
    outputs=("y", "xa"), grads=("x", "lhs", "rhs"), saved=("x", "lhs", "rhs", "expert_ids", "xa"),
    forward=_grouped_lora_forward, backward=_grouped_lora_backward, fake=_grouped_lora_fake,
    backward_fake=_grouped_lora_backward_fake,
)


def triton_grouped_lora(x, lhs, rhs, expert_ids, scaling):
    """The entry :func:`grouped_lora.grouped_lora` dispatches to (tests spy on it)."""
    return GROUPED_LORA(x, lhs, rhs, expert_ids, float(scaling))
