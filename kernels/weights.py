"""Base weights as the kernels receive them (a dense tensor or a bitsandbytes 4-bit parameter) and the
operand checks every op runs before choosing a backend.

A 4-bit weight crosses a ``torch.library`` op boundary as its storage tensors (:func:`quant_args`) and
is rebuilt and dequantized on the other side where a GEMM needs it dense (:func:`dense_base`). Nothing
here imports Triton.
"""
from __future__ import annotations

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


def quant_args(weight: BaseWeight) -> Tuple:
    """Split a base weight into a custom op's tensor arguments.

    Args:
        weight: dense tensor, ``Quant4bit``, bitsandbytes ``Params4bit``, or None.

    Returns:
        ``(w, absmax, code, code2, absmax2, offset, meta, quant_type)``: ``w`` is the dense weight or the
        packed uint8 codes; ``meta`` is ``[]`` for dense weights and ``[blocksize, blocksize2, N, K]`` for
        4-bit ones (the scale tensors are None for dense weights).
    """
    if weight is None or not (isinstance(weight, Quant4bit) or is_4bit_weight(weight)):
        return weight, None, None, None, None, None, [], ""
    q = weight if isinstance(weight, Quant4bit) else quant4bit_view(weight)
    n, k = q.shape
    offset = q.offset
    if q.nested and not torch.is_tensor(offset):  # some bitsandbytes versions keep a Python float
        offset = torch.tensor(float(offset), device=q.packed.device, dtype=torch.float32)
    return (q.packed, q.absmax, q.code, q.code2, q.absmax2, offset,
            [q.blocksize, q.blocksize2, int(n), int(k)], q.quant_type)


def dense_base(w: Optional[torch.Tensor], absmax, code, code2, absmax2, offset, meta: List[int], quant_type: str,
               dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The [N, K] base weight from :func:`quant_args`' pieces: ``w`` itself when dense (the kernels cast
    it), else a fresh dequantization in ``dtype`` (a temporary for one call)."""
    if w is None or not meta:
        return w
    blocksize, blocksize2, n, k = meta
    q = Quant4bit(packed=w, absmax=absmax, code=code, blocksize=blocksize, shape=(n, k), dtype=dtype,
                  quant_type=quant_type, code2=code2, absmax2=absmax2, blocksize2=blocksize2, offset=offset)
    return dequantize_4bit(q, dtype=dtype, backend="auto")
