"""Compile the in-loop QLoRA GEMM (kernels/experimental/qmatmul.py) for sm80/sm89/sm90 without a GPU.

Run by tests/kernels/test_qmatmul.py through ``aot.run_in_subprocess`` (TRITON_INTERPRET unset):

    python tests/kernels/aot_qmatmul_cases.py [--all] [--arch sm80,sm89,sm90]

For every arch, the configs of ``configs/lora_matmul_4bit.json`` that the launch-time pruner admits
at a training-sized M (rank 16) are compiled through the launcher's own argument path, and their
shared memory (the compiler's figure) is recorded beside ``qmatmul.smem_bytes``'s estimate and the
arch's limit. Default (4 compiles, ~25 s on 2 cores): bf16, an NF4 nested blocksize-64 weight (the
QLoRA default), the admitted config with the largest estimate (the one nearest the limit), for the
forward on sm80, the dX GEMM on sm89 and both on sm90 (the two layouts compile to the same shared
memory in the full sweep). ``--all``: every admitted config, for that weight and for a non-nested one, blocksizes
32 (two scale groups per 64-wide tile) and 256 (one block over several tiles), fp32 compute, the
bias + dropout epilogue, and fp32 adapters at rank 64. The last stdout line is a JSON list of records.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import aot  # noqa: E402


# The default subset's layouts per arch (see the module docstring).
_SUBSET_LAYOUTS = {"sm80": ("nk",), "sm89": ("kn",), "sm90": ("nk", "kn")}


def _case_tensors(torch, *, m, n_w, k_w, blocksize, nested, layout, dtype, r, adapter_dtype=None):
    """CPU stand-ins shaped as lora_triton.py passes them (never read: the launch only compiles)."""
    numel = n_w * k_w
    blocks = numel // blocksize
    packed = torch.zeros((numel + 1) // 2, dtype=torch.uint8)
    code = torch.zeros(16, dtype=torch.float32)
    if nested:
        absmax = torch.zeros(blocks, dtype=torch.uint8)
        code2 = torch.zeros(256, dtype=torch.float32)
        absmax2 = torch.zeros((blocks + 255) // 256, dtype=torch.float32)
        offset = torch.zeros(1, dtype=torch.float32)
    else:
        absmax = torch.zeros(blocks, dtype=torch.float32)
        code2 = absmax2 = offset = None
    k, n = (k_w, n_w) if layout == "nk" else (n_w, k_w)
    x = torch.zeros(m, k, dtype=dtype)
    left = torch.zeros(m, r, dtype=dtype)
    # Forward: right = lora_B^T (a transposed view); dX: right = lora_A [r, in], row-major.
    adt = adapter_dtype or dtype
    right = torch.zeros(n, r, dtype=adt).t() if layout == "nk" else torch.zeros(r, n, dtype=adt)
    y = torch.empty(m, n, dtype=dtype)
    return x, packed, absmax, code, code2, absmax2, offset, left, right, y


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--all", action="store_true", help="the full sweep (see the module docstring)")
    p.add_argument("--arch", default="sm80,sm89,sm90")
    p.add_argument("--limit", type=int, default=0, help="at most this many configs per arch (0: all admitted)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run with TRITON_INTERPRET unset")

    import torch

    from peftfast.kernels import launch
    from peftfast.kernels.experimental import qmatmul as q

    m, n_w, k_w = 8192, 1024, 4096
    bf16, fp32 = torch.bfloat16, torch.float32
    # (blocksize, nested, dtype, bias + dropout epilogue, adapter dtype, rank): the QLoRA default first.
    cases = [(64, True, bf16, False, bf16, 16)]
    if args.all:
        cases += [(64, False, bf16, False, bf16, 16), (32, True, bf16, False, bf16, 16),
                  (256, False, bf16, False, bf16, 16), (64, True, fp32, False, fp32, 16),
                  (64, True, bf16, True, bf16, 16),
                  # fp32 adapters (peftfast's default on a bf16 base) at the widest low-rank tile
                  (64, True, bf16, False, fp32, 64)]
    records = []
    for arch in args.arch.split(","):
        limit = aot.SMEM_LIMIT[arch]
        layouts = q.LAYOUTS if args.all else _SUBSET_LAYOUTS[arch]
        for (blocksize, nested, dtype, has_bias, adapter_dtype, r), layout in itertools.product(cases, layouts):
            dropout = has_bias
            elem = torch.empty(0, dtype=dtype).element_size()
            cfgs = q.candidates(m, elem, launch.block_r(r), family=arch, max_smem=limit, blocksize=blocksize,
                                nested=nested, layout=layout)
            if not args.all:
                def estimate(c, bs=blocksize, nested=nested, layout=layout, elem=elem):
                    return q.smem_bytes(c, c["num_stages"], elem, launch.block_r(r), blocksize=bs, nested=nested,
                                        w_nk=layout == "nk")

                cfgs = sorted(cfgs, key=estimate, reverse=True)[:1]
            if args.limit:
                cfgs = cfgs[:args.limit]
            for cfg in cfgs:
                x, packed, absmax, code, code2, absmax2, offset, left, right, y = _case_tensors(
                    torch, m=m, n_w=n_w, k_w=k_w, blocksize=blocksize, nested=nested, layout=layout, dtype=dtype,
                    r=r, adapter_dtype=adapter_dtype)
                bias = torch.zeros(y.shape[1], dtype=dtype) if has_bias else None
                seed = torch.zeros(1, dtype=torch.int64) if dropout else None
                launch_args, flags = q._launch_args(x, packed, absmax, code, code2, absmax2, offset,
                                                    [blocksize, 256, n_w, k_w], left, right, 2.0, bias,
                                                    0.1 if dropout else 0.0, seed, y, layout)
                flags["PTX_MUL_RN"] = True  # what a CUDA launch on NVIDIA passes
                rec = {"arch": arch, "config": cfg, "layout": layout, "blocksize": blocksize, "nested": nested,
                       "dtype": str(dtype).replace("torch.", ""), "bias": has_bias, "dropout": dropout,
                       "adapters": str(adapter_dtype).replace("torch.", ""), "rank": r,
                       "limit": limit,
                       "estimate": q.smem_bytes(cfg, cfg["num_stages"], elem, launch.block_r(r), blocksize=blocksize,
                                                nested=nested, w_nk=layout == "nk")}
                try:
                    with aot.compile_instead_of_launch(arch) as launches:
                        q._launch_config(launch_args, flags, m, y.shape[1], cfg)
                    rec["shared"] = launches[0].shared
                    rec["fits"] = launches[0].fits
                except Exception as e:  # noqa: BLE001 - a compile failure is a result to report
                    rec["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(json.dumps(rec), file=sys.stderr)
                records.append(rec)
    print(json.dumps(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
