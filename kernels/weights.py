"""Base weights as the kernels receive them: a dense tensor or a bitsandbytes 4-bit parameter."""
from __future__ import annotations

from typing import Optional, Union

import torch

from .nf4 import Quant4bit, dequantize_4bit, is_4bit_weight

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
