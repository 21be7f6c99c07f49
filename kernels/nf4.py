"""bitsandbytes 4-bit (NF4 / FP4) weights: a plain view of their storage and dequantization.

Layout (bitsandbytes/functional.py): the weight [N, K] is flattened row-major and cut into blocks of
``blocksize`` consecutive values; each value is a 4-bit index into a 16-entry fp32 ``code`` table,
two per byte, element 2i in the HIGH nibble and 2i+1 in the LOW one. Each block has one fp32 scale
``absmax``; with nested (double) quantization that scale is itself stored as a uint8 index into a
256-entry ``code2`` with one fp32 ``absmax2`` per ``blocksize2`` (256) scales, plus a global ``offset``:
``scale[i] = code2[absmax_u8[i]] * absmax2[i // blocksize2] + offset``.

The reference below repeats bitsandbytes' arithmetic in the same order (fp32 products, a separate
offset add, one rounding to the output dtype), so its output is bit-identical to
``bitsandbytes.functional.dequantize_4bit``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .dispatch import interpreting, resolve_backend

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class Quant4bit:
    """Everything needed to decode one bitsandbytes 4-bit weight, read at call time.

    Never cache one across steps: FSDP and ZeRO free and swap parameter storage between steps.
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
    if state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {state.quant_type!r}")
    if state.blocksize not in BLOCKSIZES:
        raise ValueError(f"bitsandbytes 4-bit blocksize must be one of {BLOCKSIZES}, got {state.blocksize}")
    shape = tuple(int(s) for s in state.shape)
    if len(shape) != 2:
        raise ValueError(f"a 4-bit linear weight is 2-D [N, K]; its quant_state says {shape}")
    stored = weight.data
    data = stored if stored.dtype == torch.uint8 else stored.view(torch.uint8)
    if getattr(state, "packing_format_for_cpu", False):
        return _cached_cpu_unpack(data, getattr(weight, "_version", 0), state, shape)
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
        return Quant4bit(
            packed=packed, absmax=state.absmax, code=state.code.float(), blocksize=int(state.blocksize),
            shape=shape, dtype=state.dtype, quant_type=state.quant_type, code2=s2.code.float(),
            absmax2=s2.absmax.float(), blocksize2=int(s2.blocksize), offset=state.offset,
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


def _cached_cpu_unpack(data: torch.Tensor, version: int, state, shape: tuple) -> Quant4bit:
    """The unpacked view, computed once per packed storage: each forward of a patched layer reads it.

    The key is the storage (pointer, and the parameter's version counter, which in-place writes under
    no_grad bump) and the scales' identity, so a repack, an in-place write or bitsandbytes turning the
    weight back (a new ``.data``) all miss the cache.
    """
    key = (data.data_ptr(), version, id(state.absmax), state.absmax._version, shape)
    cached = getattr(state, "_peftfast_unpacked", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    view = _cpu_unpacked_view(data, state, shape)
    state._peftfast_unpacked = (key, view)
    return view


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
        _check_out(q, out, out_dtype)
    if resolve_backend(backend, q.device, supported=_triton_dequantize is not None) == "triton":
        return _triton_dequantize(q, out_dtype, out=out)
    result = dequantize_4bit_reference(q, out_dtype)
    if out is None:
        return result
    return out.view(q.shape).copy_(result)


def _check_out(q: Quant4bit, out: torch.Tensor, dtype: torch.dtype) -> None:
    if out.dtype != dtype:
        raise ValueError(f"out has dtype {out.dtype}, but the dequantized weight is {dtype}")
    if out.numel() != q.numel or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous tensor with {q.numel} elements (the weight is {tuple(q.shape)}); "
            f"got shape {tuple(out.shape)}, contiguous={out.is_contiguous()}"
        )
    if out.device != q.device:
        raise ValueError(f"out is on {out.device}, the weight on {q.device}")


# ----------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _mul_rn(a, b, PTX_MUL_RN: tl.constexpr):
    """fp32 ``a * b`` rounded on its own, so that no later add can absorb it into an FMA.

    bitsandbytes rounds ``code2[a] * absmax2[j]`` to fp32 before adding ``offset`` (two separate ops);
    an FMA rounds once and can flip the last bit of a scale, and with it every value of its block.
    Triton (before 3.9's default change) lets LLVM and ptxas contract a plain ``mul`` + ``add``. The PTX
    ISA treats an instruction with an explicit rounding modifier "conservatively": only unmodified
    mul/add pairs may become FMAs, so ``mul.rn.f32`` pins the rounding whatever the compiler flags.
    The launcher also passes ``enable_fp_fusion=False`` (ptxas ``--fmad=false``; LLVM without
    contraction on AMD), which covers targets without the PTX path. The interpreter (numpy) never fuses.
    """
    if PTX_MUL_RN:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return a * b


@triton.jit
def _to_bf16_rtne(x):
    """fp32 -> bf16, round to nearest even, in integer ops.

    Used only in Triton's CPU interpreter, whose fp32 -> bf16 cast truncates (triton 3.9
    ``interpreter._convert_float`` with no rounding mode), where a GPU's ``cvt.rn.bf16.f32`` and
    bitsandbytes round to nearest even. Finite inputs only (code * scale always is); NaN stays NaN.
    """
    b_bits = x.to(tl.uint32, bitcast=True)
    b_bits = b_bits + 0x7FFF + ((b_bits >> 16) & 1)
    b_hi = (b_bits >> 16).to(tl.uint16)
    b_hi = tl.where(x != x, 0x7FC0, b_hi).to(tl.uint16)
    return b_hi.to(tl.bfloat16, bitcast=True)


# Tile decode shared by the kernels that read the packed weight inside their K loop (qmatmul's GEMM and
# lora.py's decode GEMV): scales in bitsandbytes' order of operations, codes through a register LUT.


@triton.jit
def _block_scales(p_absmax, p_code2, p_absmax2, p_offset, o_blk, m_blk,
                  BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, PTX_MUL_RN: tl.constexpr):
    """fp32 scales of the absmax blocks ``o_blk``, in bitsandbytes' order of operations."""
    if NESTED:
        b_a8 = tl.load(p_absmax + o_blk, mask=m_blk, other=0).to(tl.int32)
        b_a2 = tl.load(p_absmax2 + o_blk // BLOCKSIZE2, mask=m_blk, other=0.0)
        # bitsandbytes: dequantize_blockwise (fp32 product), then `absmax += offset` as its own op; the
        # product is rounded before the offset is added (see _mul_rn): an FMA would flip bits.
        b_scale = _mul_rn(tl.load(p_code2 + b_a8), b_a2, PTX_MUL_RN) + tl.load(p_offset)
    else:
        b_scale = tl.load(p_absmax + o_blk, mask=m_blk, other=0.0)
    return b_scale


@triton.jit
def _decode_4bit_tile(p_q, p_absmax, b_lut, p_code2, p_absmax2, p_offset, o_row, m_row, c0, W_COLS,
                      ROWS: tl.constexpr, COLS: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                      NESTED: tl.constexpr, PTX_MUL_RN: tl.constexpr):
    """fp32 values of W[o_row, c0:c0+COLS] ([ROWS, COLS]); W has ``W_COLS`` columns, ``W_COLS % BLOCKSIZE == 0``.

    ``c0`` is a multiple of COLS, and COLS and BLOCKSIZE are powers of two, so the tile's columns lie in
    one block per row (COLS <= BLOCKSIZE) or cover COLS / BLOCKSIZE whole blocks. Out-of-range rows and
    columns decode to finite values (a zero byte times a masked scale): the matching X entries are
    masked to zero, so they add exactly nothing.
    """
    HALF: tl.constexpr = COLS // 2
    o_c2 = c0 // 2 + tl.arange(0, HALF)
    m_c2 = o_c2 < W_COLS // 2
    b_q = tl.load(p_q + o_row[:, None] * (W_COLS // 2) + o_c2[None, :],
                  mask=m_row[:, None] & m_c2[None, :], other=0)  # [ROWS, COLS/2] uint8
    # Two codes per byte, element 2i in the high nibble (bitsandbytes' packing).
    b_idx = tl.interleave((b_q >> 4).to(tl.int32), (b_q & 0xF).to(tl.int32))  # [ROWS, COLS]
    # LUT decode from registers (b_lut: [16, COLS], the code table repeated per column). A load from the
    # table in global memory would be an indirect load that the pipeliner stages in shared memory, a
    # fp32 copy of the whole tile per stage.
    b_val = tl.gather(b_lut, b_idx, axis=0)  # [ROWS, COLS] fp32
    blocks_per_row = W_COLS // BLOCKSIZE
    if COLS > BLOCKSIZE:
        GROUPS: tl.constexpr = COLS // BLOCKSIZE
        o_g = c0 // BLOCKSIZE + tl.arange(0, GROUPS)
        b_scale = _block_scales(p_absmax, p_code2, p_absmax2, p_offset, o_row[:, None] * blocks_per_row + o_g[None, :],
                                m_row[:, None] & (o_g < blocks_per_row)[None, :], BLOCKSIZE2, NESTED,
                                PTX_MUL_RN)  # [ROWS, GROUPS]
        # Each block's scale repeated over its BLOCKSIZE columns (GROUPS * BLOCKSIZE == COLS).
        b_scale = tl.reshape(tl.broadcast_to(b_scale[:, :, None], [ROWS, GROUPS, BLOCKSIZE]), [ROWS, COLS])
        b_w = b_val * b_scale
    else:
        b_scale = _block_scales(p_absmax, p_code2, p_absmax2, p_offset, o_row * blocks_per_row + c0 // BLOCKSIZE,
                                m_row, BLOCKSIZE2, NESTED, PTX_MUL_RN)  # [ROWS]
        b_w = b_val * b_scale[:, None]
    return b_w


@triton.jit
def _dequantize_4bit_kernel(
    p_packed,  # uint8 [ceil(n / 2)]
    p_absmax,  # fp32 [n_blocks], or uint8 [n_blocks] when NESTED
    p_code,  # fp32 [16]
    p_code2,  # fp32 [256] (NESTED only)
    p_absmax2,  # fp32 [ceil(n_blocks / BLOCKSIZE2)] (NESTED only)
    p_offset,  # fp32 [1] (NESTED only)
    p_out,  # fp16 / bf16 / fp32 [n]
    n,
    n_bytes,
    n_blocks,
    BLOCKSIZE: tl.constexpr,  # values per absmax block (32..4096)
    BLOCKSIZE2: tl.constexpr,  # absmax values per absmax2 entry (nested)
    BLOCKS_PER_PROGRAM: tl.constexpr,  # S: whole absmax blocks per program, so a scale never straddles programs
    NESTED: tl.constexpr,
    PTX_MUL_RN: tl.constexpr,
    INT64: tl.constexpr,  # n >= 2**31: int32 offsets would wrap
    SOFT_BF16: tl.constexpr,  # interpreter with bf16 output: round in integer ops (see _to_bf16_rtne)
):
    # Each program owns S whole absmax blocks: S * BLOCKSIZE / 2 packed bytes -> S * BLOCKSIZE values,
    # tiled [S, HALF, 2] so each block's scale is computed once and broadcast, not gathered per value.
    HALF: tl.constexpr = BLOCKSIZE // 2
    i_p = tl.program_id(0)
    if INT64:
        i_p = i_p.to(tl.int64)
    o_q = i_p * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)  # [S] absmax block ids
    o_h = tl.arange(0, HALF)  # [HALF] byte within the block
    o_j = tl.arange(0, 2)  # [2] 0: high nibble (element 2i), 1: low nibble (element 2i+1)
    m_q = o_q < n_blocks

    b_scale = _block_scales(p_absmax, p_code2, p_absmax2, p_offset, o_q, m_q, BLOCKSIZE2, NESTED, PTX_MUL_RN)  # [S]

    o_byte = o_q[:, None] * HALF + o_h[None, :]  # [S, HALF]
    # n may be odd: the last byte then holds only a high nibble, and the byte count is ceil(n / 2).
    m_byte = o_byte < n_bytes
    b_packed = tl.load(p_packed + o_byte, mask=m_byte, other=0).to(tl.int32)  # [S, HALF]
    b_idx = tl.where(o_j[None, None, :] == 0, b_packed[:, :, None] >> 4, b_packed[:, :, None] & 0xF)  # [S, HALF, 2]
    # Indices are 0..15 by construction (masked bytes read as 0), so the table lookup needs no mask.
    b_val = tl.load(p_code + b_idx)  # [S, HALF, 2] fp32
    # One fp32 product, then one rounding to the output dtype, as bitsandbytes does.
    b_out = b_val * b_scale[:, None, None]  # [S, HALF, 2]

    o_out = 2 * o_byte[:, :, None] + o_j[None, None, :]  # [S, HALF, 2]
    m_out = o_out < n
    if SOFT_BF16:
        b_res = _to_bf16_rtne(b_out)
    else:
        b_res = b_out.to(p_out.dtype.element_ty)
    tl.store(p_out + o_out, b_res, mask=m_out)


def _values_per_program(blocksize: int, n: int) -> int:
    """Values per program: a power of two, at least one absmax block."""
    if interpreting():
        # The interpreter pays per program and per padded value: a big tile, but no bigger than n.
        return max(blocksize, min(16384, triton.next_power_of_2(n)))
    # ~2K values (16 per thread at 4 warps) keeps enough programs in flight to saturate memory
    # bandwidth for every real layer size; fixed so the kernel compiles once per blocksize.
    return max(blocksize, 2048)


def _ptx_mul_rn(device: torch.device) -> bool:
    """Whether the nested scale's product uses the PTX ``mul.rn.f32`` (see :func:`_mul_rn`): NVIDIA
    GPUs only; a function of its own so that the path can be compiled ahead of time without a GPU."""
    return device.type == "cuda" and torch.version.hip is None and not interpreting()


def _triton_dequantize(q: Quant4bit, dtype: torch.dtype, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch :func:`_dequantize_4bit_kernel` once; returns the dense ``q.shape`` weight.

    Args:
        q: the weight's storage.
        dtype: fp16, bf16 or fp32.
        out: optional workspace (contiguous, ``q.numel`` elements of ``dtype``, on ``q.device``); the
            LoRA kernels pass a reused buffer here instead of allocating every call.
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dequantize_4bit produces fp16, bf16 or fp32, not {dtype}")
    if q.blocksize not in BLOCKSIZES:
        raise ValueError(f"bitsandbytes 4-bit blocksize must be one of {BLOCKSIZES}, got {q.blocksize}")
    n = q.numel
    n_bytes = (n + 1) // 2
    n_blocks = -(-n // q.blocksize)
    packed = q.packed.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    if packed.numel() < n_bytes:
        raise ValueError(f"packed storage has {packed.numel()} bytes; a {tuple(q.shape)} weight needs {n_bytes}")
    if q.absmax.numel() < n_blocks:
        raise ValueError(f"absmax has {q.absmax.numel()} entries; {n_blocks} blocks of {q.blocksize} need one each")
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    else:
        _check_out(q, out, dtype)
    if n == 0:
        return out.view(q.shape)

    packed = packed.contiguous()
    code = q.code.to(device=q.device, dtype=torch.float32).contiguous()
    if q.nested:
        absmax = q.absmax.reshape(-1).contiguous()
        if absmax.dtype != torch.uint8:
            raise ValueError(f"nested absmax must be uint8 code2 indices, got {absmax.dtype}")
        code2 = q.code2.to(torch.float32).contiguous()
        absmax2 = q.absmax2.to(torch.float32).contiguous()
        offset = q.offset.to(device=q.device, dtype=torch.float32).reshape(1)
    else:
        absmax = q.absmax.reshape(-1).to(torch.float32).contiguous()
        # Unused when not nested (NESTED is constexpr); any pointer will do.
        code2 = absmax2 = offset = absmax

    per_program = _values_per_program(q.blocksize, n) // q.blocksize
    grid = (triton.cdiv(n_blocks, per_program),)
    _dequantize_4bit_kernel[grid](
        packed, absmax, code, code2, absmax2, offset, out,
        n, n_bytes, n_blocks,
        BLOCKSIZE=q.blocksize,
        BLOCKSIZE2=q.blocksize2,
        BLOCKS_PER_PROGRAM=per_program,
        NESTED=q.nested,
        PTX_MUL_RN=_ptx_mul_rn(q.device),
        INT64=grid[0] * per_program * q.blocksize >= 2**31,
        SOFT_BF16=dtype == torch.bfloat16 and interpreting(),
        num_warps=8 if per_program * q.blocksize >= 4096 else 4,
        # Keep the nested scale's multiply and add separate on targets without the PTX path.
        enable_fp_fusion=False,
    )
    return out.view(q.shape)
