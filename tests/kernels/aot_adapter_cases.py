"""Compile the IA3, DoRA and prefix-attention kernels for sm80/sm89/sm90 with every config their CUDA
launch paths can pick, and check each one's shared memory against the GPU's per-block limit.

Usage::

    python tests/kernels/aot_adapter_cases.py [--all] [--arch sm90 ...] [--kernel ia3|dora|prefix ...] [--jobs N]

Prints one JSON list on its last stdout line, one record per compiled kernel::

    {"kernel", "arch", "case", "config", "shared", "limit", "estimate", "ok", "error"}

``estimate`` is the launch path's own shared-memory estimate for that config, where its pruner makes one
(it must not be below the compiler's ``shared``: an underestimate lets the pruner admit a config that
does not fit). ``ok``: compiled, ``shared <= limit`` and no underestimate.

The launchers are driven exactly as on a GPU, with CPU tensors (nothing reads or writes their memory;
see aot.py): the same argument tuples, the CUDA branch's block sizes, and for autotuned kernels each
config of the candidate list that the autotuner's own pruner admits for that GPU's shared memory.
Without ``--all``, a representative subset (bf16, the widest head dim, the largest-smem admissible
configs) that the CI test runs; ``--all`` is the full sweep over dtypes, flags and configs.
Needs ``TRITON_INTERPRET`` unset (the test runs it through ``aot.run_in_subprocess``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from aot import CAPABILITY, SMEM_LIMIT, compile_instead_of_launch  # noqa: E402

ARCHS = ("sm80", "sm89", "sm90")
KERNELS = ("ia3", "dora", "prefix")
DTYPE_NAMES = ("bf16", "fp16", "fp32")
# A GEMM shape with every dim a multiple of 16 (Triton's divisibility specialization, as real layers
# have) and M large enough that the row-block pruning keeps every config (M=1 is its own case).
GEMM_M, GEMM_N, GEMM_K = 4096, 4096, 4096
# Cases name x's dtype and the base weight's: a dense weight is cast in-kernel (an fp32 master copy
# under bf16 is loaded at 4 bytes); a 4-bit base reaches the GEMMs dequantized to x's dtype
# (kernels.weights.dense_base), i.e. as the w == x case.
HEAD_DIMS = (64, 80, 96, 128, 256)


def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _empty(*shape, dtype="bf16"):
    import torch

    return torch.empty(*shape, dtype=_torch_dtype(dtype) if isinstance(dtype, str) else dtype)


def _config_dict(compiled):
    cfg = {k: v for k, v in compiled.constexprs.items() if k.startswith(("BLOCK_", "GROUP_"))}
    cfg.update(num_warps=compiled.num_warps, num_stages=compiled.num_stages)
    return cfg


def _triton_config_dict(c):
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def _compile(kernel, arch, case, config, launch, estimate=None):
    """Run ``launch()`` compiling for ``arch``; one record per kernel it launched (or one error record)."""
    try:
        with compile_instead_of_launch(arch) as launches:
            launch()
    except Exception as e:  # a compile failure is a finding, not a crash of the sweep
        msg = "".join(traceback.format_exception_only(type(e), e)).strip()
        return [dict(kernel=kernel, arch=arch, case=case, config=config, shared=None, limit=SMEM_LIMIT[arch],
                     estimate=estimate, ok=False, error=msg[-2000:])]
    out = []
    for c in launches:
        ok, error = c.fits, None
        if not c.fits:
            error = f"shared {c.shared} > limit {SMEM_LIMIT[arch]}"
        elif estimate is not None and estimate < c.shared:
            ok, error = False, f"pruner estimate {estimate} < compiled shared {c.shared}"
        out.append(dict(kernel=c.name, arch=arch, case=case, config=_config_dict(c), shared=c.shared,
                        limit=SMEM_LIMIT[arch], estimate=estimate, ok=ok, error=error))
    return out


def _autotune_candidates(configs, pruner, kernel_fn, args, flags):
    """The configs the autotuner would time: its early pruner, called as Triton's Autotuner calls it."""
    named = dict(zip(kernel_fn.arg_names, args))
    return pruner(configs, named, **flags), {**named, **flags}


