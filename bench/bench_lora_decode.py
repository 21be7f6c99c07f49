"""Suite ``lora_decode``: one LoRA linear on an NF4 (nested absmax) base at decode batch sizes.

Shapes: Llama-3-8B's linear layers (K -> N: 4096->4096, 4096->1024, 4096->14336, 14336->4096), r=16,
M in {1, 4, 16, 64} rows, bf16 activations, inference (no grad). Decode is bound by reading the weight:

    bytes  = nf4(N, K) + 2*M*K (x) + 2*r*K (A) + 2*N*r (B) + 2*M*N (y)
    nf4    = N*K/2 (codes) + N*K/64 (uint8 block scales) + 4*N*K/64/256 (fp32 second-level scales)
    FLOPs  = 2*M*N*K + 2*M*r*(K + N)
    % of HBM roofline = (bytes / measured copy bandwidth) / measured time

Implementations (each timed on the same inputs, rotated through > 2x L2 of weight sets):
    peftfast            peftfast.kernels.lora_linear (fused dequant-GEMV + LoRA epilogue for M <= 64)
    peft_bnb            Hugging Face PEFT's LoRA layer on a bitsandbytes Linear4bit (what users run today)
    dequant_cublas      bitsandbytes.functional.dequantize_4bit, then x @ W^T (cuBLAS), LoRA by torch.addmm
    bf16_dense_floor    x @ W^T on a pre-dequantized bf16 weight (no LoRA term): 4x the weight bytes
"""
from __future__ import annotations

from typing import Optional

import torch

from bench_common import (LLAMA3_8B_SHAPES, LORA_ALPHA, LORA_R, Context, derive, free_memory, geomean, headline,
                          import_bnb, import_peft, is_available, make_context, measure_ceilings, n_buffers,
                          nf4_bytes, peft_lora_layer, quantize_nf4, rel_err, safe_measure, smoke_threads, speedups,
                          suite_result, unavailable)

NAME = "lora_decode"
FULL_MS = (1, 4, 16, 64)
SMOKE_SHAPES = ((128, 128), (128, 256))
SMOKE_MS = (1, 4)
# The headline profile: single-token decode through the two MLP shapes (gate/up and down).
HEADLINE_SHAPES = ((4096, 14336), (14336, 4096))
HEADLINE_MS = (1,)


def sizes(ctx: Context):
    """``(shapes, Ms)`` of this run: full, headline, or the smoke analogue of either."""
    if ctx.smoke:
        return (SMOKE_SHAPES[:1], SMOKE_MS[:1]) if ctx.headline else (SMOKE_SHAPES, SMOKE_MS)
    return (HEADLINE_SHAPES, HEADLINE_MS) if ctx.headline else (LLAMA3_8B_SHAPES, FULL_MS)


def _weight_set(ctx: Context, k: int, n: int, bnb_ok: bool, peft_ok: bool, peft_why: str):
    dt, dev = ctx.dtype, ctx.device
    w = (torch.randn(n, k, device=dev) / k**0.5).to(dt)
    a = (torch.randn(LORA_R, k, device=dev) / k**0.5).to(dt)
    b = (torch.randn(n, LORA_R, device=dev) * 0.02).to(dt)
    s = {"w": w, "A": a, "B": b}
    if bnb_ok:
        s["lin"] = quantize_nf4(w, dt, nested=True)
        if peft_ok:
            try:
                s["peft"] = peft_lora_layer(s["lin"], a, b, r=LORA_R, alpha=LORA_ALPHA, four_bit=True)
            except Exception as e:  # noqa: BLE001
                s["peft_error"] = f"error building PEFT's layer: {type(e).__name__}: {e}"
        else:
            s["peft_error"] = peft_why
    return s


