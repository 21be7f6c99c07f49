"""IA3 linear: the base layer with its output (or, for feed-forward layers, its input) scaled.

``feedforward=False``: ``y = (x W^T + bias) * l`` with ``l`` [N, 1] (PEFT scales after the bias).
``feedforward=True``:  ``y = (x * l) W^T + bias`` with ``l`` [1, K].
Several active adapters multiply their vectors first, as PEFT does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import resolve_backend
from .weights import dense_weight, weight_shape


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
        x: input [..., K].
        weight: dense [N, K] tensor or bitsandbytes ``Params4bit``.
        ia3_l: the learned vector, [N, 1] (output scaling) or [1, K] (``feedforward=True``).
        feedforward: scale the input instead of the output.
        bias: optional [N].
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        [..., N] in x's dtype.

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
    supported = _triton_ia3_linear is not None
    if resolve_backend(backend, x.device, supported, "no Triton IA3 kernel is built yet") == "triton":
        return _triton_ia3_linear(x, weight, ia3_l, feedforward=feedforward, bias=bias)
    # No Triton IA3 kernel yet: dequantize a 4-bit base with the best backend, then the reference math.
    return ia3_linear_reference(x, dense_weight(weight, x.dtype, backend), ia3_l, feedforward=feedforward, bias=bias)


_triton_ia3_linear = None
