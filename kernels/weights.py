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
