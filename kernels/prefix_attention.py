"""Prefix-tuning attention: every query attends to P learned prefix keys, then to the real keys.

Hugging Face PEFT's prefix tuning feeds the prefix as a KV cache: per layer ``prefix_k``/``prefix_v``
([H_kv, P, D], the same for every sequence) are expanded over the batch, concatenated in front of the
real keys/values, and the attention mask is extended with P ones. So, for query ``i`` (0-based among
``Nq``) the visible keys are

* all P prefix keys, always (never masked by causality nor by the padding mask);
* real key ``j`` iff ``j <= i + (Nk - Nq)`` (causal, bottom-right aligned: with a KV cache the last
  query is the newest token) and ``attention_mask[b, j] != 0`` (left or right padding).

:func:`prefix_attention_reference` builds exactly that (expand + cat + boolean mask + SDPA); it
defines the semantics and is the fallback. The Triton path (``backend="triton"``) never materializes
the concatenation, the expanded prefix nor the [Nq, P+Nk] mask:

* forward: flash-attention's online softmax, one program per (query block, batch, query head). It first
  sweeps the prefix (batch stride 0, no mask except the ragged last block), then the real keys with the
  causal and padding masks; key blocks entirely above the causal diagonal are skipped. Since the prefix
  is seen first and never masked, the running max is finite before any masked score arrives, so no
  row ever needs the all-masked special case (P >= 1; P == 0 runs the reference). It saves the
  log-sum-exp per row for the backward.
* backward: ``delta = rowsum(dO * O)``; one kernel over key blocks (prefix blocks first in the grid,
  they are the longest: every query sees them) computes dK/dV, and one over query blocks computes dQ.
  Grouped-query attention (``kv_head = q_head // G``) is reduced inside the key-block program, in a fixed
  order. The prefix gradients are also reduced over the batch: each (batch, kv head, prefix block)
  program writes its fp32 partial into a [B, H_kv, P, D] workspace that one ``torch.sum`` folds, so the
  result is bitwise reproducible (atomics would not be) while B * H_kv * P/BLOCK_N programs keep the GPU
  busy (one program per prefix block looping over the batch would leave H_kv * P/BLOCK_N, e.g. 8).

Both Triton steps are declared once (:mod:`.ops`) as the ``torch.library`` custom ops
``peftfast::prefix_attention`` and ``peftfast::prefix_attention_backward`` with fake implementations and
an autograd formula, so ``torch.compile`` traces them without graph breaks (eager mode runs the same
bodies without the dispatcher). Scores use ``exp2`` with ``scale * log2(e)`` folded
into one multiplier; accumulation is fp32; in Triton's CPU interpreter the dot operands of bf16 inputs
are widened to fp32 (its bf16 ``tl.dot`` is wrong). Nothing here touches CUDA at import time.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import resolve_backend, triton_module
from .weights import FLOAT_DTYPES

_MAX_HEAD_DIM = 256
# CUDA grids put batch x heads on axis 1, which CUDA caps at 65535 programs.
_MAX_GRID_Y = 65535


# ==================================================================================================
# Shapes and the reference
# ==================================================================================================


def _check_shapes(q, k, v, prefix_k, prefix_v, attention_mask) -> None:
    """Raise ValueError naming the tensor, the shape seen and the shape expected."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hq, Nq, D], got shape {tuple(q.shape)}")
    b, hq, nq, d = q.shape
    if k.dim() != 4 or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k must be [B={b}, Hkv, Nk, D={d}] (from q {tuple(q.shape)}), got shape {tuple(k.shape)}")
    hkv, nk = k.shape[1], k.shape[2]
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape [B, Hkv, Nk, D] = {tuple(k.shape)}, got shape {tuple(v.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"q's head count Hq={hq} must be a multiple of k's Hkv={hkv} (grouped-query attention); "
            f"q is {tuple(q.shape)}, k is {tuple(k.shape)}"
        )
    if prefix_k.dim() != 3 or prefix_k.shape[0] != hkv or prefix_k.shape[2] != d:
        raise ValueError(f"prefix_k must be [Hkv={hkv}, P, D={d}], got shape {tuple(prefix_k.shape)}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(
            f"prefix_v must have prefix_k's shape [Hkv, P, D] = {tuple(prefix_k.shape)}, "
            f"got shape {tuple(prefix_v.shape)}"
        )
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (b, nk):
            raise ValueError(
                f"attention_mask must be [B={b}, Nk={nk}] (padding of the real keys; the prefix is never masked), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise ValueError(
                f"attention_mask must be bool or integer (nonzero = attend), got {attention_mask.dtype}"
            )


def prefix_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool = True,
    attention_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Pure-PyTorch prefix attention, as PEFT runs it: expand + concatenate + masked SDPA.

    Differentiable in q, k, v, prefix_k and prefix_v. Arguments and result as in
    :func:`prefix_attention`.

    Example:
        >>> out = prefix_attention_reference(q, k, v, pk, pv, attention_mask=mask)  # doctest: +SKIP
    """
    _check_shapes(q, k, v, prefix_k, prefix_v, attention_mask)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    p = prefix_k.shape[1]
    # PEFT casts the prefix to the model's dtype before it becomes the cache.
    pk = prefix_k.to(k.dtype).unsqueeze(0).expand(b, hkv, p, d)
    pv = prefix_v.to(v.dtype).unsqueeze(0).expand(b, hkv, p, d)
    kk = torch.cat([pk, k], dim=2)
    vv = torch.cat([pv, v], dim=2)
    if hq != hkv:
        kk = kk.repeat_interleave(hq // hkv, dim=1)
        vv = vv.repeat_interleave(hq // hkv, dim=1)
    o_q = torch.arange(nq, device=q.device)
    o_k = torch.arange(nk, device=q.device)
    keep = torch.ones(b, nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep & (o_k[None, :] <= o_q[:, None] + (nk - nq))[None]
    if attention_mask is not None:
        keep = keep & (attention_mask != 0)[:, None, :].to(q.device)
    mask = torch.cat([torch.ones(b, nq, p, dtype=torch.bool, device=q.device), keep], dim=2)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask[:, None], scale=scale)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool = True,
    attention_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over a learned prefix followed by the real keys (PEFT prefix tuning's semantics).

    Args:
        q: [B, Hq, Nq, D] queries, any strides; fp32/fp16/bf16.
        k, v: [B, Hkv, Nk, D] real keys and values (the KV cache included), any strides, q's dtype.
            ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention, ``kv_head = q_head // G``).
            ``Nq < Nk`` is decode / chunked prefill: queries are the last ``Nq`` positions.
        prefix_k, prefix_v: [Hkv, P, D], one copy for the whole batch (never expanded on the Triton
            path); cast to k's dtype as PEFT does, gradients come back in their own dtype.
        causal: query ``i`` sees real key ``j`` iff ``j <= i + Nk - Nq``; the prefix is always seen.
        attention_mask: optional [B, Nk] bool or integer, nonzero = real token; zeros mask those real
            keys (padding) for every query. It never masks the prefix.
        scale: score multiplier, default ``1 / sqrt(D)``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        [B, Hq, Nq, D] in q's dtype (contiguous on the Triton path).

    Example:
        >>> q = torch.randn(2, 8, 16, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> k = v = torch.randn(2, 2, 16, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> pk = torch.randn(2, 10, 64, device="cuda", requires_grad=True)  # doctest: +SKIP
        >>> pv = torch.randn(2, 10, 64, device="cuda", requires_grad=True)  # doctest: +SKIP
        >>> out = prefix_attention(q, k, v, pk, pv)  # [2, 8, 16, 64]  # doctest: +SKIP
        >>> out.sum().backward()  # pk.grad: fp32 [2, 10, 64], summed over batch and head groups  # doctest: +SKIP
    """
    _check_shapes(q, k, v, prefix_k, prefix_v, attention_mask)
    supported, why = _triton_supports(q, k, v, prefix_k, prefix_v, attention_mask)
    if resolve_backend(backend, q.device, supported, why) == "triton":
        return _triton_prefix_attention(q, k, v, prefix_k, prefix_v, causal=causal,
                                        attention_mask=attention_mask, scale=scale)
    return prefix_attention_reference(q, k, v, prefix_k, prefix_v, causal=causal, attention_mask=attention_mask,
                                      scale=scale)


def _triton_supports(q, k, v, prefix_k, prefix_v, attention_mask):
    """``(True, "")`` when the Triton path handles this call, else ``(False, why)``."""
    if _kernels is None:
        return False, "Triton is not importable on this platform"
    if q.dtype not in FLOAT_DTYPES:
        return False, f"q is {q.dtype}; the kernel takes float32, float16 or bfloat16"
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            return False, f"{name} is {t.dtype} but q is {q.dtype} (q, k and v must share a dtype)"
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype not in FLOAT_DTYPES:
            return False, f"{name} is {t.dtype}; the kernel takes float32, float16 or bfloat16"
    others = (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v), ("attention_mask", attention_mask))
    for name, t in others:
        if t is not None and t.device != q.device:
            return False, f"{name} is on {t.device} but q is on {q.device}"
    if prefix_k.shape[1] == 0:
        return False, "the prefix is empty (P=0): plain attention, which the reference runs"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return False, f"head_dim {q.shape[-1]} > {_MAX_HEAD_DIM}"
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:
        return False, f"batch x heads = {q.shape[0] * q.shape[1]} exceeds the launch grid's {_MAX_GRID_Y}"
    return True, ""


def _triton_prefix_attention(*args, **kwargs):
    """The entry prefix_attention dispatches to (``prefix_attention_triton.triton_prefix_attention``; tests spy on it)."""
    return _kernels.triton_prefix_attention(*args, **kwargs)


# The Triton half (None without Triton); imported last, as it uses this module's names.
_kernels = triton_module("prefix_attention_triton")
