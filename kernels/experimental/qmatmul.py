"""Experimental: the LoRA GEMM on a bitsandbytes 4-bit base with the weight decoded inside the K loop.

It lives under ``experimental/`` because no default path runs it and no benchmark has chosen it yet:
``lora_triton`` calls it only when ``PEFTFAST_QLORA_GEMM=inloop`` or a tuned table entry says
``"inloop"``. Move it back beside ``matmul.py`` once a GPU measurement picks it for some shape bucket.

:func:`matmul_lowrank_4bit` computes what ``matmul.matmul_lowrank`` computes on a dequantized weight:

* ``layout="nk"`` (forward):  ``Y = X @ W^T + keep * (scale * L @ R) / (1 - p) + bias``
* ``layout="kn"`` (dX GEMM):  ``Y = X @ W   + ...``  (``dX = dY @ W + keep * (g @ A) / (1 - p)``)

but reads ``W`` [N_w, K_w] as its packed 4-bit codes, never writing a dense copy. It is the *in-loop*
variant of a QLoRA GEMM at training / prefill sizes; the other variant (``"dequant"``) dequantizes
into a temporary in one launch and runs ``matmul_lowrank`` on it. Which one runs is chosen per shape
bucket by :func:`qlora_gemm_variant` (see "Choosing the variant" below).

How the K loop decodes. bitsandbytes flattens ``W`` row-major and cuts it into blocks of ``blocksize``
consecutive values (two codes per byte, element 2i in the high nibble), so the blocks run along
``W``'s rows, i.e. along ``K_w``. Every tile the kernel needs is a [rows of W, columns of W] tile:

* forward: rows = the BLOCK_N output columns, columns = the BLOCK_K slice of the reduction; the decoded
  [BN, BK] tile is transposed to the dot's [BK, BN] right operand;
* dX: rows = the BLOCK_K slice of the reduction (W's rows, i.e. its out features), columns = the
  BLOCK_N output columns; the decoded [BK, BN] tile is the right operand as is.

A tile loads [rows, cols/2] bytes (contiguous along the row), splits each byte into its two nibbles
and interleaves them back into element order, looks the 16-entry ``code`` table up (fp32), and
multiplies by the block scale: one scale per row when the tile's columns fit in one block, else
``cols / blocksize`` scales per row broadcast over their blocks. The scale is bitsandbytes' own
arithmetic (nested: ``code2[absmax_u8] * absmax2[block // blocksize2]`` rounded on its own, then
``+ offset``), and the fp32 product is rounded once to the compute dtype: the decoded tile holds
exactly the values ``dequantize_4bit`` writes, so the two variants differ only in accumulation order.
That needs rows that start on a block boundary: ``K_w % blocksize == 0`` (:func:`inloop_supported`);
other weights always take the dequant variant.

Epilogue, dropout and dtypes are ``matmul_lowrank``'s exactly (LoRA term in x's dtype with fp32
accumulation, the keep mask of an [M, N] input regenerated from the seed, bias added last).

Choosing the variant (:func:`qlora_gemm_variant`, called by ``lora_triton.py`` for a 4-bit base at
M > ``DECODE_MAX_M``, forward and the backward's dX GEMM):

1. ``PEFTFAST_QLORA_GEMM=inloop|dequant`` forces one (for benchmarking); ``auto`` or unset goes on;
2. a tuned table entry ``lora_matmul_4bit|M|N|K|dtype|<format>`` with ``"variant"`` (``peftfast tune
   --weight nf4`` writes it);
3. otherwise ``"dequant"``: on Hopper, dequant + a tuned GEMM has historically won, so nothing changes
   until a measurement says so.

An in-loop launch on CUDA takes its config from the table entry (when its variant is ``inloop``), else
a pruned ``triton.autotune`` search over ``configs/lora_matmul_4bit.json`` whose winner Triton's disk
cache keeps, as ``matmul_lowrank`` does; both choices are made once per signature (:mod:`..plans`). The
interpreter runs one fixed config. The variant override is read once per process, with the rest of
the environment (:func:`..dispatch.settings`).
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import launch
from .. import plans as _plans
from .. import tuning as _tuning
from ..dispatch import interpreting, settings
from ..nf4 import Quant4bit
from ..nf4_triton import block_scales, decode_4bit_tile, mul_rn, to_bf16_rtne
from ..tiles import dot, dropout_keep, gemm_tile, grouped_tile, lowrank_epilogue, lowrank_tile

_CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "lora_matmul_4bit.json")

ENV_VARIANT = "PEFTFAST_QLORA_GEMM"
VARIANTS = ("inloop", "dequant")
DEFAULT_VARIANT = "dequant"
LAYOUTS = ("nk", "kn")


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _matmul_lowrank_4bit_kernel(
    p_x, p_q, p_absmax, p_code, p_code2, p_absmax2, p_offset, p_l, p_r, p_bias, p_seed, p_y,
    M, N, K, R, M_KEY, W_COLS,
    stride_xm, stride_xk, stride_lm, stride_lr, stride_rr, stride_rn, stride_ym, stride_yn,
    scale, dropout_p,
    W_NK: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    PTX_MUL_RN: tl.constexpr, SOFT_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y[M, N] = X[M, K] @ dequant(W)^T-or-W [K, N] + keep * (scale * L @ R) / (1 - p) + bias.

    ``W_NK``: W is [N, K] (forward, ``X @ W^T``), else [K, N] (dX, ``X @ W``); ``W_COLS`` is W's row
    length either way. ``M_KEY`` is only an autotuning key (M rounded up to a power of two).
    """
    i_m, i_n, o_m, o_n, m_m, m_n, o_m64 = gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # int64 W row offsets: W's rows * bytes per row overflow int32 for large layers.
    o_n64 = o_n.to(tl.int64)
    dtype = p_y.dtype.element_ty

    o_k = tl.arange(0, BLOCK_K)
    p_xb = p_x + o_m64[:, None] * stride_xm + o_k[None, :] * stride_xk
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    b_code = tl.load(p_code + tl.arange(0, 16))  # [16] fp32
    if W_NK:
        b_lut = tl.broadcast_to(b_code[:, None], [16, BLOCK_K])
    else:
        b_lut = tl.broadcast_to(b_code[:, None], [16, BLOCK_N])
    for k0 in range(0, K, BLOCK_K):
        m_k = (k0 + o_k) < K
        b_x = tl.load(p_xb, mask=m_m[:, None] & m_k[None, :], other=0.0)
        if W_NK:
            # W's rows are the output columns; its blocks run along this K slice.
            b_w32 = decode_4bit_tile(p_q, p_absmax, b_lut, p_code2, p_absmax2, p_offset, o_n64, m_n, k0, W_COLS,
                                      BLOCK_N, BLOCK_K, BLOCKSIZE, BLOCKSIZE2, NESTED, PTX_MUL_RN)  # [BN, BK]
        else:
            # W's rows are this K slice; its blocks run along the output columns.
            b_w32 = decode_4bit_tile(p_q, p_absmax, b_lut, p_code2, p_absmax2, p_offset, (k0 + o_k).to(tl.int64),
                                      m_k, i_n * BLOCK_N, W_COLS,
                                      BLOCK_K, BLOCK_N, BLOCKSIZE, BLOCKSIZE2, NESTED, PTX_MUL_RN)  # [BK, BN]
        # One rounding of the fp32 product to the compute dtype, as dequantize_4bit does.
        if SOFT_BF16:
            b_w = to_bf16_rtne(b_w32)
        else:
            b_w = b_w32.to(dtype)
        if W_NK:
            b_w = tl.trans(b_w)  # [BN, BK] -> [BK, BN]
        b_acc = dot(b_x, b_w, b_acc, DOT_F32, IEEE)  # [BM, BK] @ [BK, BN] -> [BM, BN]
        p_xb += BLOCK_K * stride_xk

    # Low-rank epilogue, as matmul._matmul_lowrank_kernel's: Y is written once.
    lowrank_epilogue(b_acc, p_l, p_r, p_bias, p_seed, p_y, o_m, o_m64, o_n, m_m, m_n, N, R,
                     stride_lm, stride_lr, stride_rr, stride_rn, stride_ym, stride_yn, scale, dropout_p,
                     dtype, HAS_BIAS, DROPOUT, DOT_F32, IEEE, BLOCK_M, BLOCK_N, BLOCK_R)