def _largest(configs, estimate):
    """The admissible config with the most estimated shared memory (the likeliest not to fit)."""
    return [max(configs, key=lambda c: (estimate(c), c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]))]


def _compile_gemm_configs(kernel_fn, arch, case, cands, args, flags, m, n, estimate, subset):
    """Compile a grouped-tile GEMM kernel (one program per BLOCK_M x BLOCK_N tile of [m, n]) with each
    admitted config, or only the largest by ``estimate`` for the subset; one record per compile."""
    import triton

    if subset:
        cands = _largest(cands, estimate)
    records = []
    for c in cands:
        grid = (triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(n, c.kwargs["BLOCK_N"]),)

        def launch(c=c, grid=grid):
            kernel_fn[grid](*args, **flags, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)

        records += _compile(kernel_fn.__name__, arch, case, _triton_config_dict(c), launch, estimate(c))
    return records


# --------------------------------------------------------------------------------------------------
# IA3
# --------------------------------------------------------------------------------------------------

# (name, scale_a, scale_out, bias, coldot, store, weight layout): the launches of ia3.py's forward and
# backward bodies ("nk": W^T through strides, "kn": W as stored).
IA3_VARIANTS = (
    ("fwd_out", False, True, False, False, True, "nk"),
    ("fwd_out_bias", False, True, True, False, True, "nk"),
    ("fwd_ff", True, False, False, False, True, "nk"),
    ("fwd_ff_bias", True, False, True, False, True, "nk"),
    ("bwd_ff_dx_dl", False, True, False, True, True, "kn"),
    ("bwd_ff_dx", False, True, False, False, True, "kn"),
    ("bwd_ff_dl", False, True, False, True, False, "kn"),
    ("bwd_out_dx", True, False, False, False, True, "kn"),
    ("bwd_out_dl", False, False, False, True, False, "nk"),
    ("bwd_out_dl_bias", False, False, True, True, False, "nk"),
)


def ia3_gemm(arch, variant, xdt, wdt, m=GEMM_M, subset=False):
    import triton

    from peftfast.kernels import ia3_triton, launch

    name, scale_a, scale_out, has_bias, coldot, store, layout = variant
    n, k = GEMM_N, GEMM_K
    # The GEMM is [M, Kg] @ [Kg, Ng]: W^T for x @ W^T (Kg = K), W for dY @ W (Kg = N).
    w = _empty(n, k, dtype=wdt)
    b = w.t() if layout == "nk" else w
    kg, ng = b.shape
    a = _empty(m, kg, dtype=xdt)
    scale = _empty(kg if scale_a else ng, dtype=xdt)
    bias = _empty(ng, dtype=xdt) if has_bias else None
    g = _empty(m, ng, dtype=xdt) if coldot else None
    y = _empty(m, ng, dtype=xdt) if store else None
    part = _empty(triton.cdiv(m, ia3_triton._SUB_M), ng, dtype="fp32") if coldot else None
    args, flags = ia3_triton._launch_args(a, b, scale, scale_a, scale_out, bias, g, y, part)
    limit = SMEM_LIMIT[arch]
    cands, named = _autotune_candidates(launch.gemm_configs(arch), ia3_triton._make_pruner(limit), ia3_triton._ia3_matmul_kernel,
                                        args, flags)
    elem = max(a.element_size(), b.element_size())

    def estimate(c):
        return launch.gemm_smem_bytes(c.kwargs, c.num_stages, elem, 0)

    return _compile_gemm_configs(ia3_triton._ia3_matmul_kernel, arch, f"{name} x={xdt} w={wdt} M={m}", cands, args, flags,
                                 m, ng, estimate, subset)


