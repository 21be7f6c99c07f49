"""IA3 linear: the base layer with its output (or, for feed-forward layers, its input) scaled.

``feedforward=False``: ``y = (x W^T + bias) * l`` with ``l`` [N, 1] (PEFT scales after the bias).
``feedforward=True``:  ``y = (x * l) W^T + bias`` with ``l`` [1, K].
Several active adapters multiply their vectors first, as PEFT does.

The Triton path (``backend="triton"``, and ``"auto"`` on CUDA or under ``TRITON_INTERPRET=1``) is one
GEMM kernel, :func:`_ia3_matmul_kernel`, with the IA3 scaling fused: a per-column scale of the A
operand applied as its tiles are loaded (``SCALE_A``) and a per-column scale of the result in the
epilogue, after the bias (``SCALE_OUT``); the output is written once. The same kernel serves every
GEMM of the forward and backward passes (see the table above :func:`_ia3_forward`). It is
declared once (:mod:`.ops`) as the ``torch.library`` custom ops ``peftfast::ia3_linear`` /
``peftfast::ia3_linear_backward`` with fake implementations and an autograd formula, so ``torch.compile``
traces it without graph breaks; eager mode runs the same bodies without the dispatcher.
A bitsandbytes 4-bit base is dequantized into a temporary (one launch) for each GEMM call and never
saved for the backward. Gradients flow to ``x`` and ``ia3_l`` only: the base weight and bias are frozen.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import resolve_backend, triton_module
from .weights import base_weight_problem, bias_problem, dense_weight, float_operands_problem, weight_shape


def ia3_linear_reference(
    x: torch.Tensor, weight, ia3_l: torch.Tensor, *, feedforward: bool, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Pure-PyTorch IA3 linear; differentiable in x and ia3_l."""
    w = dense_weight(weight, x.dtype, backend="reference")
    b = None if bias is None else bias.to(x.dtype)
    scale = ia3_l.flatten()
    if feedforward:
        return F.linear((x * scale).to(x.dtype), w, b)
    y = F.linear(x, w, b)
    return (y * scale).to(y.dtype)


def ia3_linear(
    x: torch.Tensor,
    weight,
    ia3_l: torch.Tensor,
    *,
    feedforward: bool,
    bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """IA3-scaled linear layer, dense or 4-bit base.

    Args:
        x: input [..., K], any leading shape, fp32/fp16/bf16; need not be contiguous.
        weight: dense [N, K] tensor (any float dtype; cast to x's) or bitsandbytes ``Params4bit``.
        ia3_l: the learned vector, [N, 1] (output scaling) or [1, K] (``feedforward=True``); may be
            in another dtype than x (fp32 adapters on a half-precision base).
        feedforward: scale the input instead of the output.
        bias: optional [N].
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        [..., N] in x's dtype. Differentiable in x and ia3_l (the base weight and bias are frozen on
        the Triton path; a base that requires grad makes ``"auto"`` use the reference).

    Example:
        >>> y = ia3_linear(x, layer.weight, l, feedforward=False, bias=layer.bias)  # doctest: +SKIP
    """
    n, k = weight_shape(weight)
    expected = k if feedforward else n
    if ia3_l.numel() != expected:
        raise ValueError(
            f"ia3_l has {ia3_l.numel()} values; a {'feed-forward (input)' if feedforward else 'output'} "
            f"scaling of a [{n}, {k}] weight needs {expected}"
        )
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the [{n}, {k}] base weight expects {k}")
    supported, why = _triton_supports(x, weight, ia3_l, bias)
    if resolve_backend(backend, x.device, supported, why) == "triton":
        return _triton_ia3_linear(x, weight, ia3_l, feedforward=feedforward, bias=bias)
    # The fallback still dequantizes a 4-bit base with the best backend available, then the reference math.
    return ia3_linear_reference(x, dense_weight(weight, x.dtype, backend), ia3_l, feedforward=feedforward, bias=bias)


def _triton_supports(x, weight, ia3_l, bias):
    """``(True, "")`` when the Triton path handles this call, else ``(False, why)``."""
    if _kernels is None:
        return False, "Triton is not importable on this platform"
    if x.shape[-1] == 0:
        return False, "zero input features"
    if weight is None:
        return False, "no base weight (IA3 scales a base layer)"
    why = (float_operands_problem(x, (("ia3_l", ia3_l),)) or base_weight_problem(weight, x)
           or bias_problem(bias, x, computes_dbias=False))
    return not why, why


def _triton_ia3_linear(*args, **kwargs):
    """The entry ia3_linear dispatches to (``ia3_triton.triton_ia3_linear``; tests spy on it)."""
    return _kernels.triton_ia3_linear(*args, **kwargs)


# The Triton half (None without Triton); imported last, as it uses this module's names.
_kernels = triton_module("ia3_triton")
