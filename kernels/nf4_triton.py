"""The Triton side of bitsandbytes 4-bit weights: the dequantization kernel and the tile decode that the
4-bit GEMMs share (lora_triton's decode GEMV, experimental.qmatmul's in-loop GEMM).

Layout and arithmetic are described in :mod:`.nf4`, whose :func:`~.nf4.dequantize_4bit` dispatches
here; every value is bit-identical to ``bitsandbytes.functional.dequantize_4bit``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .dispatch import interpreting
from .nf4 import BLOCKSIZES, Quant4bit, check_out


@triton.jit
def mul_rn(a, b, PTX_MUL_RN: tl.constexpr):
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
def to_bf16_rtne(x):
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


# Tile decode shared by the kernels that read the packed weight inside their K loop (experimental.qmatmul's GEMM
# and lora_triton.py's decode GEMV): scales in bitsandbytes' order of operations, codes through a register LUT.


@triton.jit
def block_scales(p_absmax, p_code2, p_absmax2, p_offset, o_blk, m_blk,
                  BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, PTX_MUL_RN: tl.constexpr):
    """fp32 scales of the absmax blocks ``o_blk``, in bitsandbytes' order of operations."""
    if NESTED:
        b_a8 = tl.load(p_absmax + o_blk, mask=m_blk, other=0).to(tl.int32)
        b_a2 = tl.load(p_absmax2 + o_blk // BLOCKSIZE2, mask=m_blk, other=0.0)
        # bitsandbytes: dequantize_blockwise (fp32 product), then `absmax += offset` as its own op; the
        # product is rounded before the offset is added (see mul_rn): an FMA would flip bits.
        b_scale = mul_rn(tl.load(p_code2 + b_a8), b_a2, PTX_MUL_RN) + tl.load(p_offset)
    else:
        b_scale = tl.load(p_absmax + o_blk, mask=m_blk, other=0.0)
    return b_scale


@triton.jit
def decode_4bit_tile(p_q, p_absmax, b_lut, p_code2, p_absmax2, p_offset, o_row, m_row, c0, W_COLS,
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
        b_scale = block_scales(p_absmax, p_code2, p_absmax2, p_offset, o_row[:, None] * blocks_per_row + o_g[None, :],
                                m_row[:, None] & (o_g < blocks_per_row)[None, :], BLOCKSIZE2, NESTED,
                                PTX_MUL_RN)  # [ROWS, GROUPS]
        # Each block's scale repeated over its BLOCKSIZE columns (GROUPS * BLOCKSIZE == COLS).
        b_scale = tl.reshape(tl.broadcast_to(b_scale[:, :, None], [ROWS, GROUPS, BLOCKSIZE]), [ROWS, COLS])
        b_w = b_val * b_scale
    else:
        b_scale = block_scales(p_absmax, p_code2, p_absmax2, p_offset, o_row * blocks_per_row + c0 // BLOCKSIZE,
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
    SOFT_BF16: tl.constexpr,  # interpreter with bf16 output: round in integer ops (see to_bf16_rtne)
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

    b_scale = block_scales(p_absmax, p_code2, p_absmax2, p_offset, o_q, m_q, BLOCKSIZE2, NESTED, PTX_MUL_RN)  # [S]

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
        b_res = to_bf16_rtne(b_out)
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


def ptx_mul_rn(device: torch.device) -> bool:
    """Whether the nested scale's product uses the PTX ``mul.rn.f32`` (see :func:`mul_rn`): NVIDIA
    GPUs only; a function of its own so that the path can be compiled ahead of time without a GPU."""
    return device.type == "cuda" and torch.version.hip is None and not interpreting()


def triton_dequantize(q: Quant4bit, dtype: torch.dtype, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
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
        check_out(q, out, dtype)
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
        PTX_MUL_RN=ptx_mul_rn(q.device),
        INT64=grid[0] * per_program * q.blocksize >= 2**31,
        SOFT_BF16=dtype == torch.bfloat16 and interpreting(),
        num_warps=8 if per_program * q.blocksize >= 4096 else 4,
        # Keep the nested scale's multiply and add separate on targets without the PTX path.
        enable_fp_fusion=False,
    )
    return out.view(q.shape)