def ia3_jobs(archs, full):
    if not full:
        # The epilogue-heavy launch (dx and dl from one GEMM) everywhere; the widest operands (an fp32
        # master weight under bf16) on the smallest shared memory.
        jobs = [("ia3_gemm", (arch, IA3_VARIANTS[4], "bf16", "bf16"), {"subset": True}) for arch in archs]
        jobs += [("ia3_gemm", ("sm89", IA3_VARIANTS[0], "bf16", "fp32"), {"subset": True})] if "sm89" in archs else []
        return jobs
    v = {var[0]: var for var in IA3_VARIANTS}
    # Every launch in bf16 and fp32; the fp32-master-weight and fp16 runs take the launches whose main
    # loop or epilogue differ in what they stage (the bias variants only add a vector load).
    plan = [(name, "bf16", "bf16") for name in v] + [(name, "fp32", "fp32") for name in v]
    distinct = ("fwd_out", "fwd_ff", "bwd_ff_dx_dl", "bwd_out_dx", "bwd_out_dl")
    plan += [(name, "bf16", "fp32") for name in distinct] + [(name, "fp16", "fp16") for name in distinct[:3]]
    plan += [("fwd_out", "fp16", "fp32"), ("bwd_out_dl", "fp16", "fp16")]
    jobs = [("ia3_gemm", (arch, v[name], xdt, wdt), {}) for arch in archs for name, xdt, wdt in plan]
    # Decode: M == 1 is specialized by Triton, and the pruner keeps only the 16-row configs.
    jobs += [("ia3_gemm", (arch, v[name], xdt, xdt), {"m": 1}) for arch in archs for name in ("fwd_out", "fwd_ff")
             for xdt in ("bf16", "fp32")]
    return jobs


# --------------------------------------------------------------------------------------------------
# DoRA
# --------------------------------------------------------------------------------------------------

# (name, mode, dropout, bias): the launches of dora.py's forward and backward bodies.
DORA_VARIANTS = (
    ("fwd", 0, False, False),
    ("fwd_bias", 0, False, True),
    ("fwd_dropout", 0, True, False),
    ("fwd_dropout_bias", 0, True, True),
    ("dx", 1, False, False),
    ("dx_dropout", 1, True, False),
    ("dm", 2, False, False),
)


def dora_gemm(arch, variant, xdt, wdt, rank, adt=None, m=GEMM_M, subset=False):
    import torch
    import triton

    from peftfast.kernels import dora_triton, launch

    name, mode, dropout, has_bias = variant
    adt = adt or xdt
    n, k = GEMM_N, GEMM_K
    w = _empty(n, k, dtype=wdt)
    lora_a, lora_b = _empty(rank, k, dtype=adt), _empty(n, rank, dtype=adt)
    p = 0.1 if dropout else 0.0
    seed = torch.zeros(1, dtype=torch.int64)
    if mode == dora_triton._FWD:
        x, wt, left, right = _empty(m, k, dtype=xdt), w.t(), _empty(m, rank, dtype=xdt), lora_b.t()
        c = _empty(n, dtype="fp32")
        xd = _empty(m, k, dtype=xdt) if dropout else None
        bias = _empty(n, dtype=xdt) if has_bias else None
        g, y, part = None, _empty(m, n, dtype=xdt), None
    elif mode == dora_triton._DX:
        x, wt, left, right = _empty(m, n, dtype=xdt), w, _empty(m, rank, dtype=xdt), lora_a
        c, xd, bias, g = _empty(n, dtype="fp32"), None, None, None
        y, part = _empty(m, k, dtype=xdt), None
    else:
        x, wt, left, right = _empty(m, k, dtype=xdt), w.t(), _empty(m, rank, dtype=xdt), lora_b.t()
        c, xd, bias, g = None, None, None, _empty(m, n, dtype=xdt)
        y, part = None, _empty(triton.cdiv(m, dora_triton._SUB_M), n, dtype="fp32")
    args, flags = dora_triton._launch_args(x, wt, left, right, c, mode, 2.0, xd, bias, g, p, seed, y, part)
    ng = wt.shape[1]
    cands, named = _autotune_candidates(launch.gemm_configs(arch), dora_triton._make_pruner(SMEM_LIMIT[arch]),
                                        dora_triton._dora_matmul_kernel, args, flags)

    def estimate(c):
        return dora_triton._smem_bytes(c, named)

    return _compile_gemm_configs(dora_triton._dora_matmul_kernel, arch, f"{name} x={xdt} w={wdt} lora={adt} r={rank} M={m}",
                                 cands, args, flags, m, ng, estimate, subset)


