"""bitsandbytes 4-bit (NF4 / FP4) weights: a plain view of their storage and dequantization.

Layout (bitsandbytes/functional.py): the weight [N, K] is flattened row-major and cut into blocks of
``blocksize`` consecutive values; each value is a 4-bit index into a 16-entry fp32 ``code`` table,
two per byte, element 2i in the HIGH nibble and 2i+1 in the LOW one. Each block has one fp32 scale
``absmax``; with nested (double) quantization that scale is itself stored as a uint8 index into a
256-entry ``code2`` with one fp32 ``absmax2`` per ``blocksize2`` (256) scales, plus a global ``offset``:
``scale[i] = code2[absmax_u8[i]] * absmax2[i // blocksize2] + offset``.

The reference below repeats bitsandbytes' arithmetic in the same order (fp32 products, a separate
offset add, one rounding to the output dtype), so its output is bit-identical to
``bitsandbytes.functional.dequantize_4bit``. The Triton dequantization kernel is in :mod:`.nf4_triton`.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from .dispatch import resolve_backend, triton_module

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class Quant4bit:
    """Everything needed to decode one bitsandbytes 4-bit weight.

    Read through :func:`quant4bit_view`, which keeps one per weight and checks on every read that the
    storage it views is still the weight's (FSDP and ZeRO free and swap parameter storage between steps);
    one held elsewhere across steps is not checked.
    """

    packed: torch.Tensor  # uint8 [ceil(n / 2)]
    absmax: torch.Tensor  # fp32 [n_blocks], or uint8 [n_blocks] when nested
    code: torch.Tensor  # fp32 [16]
    blocksize: int
    shape: tuple  # (N, K) of the dequantized weight
    dtype: torch.dtype  # bitsandbytes' compute dtype recorded at quantization time
    quant_type: str  # "nf4" | "fp4"
    code2: Optional[torch.Tensor] = None  # fp32 [256], nested only
    absmax2: Optional[torch.Tensor] = None  # fp32 [ceil(n_blocks / blocksize2)], nested only
    blocksize2: int = 256
    offset: Optional[torch.Tensor] = None  # fp32 scalar tensor, nested only

    @property
    def nested(self) -> bool:
        return self.code2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def meta(self) -> list:
        """``[blocksize, blocksize2, N, K]``: the integers a 4-bit kernel launch needs beside the tensors."""
        return [self.blocksize, self.blocksize2, int(self.shape[0]), int(self.shape[1])]


def is_4bit_weight(weight) -> bool:
    """True for a bitsandbytes ``Params4bit`` (or anything carrying a 4-bit ``quant_state``)."""
    return getattr(weight, "quant_state", None) is not None and weight.dtype in (
        torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32,
    ) and getattr(weight, "bnb_quantized", True)


def quant4bit_view(weight) -> Quant4bit:
    """Read a ``Params4bit``'s storage into a :class:`Quant4bit`, whatever state bitsandbytes left it in.

    bitsandbytes keeps a 4-bit weight in one of these states, and every 4-bit read in peftfast goes
    through this function so that none of them is misread:

    - standard: the flat layout described at the top of this module, absmax fp32 or nested (uint8 +
      ``state2``); the view shares storage with ``weight``.
    - CPU-packed (bitsandbytes >= 0.49): ``Linear4bit.forward`` on a CPU with AVX512-BF16, in eval with an
      input that needs no grad, rewrites the weight *in place* (``quant_state.packing_format_for_cpu``): the
      codes as [N, K/2] in 32-row tiles with another nibble order, absmax as bf16 [K/blocksize, N] with the
      nested state folded in. The view decodes that layout exactly (see :func:`unpack_cpu_4bit`); the
      bf16 rounding of the scales is bitsandbytes' own and cannot be undone.
    - anything else (a shard of the bytes, a layout of a newer bitsandbytes): refused with an error that
      says what does not add up, rather than read as the standard layout.

    Args:
        weight: a bitsandbytes ``Params4bit`` that has been quantized (moved to a device or created
            with ``quant_state``). Any ``quant_storage`` dtype; its bytes are reinterpreted as uint8.

    Returns:
        A :class:`Quant4bit` in the standard layout (sharing storage with ``weight`` unless it was CPU-packed).

    Raises:
        TypeError / ValueError: the weight is not a quantized 4-bit weight, or its storage does not match
            the layout its state describes.

    Example:
        >>> q = quant4bit_view(linear4bit.weight)  # doctest: +SKIP
        >>> w = dequantize_4bit_reference(q, torch.float32)  # doctest: +SKIP
    """
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise TypeError(
            "expected a quantized bitsandbytes Params4bit (with .quant_state); got a "
            f"{type(weight).__name__} without one. Quantize it first (move the Linear4bit to a device)."
        )
    # A decode step reads every 4-bit weight once per token: the view is kept on the quant state and
    # reused while nothing it was read from has changed (see _view_key).
    if not isinstance(weight, torch.Tensor):  # a stand-in holding .data and .quant_state: nothing to key on
        return _read_view(weight, state)
    storage, key = _view_key(weight, state)
    cached = getattr(state, "_peftfast_view", None)
    if cached is not None and cached[0]() is storage and cached[1] == key:
        return cached[2]
    view = _read_view(weight, state)
    state._peftfast_view = (weakref.ref(storage), key, view)
    return view


def _read_view(weight, state) -> Quant4bit:
    """The view of the layout the state names: CPU-packed (decoded into a standard copy) or standard."""
    if getattr(state, "packing_format_for_cpu", False):
        shape = _checked_shape(state)
        stored = weight.data
        data = stored if stored.dtype == torch.uint8 else stored.view(torch.uint8)
        return _cpu_unpacked_view(data, state, shape)
    return _standard_view(weight, state)


def _checked_shape(state) -> tuple:
    if state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {state.quant_type!r}")
    if state.blocksize not in BLOCKSIZES:
        raise ValueError(f"bitsandbytes 4-bit blocksize must be one of {BLOCKSIZES}, got {state.blocksize}")
    shape = tuple(int(s) for s in state.shape)
    if len(shape) != 2:
        raise ValueError(f"a 4-bit linear weight is 2-D [N, K]; its quant_state says {shape}")
    return shape


def _view_key(weight, state) -> tuple:
    """``(storage, key)``: the weight's storage object and everything else :func:`_read_view` reads,
    compared before a kept view is reused.

    The storage is compared by identity through a weak reference (FSDP/ZeRO swap in new storage; its
    address may repeat, a live object's identity cannot, and a dead one's reference answers None), with
    its size (freed storage has size 0), the weight's offset, shape, dtype and version counter (in-place
    writes under no_grad bump it: a CPU-packed weight's view is a decoded copy). The state's tensors enter
    by identity and version, its layout flag and dtypes by value. Read with subclass ``__torch_function__``
    off: ``Params4bit`` routes every tensor method through Python, which would cost more than the view.
    """
    with torch._C.DisableTorchFunctionSubclass():
        storage = weight.untyped_storage()
        stored = (storage.nbytes(), weight.storage_offset(), weight.shape, weight.dtype, weight._version)
    absmax = state.absmax
    nested = None
    if state.nested:
        s2 = state.state2
        nested = (id(s2), id(s2.absmax), s2.absmax._version, id(s2.code), s2.blocksize, id(state.offset))
    layout = (bool(getattr(state, "packing_format_for_cpu", False)), getattr(state, "original_dtype", None))
    return storage, (stored, layout, state.quant_type, state.blocksize, tuple(state.shape), state.dtype,
                     id(absmax), absmax._version, id(state.code), nested)


def _standard_view(weight, state) -> Quant4bit:
    """The :class:`Quant4bit` of a weight in bitsandbytes' standard flat layout, checked against its state."""
    shape = _checked_shape(state)
    stored = weight.data
    data = stored if stored.dtype == torch.uint8 else stored.view(torch.uint8)
    n = math.prod(shape)
    n_blocks = -(-n // state.blocksize)
    packed = data.reshape(-1)
    if stored.dim() > 2 or (stored.dim() == 2 and stored.shape[1] != 1) or packed.numel() < (n + 1) // 2:
        raise ValueError(
            f"this 4-bit weight's storage is {tuple(stored.shape)} {stored.dtype} ({packed.numel()} bytes), but its quant_state "
            f"describes the flat layout of a {shape} weight ({(n + 1) // 2} bytes as [bytes, 1]). It may be a "
            "shard (FSDP/ZeRO: read it inside the owning module's forward) or a layout this bitsandbytes version "
            "introduced; peftfast refuses to guess. Report the bitsandbytes version if it is the latter."
        )
    with torch._C.DisableTorchFunctionSubclass():
        held = stored.untyped_storage().nbytes() - stored.storage_offset() * stored.element_size()
    if held < stored.numel() * stored.element_size():
        raise ValueError(
            f"this 4-bit weight's storage holds {held} bytes of its {stored.numel() * stored.element_size()}: it "
            "has been freed (FSDP/ZeRO between steps); read it inside the owning module's forward"
        )
    if state.absmax.numel() != n_blocks:
        raise ValueError(
            f"this 4-bit weight has {state.absmax.numel()} block scales; a {shape} weight in blocks of "
            f"{state.blocksize} needs {n_blocks}: its quant_state does not describe its storage"
        )
    if state.nested:
        s2 = state.state2
        if s2.absmax.numel() != -(-n_blocks // int(s2.blocksize)):
            raise ValueError(
                f"this 4-bit weight's nested state has {s2.absmax.numel()} second-level scales; "
                f"{n_blocks} block scales in blocks of {s2.blocksize} need {-(-n_blocks // int(s2.blocksize))}"
            )
        # the kernels read the offset through a pointer; some bitsandbytes versions keep a Python float
        offset = state.offset if torch.is_tensor(state.offset) else torch.tensor(
            float(state.offset), device=packed.device, dtype=torch.float32)
        return Quant4bit(
            packed=packed, absmax=state.absmax, code=state.code.float(), blocksize=int(state.blocksize),
            shape=shape, dtype=state.dtype, quant_type=state.quant_type, code2=s2.code.float(),
            absmax2=s2.absmax.float(), blocksize2=int(s2.blocksize), offset=offset,
        )
    return Quant4bit(
        packed=packed, absmax=state.absmax.float(), code=state.code.float(), blocksize=int(state.blocksize),
        shape=shape, dtype=state.dtype, quant_type=state.quant_type,
    )


# bitsandbytes' CPU packing puts 32 rows side by side: for each tile of 32 rows and each pair of columns
# (2c, 2c+1), 32 bytes hold those 64 codes, rows 0-15 in the low nibbles and rows 16-31 in the high ones.
CPU_PACK_ROWS = 32


def unpack_cpu_4bit(packed: torch.Tensor, shape: tuple) -> torch.Tensor:
    """bitsandbytes' CPU-packed 4-bit codes [N, K/2] back to the standard flat layout, exactly.

    Args:
        packed: uint8 [N, K // 2], as ``functional._convert_weight_packed_for_cpu`` leaves ``weight.data``.
        shape: (N, K) of the weight; N a multiple of 32, K even (bitsandbytes packs only those).

    Returns:
        uint8 [N * K // 2]: code 2i in the high nibble and 2i+1 in the low one of byte i, row-major.

    Example:
        >>> flat = unpack_cpu_4bit(linear4bit.weight.data, (4096, 4096))  # doctest: +SKIP
    """
    n, k = shape
    if n % CPU_PACK_ROWS or k % 2 or tuple(packed.shape) != (n, k // 2):
        raise ValueError(
            f"a CPU-packed 4-bit weight of shape {(n, k)} is uint8 [{n}, {k // 2}] with N a multiple of "
            f"{CPU_PACK_ROWS} and K even; got storage {tuple(packed.shape)}"
        )
    # One group = the 64 codes of (32 rows x 2 columns) in row-major order: (row, col) -> 2 * row + col.
    groups = packed.reshape(-1, CPU_PACK_ROWS)  # [N/32 * K/2, 32] bytes
    codes = torch.cat([groups & 0xF, groups >> 4], dim=1)  # [G, 64]: low nibbles hold entries 0..31
    codes = codes.reshape(n // CPU_PACK_ROWS, k // 2, CPU_PACK_ROWS, 2)  # [tile, col pair, row, col]
    codes = codes.permute(0, 2, 1, 3).reshape(-1)  # row-major [N * K]
    return (codes[0::2] << 4) | codes[1::2]


def _cpu_unpacked_view(data: torch.Tensor, state, shape: tuple) -> Quant4bit:
    n, k = shape
    blocksize = int(state.blocksize)
    if k % blocksize or tuple(state.absmax.shape) != (k // blocksize, n):
        raise ValueError(
            f"a CPU-packed 4-bit weight of shape {shape} keeps its scales as [K/blocksize, N] = "
            f"[{k // blocksize}, {n}]; got {tuple(state.absmax.shape)}: its quant_state does not describe it"
        )
    return Quant4bit(
        packed=unpack_cpu_4bit(data, shape),
        # [K/bs, N] -> [N, K/bs] -> flat block order (blocks never straddle rows here: bs divides K)
        absmax=state.absmax.t().reshape(-1).float(),
        code=state.code.float(), blocksize=blocksize, shape=shape,
        # the packing overwrote state.dtype with bf16; the compute dtype chosen at quantization is kept here
        dtype=getattr(state, "original_dtype", state.dtype), quant_type=state.quant_type,
    )


def quantization_settings(weight) -> dict:
    """How a 4-bit weight was quantized, as ``Params4bit`` arguments to quantize a new one the same way.

    A CPU-packed state has folded its nested scales away and overwritten its dtype; the originals are
    recorded beside them and are what a requantization (merge) must use.

    Returns:
        ``dict(quant_type=..., blocksize=..., compress_statistics=..., compute_dtype=...)``.
    """
    state = weight.quant_state
    packed = getattr(state, "packing_format_for_cpu", False)
    return dict(
        quant_type=state.quant_type, blocksize=int(state.blocksize),
        compress_statistics=bool(getattr(state, "original_nested", state.nested) if packed else state.nested),
        compute_dtype=getattr(state, "original_dtype", state.dtype) if packed else state.dtype,
    )


def block_scales_reference(q: Quant4bit) -> torch.Tensor:
    """The fp32 scale of every block, as bitsandbytes computes it (nested: product, then offset)."""
    if not q.nested:
        return q.absmax.float()
    n_blocks = q.absmax.numel()
    idx = torch.arange(n_blocks, device=q.absmax.device) // q.blocksize2
    scales = q.code2[q.absmax.long()] * q.absmax2[idx]
    return scales + q.offset.float()


def dequantize_4bit_reference(q: Quant4bit, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Pure-PyTorch dequantization; bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

    Args:
        q: the weight's storage, from :func:`quant4bit_view`.
        dtype: output dtype; defaults to the dtype recorded at quantization.

    Returns:
        The dense weight, shape ``q.shape``.
    """
    n = q.numel
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1)[:n].long()
    values = q.code[codes]  # fp32 [n]
    scales = block_scales_reference(q)
    block_of = torch.arange(n, device=values.device) // q.blocksize
    out = values * scales[block_of]
    return out.reshape(q.shape).to(dtype or q.dtype)


def dequantize_4bit(
    weight, *, dtype: Optional[torch.dtype] = None, backend: str = "auto", out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight in one launch.

    Args:
        weight: a ``Params4bit`` (NF4 or FP4, nested absmax or not, blocksize 32..4096, any
            ``quant_storage``), or a :class:`Quant4bit`.
        dtype: output dtype (fp16, bf16 or fp32); defaults to ``out.dtype`` when ``out`` is given,
            else to the weight's recorded compute dtype.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
        out: optional contiguous workspace with ``N * K`` elements of the output dtype, on the weight's
            device; it is written and returned viewed as ``[N, K]`` (no allocation).

    Returns:
        The dense [N, K] weight, bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

    Example:
        >>> w = peftfast.kernels.dequantize_4bit(linear4bit.weight)  # doctest: +SKIP
    """
    q = weight if isinstance(weight, Quant4bit) else quant4bit_view(weight)
    out_dtype = dtype or (out.dtype if out is not None else q.dtype)
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dequantize_4bit produces fp16, bf16 or fp32, not {out_dtype}")
    if out is not None:
        check_out(q, out, out_dtype)
    if resolve_backend(backend, q.device, supported=triton_module("nf4_triton") is not None) == "triton":
        return triton_module("nf4_triton").triton_dequantize(q, out_dtype, out=out)
    result = dequantize_4bit_reference(q, out_dtype)
    if out is None:
        return result
    return out.view(q.shape).copy_(result)


def check_out(q: Quant4bit, out: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise ValueError unless ``out`` can hold ``q`` dequantized to ``dtype`` (dtype, size, layout, device)."""
    if out.dtype != dtype:
        raise ValueError(f"out has dtype {out.dtype}, but the dequantized weight is {dtype}")
    if out.numel() != q.numel or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous tensor with {q.numel} elements (the weight is {tuple(q.shape)}); "
            f"got shape {tuple(out.shape)}, contiguous={out.is_contiguous()}"
        )
    if out.device != q.device:
        raise ValueError(f"out is on {out.device}, the weight on {q.device}")

