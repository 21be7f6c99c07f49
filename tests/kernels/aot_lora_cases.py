"""Compile the LoRA / QLoRA Triton kernels for sm80, sm89 and sm90 on a machine without a GPU.

    python tests/kernels/aot_lora_cases.py [--all] [--arch sm90 ...] [--jobs N]

Prints one JSON list of records on its last stdout line (progress goes to stderr), one per launch:
``kernel, arch, case, config, shared, limit, estimate, admitted, fits, ok, error``. ``ok`` is "compiled";
``admitted`` says whether the launch path can pick this config on that GPU (for the GEMM: it survives
``matmul._make_pruner`` at that GPU's shared-memory limit; everything else has one config per call);
``estimate`` is the pruner's ``matmul._smem_bytes`` (GEMM only), which must bound ``shared`` for every
admitted config. tests/kernels/test_aot_lora.py asserts all of that on the default subset.

What is compiled (from the launchers' own argument builders, on ``meta`` tensors: nothing is read):

* ``_matmul_lowrank_kernel`` via ``matmul._launch_args`` + ``matmul._launch_config`` (the CUDA path's
  own functions) with every config of the GPU family's list in ``configs/lora_matmul.json``: dtypes,
  ranks (``BLOCK_R`` 16/64 and the chunked rank 128), both weight layouts (``W.t()`` in the forward,
  ``W`` in dX), fp32 base weights and fp32 adapters on a half-precision x, bias, dropout, no base.
* ``_lowrank_project_kernel`` / ``_lowrank_wgrad_kernel`` through ``lowrank_project`` /
  ``lowrank_wgrad`` with their GPU block choice (``_project_blocks`` / ``_wgrad_blocks``).
* ``_decode_lora_4bit_kernel`` through ``lora_triton._decode_lora_4bit`` (NF4/FP4, nested or not, blocksizes,
  M = 1..64, one split and split-K).
* ``_dequantize_4bit_kernel`` through ``nf4_triton.triton_dequantize`` with the NVIDIA ``mul.rn`` inline-PTX
  path on (``nf4_triton.ptx_mul_rn``), every output dtype and blocksize, int32 and int64 offsets; and the
  4-bit LoRA forward/backward for M > 64 as the op runs it: project, dequantize, GEMM, wgrad.

The default (no ``--all``) is a subset that compiles in about a minute on two cores: per arch, the
admitted GEMM config with the largest shared-memory estimate for three dtype/layout combinations, and
the largest-footprint case of each other kernel; plus one 4-bit LoRA path on sm89, the GPU with the
least shared memory. ``--all`` compiles the full sweep (about 1,400 launches).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("aot_lora_cases.py compiles for real GPUs: run it with TRITON_INTERPRET unset")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402

from aot import SMEM_LIMIT, CompileFailed, compile_instead_of_launch  # noqa: E402
from peftfast.kernels import matmul as mm, nf4  # noqa: E402
# `launch` as kl: the case builders name their launch closures `launch`
from peftfast.kernels import launch as kl, lora_triton, nf4_triton, weights  # noqa: E402

ARCHS = ("sm80", "sm89", "sm90")
META = torch.device("meta")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
_NAMES = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}


def _empty(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device=META)


@dataclasses.dataclass
class Case:
    kernel: str                      # the kernel the case is about (a path case launches several)
    arch: str
    desc: str
    launch: Callable[[], None]       # runs the launcher(s); inside compile_instead_of_launch nothing runs
    config: Optional[dict] = None    # GEMM: the table entry
    estimate: Optional[int] = None   # GEMM: matmul._smem_bytes for this call
    admitted: bool = True
    # Path cases: the estimate of each GEMM they launch, in launch order.
    gemm_estimates: List[int] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def _as_gpu():
    """The launchers' GPU-only choices, taken on meta tensors: GPU block sizes and the PTX path."""
    saved = mm._project_blocks, mm._wgrad_blocks, nf4_triton.ptx_mul_rn
    mm._project_blocks = lambda m, elem, on_gpu: saved[0](m, elem, True)
    mm._wgrad_blocks = lambda elem, on_gpu: saved[1](elem, True)
    nf4_triton.ptx_mul_rn = lambda device: True
    try:
        yield
    finally:
        mm._project_blocks, mm._wgrad_blocks, nf4_triton.ptx_mul_rn = saved


