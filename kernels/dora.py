"""DoRA linear: LoRA with the weight's direction and magnitude trained apart.

With ``W' = W + scaling * B A`` and ``n = ||W'||`` per output row (detached, as PEFT does so the norm
gets no gradient), the layer computes

    y = base + (m / n - 1) * (x_d W^T) + (m / n) * scaling * (x_d A^T) B^T

where ``base = x W^T + bias`` and ``x_d`` is the LoRA input after dropout. Without dropout ``x_d W^T``
is ``base - bias`` and is not recomputed; with dropout PEFT recomputes it from ``x_d``, and so do we.

The Triton path (``backend="triton"``, and ``"auto"`` on CUDA or under ``TRITON_INTERPRET=1``) is
declared once (:mod:`.ops`) as the ``torch.library`` custom ops ``peftfast::dora_linear`` /
``peftfast::dora_linear_backward`` (fakes + autograd formula, so ``torch.compile`` traces it without graph
breaks; eager mode runs the same bodies without the dispatcher). With ``c = m / n``:

* the row norms come from one small kernel (:func:`_dora_norm_kernel`) that forms ``W + s B A`` tile by
  tile in registers: the [N, K] ``B A`` product and the sum are never written (the reference writes both);
* without dropout the output is ``y = c * (x W^T + s (x A^T) B^T) + bias``: ONE GEMM with the LoRA term
  and the per-output-column factor ``c`` in its epilogue (:func:`_dora_matmul_kernel`, mode ``_FWD``);
* with dropout the same launch reads W once for two accumulators, ``x W^T`` and ``x_d W^T``, because
  the base output and the DoRA correction see different inputs (PEFT runs two GEMMs for this).

``x_d`` and the pre-scale output are never saved: see the table above :func:`_dora_forward`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import resolve_backend, triton_module
from .weights import (base_weight_problem, bias_problem, check_lora_shapes, dense_weight, float_operands_problem,
                      weight_shape)


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
        x: input [..., K], fp32/fp16/bf16; need not be contiguous.
        weight: dense [N, K] tensor (any float dtype, any strides) or bitsandbytes ``Params4bit``.
        lora_A: [r, K]. lora_B: [N, r]. scaling: LoRA scaling. magnitude: [N]. The adapters may be in
            another dtype than x (fp32 adapters on a half-precision base).
        bias: optional [N].
        base_output: the output already computed for this input (base plus earlier adapters), if any.
            Such calls (8-bit bases, a second active adapter) run the reference.
        dropout_p, training: dropout on the adapter input.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        [..., N] in x's dtype. Differentiable in x, lora_A, lora_B, magnitude (and bias); the base
        weight is frozen on the Triton path (a base that requires grad makes ``"auto"`` use the reference).

    Example:
        >>> y = dora_linear(x, layer.weight, A, B, 2.0, m, bias=layer.bias)  # doctest: +SKIP
    """
    n, _ = weight_shape(weight)
    if magnitude.numel() != n:
        raise ValueError(f"DoRA magnitude has {magnitude.numel()} values, the weight has {n} output rows")
    check_lora_shapes(x, weight, lora_A, lora_B)
    p = dropout_p if training else 0.0
    supported, why = _triton_supports(x, weight, lora_A, lora_B, magnitude, bias, base_output, p)
    if resolve_backend(backend, x.device, supported, why) == "triton":
        return _triton_dora_linear(x, weight, lora_A, lora_B, scaling, magnitude, bias=bias, dropout_p=p)
    # The fallback still dequantizes a 4-bit base with the best backend available, then the reference math.
    return dora_linear_reference(
        x, dense_weight(weight, x.dtype, backend), lora_A, lora_B, scaling, magnitude, bias=bias, base_output=base_output,
        dropout_p=dropout_p, training=training,
    )


def _triton_supports(x, weight, lora_A, lora_B, magnitude, bias, base_output, dropout_p):
    """``(True, "")`` when the Triton path handles this call, else ``(False, why)``."""
    if _kernels is None:
        return False, "Triton is not importable on this platform"
    if base_output is not None:
        return False, ("base_output was given (8-bit base or a second active adapter): the DoRA correction is "
                       "combined with an output computed elsewhere, which only the reference does")
    if not 0.0 <= dropout_p < 1.0:
        return False, f"dropout_p={dropout_p} (the kernel handles 0 <= p < 1)"
    if lora_A.shape[0] == 0 or x.shape[-1] == 0:
        return False, "rank 0 or zero input features"
    if weight is None:
        return False, "no base weight (DoRA normalizes W + s BA, so it needs one)"
    why = (float_operands_problem(x, (("lora_A", lora_A), ("lora_B", lora_B), ("magnitude", magnitude)))
           or base_weight_problem(weight, x) or bias_problem(bias, x, computes_dbias=True))
    return not why, why


def _triton_dora_linear(*args, **kwargs):
    """The entry dora_linear dispatches to (``dora_triton.triton_dora_linear``; tests spy on it)."""
    return _kernels.triton_dora_linear(*args, **kwargs)


# The Triton half (None without Triton); imported last, as it uses this module's names.
_kernels = triton_module("dora_triton")
