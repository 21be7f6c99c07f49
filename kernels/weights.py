"""Base weights as the kernels receive them (a dense tensor or a bitsandbytes 4-bit parameter) and the
operand checks every op runs before choosing a backend.

Inside Python a 4-bit weight is one :class:`~.nf4.Quant4bit` (:func:`kernel_operand`); only at a
``torch.library`` op boundary is it flattened to its storage tensors (:func:`quant_args`) and rebuilt on
the other side (:func:`from_quant_args`, both called by :mod:`.ops`), and a GEMM that needs it dense
dequantizes it afresh (:func:`dense_base`). Nothing here imports Triton.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple, Union

import torch

from .nf4 import Quant4bit, dequantize_4bit, is_4bit_weight, quant4bit_view

BaseWeight = Union[torch.Tensor, Quant4bit, None]


def weight_shape(weight) -> tuple:
    """(N, K) of a dense [N, K] tensor or a 4-bit weight's dequantized shape."""
    if isinstance(weight, Quant4bit):
        return weight.shape
    if is_4bit_weight(weight):
        return tuple(int(s) for s in weight.quant_state.shape)
    return tuple(weight.shape)


def dense_weight(weight, dtype: torch.dtype, backend: str = "auto") -> Optional[torch.Tensor]:
    """The [N, K] weight in ``dtype``: a cast for dense weights, a dequantization for 4-bit ones.

    The result is a temporary for one call; callers must not keep it across steps.
    """
    if weight is None:
        return None
    if isinstance(weight, Quant4bit) or is_4bit_weight(weight):
        return dequantize_4bit(weight, dtype=dtype, backend=backend)
    return weight.to(dtype)


def operand_signature(t) -> Optional[tuple]:
    """What the operand checks below read of one operand, as a comparable tuple (None for None): its
    type (a bitsandbytes ``Params4bit`` is no plain tensor), dtype, device, requires_grad and shape; for a
    :class:`Quant4bit`, its device and logical shape."""
    if t is None:
        return None
    kind = type(t)
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        return kind, t.dtype, t.device, t.requires_grad, t.shape
    if kind is Quant4bit:
        return Quant4bit, t.device, t.shape
    # a subclass (bitsandbytes' Params4bit) may route each attribute read through Python __torch_function__
    with torch._C.DisableTorchFunctionSubclass():
        return kind, t.dtype, t.device, t.requires_grad, t.shape


# Why a Triton launcher would refuse its operands: each check returns "" when they are fine, else a reason
# that the dispatcher reports (PEFTFAST_BACKEND=triton raises it; auto falls back to the reference).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def float_operands_problem(x: torch.Tensor, named: tuple) -> str:
    """x and each ``(name, tensor)`` must be fp32/fp16/bf16 tensors on x's device."""
    for name, t in (("x", x), *named):
        if t.dtype not in FLOAT_DTYPES:
            return f"{name} is {t.dtype}; the kernel takes float32, float16 or bfloat16"
        if t.device != x.device:
            return f"{name} is on {t.device} but x is on {x.device}"
    return ""


def base_weight_problem(weight: BaseWeight, x: torch.Tensor) -> str:
    """A frozen float or bitsandbytes 4-bit base on x's device (None: no base, fine)."""
    if weight is None:
        return ""
    if isinstance(weight, Quant4bit) or is_4bit_weight(weight):
        dev = weight.device if isinstance(weight, Quant4bit) else weight.data.device
        return f"the 4-bit weight is on {dev} but x is on {x.device}" if dev != x.device else ""
    if not torch.is_tensor(weight):
        return f"the base weight is a {type(weight).__name__}, not a tensor or a 4-bit weight"
    if weight.dtype not in FLOAT_DTYPES:
        what = "8-bit weights are not supported" if weight.dtype in (torch.int8, torch.uint8) else (
            "the kernel takes float32, float16 or bfloat16")
        return f"the base weight is {weight.dtype}; {what}"
    if weight.device != x.device:
        return f"the base weight is on {weight.device} but x is on {x.device}"
    if weight.requires_grad and torch.is_grad_enabled():
        return "the base weight requires grad and the Triton path computes no dW (freeze it)"
    return ""


