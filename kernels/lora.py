"""LoRA linear: ``y = x W^T + bias + scaling * (dropout(x) A^T) B^T``.

``W`` is dense [N, K] or bitsandbytes 4-bit; ``A`` is [r, K], ``B`` is [N, r]. ``weight=None`` gives
the LoRA term alone (used when another module computes the base output, e.g. 8-bit bases, and for
the second and later of several active adapters).

The reference mirrors Hugging Face PEFT's arithmetic order (``lora_B(lora_A(dropout(x))) * scaling``,
the LoRA branch run in the adapter's dtype and cast back), so logits match PEFT to float rounding.

The Triton path (``backend="triton"``, in ``lora_triton.py``; building blocks in ``matmul.py``) is declared once
(:mod:`.ops`) as the ``torch.library`` custom ops ``peftfast::lora_linear`` / ``peftfast::lora_linear_backward``
with fake implementations and an autograd formula, so ``torch.compile`` traces it without graph breaks; in
eager mode the same bodies run without the dispatcher (an ``autograd.Function``, or the forward alone
when nothing needs a gradient):

* forward: ``xa = dropout(x) A^T`` ([M, r], kept for dB), then one GEMM with the LoRA term and bias in
  its epilogue; a 4-bit base is dequantized into a temporary first, or, for M <= ``lora_triton.DECODE_MAX_M``,
  read directly as 4-bit codes by a fused dequant-GEMV (split-K) kernel;
* a 4-bit base at M > ``DECODE_MAX_M`` (forward and the backward's dX GEMM) runs one of two variants,
  chosen per shape bucket by ``experimental.qmatmul.qlora_gemm_variant``: ``"dequant"`` (the default: dequantize,
  then the fused GEMM) or ``"inloop"`` (``experimental.qmatmul.matmul_lowrank_4bit``, the codes decoded in the GEMM's
  K loop), as a tuned table entry says; ``PEFTFAST_QLORA_GEMM=inloop|dequant|auto`` overrides it;
* backward: ``g = s dY B`` once; ``dX = dY W + keep * (g A) / (1-p)`` with the same fused GEMM,
  ``dA = g^T dropout(x)``, ``dB = s dY^T xa`` with ``dbias`` summed in the same pass over dY.
* dropout masks are regenerated from a seed drawn from PyTorch's generator (``torch.manual_seed``
  reproduces them); no mask tensor is stored. The LoRA branch runs in x's dtype with fp32
  accumulation, also for fp32 adapters on a half-precision base; dA/dB come back in the adapters' dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import resolve_backend, settings, triton_module
from .weights import (base_weight_problem, bias_problem, check_lora_shapes, dense_weight, float_operands_problem,
                      operand_signature)


def lora_linear_reference(
    x: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """Pure-PyTorch LoRA linear; differentiable in x, lora_A, lora_B (and bias)."""
    lora_in = F.dropout(x, dropout_p, training=True) if (dropout_p > 0 and training) else x
    lora_out = F.linear(F.linear(lora_in.to(lora_A.dtype), lora_A), lora_B) * scaling
    if weight is None:
        out = lora_out.to(x.dtype)
        return out if bias is None else out + bias.to(x.dtype)
    w = dense_weight(weight, x.dtype, backend="reference")
    y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    return y + lora_out.to(y.dtype)


def lora_linear(
    x: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """LoRA linear layer, dense or 4-bit base, in one call.

    Args:
        x: input [..., K], any leading shape, fp32/fp16/bf16; need not be contiguous.
        weight: the frozen base weight: dense [N, K] tensor, bitsandbytes ``Params4bit``, or None for
            the LoRA term alone.
        lora_A: [r, K]. lora_B: [N, r]. Both may be in another dtype than x (fp32 adapters on a bf16
            base): the LoRA branch runs in their dtype, as PEFT does.
        scaling: ``lora_alpha / r`` (or ``/ sqrt(r)`` for rsLoRA).
        bias: optional [N].
        dropout_p: dropout on the LoRA branch's input, applied only when ``training``.
        training: whether dropout is active.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        [..., N] in x's dtype.

    Example:
        >>> y = lora_linear(x, layer.weight, A, B, 2.0, bias=layer.bias)  # doctest: +SKIP
    """
    p = dropout_p if training else 0.0
    chosen = lora_linear_backend(x, weight, lora_A, lora_B, bias=bias, dropout_p=p, backend=backend)
    return run_lora_linear(chosen, x, weight, lora_A, lora_B, scaling, bias=bias, dropout_p=p, backend=backend)


def lora_linear_signature(x: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                          bias: Optional[torch.Tensor], dropout_p: float, backend: str) -> tuple:
    """Everything :func:`lora_linear_backend` reads, as one comparable tuple.

    Two calls with equal signatures get the same decision (or the same error), so a caller that repeats
    the call on the same parameters (a layer, at every step of a decode) may decide once and then call
    :func:`run_lora_linear` while the signature stays equal: comparing it costs a fraction of the checks.
    The environment enters through :func:`dispatch.settings`, whose snapshot is replaced when
    ``tuning.clear_memory_caches`` re-reads it.

    Args:
        x, weight, lora_A, lora_B, bias, backend: as for :func:`lora_linear`.
        dropout_p: the effective probability (0 outside training).

    Returns:
        A tuple of dtypes, devices, shapes, flags and the settings snapshot.

    Example:
        >>> sig = lora_linear_signature(x, w, A, B, None, 0.0, "auto")  # doctest: +SKIP
    """
    return (x.dtype, x.device, x.shape[-1], torch.is_grad_enabled(), dropout_p, backend, settings(),
            operand_signature(weight), lora_A.dtype, lora_A.device, lora_A.shape,
            lora_B.dtype, lora_B.device, lora_B.shape, operand_signature(bias))


def lora_linear_backend(x: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor, *,
                        bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0, backend: str = "auto") -> str:
    """Check the operands of one :func:`lora_linear` call and choose its backend.

    Args:
        x, weight, lora_A, lora_B, bias, backend: as for :func:`lora_linear`.
        dropout_p: the effective probability (0 outside training).

    Returns:
        ``"triton"`` or ``"reference"``.

    Raises:
        ValueError: the shapes disagree. RuntimeError / NotImplementedError: ``backend="triton"`` cannot run.

    Example:
        >>> lora_linear_backend(x, w, A, B)  # doctest: +SKIP
        'triton'
    """
    check_lora_shapes(x, weight, lora_A, lora_B)
    supported, why = _triton_supports(x, weight, lora_A, lora_B, dropout_p, bias)
    return resolve_backend(backend, x.device, supported, why)


def run_lora_linear(chosen: str, x: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scaling: float, *, bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                    backend: str = "auto") -> torch.Tensor:
    """:func:`lora_linear` on the backend ``chosen`` by :func:`lora_linear_backend` for these operands (or
    for operands of an equal :func:`lora_linear_signature`); checks nothing itself.

    Args:
        chosen: ``"triton"`` or ``"reference"``.
        x, weight, lora_A, lora_B, scaling, bias: as for :func:`lora_linear`.
        dropout_p: the effective probability (0 outside training).
        backend: what the caller asked for (the reference path dequantizes a 4-bit base with it).

    Returns:
        [..., N] in x's dtype.

    Example:
        >>> y = run_lora_linear("triton", x, w, A, B, 2.0)  # doctest: +SKIP
    """
    if chosen == "triton":
        return _triton_lora_linear(x, weight, lora_A, lora_B, scaling, bias=bias, dropout_p=dropout_p)
    # The fallback still dequantizes a 4-bit base with the fastest backend available: the pure-PyTorch
    # dequantization materializes int64 indices, several times the weight's size, on every call.
    w = dense_weight(weight, x.dtype, backend)
    return lora_linear_reference(x, w, lora_A, lora_B, scaling, bias=bias, dropout_p=dropout_p)


def _triton_supports(x, weight, lora_A, lora_B, dropout_p, bias=None):
    """``(True, "")`` when the Triton path handles this call, else ``(False, why)``."""
    if _kernels is None:
        return False, "Triton is not importable on this platform"
    if not 0.0 <= dropout_p < 1.0:
        return False, f"dropout_p={dropout_p} (the kernel handles 0 <= p < 1)"
    if lora_A.shape[0] == 0 or x.shape[-1] == 0:
        return False, "rank 0 or zero input features"
    why = (float_operands_problem(x, (("lora_A", lora_A), ("lora_B", lora_B))) or base_weight_problem(weight, x)
           or bias_problem(bias, x, computes_dbias=True))
    return not why, why




def _triton_lora_linear(x, weight, lora_A, lora_B, scaling, *, bias=None, dropout_p=0.0):
    """The entry lora_linear dispatches to (``lora_triton.triton_lora_linear``; tests spy on it)."""
    return _kernels.triton_lora_linear(x, weight, lora_A, lora_B, scaling, bias=bias, dropout_p=dropout_p)


# The Triton half (None without Triton); imported last, as it uses this module's names.
_kernels = triton_module("lora_triton")