def dora_norm(arch, wdt, xdt, rank, adt=None):
    import torch

    from peftfast.kernels import dora_triton

    adt = adt or xdt
    n, k = GEMM_N, GEMM_K
    w, lora_a, lora_b = _empty(n, k, dtype=wdt), _empty(rank, k, dtype=adt), _empty(n, rank, dtype=adt)
    blocks = dora_triton._norm_blocks(torch.device("cuda"), max(lora_a.element_size(), lora_b.element_size()))
    case = f"norm w={wdt} compute={xdt} lora={adt} r={rank}"
    return _compile("_dora_norm_kernel", arch, case, {"BLOCK_N": blocks[0], "BLOCK_K": blocks[1]},
                    lambda: dora_triton._weight_norm_launch(w, lora_a, lora_b, 2.0, _torch_dtype(xdt), blocks))


def dora_dropout(arch, xdt):
    import torch

    from peftfast.kernels import dora_triton

    x, seed = _empty(GEMM_M, GEMM_K, dtype=xdt), torch.zeros(1, dtype=torch.int64)
    return _compile("_dropout_kernel", arch, f"dropout x={xdt}", {}, lambda: dora_triton._dropout(x, seed, 0.1))


def dora_jobs(archs, full):
    if not full:
        # The two-accumulator forward (two X tiles per W tile) everywhere; its dX twin with an fp32
        # weight on the smallest shared memory; the norm kernel's fixed blocks with fp32 adapters (its
        # widest staged tiles), and the dropout kernel's.
        jobs = []
        for arch in archs:
            jobs += [("dora_gemm", (arch, DORA_VARIANTS[3], "bf16", "bf16", 64), {"subset": True}),
                     ("dora_norm", (arch, "fp32", "bf16", 64, "fp32"), {})]
        if "sm89" in archs:
            jobs.append(("dora_gemm", ("sm89", DORA_VARIANTS[5], "bf16", "fp32", 64), {"subset": True}))
        jobs += [("dora_dropout", (archs[-1], "bf16"), {})]
        return jobs
    v = {var[0]: var for var in DORA_VARIANTS}
    # Every launch in bf16 and fp32 at rank 64 (BLOCK_R caps at 64: the widest epilogue tiles); the
    # others on the launches whose staged operands differ: an fp32 master weight, fp16, rank 8
    # (BLOCK_R 16), fp32 adapters under bf16 (L/R tiles loaded at 4 bytes, cast in-kernel).
    plan = [(name, "bf16", "bf16", 64, None) for name in v] + [(name, "fp32", "fp32", 64, None) for name in v]
    plan += [(name, "bf16", "fp32", 64, None) for name in ("fwd", "fwd_dropout", "dx_dropout", "dm")]
    plan += [(name, "fp16", "fp16", 64, None) for name in ("fwd_dropout_bias", "dx", "dm")]
    plan += [(name, "bf16", "bf16", 8, None) for name in ("fwd", "fwd_dropout", "dx_dropout", "dm")]
    plan += [(name, "bf16", "bf16", 64, "fp32") for name in ("fwd_dropout", "dx", "dm")]
    norms = [("bf16", "bf16", 64, None), ("fp32", "bf16", 64, None), ("fp16", "fp16", 64, None),
             ("fp32", "fp32", 64, None), ("bf16", "bf16", 8, None), ("bf16", "bf16", 64, "fp32")]
    jobs = []
    for arch in archs:
        jobs += [("dora_gemm", (arch, v[name], xdt, wdt, rank, adt), {}) for name, xdt, wdt, rank, adt in plan]
        # Decode: M == 1 is specialized by Triton, and the pruner keeps only the 16-row configs.
        jobs += [("dora_gemm", (arch, v[name], "bf16", "bf16", 16), {"m": 1}) for name in ("fwd", "fwd_dropout")]
        jobs += [("dora_norm", (arch, wdt, xdt, rank, adt), {}) for wdt, xdt, rank, adt in norms]
        jobs += [("dora_dropout", (arch, xdt), {}) for xdt in DTYPE_NAMES]
    return jobs