def bias_problem(bias: Optional[torch.Tensor], x: torch.Tensor, *, computes_dbias: bool) -> str:
    """A float bias on x's device; frozen unless the kernel computes its gradient."""
    if bias is None:
        return ""
    if bias.dtype not in FLOAT_DTYPES:
        return f"bias is {bias.dtype}; the kernel takes float32, float16 or bfloat16"
    if bias.device != x.device:
        return f"bias is on {bias.device} but x is on {x.device}"
    if not computes_dbias and bias.requires_grad and torch.is_grad_enabled():
        return "the bias requires grad and the Triton path computes no dbias (freeze it)"
    return ""


def check_lora_shapes(x: torch.Tensor, weight: BaseWeight, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """Raise ValueError unless x [..., K], lora_A [r, K], lora_B [N, r] and the base [N, K] agree.

    Args:
        x: the input. weight: the base weight (dense, 4-bit, or None). lora_A, lora_B: the adapter.
    """
    r, k = lora_A.shape
    if lora_B.shape[1] != r:
        raise ValueError(f"lora_B must be [N, r={r}], got {tuple(lora_B.shape)} for lora_A {tuple(lora_A.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but lora_A expects {k}")
    if weight is not None:
        n, kw = weight_shape(weight)
        if (n, kw) != (lora_B.shape[0], k):
            raise ValueError(
                f"base weight is {(n, kw)} but the adapter expects ({lora_B.shape[0]}, {k}) (lora_B rows, lora_A cols)"
            )


def kernel_operand(weight) -> BaseWeight:
    """A base weight as the Triton ops take it: None, a dense tensor, or one :class:`Quant4bit`.

    A bitsandbytes ``Params4bit`` is read into its view (:func:`~.nf4.quant4bit_view`, which reuses its
    view while the weight's storage and scales are unchanged), and a nested offset kept as a Python float
    (some bitsandbytes versions, or a hand-made ``Quant4bit``) becomes an fp32 tensor, since the kernels
    read it through a pointer.

    Args:
        weight: dense tensor, ``Quant4bit``, bitsandbytes ``Params4bit``, or None.

    Returns:
        None, the dense tensor itself, or a ``Quant4bit``.

    Example:
        >>> q = kernel_operand(linear4bit.weight)  # doctest: +SKIP
    """
    if weight is None:
        return None
    if isinstance(weight, Quant4bit):
        q = weight
    elif is_4bit_weight(weight):
        q = quant4bit_view(weight)
    else:
        return weight
    if q.nested and not torch.is_tensor(q.offset):
        q = dataclasses.replace(q, offset=torch.tensor(float(q.offset), device=q.device, dtype=torch.float32))
    return q


def quant_args(weight: BaseWeight) -> Tuple:
    """Flatten a base weight into a custom op's arguments (the inverse of :func:`from_quant_args`).

    Args:
        weight: dense tensor, ``Quant4bit``, bitsandbytes ``Params4bit``, or None.

    Returns:
        ``(w, absmax, code, code2, absmax2, offset, meta, quant_type)``: ``w`` is the dense weight or the
        packed uint8 codes; ``meta`` is ``[]`` for dense weights and ``[blocksize, blocksize2, N, K]`` for
        4-bit ones (the scale tensors are None for dense weights).
    """
    q = kernel_operand(weight)
    if not isinstance(q, Quant4bit):
        return q, None, None, None, None, None, [], ""
    return q.packed, q.absmax, q.code, q.code2, q.absmax2, q.offset, q.meta, q.quant_type


def from_quant_args(w: Optional[torch.Tensor], absmax, code, code2, absmax2, offset, meta: List[int],
                    quant_type: str, dtype: Optional[torch.dtype] = None) -> BaseWeight:
    """The base weight from :func:`quant_args`' pieces: ``w`` itself when dense (or None), else the
    :class:`Quant4bit` they describe, with ``dtype`` recorded as its compute dtype."""
    if w is None or not meta:
        return w
    blocksize, blocksize2, n, k = meta
    return Quant4bit(packed=w, absmax=absmax, code=code, blocksize=blocksize, shape=(n, k), dtype=dtype,
                     quant_type=quant_type, code2=code2, absmax2=absmax2, blocksize2=blocksize2, offset=offset)


def dense_base(weight: BaseWeight, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The [N, K] base weight for a GEMM: a dense weight itself (the kernels cast it), a 4-bit one
    dequantized afresh in ``dtype`` (a temporary for one call), None for none."""
    if not isinstance(weight, Quant4bit):
        return weight
    return dequantize_4bit(weight, dtype=dtype, backend="auto")