# --------------------------------------------------------------------------------------------------
# _matmul_lowrank_kernel
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GemmVariant:
    xdt: torch.dtype                  # x (and output, and L) dtype
    wdt: Optional[torch.dtype]        # base weight dtype; None: no base (the LoRA term alone)
    adt: torch.dtype                  # adapter (R operand) dtype
    layout: str = "nk"                # "nk": Wt = W.t() (forward); "kn": Wt = W (dX = dY @ W)
    rank: int = 16
    bias: bool = False
    dropout: bool = False
    shape: tuple = (512, 4096, 4096)  # M, N, K

    @property
    def desc(self) -> str:
        w = f"W {_NAMES[self.wdt]} {self.layout}" if self.wdt is not None else "no base"
        extra = "".join([" +bias" if self.bias else "", " +dropout" if self.dropout else ""])
        m, n, k = self.shape
        return f"x {_NAMES[self.xdt]}, {w}, adapters {_NAMES[self.adt]}, r={self.rank}{extra}, MNK={m}x{n}x{k}"


def _gemm_call(v: GemmVariant):
    """(args, flags, m, n) of one ``matmul_lowrank`` call, built by the launcher's own code."""
    m, n, k = v.shape
    x = _empty(m, k, dtype=v.xdt)
    if v.wdt is None:
        wt = None
    elif v.layout == "nk":
        wt = _empty(n, k, dtype=v.wdt).t()
    else:
        wt = _empty(k, n, dtype=v.wdt)
    left = _empty(m, v.rank, dtype=v.xdt)
    # Forward: lora_B.t() ([r, N] view of [N, r]); dX: lora_A ([r, K] with K as this GEMM's N).
    right = _empty(n, v.rank, dtype=v.adt).t() if v.layout == "nk" else _empty(v.rank, n, dtype=v.adt)
    bias = _empty(n, dtype=v.xdt) if v.bias else None
    seed = _empty(1, dtype=torch.int64) if v.dropout else None
    y = _empty(m, n, dtype=v.xdt)
    args, flags = mm._launch_args(x if wt is not None else None, wt, left, right, 1.5, bias,
                                  0.1 if v.dropout else 0.0, seed, y)
    return args, flags, m, n


def _estimate(cfg: dict, args: tuple, flags: dict) -> int:
    """The pruner's shared-memory figure for ``cfg`` at this call: matmul._smem_bytes at the launch's
    staged widths (matmul._staged_widths)."""
    elem, lr_elem = kl.staged_widths(dict(zip(mm._matmul_lowrank_kernel.arg_names, args)))
    return kl.gemm_smem_bytes(cfg, cfg["num_stages"], elem, flags["BLOCK_R"], lr_elem)