# --------------------------------------------------------------------------------------------------
# Prefix attention
# --------------------------------------------------------------------------------------------------


def _attn_inputs(dt, d, gqa, nq, nk=512, p=16, b=2, hq=8):
    hkv = hq // 4 if gqa else hq
    q = _empty(b, hq, nq, d, dtype=dt)
    k, v = _empty(b, hkv, nk, d, dtype=dt), _empty(b, hkv, nk, d, dtype=dt)
    pk, pv = _empty(hkv, p, d, dtype=dt), _empty(hkv, p, d, dtype=dt)
    return q, k, v, pk, pv


def _attn_case(dt, d, gqa, causal, pad, nq):
    return f"x={dt} D={d} {'gqa4' if gqa else 'mha'} causal={int(causal)} pad={int(pad)} Nq={nq}"


def prefix_fwd(arch, dt, d, gqa, causal, pad, nq=512, subset=False):
    import torch
    import triton

    from peftfast.kernels import prefix_attention_triton

    q, k, v, pk, pv = _attn_inputs(dt, d, gqa, nq)
    mask = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool) if pad else None
    out, lse = torch.empty_like(q), _empty(*q.shape[:3], dtype="fp32")
    args, flags = prefix_attention_triton._fwd_launch_args(q, k, v, pk, pv, mask, causal, 0.125, out, lse)
    cap = CAPABILITY[arch]
    cands, named = _autotune_candidates(prefix_attention_triton._fwd_configs(prefix_attention_triton._d_bucket(flags["BLOCK_D"])),
                                        prefix_attention_triton._fwd_pruner(SMEM_LIMIT[arch], cap), prefix_attention_triton._prefix_attn_fwd_kernel, args, flags)

    def estimate(c):
        return prefix_attention_triton._fwd_smem_bytes(c, named, cap)

    if subset:
        cands = _largest(cands, estimate)
    records = []
    for c in cands:
        grid = (triton.cdiv(nq, c.kwargs["BLOCK_M"]), q.shape[0] * q.shape[1])

        def launch(c=c, grid=grid):
            prefix_attention_triton._prefix_attn_fwd_kernel[grid](*args, **flags, **c.kwargs, num_warps=c.num_warps,
                                             num_stages=c.num_stages)

        records += _compile("_prefix_attn_fwd_kernel", arch, "fwd " + _attn_case(dt, d, gqa, causal, pad, nq),
                            _triton_config_dict(c), launch, estimate(c))
    return records


def prefix_bwd(arch, dt, d, gqa, causal, pad, nq=512):
    import torch

    from peftfast.kernels import prefix_attention_triton

    q, k, v, pk, pv = _attn_inputs(dt, d, gqa, nq)
    mask = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool) if pad else None
    out, do, lse = torch.empty_like(q), torch.empty_like(q), _empty(*q.shape[:3], dtype="fp32")
    block_d = max(16, 1 << (d - 1).bit_length())
    config = prefix_attention_triton._bwd_config(block_d, q.dtype)
    bm, bn, w, s = config
    return _compile("prefix_attention_backward", arch, "bwd " + _attn_case(dt, d, gqa, causal, pad, nq),
                    dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s),
                    lambda: prefix_attention_triton._prefix_attn_backward_launch(do, q, k, v, pk, pv, mask, out, lse, causal, 0.125,
                                                            config))