# --------------------------------------------------------------------------------------------------
# Configs, shared memory, autotuning (CUDA only)
# --------------------------------------------------------------------------------------------------

# The interpreter runs matmul_lowrank's fixed blocks, so both variants accumulate in the same order there.
_INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}


@functools.lru_cache(maxsize=None)
def _config_table() -> Dict[str, List[dict]]:
    with open(_CONFIG_FILE) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def smem_bytes(cfg: dict, num_stages: int, elem: int, block_r: int, *, blocksize: int, nested: bool,
               w_nk: bool = True) -> int:
    """An upper bound on the shared memory one program of the in-loop kernel uses, in bytes.

    Per pipeline stage: the X tile (``BM x BK`` at ``elem`` bytes) and the packed weight tile, half a
    byte per value, plus its block scales (uint8 + an fp32 second-level scale when nested, else fp32).
    Once: the decoded ``BK x BN`` tile, staged in the compute dtype as the MMA's operand, and a
    layout-conversion buffer of the same size (nibble interleave, transpose, LUT gather). The code table
    itself lives in registers. The epilogue's L and R tiles (counted per stage although
    matmul._lowrank_tile does not pipeline them: a margin for fp32 adapters, unmeasured) and the output
    tile's conversion for the store reuse the main loop's space (``max``). Checked against the compiler's figure for
    every shipped config by tests/kernels/aot_qmatmul_cases.py.
    """
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    cols = bk if w_nk else bn
    rows = bn if w_nk else bk
    groups = max(1, cols // blocksize)
    scale_bytes = rows * groups * (5 if nested else 4)
    per_stage = bm * bk * elem + bk * bn // 2 + scale_bytes
    decoded = 2 * bk * bn * elem
    main = num_stages * per_stage + decoded
    epilogue = num_stages * (bm * block_r + block_r * bn) * elem
    store = bm * bn * elem
    return max(main, epilogue, store)


def _make_pruner(max_smem: int):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        m = int(args["M"])
        elem = args["p_y"].element_size()
        block_r = int(args["BLOCK_R"])
        bs, nested, w_nk = int(args["BLOCKSIZE"]), bool(args["NESTED"]), bool(args["W_NK"])

        def need(c):
            return smem_bytes(c.kwargs, c.num_stages, elem, block_r, blocksize=bs, nested=nested, w_nk=w_nk)

        fits = [c for c in configs if need(c) <= max_smem]
        fits = fits or [min(configs, key=need)]
        return launch.keep_rows_fitting(fits, m)

    return prune


def _triton_configs(family: str) -> list:
    return launch.as_triton_configs(_config_table()[family])


def candidates(m: int, elem: int, block_r: int, *, family: str, max_smem: int, blocksize: int, nested: bool,
               layout: str) -> List[dict]:
    """The family's in-loop configs that the launch-time pruner keeps for this call, as plain dicts.

    Args:
        m: GEMM rows. elem: compute dtype's element size. block_r: the launch's ``BLOCK_R``.
        family: ``sm80`` / ``sm89`` / ``sm90``. max_smem: shared memory per block, in bytes.
        blocksize, nested: the weight's quantization. layout: ``"nk"`` (forward) or ``"kn"`` (dX).

    Returns:
        Config dicts (``tuning.CONFIG_FIELDS``) in the JSON list's order.
    """
    probe = torch.empty(0, dtype={2: torch.bfloat16, 4: torch.float32}.get(elem, torch.bfloat16))
    args = {"M": m, "p_y": probe, "BLOCK_R": block_r, "BLOCKSIZE": blocksize, "NESTED": nested,
            "W_NK": layout == "nk"}
    return [_tuning.config_to_dict(c) for c in _make_pruner(max_smem)(_triton_configs(family), args)]


@functools.lru_cache(maxsize=None)
def _tuned_kernel(device_index: int):
    """The autotuned in-loop kernel for one CUDA device, built on first use (never at import)."""
    return triton.autotune(
        configs=_triton_configs(launch.device_family(device_index)),
        # The layout, blocksize and nesting change the decode work per tile: tune them apart.
        key=["M_KEY", "N", "K", "R", "W_NK", "BLOCKSIZE", "NESTED"],
        prune_configs_by={"early_config_prune": _tuning.limited_pruner(
            _make_pruner(launch.max_shared_memory(device_index)))},
        **launch.autotune_options(),
    )(_matmul_lowrank_4bit_kernel)


@functools.lru_cache(maxsize=None)
def _kernel_hash() -> str:
    """Source hash of the in-loop kernel and every helper it calls, recorded beside its table entries."""
    return _tuning.source_hash(_matmul_lowrank_4bit_kernel, decode_4bit_tile, block_scales, mul_rn,
                               to_bf16_rtne, dot, dropout_keep, gemm_tile, grouped_tile, lowrank_epilogue,
                               lowrank_tile)


def _gpu_name(device: torch.device) -> Optional[str]:
    """The GPU name whose tables apply to ``device``; None off CUDA (no tuned data applies)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return launch.device_info(index)[0]


def select_inloop_config(m: int, n: int, k: int, dtype, weight: str, *, gpu_name: str, max_smem: int, elem: int,
                         block_r: int, blocksize: int, nested: bool, layout: str) -> Optional[Tuple[dict, str]]:
    """The config a CUDA launch of the in-loop kernel uses without searching, and its source.

    Args:
        m, n, k: the GEMM's shape (M is bucketed). dtype: compute dtype.
        weight: :func:`tuning.weight_format_4bit` of the operand.
        gpu_name, max_smem: the device's name and shared memory per block.
        elem, block_r, blocksize, nested, layout: what the shared-memory estimate depends on.

    Returns:
        ``(config, "table")`` or None (search). An entry whose ``variant`` is ``"dequant"``
        holds the dense GEMM's config, not this kernel's, and is passed over, as is one that would not
        fit in shared memory at this call's rank.
    """
    key = _tuning.shape_key(_tuning.OP_LORA_MATMUL_4BIT, m, n, k, dtype, weight)

    def fits(cfg: dict) -> bool:
        return smem_bytes(cfg, cfg["num_stages"], elem, block_r, blocksize=blocksize, nested=nested,
                          w_nk=layout == "nk") <= max_smem

    return _tuning.select_config(key, gpu_name=gpu_name, fits=fits, variant="inloop")


def _launch_config(args: tuple, flags: dict, m: int, n: int, cfg: dict) -> None:
    """Launch the in-loop kernel with one explicit config (a table hit, or a candidate being timed)."""
    grid = (_plans.cdiv(m, cfg["BLOCK_M"]) * _plans.cdiv(n, cfg["BLOCK_N"]),)
    _matmul_lowrank_4bit_kernel[grid](
        *args, **flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _launch_cuda(args: tuple, flags: dict, m: int, n: int, k: int, dtype, weight: str, y: torch.Tensor) -> None:
    device_index = y.device.index if y.device.index is not None else torch.cuda.current_device()
    plan_key = ("matmul_lowrank_4bit", device_index, m, n, k, dtype, weight, flags["BLOCK_R"])
    plan = _plans.PLANS.get(plan_key)
    if plan is None:
        gpu_name, max_smem = launch.device_info(device_index)
        hit = select_inloop_config(m, n, k, dtype, weight, gpu_name=gpu_name, max_smem=max_smem,
                                   elem=y.element_size(), block_r=flags["BLOCK_R"], blocksize=flags["BLOCKSIZE"],
                                   nested=flags["NESTED"], layout="nk" if flags["W_NK"] else "kn")
        # The table's config, else Triton's search (its winner kept by Triton's own disk cache).
        plan = _plans.PLANS[plan_key] = hit[0] if hit is not None else None
    if plan is not None:
        _launch_config(args, flags, m, n, plan)
        return
    grid = lambda meta: (_plans.cdiv(m, meta["BLOCK_M"]) * _plans.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _tuned_kernel(device_index)[grid](*args, **flags)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def inloop_supported(meta: Sequence[int]) -> Tuple[bool, str]:
    """Whether the in-loop kernel can decode this weight: ``(True, "")`` or ``(False, why)``.

    Args:
        meta: ``[blocksize, blocksize2, N_w, K_w]`` as ``weights.quant_args`` gives it.
    """
    if not meta or len(meta) != 4:
        return False, "not a 4-bit weight"
    blocksize, _, _, k_w = (int(v) for v in meta)
    if blocksize < 2 or blocksize & (blocksize - 1):
        return False, f"blocksize {blocksize} is not a power of two"
    if k_w % blocksize:
        # Blocks (and, for odd K, bytes) would straddle rows: a tile's scales could not be broadcast per row.
        return False, (f"in_features {k_w} is not a multiple of the blocksize {blocksize}, so 4-bit blocks "
                       f"straddle the weight's rows")
    return True, ""


def weight_format(meta: Sequence[int], quant_type: str, nested: bool, layout: str) -> str:
    """The table's weight-format field of this operand (:func:`tuning.weight_format_4bit`)."""
    return _tuning.weight_format_4bit(quant_type, int(meta[0]), nested, layout)


def _launch_args(x, packed, absmax, code, code2, absmax2, offset, meta, left, right, scale, bias, dropout_p, seed,
                 y, layout) -> Tuple[tuple, dict]:
    """The kernel's positional arguments and constexpr flags for one call into ``y``."""
    blocksize, blocksize2, _, k_w = (int(v) for v in meta)
    m, r = left.shape
    n = right.shape[1]
    k = x.shape[1]
    nested = code2 is not None
    dtype = y.dtype
    args = (
        x, packed, absmax, code, code2 if nested else code, absmax2 if nested else code,
        offset if nested else code, left, right, bias if bias is not None else y,
        seed if dropout_p > 0 else y, y,
        m, n, k, r, _plans.next_power_of_2(m), k_w,
        x.stride(0), x.stride(1), left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        y.stride(0), y.stride(1),
        float(scale), float(dropout_p),
    )
    on_nvidia = y.device.type == "cuda" and torch.version.hip is None and not interpreting()
    flags = dict(W_NK=layout == "nk", BLOCKSIZE=blocksize, BLOCKSIZE2=int(blocksize2) if nested else 256,
                 NESTED=nested, HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0, PTX_MUL_RN=on_nvidia,
                 SOFT_BF16=dtype == torch.bfloat16 and interpreting(), BLOCK_R=launch.block_r(r), **launch.dot_flags(dtype))
    return args, flags


def _prepare_quant(packed, absmax, code, code2, absmax2, offset, device):
    """Flat uint8 codes and fp32 tables as the kernel reads them (views where they already are)."""
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    code = code.to(device=device, dtype=torch.float32)
    if code2 is not None:
        if absmax.dtype != torch.uint8:
            raise ValueError(f"nested absmax must be uint8 code2 indices, got {absmax.dtype}")
        code2 = code2.to(device=device, dtype=torch.float32)
        absmax2 = absmax2.reshape(-1).to(dtype=torch.float32)
        offset = (offset if torch.is_tensor(offset) else torch.tensor(float(offset))).to(
            device=device, dtype=torch.float32).reshape(1)
    else:
        absmax = absmax.to(torch.float32)
    return packed.contiguous(), absmax.reshape(-1).contiguous(), code.contiguous(), code2, absmax2, offset


def matmul_lowrank_4bit(
    x: torch.Tensor,
    weight: Quant4bit,
    left: torch.Tensor,
    right: torch.Tensor,
    scale: float,
    *,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    layout: str = "nk",
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``x @ op(W) + keep * (scale * left @ right) / (1 - p) + bias`` with W decoded from 4 bits in the K loop.

    Args:
        x: [M, K], any strides, fp32/fp16/bf16.
        weight: the 4-bit weight W [N_w, K_w] as one :class:`~peftfast.kernels.nf4.Quant4bit` (its
            ``meta = [blocksize, blocksize2, N_w, K_w]``). ``K_w`` must be a multiple of the blocksize
            (:func:`inloop_supported`).
        left: [M, R]. right: [R, N]; any strides and float dtype.
        scale: multiplies the low-rank product.
        bias: optional [N].
        dropout_p, seed: as ``matmul_lowrank``: the low-rank term is masked with the dropout mask of an
            [M, N] input regenerated from ``seed`` (dX's LoRA part) and divided by ``1 - p``.
        layout: ``"nk"``: ``op(W) = W^T`` (forward; K = K_w, N = N_w); ``"kn"``: ``op(W) = W`` (the dX
            GEMM ``dY @ W``; K = N_w, N = K_w).
        out_dtype: output and compute dtype (W is decoded to it); defaults to x's.

    Returns:
        [M, N] contiguous tensor in ``out_dtype``.

    Raises:
        ValueError: on mismatched shapes, an unknown layout, or a weight the kernel cannot decode.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    packed, absmax, code, code2, absmax2, offset = (weight.packed, weight.absmax, weight.code, weight.code2,
                                                    weight.absmax2, weight.offset)
    meta, quant_type = weight.meta, weight.quant_type
    ok, why = inloop_supported(meta)
    if not ok:
        raise ValueError(f"matmul_lowrank_4bit cannot decode this weight in its K loop: {why}; "
                         f"use the dequant variant (dequantize_4bit + matmul_lowrank)")
    _, _, n_w, k_w = (int(v) for v in meta)
    m, r = left.shape
    n = right.shape[1]
    k_want, n_want = (k_w, n_w) if layout == "nk" else (n_w, k_w)
    if x.dim() != 2 or x.shape[0] != m or x.shape[1] != k_want or n != n_want or right.shape[0] != r:
        raise ValueError(f"layout {layout!r} with W [{n_w}, {k_w}] needs x [M, {k_want}], left [M, R], right "
                         f"[R, {n_want}]; got x {tuple(x.shape)}, left {tuple(left.shape)}, right {tuple(right.shape)}")
    if dropout_p > 0 and seed is None:
        raise ValueError("dropout_p > 0 needs a seed tensor")
    dtype = out_dtype or x.dtype
    y = torch.empty((m, n), device=x.device, dtype=dtype)
    if m == 0 or n == 0:
        return y
    packed, absmax, code, code2, absmax2, offset = _prepare_quant(packed, absmax, code, code2, absmax2, offset,
                                                                   x.device)
    args, flags = _launch_args(x, packed, absmax, code, code2, absmax2, offset, meta, left, right, scale, bias,
                               dropout_p, seed, y, layout)
    k = x.shape[1]
    if y.device.type == "cuda":
        _launch_cuda(args, flags, m, n, k, dtype, weight_format(meta, quant_type, code2 is not None, layout), y)
    else:
        cfg = _INTERPRET_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _matmul_lowrank_4bit_kernel[grid](*args, **flags, **cfg)
    return y


# --------------------------------------------------------------------------------------------------
# Choosing the variant
# --------------------------------------------------------------------------------------------------


def variant_override() -> Optional[str]:
    """``PEFTFAST_QLORA_GEMM``: ``"inloop"`` / ``"dequant"``, or None for ``auto`` / unset.

    Raises:
        ValueError: on any other value (a typo must not silently benchmark the wrong variant).
    """
    env = settings().qlora_gemm
    if env in ("", "auto"):
        return None
    if env not in VARIANTS:
        raise ValueError(f"{ENV_VARIANT} must be one of inloop, dequant, auto; got {env!r}")
    return env


def select_variant(m: int, n: int, k: int, dtype, weight: str, *, gpu_name: Optional[str]) -> Tuple[str, str]:
    """Which QLoRA GEMM variant runs for this shape bucket, and why.

    Args:
        m, n, k: the GEMM's shape. dtype: compute dtype.
        weight: :func:`tuning.weight_format_4bit` of the operand (layout included).
        gpu_name: the CUDA device's name, or None off CUDA (then only the override and the default apply).

    Returns:
        ``(variant, source)``: source is ``"env"``, ``"table"`` or ``"default"``.
        Does not check :func:`inloop_supported` (see :func:`qlora_gemm_variant`).
    """
    forced = variant_override()
    if forced is not None:
        return forced, "env"
    if gpu_name is None:
        return DEFAULT_VARIANT, "default"
    key = _tuning.shape_key(_tuning.OP_LORA_MATMUL_4BIT, m, n, k, dtype, weight)
    if _tuning.table_enabled():
        v = _tuning.lookup_table_variant(_tuning.gpu_slug(gpu_name), key)
        if v is not None:
            return v, "table"
    return DEFAULT_VARIANT, "default"


_WARNED: set = set()


def qlora_gemm_variant(m: int, n: int, k: int, dtype, meta: Sequence[int], quant_type: str, nested: bool,
                       layout: str, device: torch.device) -> str:
    """``"inloop"`` or ``"dequant"`` for one 4-bit GEMM of a LoRA linear (the choice ``lora_triton.py`` makes).

    Args:
        m, n, k: the GEMM's shape (forward: N = out, K = in; dX: N = in, K = out).
        dtype: compute dtype. meta, quant_type, nested: the weight (see :func:`matmul_lowrank_4bit`).
        layout: ``"nk"`` (forward) or ``"kn"`` (dX). device: where it runs.

    Returns:
        The variant. A weight the in-loop kernel cannot decode always gets ``"dequant"`` (with one warning
        when ``PEFTFAST_QLORA_GEMM=inloop`` asked for it).
    """
    forced = variant_override()
    ok, why = inloop_supported(meta)
    if forced is not None:
        if forced == "inloop" and not ok:
            if why not in _WARNED:
                _WARNED.add(why)
                warnings.warn(f"{ENV_VARIANT}=inloop: {why}; this weight uses the dequant variant",
                              RuntimeWarning, stacklevel=2)
            return "dequant"
        return forced
    if not ok:
        return "dequant"
    weight = weight_format(meta, quant_type, nested, layout)
    gpu_name = _gpu_name(device)
    if gpu_name is None:
        return select_variant(m, n, k, dtype, weight, gpu_name=None)[0]
    plan_key = ("qlora_gemm_variant", gpu_name, device.index, m, n, k, dtype, weight)
    hit = _plans.PLANS.get(plan_key)
    if hit is None:
        hit = _plans.PLANS[plan_key] = select_variant(m, n, k, dtype, weight, gpu_name=gpu_name)
    return hit[0]