@smoke_threads
def run(smoke: Optional[bool] = None, ctx: Optional[Context] = None) -> dict:
    ctx = ctx or make_context(smoke)
    ceilings = ctx.ceilings or measure_ceilings(ctx)
    shapes, ms = sizes(ctx)
    bnb, bnb_why = import_bnb()
    peft, peft_why = import_peft()
    from peftfast.kernels import lora_linear

    scaling = LORA_ALPHA / LORA_R
    ctx.begin(NAME, len(shapes) * len(ms))
    cases = []
    for k, n in shapes:
        torch.manual_seed(0)
        wbytes = nf4_bytes(n, k)
        n_nf4 = n_buffers(ctx, wbytes + 2 * LORA_R * (k + n))
        n_dense = n_buffers(ctx, 2 * n * k)
        sets = [_weight_set(ctx, k, n, bnb is not None, peft is not None, peft_why) for _ in range(max(n_nf4, n_dense))]
        for m in ms:
            xs = [torch.randn(m, k, device=ctx.device).to(ctx.dtype) for _ in sets]
            adapter_bytes = 2 * LORA_R * (k + n)
            io_bytes = 2 * m * k + 2 * m * n
            flops = 2 * m * n * k + 2 * m * LORA_R * (k + n)
            nf4_total = wbytes + adapter_bytes + io_bytes
            dense_total = 2 * n * k + io_bytes
            impls = {}
            with torch.no_grad():
                if bnb is None:
                    impls["peftfast"] = unavailable(bnb_why)
                    impls["peft_bnb"] = unavailable(bnb_why)
                    impls["dequant_cublas"] = unavailable(bnb_why)
                else:
                    nf4_sets = list(zip(sets, xs))[:n_nf4]
                    impls["peftfast"] = safe_measure(
                        ctx, lambda s, x: lora_linear(x, s["lin"].weight, s["A"], s["B"], scaling, backend=ctx.backend),
                        nf4_sets)
                    if "peft" in sets[0]:
                        impls["peft_bnb"] = safe_measure(ctx, lambda s, x: s["peft"](x), nf4_sets)
                    else:
                        impls["peft_bnb"] = unavailable(sets[0].get("peft_error", peft_why))

                    def dequant_cublas(s, x):
                        wq = s["lin"].weight
                        w = bnb.functional.dequantize_4bit(wq.data, wq.quant_state).to(x.dtype)
                        y = torch.mm(x, w.t())
                        return torch.addmm(y, torch.mm(x, s["A"].t()), s["B"].t(), alpha=scaling)

                    impls["dequant_cublas"] = safe_measure(ctx, dequant_cublas, nf4_sets)
                dense_sets = list(zip(sets, xs))[:n_dense]
                impls["bf16_dense_floor"] = safe_measure(ctx, lambda s, x: torch.mm(x, s["w"].t()), dense_sets)
                check = {}
                if bnb is not None and is_available(impls["peftfast"]) and is_available(impls["dequant_cublas"]):
                    s0, x0 = sets[0], xs[0]
                    ref = dequant_cublas(s0, x0)
                    check["rel_err_peftfast_vs_dequant_cublas"] = rel_err(
                        lora_linear(x0, s0["lin"].weight, s0["A"], s0["B"], scaling, backend=ctx.backend), ref)
                    if is_available(impls.get("peft_bnb")):
                        check["rel_err_peft_vs_dequant_cublas"] = rel_err(s0["peft"](x0), ref)
            for name, res in impls.items():
                derive(res, flops=flops, bytes_moved=dense_total if name == "bf16_dense_floor" else nf4_total,
                       ceilings=ceilings)
            cases.append({
                "name": f"{k}->{n} M={m}",
                "shape": {"M": m, "K": k, "N": n, "r": LORA_R, "base": "nf4-nested", "dtype": str(ctx.dtype)},
                "flops": flops, "bytes": {"nf4_impls": nf4_total, "bf16_dense_floor": dense_total},
                "impls": impls, "speedup": speedups(impls), "check": check,
            })
            ctx.tick(f"{k}->{n} M={m}")
        del sets
        free_memory(ctx)

    def pct(case):
        r = case["impls"]["peftfast"]
        return r.get("pct_of_hbm_roofline") if is_available(r) else None

    heads = []
    for m in ms:
        sel = [c for c in cases if c["shape"]["M"] == m]
        heads.append(headline(f"M={m}: peftfast % of HBM roofline (geomean over shapes)",
                              geomean([pct(c) for c in sel]), "%"))
    heads.append(headline("speedup vs PEFT+bnb (geomean, all cases)",
                          geomean([c["speedup"].get("peft_bnb") for c in cases]), "x"))
    heads.append(headline("speedup vs dequant+cuBLAS (geomean, all cases)",
                          geomean([c["speedup"].get("dequant_cublas") for c in cases]), "x"))
    config = {"shapes_K_N": [list(s) for s in shapes], "M": list(ms), "r": LORA_R, "lora_alpha": LORA_ALPHA,
              "dtype": str(ctx.dtype), "base": "NF4, nested absmax, blocksize 64", "grad": False,
              "peft_adapter_dtype": "same as peftfast's (bf16): autocast_adapter_dtype=False"}
    return suite_result(NAME, ctx, cases, config=config, headline=heads,
                        notes=["speedup = baseline median / peftfast median (> 1: peftfast faster)"])