def _table_configs(arch: str) -> List[triton.Config]:
    return [triton.Config({k: e[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")},
                          num_warps=e["num_warps"], num_stages=e["num_stages"]) for e in kl.gemm_config_table()[arch]]


def _admitted(arch: str, args: tuple, flags: dict) -> List[int]:
    """Indices of the family's configs that the autotuner's pruner keeps for some M at this GPU's limit."""
    configs = _table_configs(arch)
    named = dict(zip(mm._matmul_lowrank_kernel.arg_names, args), **flags)
    prune = kl.make_gemm_pruner(SMEM_LIMIT[arch])
    keep = set()
    for m in (1, 16, 32, 64, 128, 256, 1 << 20):
        keep |= {id(c) for c in prune(configs, {**named, "M": m})}
    return [i for i, c in enumerate(configs) if id(c) in keep]


def _gemm_cases(arch: str, v: GemmVariant, which: Optional[List[int]] = None) -> List[Case]:
    args, flags, m, n = _gemm_call(v)
    admitted = set(_admitted(arch, args, flags))
    out = []
    for i, cfg in enumerate(kl.gemm_config_table()[arch]):
        if which is not None and i not in which:
            continue
        out.append(Case(
            kernel="_matmul_lowrank_kernel", arch=arch, desc=v.desc, config=dict(cfg),
            estimate=_estimate(cfg, args, flags), admitted=i in admitted,
            launch=lambda cfg=cfg: mm._launch_config(args, flags, m, n, cfg),
        ))
    return out


def _gemm_variants(full: bool) -> List[GemmVariant]:
    """The calls every config is compiled for. Shared memory depends on the staged element widths (x,
    W, adapters), ``BLOCK_R`` (16 for r <= 16, else 64: r = 128 loops twice over the same code), the
    weight layout and whether there is a base GEMM; bias and dropout only add epilogue registers."""
    if not full:
        return [GemmVariant(BF16, BF16, BF16, "nk", 64), GemmVariant(FP32, FP32, FP32, "nk", 64)]
    vs = []
    for layout in ("nk", "kn"):
        for xdt, wdt, adt in ((BF16, BF16, BF16), (FP32, FP32, FP32), (BF16, FP32, BF16), (BF16, BF16, FP32)):
            for rank in (16, 64):
                vs.append(GemmVariant(xdt, wdt, adt, layout, rank))
    vs += [
        GemmVariant(BF16, BF16, BF16, "nk", 128, bias=True),    # forward
        GemmVariant(BF16, BF16, BF16, "kn", 128, dropout=True),  # dX
        GemmVariant(FP32, FP32, FP32, "nk", 16, bias=True, dropout=True),
        GemmVariant(FP16, FP16, FP16, "nk", 64),
        GemmVariant(FP16, FP32, FP32, "kn", 64, dropout=True),
        GemmVariant(BF16, BF16, BF16, "nk", 8),                  # R not a multiple of 16
        # Odd sizes: no 16-divisible strides, so no wide vector loads.
        GemmVariant(BF16, BF16, BF16, "kn", 16, shape=(77, 1000, 1030)),
        # No base: the LoRA term alone.
        GemmVariant(BF16, None, BF16, "nk", 64, bias=True),
        GemmVariant(FP32, None, FP32, "nk", 64),
        GemmVariant(BF16, None, FP32, "nk", 16),
    ]
    return vs


# One more GEMM call per arch in the subset: fp32 adapters on a bf16 base (PEFT's default), whose R
# tiles are the widest the epilogue loads; the forward, dX and no-base forms spread over the archs.
_SUBSET_EXTRA = {
    "sm80": GemmVariant(BF16, BF16, FP32, "kn", 64, dropout=True),
    "sm89": GemmVariant(BF16, BF16, FP32, "nk", 128, bias=True),
    "sm90": GemmVariant(BF16, None, FP32, "nk", 64, bias=True),
}


def _gemm_subset(arch: str) -> List[Case]:
    """Per arch: for bf16 (forward layout), fp32 (dX layout) and one fp32-adapter call, the admitted
    config with the largest shared-memory estimate: the one nearest the GPU's limit, and (sm90) the
    one where the estimate is exact."""
    cases = []
    variants = [GemmVariant(BF16, BF16, BF16, "nk", 64), GemmVariant(FP32, FP32, FP32, "kn", 64),
                _SUBSET_EXTRA[arch]]
    table = kl.gemm_config_table()[arch]
    for v in variants:
        args, flags, m, n = _gemm_call(v)
        est = {i: _estimate(table[i], args, flags) for i in _admitted(arch, args, flags)}
        cases += _gemm_cases(arch, v, [max(est, key=lambda i: (est[i], -i))])
    return cases


# --------------------------------------------------------------------------------------------------
# _lowrank_project_kernel, _lowrank_wgrad_kernel
# --------------------------------------------------------------------------------------------------


def _project_case(arch, xdt, adt, m, rank, dropout, k=4096, odt=None) -> Case:
    def launch():
        x = _empty(m, k, dtype=xdt)
        at = _empty(rank, k, dtype=adt).t()  # x @ A^T
        seed = _empty(1, dtype=torch.int64) if dropout else None
        with _as_gpu():
            mm.lowrank_project(x, at, scale=2.0, dropout_p=0.1 if dropout else 0.0, seed=seed, out_dtype=odt)

    desc = f"x {_NAMES[xdt]} [{m}, {k}] @ A^T {_NAMES[adt]} r={rank}" + (" +dropout" if dropout else "")
    return Case(kernel="_lowrank_project_kernel", arch=arch, desc=desc, launch=launch)


def _wgrad_case(arch, xdt, ldt, odt, m, c, rank, dropout, colsum, splits) -> Case:
    def launch():
        left = _empty(m, rank, dtype=ldt)
        x = _empty(m, c, dtype=xdt)
        out = _empty(c, rank, dtype=odt).t()  # dB written through dB.t()
        seed = _empty(1, dtype=torch.int64) if dropout else None
        cs = _empty(c, dtype=FP32) if colsum else None
        with _as_gpu():
            mm.lowrank_wgrad(left, x, out, scale=0.5, dropout_p=0.1 if dropout else 0.0, seed=seed,
                             colsum=cs, splits=splits)

    desc = (f"L {_NAMES[ldt]} [{m}, r={rank}]^T @ x {_NAMES[xdt]} [{m}, {c}] -> {_NAMES[odt]}, splits={splits}"
            + (" +dropout" if dropout else "") + (" +colsum" if colsum else ""))
    return Case(kernel="_lowrank_wgrad_kernel", arch=arch, desc=desc, launch=launch)


def _skinny_cases(arch: str, full: bool) -> List[Case]:
    if not full:
        return [_project_case(arch, BF16, FP32, 512, 64, True),
                _wgrad_case(arch, FP32, FP32, FP32, 4096, 4096, 64, False, True, 1)]
    cases = []
    for xdt, adt in ((BF16, BF16), (FP16, FP16), (FP32, FP32), (BF16, FP32), (FP16, FP32)):
        for m, rank in ((1, 8), (16, 64), (512, 16), (512, 128)):
            cases.append(_project_case(arch, xdt, adt, m, rank, False))
        cases.append(_project_case(arch, xdt, adt, 512, 64, True))
        cases.append(_project_case(arch, xdt, adt, 77, 16, False, k=1030))
        for rank in (16, 64):
            for splits in (1, 4):
                # dA: L = g (x's dtype), out = A's dtype; dB: L = xa, out = B's dtype, with dbias.
                cases.append(_wgrad_case(arch, xdt, xdt, adt, 1024, 4096, rank, True, False, splits))
                cases.append(_wgrad_case(arch, xdt, xdt, adt, 1024, 4096, rank, False, True, splits))
        cases.append(_wgrad_case(arch, xdt, xdt, adt, 77, 1030, 16, False, True, 1))
    return cases


# --------------------------------------------------------------------------------------------------
# 4-bit: _dequantize_4bit_kernel, _decode_lora_4bit_kernel, and the M > 64 path
# --------------------------------------------------------------------------------------------------


def _quant(n: int, k: int, blocksize: int, nested: bool, quant_type: str, dtype=BF16) -> nf4.Quant4bit:
    """bitsandbytes' storage layout (see nf4.py) for an [n, k] weight, as meta tensors."""
    numel = n * k
    n_blocks = -(-numel // blocksize)
    packed = _empty((numel + 1) // 2, dtype=torch.uint8)
    code = _empty(16, dtype=FP32)
    if nested:
        return nf4.Quant4bit(packed=packed, absmax=_empty(n_blocks, dtype=torch.uint8), code=code,
                             blocksize=blocksize, shape=(n, k), dtype=dtype, quant_type=quant_type,
                             code2=_empty(256, dtype=FP32), absmax2=_empty(-(-n_blocks // 256), dtype=FP32),
                             blocksize2=256, offset=_empty((), dtype=FP32))
    return nf4.Quant4bit(packed=packed, absmax=_empty(n_blocks, dtype=FP32), code=code, blocksize=blocksize,
                         shape=(n, k), dtype=dtype, quant_type=quant_type)


def _dequant_case(arch, dtype, blocksize, nested, quant_type="nf4", shape=(4096, 4096)) -> Case:
    def launch():
        with _as_gpu():
            nf4_triton.triton_dequantize(_quant(*shape, blocksize, nested, quant_type), dtype)

    big = " (int64 offsets)" if shape[0] * shape[1] >= 2**31 else ""
    desc = (f"{quant_type} {'nested' if nested else 'plain'} bs={blocksize} -> {_NAMES[dtype]}, "
            f"{shape[0]}x{shape[1]}{big}, mul.rn PTX")
    return Case(kernel="_dequantize_4bit_kernel", arch=arch, desc=desc, launch=launch)


def _decode_case(arch, dtype, adt, blocksize, nested, quant_type, m, rank, bias, splits, n=4096, k=4096) -> Case:
    def launch():
        q = _quant(n, k, blocksize, nested, quant_type, dtype)
        q = weights.kernel_operand(q)
        x2 = _empty(m, k, dtype=dtype)
        xa = _empty(m, rank, dtype=dtype)
        lora_b = _empty(n, rank, dtype=adt)
        b = _empty(n, dtype=dtype) if bias else None
        assert lora_triton._decode_supported(q.meta, quant_type)
        with _as_gpu():
            lora_triton._decode_lora_4bit(x2, q, xa, lora_b, b, 1.5, splits=splits)

    desc = (f"{quant_type} {'nested' if nested else 'plain'} bs={blocksize}, x {_NAMES[dtype]} M={m}, "
            f"adapters {_NAMES[adt]} r={rank}, splits={splits}" + (" +bias" if bias else ""))
    return Case(kernel="_decode_lora_4bit_kernel", arch=arch, desc=desc, launch=launch)


def _lora_4bit_path_case(arch, dtype, adt, blocksize, nested, rank, m=512, n=4096, k=4096) -> Case:
    """The 4-bit LoRA op for M > DECODE_MAX_M, forward and backward, launched as ``_lora_forward``
    and ``_lora_backward`` build them; the GEMM with the admitted config of largest estimate."""
    case = Case(kernel="lora_4bit_path", arch=arch, desc="", launch=lambda: None)

    def gemm(x, wt, left, right, dropout, bias):
        y = _empty(x.shape[0], right.shape[1], dtype=x.dtype)
        args, flags = mm._launch_args(x, wt, left, right, 1.5, bias, 0.1 if dropout else 0.0,
                                      _empty(1, dtype=torch.int64) if dropout else None, y)
        table = kl.gemm_config_table()[arch]
        est = {i: _estimate(table[i], args, flags) for i in _admitted(arch, args, flags)}
        best = max(est, key=lambda i: (est[i], -i))
        case.gemm_estimates.append(est[best])
        mm._launch_config(args, flags, y.shape[0], y.shape[1], table[best])

    def launch():
        q = _quant(n, k, blocksize, nested, "nf4", dtype)
        x2, dy2 = _empty(m, k, dtype=dtype), _empty(m, n, dtype=dtype)
        lora_a, lora_b = _empty(rank, k, dtype=adt), _empty(n, rank, dtype=adt)
        seed = _empty(1, dtype=torch.int64)
        with _as_gpu():
            xa = mm.lowrank_project(x2, lora_a.t(), dropout_p=0.1, seed=seed)
            w = nf4_triton.triton_dequantize(q, dtype)
            gemm(x2, w.t(), xa, lora_b.t(), False, _empty(n, dtype=dtype))
            g = mm.lowrank_project(dy2, lora_b, scale=1.5)
            w = nf4_triton.triton_dequantize(q, dtype)
            gemm(dy2, w, g, lora_a, True, None)
            mm.lowrank_wgrad(g, x2, _empty(rank, k, dtype=adt), dropout_p=0.1, seed=seed)
            db = _empty(n, rank, dtype=adt)
            mm.lowrank_wgrad(xa, dy2, db.t(), scale=1.5, colsum=_empty(n, dtype=FP32))

    case.desc = (f"4-bit LoRA fwd+bwd M={m}: nf4 {'nested' if nested else 'plain'} bs={blocksize}, "
                 f"x {_NAMES[dtype]}, adapters {_NAMES[adt]} r={rank}, dropout, bias")
    case.launch = launch
    return case


def _quant_cases(arch: str, full: bool) -> List[Case]:
    if not full:
        return [
            _dequant_case(arch, BF16, 64, True),
            _decode_case(arch, FP32, FP32, 4096, True, "nf4", 64, 64, True, 4),
            _decode_case(arch, BF16, BF16, 128, False, "fp4", 1, 16, False, 1),
        ]
    cases = []
    for dtype in (BF16, FP16, FP32):
        for blocksize in nf4.BLOCKSIZES:
            for nested in (False, True):
                cases.append(_dequant_case(arch, dtype, blocksize, nested, "fp4" if blocksize == 128 else "nf4"))
        for nested in (False, True):
            cases.append(_dequant_case(arch, dtype, 64, nested, shape=(37, 75)))  # odd n
            cases.append(_dequant_case(arch, dtype, 64, nested, shape=(65536, 32768)))
    for dtype, adt in ((BF16, BF16), (FP16, FP16), (FP32, FP32), (BF16, FP32)):
        for blocksize in (32, 64, 128, 256, 4096):
            for nested in (False, True):
                cases.append(_decode_case(arch, dtype, adt, blocksize, nested, "fp4" if nested else "nf4",
                                          1, 16, False, 1))
        for m in (16, 32, 64):
            for rank in (16, 64):
                cases.append(_decode_case(arch, dtype, adt, 64, True, "nf4", m, rank, True, 8))
                cases.append(_decode_case(arch, dtype, adt, 4096, False, "nf4", m, rank, False, 1))
        cases.append(_decode_case(arch, dtype, adt, 64, True, "nf4", 5, 16, True, 1, n=1000, k=1024))
    for dtype, adt in ((BF16, BF16), (BF16, FP32), (FP32, FP32)):
        cases.append(_lora_4bit_path_case(arch, dtype, adt, 64, True, 64))
    cases.append(_lora_4bit_path_case(arch, FP16, FP16, 4096, False, 16))
    return cases


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def build_cases(archs, full: bool) -> List[Case]:
    cases = []
    for arch in archs:
        if full:
            for v in _gemm_variants(full=True):
                cases += _gemm_cases(arch, v)
        else:
            cases += _gemm_subset(arch)
        cases += _skinny_cases(arch, full)
        cases += _quant_cases(arch, full)
    if not full and "sm89" in archs:
        # Not in the per-arch subset above: one end-to-end 4-bit path, on the GPU with least memory.
        cases.append(_lora_4bit_path_case("sm89", BF16, FP32, 64, True, 64))
    return cases


def _records(case: Case) -> List[dict]:
    limit = SMEM_LIMIT[case.arch]
    with compile_instead_of_launch(case.arch, keep_going=True) as launches:
        try:
            case.launch()
            crash = None
        except Exception as e:  # noqa: BLE001 - a launcher error is a result too
            crash = f"{type(e).__name__}: {e}"[-2000:]
    out = []
    path_estimates = iter(case.gemm_estimates)
    for c in launches:
        failed = isinstance(c, CompileFailed)
        cfg = {**c.constexprs, **(case.config or {}), "num_warps": c.num_warps, "num_stages": c.num_stages}
        is_gemm = c.name == "_matmul_lowrank_kernel"
        estimate = case.estimate if case.kernel == c.name else next(path_estimates, None) if is_gemm else None
        out.append(dict(
            kernel=c.name, arch=case.arch, case=case.desc if case.kernel == c.name else f"{case.desc} [{case.kernel}]",
            config={k: v for k, v in cfg.items() if k.startswith("BLOCK") or k in (
                "GROUP_M", "num_warps", "num_stages", "NESTED", "PTX_MUL_RN", "INT64", "HAS_W", "HAS_BIAS",
                "DROPOUT", "HAS_COLSUM", "IEEE", "BLOCKS_PER_PROGRAM")},
            shared=None if failed else c.shared, limit=limit,
            estimate=estimate if is_gemm else None,
            admitted=case.admitted if case.kernel == c.name else True,
            fits=None if failed else c.shared <= limit,
            ok=not failed, error=c.error if failed else None,
        ))
    if crash is not None or not launches:
        out.append(dict(kernel=case.kernel, arch=case.arch, case=case.desc, config=case.config, shared=None,
                        limit=limit, estimate=case.estimate, admitted=case.admitted, fits=None, ok=False,
                        error=crash or "the launcher launched nothing"))
    return out


_WORKER_CASES: Dict[tuple, List[Case]] = {}


def _run_indices(args) -> List[tuple]:
    archs, full, indices = args
    key = (tuple(archs), full)
    if key not in _WORKER_CASES:
        _WORKER_CASES[key] = build_cases(archs, full)
    return [(i, _records(_WORKER_CASES[key][i])) for i in indices]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="the full sweep (default: the CI subset)")
    ap.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS))
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    opts = ap.parse_args(argv)
    t0 = time.time()
    cases = build_cases(opts.arch, opts.all)
    print(f"{len(cases)} cases", file=sys.stderr)
    results: Dict[int, List[dict]] = {}
    if opts.jobs <= 1:
        for i, case in enumerate(cases):
            results[i] = _records(case)
            if (i + 1) % 25 == 0:
                print(f"{i + 1}/{len(cases)} {time.time() - t0:.0f}s", file=sys.stderr)
    else:
        import multiprocessing as mp

        chunks = [(opts.arch, opts.all, [i]) for i in range(len(cases))]
        # fork: the workers inherit the imports; each rebuilds the (deterministic) case list once.
        with mp.get_context("fork").Pool(opts.jobs) as pool:
            for part in pool.imap_unordered(_run_indices, chunks):
                results.update(part)
                if len(results) % 25 == 0:
                    print(f"{len(results)}/{len(cases)} {time.time() - t0:.0f}s", file=sys.stderr)
    records = [r for i in range(len(cases)) for r in results[i]]
    print(f"{len(records)} compiles in {time.time() - t0:.0f}s", file=sys.stderr)
    print(json.dumps(records))


if __name__ == "__main__":
    main()