def prefix_jobs(archs, full):
    if not full:
        # The widest head's largest admissible forward everywhere; the backward where it is tightest:
        # D=256 (bf16 and fp32) on sm89's 99 KB, fp32 D=128 on sm80, and sm90's wgmma layouts.
        jobs = [("prefix_fwd", (arch, "bf16", 256, True, True, True), {"subset": True}) for arch in archs]
        bwd = {"sm80": (("fp32", 128),), "sm89": (("bf16", 256), ("fp32", 256)), "sm90": (("bf16", 128),)}
        jobs += [("prefix_bwd", (arch, dt, d, True, True, True), {}) for arch in archs for dt, d in bwd[arch]]
        return jobs
    # (gqa, causal, padding mask): all off, all on, and the common LM-training ones in bf16. D=80 and
    # D=96 compile into D=128's blocks (BLOCK_D 128), with their own masks on the head dim.
    flags = {"bf16": ((False, False, False), (True, True, True), (True, True, False), (False, True, False)),
             "fp16": ((False, False, False), (True, True, True)),
             "fp32": ((False, False, False), (True, True, True))}
    jobs = []
    for arch, dt, d in itertools.product(archs, DTYPE_NAMES, HEAD_DIMS):
        for gqa, causal, pad in flags[dt]:
            jobs.append(("prefix_fwd", (arch, dt, d, gqa, causal, pad), {}))
            jobs.append(("prefix_bwd", (arch, dt, d, gqa, causal, pad), {}))
    # Decode (Nq == 1 is specialized) and a short chunk: the row pruning keeps only the short blocks.
    for arch, dt, d, nq in itertools.product(archs, ("bf16", "fp32"), (64, 128, 256), (1, 32)):
        jobs.append(("prefix_fwd", (arch, dt, d, True, True, True), {"nq": nq}))
    return jobs


# --------------------------------------------------------------------------------------------------

RUNNERS = {f.__name__: f for f in (ia3_gemm, dora_gemm, dora_norm, dora_dropout, prefix_fwd, prefix_bwd)}
JOBS = {"ia3": ia3_jobs, "dora": dora_jobs, "prefix": prefix_jobs}


def run_job(job):
    name, args, kwargs = job
    return RUNNERS[name](*args, **kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="the full sweep (default: the CI subset)")
    parser.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--kernel", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("aot_adapter_cases.py needs TRITON_INTERPRET unset (the interpreter cannot compile)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    jobs = [j for kernel in opts.kernel for j in JOBS[kernel](opts.arch, opts.all)]
    start = time.time()
    if opts.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(opts.jobs) as pool:
            results = pool.map(run_job, jobs, chunksize=1)
    else:
        results = [run_job(j) for j in jobs]
    records = [r for rs in results for r in rs]
    _summarize(records, time.time() - start)
    print(json.dumps(records))


def _summarize(records, seconds):
    """Per kernel and arch: compiles, the largest shared memory against the limit; then what failed."""
    table = {}
    for r in records:
        row = table.setdefault((r["kernel"], r["arch"]), [0, 0])
        row[0] += 1
        row[1] = max(row[1], r["shared"] or 0)
    for (kernel, arch), (n, peak) in sorted(table.items()):
        print(f"{kernel:32s} {arch}  {n:5d} compiles  max shared {peak:7d} / {SMEM_LIMIT[arch]}", file=sys.stderr)
    bad = [r for r in records if not r["ok"]]
    for r in bad:
        print(f"NOT OK {r['kernel']} {r['arch']} [{r['case']}] {r['config']}: {r['error']}", file=sys.stderr)
    print(f"{len(records)} compiles in {seconds:.0f} s, {len(bad)} not ok", file=sys.stderr)


if __name__ == "__main__":
    main()
