"""The frozen base weight of a wrapped layer, read the one way every peftfast path reads it.

A wrapper never keeps its base weight across calls (FSDP and ZeRO swap storage between steps); it asks
here each time (the 4-bit view behind the answer is kept by ``kernels.nf4.quant4bit_view``, which checks
on each read that the weight's storage and scales are the ones it viewed), and this module answers for every kind of base: a dense ``nn.Linear`` / transformers
``Conv1D`` weight, a bitsandbytes 4-bit ``Params4bit`` in any of the states bitsandbytes leaves it in
(standard, nested, CPU-packed: decoded by ``kernels.nf4.quant4bit_view``; FSDP-sharded: its quant state
recovered from the module), a bitsandbytes 8-bit weight, or a DeepSpeed ZeRO-3 shard. It also writes a
merged weight back (requantizing 4/8-bit bases as they were quantized) and keeps bitsandbytes' own CPU
forward away from the weights peftfast reads.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..kernels.nf4 import is_4bit_weight, quantization_settings

try:  # transformers' GPT-2-style Conv1D stores its weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = ()


@functools.lru_cache(maxsize=1)
def _bnb_classes():
    """(4-bit classes, 8-bit classes) of bitsandbytes; imported on first use (not at import: it is slow and
    optional), then answered from the cache, since every wrapped forward asks."""
    try:
        import bitsandbytes as bnb
    except Exception:  # pragma: no cover - bitsandbytes missing or broken on this platform
        return (), ()
    return (bnb.nn.Linear4bit,), (bnb.nn.Linear8bitLt,)


def is_8bit(module: nn.Module) -> bool:
    return isinstance(module, _bnb_classes()[1])


def stores_transposed(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def is_zero3_partitioned(weight) -> bool:
    """A DeepSpeed ZeRO-3 parameter (it carries a ``ds_id``); no deepspeed import needed."""
    return hasattr(weight, "ds_id")


def base_weight(module: nn.Module):
    """``module.weight``, with a bitsandbytes 4-bit layer's quant state put back when a sharding engine
    (FSDP) has swapped the ``Params4bit`` for a plain tensor of the packed bytes: bnb keeps a copy of the
    state on the module for this case, and its own forward recovers it the same way. The module is not
    modified (the engine owns its parameters); the returned ``Params4bit`` shares the tensor's storage."""
    w = module.weight
    state = getattr(module, "quant_state", None)
    if state is None or is_4bit_weight(w) or w.dim() != 2 or w.shape[1] != 1:
        return w
    import bitsandbytes as bnb

    view = bnb.nn.Params4bit(w.data, requires_grad=False, quant_storage=w.dtype, bnb_quantized=True)
    view.quant_state = state
    return view


def kernel_weight(module: nn.Module):
    """The base weight in the form the kernels read: [N, K] dense view or a 4-bit Params4bit.

    None for bases the kernels cannot read (bitsandbytes 8-bit), and for DeepSpeed ZeRO-3 parameters:
    ZeRO-3 keeps each weight as a shard and gathers it only inside the owning module's own forward and
    backward hooks, so the wrapper then calls the base module (unfused) and adds the adapter term.
    """
    if is_8bit(module) or is_zero3_partitioned(module.weight):
        return None
    w = base_weight(module)
    if is_4bit_weight(w):
        return w
    return w.t() if stores_transposed(module) else w


def dense_base_weight(module: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The base weight as a dense [N, K] tensor (dequantized for bitsandbytes bases)."""
    w = base_weight(module)
    if is_8bit(module):
        cb = w.CB if getattr(w, "CB", None) is not None else w.data
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        dense = cb.float() * scb.float().view(-1, 1) / 127.0
        return dense.to(dtype or torch.float32)
    if is_4bit_weight(w):  # the view knows the compute dtype even where a CPU repack overwrote quant_state's
        return kernels.dequantize_4bit(w, dtype=dtype)
    dense = w.t() if stores_transposed(module) else w
    return dense if dtype is None else dense.to(dtype)


def write_dense_base_weight(module: nn.Module, dense: torch.Tensor) -> None:
    """Store a dense [N, K] weight back into the base module, requantizing bitsandbytes weights."""
    w = module.weight
    if is_4bit_weight(w):
        import bitsandbytes as bnb

        # as it was quantized, not as a CPU repack left its state (nesting folded away, dtype bf16)
        how = quantization_settings(w)
        new = bnb.nn.Params4bit(
            dense.to("cpu", how["compute_dtype"]), requires_grad=False, quant_type=how["quant_type"],
            blocksize=how["blocksize"], compress_statistics=how["compress_statistics"], quant_storage=w.dtype,
        )
        module.weight = new._quantize(w.device) if w.device.type != "meta" else new
        return
    if is_8bit(module):
        import bitsandbytes as bnb

        new = bnb.nn.Int8Params(dense.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False)
        module.weight = new.to(w.device)  # Int8Params quantizes when moved to a device, CPU included
        return
    data = dense.t() if stores_transposed(module) else dense
    w.data.copy_(data.to(w.dtype))


def keep_4bit_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking ``model``'s 4-bit layers for its CPU kernel; returns how many.

    bitsandbytes (>= 0.49) rewrites a ``Linear4bit`` in place on its first eval forward on a CPU with
    AVX512-BF16, rounding the block scales to bf16 and computing in bf16 from then on. ``peftfast train``
    and ``generate`` own the models they load and call this, so the base they evaluate, generate with
    and train on afterwards is the one they loaded. ``patch`` does not: layers it wraps never reach that
    code path (see :func:`base_4bit_forward_cpu`), and the others are the caller's.

    Example:
        >>> keep_4bit_layout(model)  # doctest: +SKIP
    """
    count = 0
    for m in model.modules():
        if isinstance(m, _bnb_classes()[0]) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            count += 1
    return count


def base_4bit_forward_cpu(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes ``Linear4bit``'s own output on CPU, computed from the exactly decoded weight.

    Not ``base(x)``: on a CPU with AVX512-BF16, bitsandbytes' forward in eval rewrites the weight in place
    into its CPU-packed layout (rounding the block scales to bf16) and computes in bf16, and on CPUs
    without it its dequantization is wrong where blocks straddle rows. Either way the output of a layer
    with its adapters disabled would no longer be the adapted path's base term, and the repack would
    change the weights every later read sees. Same dtype flow as the adapted path: x in the layer's
    compute dtype, the result cast back to x's dtype.
    """
    compute_dtype = getattr(base, "compute_dtype", None) or x.dtype
    x_c = x.to(compute_dtype) if x.is_floating_point() else x
    w = kernels.dequantize_4bit(base_weight(base), dtype=x_c.dtype)
    bias = base.bias.to(x_c.dtype) if base.bias is not None else None
    return F.linear(x_c, w, bias).to(x.dtype)
