"""DoRA linear: LoRA with the weight's direction and magnitude trained apart.

With ``W' = W + scaling * B A`` and ``n = ||W'||`` per output row (detached, as PEFT does so the norm
gets no gradient), the layer computes

    y = base + (m / n - 1) * (x_d W^T) + (m / n) * scaling * (x_d A^T) B^T

where ``base = x W^T + bias`` and ``x_d`` is the LoRA input after dropout. Without dropout ``x_d W^T``
is ``base - bias`` and is not recomputed; with dropout PEFT recomputes it from ``x_d``, and so do we.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import resolve_backend
from .weights import dense_weight, weight_shape


def dora_weight_norm(w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row norms of ``W + scaling * B A`` ([N]), in W's dtype, without gradient."""
    with torch.no_grad():
        delta = (lora_B.to(w.dtype) @ lora_A.to(w.dtype)) * scaling
        return torch.linalg.norm(w + delta, dim=1).to(w.dtype)


def dora_linear_reference(
    x: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    base_output: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """Pure-PyTorch DoRA; differentiable in x, lora_A, lora_B and magnitude.

    ``base_output``: the output so far (base layer plus earlier adapters), when the caller already has
    it; otherwise ``x W^T + bias`` is computed here.
    """
    w = dense_weight(weight, x.dtype, backend="reference")
    b = None if bias is None else bias.to(x.dtype)
    if base_output is None:
        base_output = F.linear(x, w, b)
    norm = dora_weight_norm(w, lora_A, lora_B, scaling)
    mag_scale = (magnitude / norm).view(1, -1)
    dropping = dropout_p > 0 and training
    x_d = F.dropout(x, dropout_p, training=True) if dropping else x
    lora_out = F.linear(F.linear(x_d.to(lora_A.dtype), lora_A), lora_B)
    x_w = F.linear(x_d, w) if dropping else (base_output if b is None else base_output - b)
    dora = (mag_scale - 1) * x_w + mag_scale * lora_out * scaling
    return base_output + dora.to(base_output.dtype)


def dora_linear(
    x: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    base_output: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """DoRA linear layer, dense or 4-bit base.

    Args:
        x: input [..., K].
        weight: dense [N, K] tensor or bitsandbytes ``Params4bit``.
        lora_A: [r, K]. lora_B: [N, r]. scaling: LoRA scaling. magnitude: [N].
        bias: optional [N].
        base_output: the output already computed for this input (base plus earlier adapters), if any.
        dropout_p, training: dropout on the adapter input.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (only the reference exists so far; "auto"
            uses it everywhere).

    Returns:
        [..., N] in x's dtype.

    Example:
        >>> y = dora_linear(x, layer.weight, A, B, 2.0, m, bias=layer.bias)  # doctest: +SKIP
    """
    n, _ = weight_shape(weight)
    if magnitude.numel() != n:
        raise ValueError(f"DoRA magnitude has {magnitude.numel()} values, the weight has {n} output rows")
    resolve_backend(backend, x.device, supported=False, why="no Triton DoRA kernel is built yet")
    # No Triton DoRA kernel yet: dequantize a 4-bit base with the best backend, then the reference math.
    return dora_linear_reference(
        x, dense_weight(weight, x.dtype, backend), lora_A, lora_B, scaling, magnitude, bias=bias, base_output=base_output,
        dropout_p=dropout_p, training=training,
    )
