"""An independent decoder of bitsandbytes' 4-bit storage, the tests' oracle for every 4-bit read.

Neither bitsandbytes' CPU path nor peft on top of it is an fp32 oracle: bitsandbytes' CPU
``dequantize_4bit`` is wrong where blocks straddle rows, and its CPU forward repacks the weight and
computes in bf16. So the truth is decoded here from the layout itself, element by element, with index
arithmetic written apart from ``peftfast.kernels.nf4`` (which shifts and reshapes; this gathers by
formula), in float64.

Standard layout: element i (row-major over [N, K]) is nibble ``i % 2`` (0 = high) of byte ``i // 2``, in
block ``i // blocksize``; nested scales are ``code2[absmax_u8[b]] * absmax2[b // blocksize2] + offset``.

CPU-packed layout (``quant_state.packing_format_for_cpu``): element (r, c) lives in the group of 32 bytes
``(r // 32) * (K / 2) + c // 2``, at entry ``e = 2 * (r % 32) + c % 2`` of that group's 64 codes: byte
``e % 32``, low nibble for ``e < 32``, high nibble otherwise; its scale is the bf16 ``absmax[c // bs, r]``.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _nibble(byte: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    byte = byte.long()
    return torch.where(high, torch.div(byte, 16, rounding_mode="floor"), torch.remainder(byte, 16))


def decode_4bit(weight) -> torch.Tensor:
    """The float64 [N, K] weight a bitsandbytes ``Params4bit`` holds, in whatever layout it is in now."""
    state = weight.quant_state
    n, k = (int(s) for s in state.shape)
    data = weight.data.reshape(-1).view(torch.uint8) if weight.data.dtype != torch.uint8 else weight.data.reshape(-1)
    code = state.code.double()
    rows = torch.arange(n).view(-1, 1).expand(n, k)
    cols = torch.arange(k).view(1, -1).expand(n, k)
    if getattr(state, "packing_format_for_cpu", False):
        group = torch.div(rows, 32, rounding_mode="floor") * (k // 2) + torch.div(cols, 2, rounding_mode="floor")
        entry = 2 * torch.remainder(rows, 32) + torch.remainder(cols, 2)
        byte = data[group * 32 + torch.remainder(entry, 32)]
        values = code[_nibble(byte, entry >= 32)]
        scales = state.absmax.double()[torch.div(cols, state.blocksize, rounding_mode="floor"), rows]
        return values * scales
    flat = rows * k + cols
    values = code[_nibble(data[torch.div(flat, 2, rounding_mode="floor")], torch.remainder(flat, 2) == 0)]
    block = torch.div(flat, state.blocksize, rounding_mode="floor")
    if state.nested:
        s2 = state.state2
        # bitsandbytes rounds the product to fp32 before adding the offset (two fp32 operations)
        prod = (s2.code.float()[state.absmax.long()] * s2.absmax.float()[
            torch.div(torch.arange(state.absmax.numel()), s2.blocksize, rounding_mode="floor")])
        block_scales = (prod + torch.as_tensor(state.offset).float()).double()
    else:
        block_scales = state.absmax.double()
    return values * block_scales[block]


def dense_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every bitsandbytes ``Linear4bit`` replaced by an fp32 ``nn.Linear``
    holding :func:`decode_4bit` of its weight as it is now (read before anything repacks it)."""
    import copy

    import bitsandbytes as bnb

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, bnb.nn.Linear4bit):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(decode_4bit(m.weight).float())
                if m.bias is not None:
                    lin.bias.copy_(m.bias.float())
            parent, _, attr = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, attr, lin)
    twin.is_loaded_in_4bit = False
    return twin
