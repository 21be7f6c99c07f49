"""Suite ``lora_train``: forward + backward of one LoRA linear at training batch sizes.

Shapes: Llama-3-8B's linear layers (4096->4096, 4096->1024, 4096->14336, 14336->4096), r=16,
M in {2048, 8192} rows, bf16, a bf16 dense base and an NF4 (nested) base; the base weight is frozen
(no dW), x, A and B get gradients. Compute-bound:

    FLOPs = forward 2MNK + 2Mr(K+N)  +  backward: dX 2MNK + 2MrK, g = dY B 2MNr, dA 2MrK, dB 2MrN
          = 4MNK + 6Mr(K+N)
    TFLOP/s and % of the measured bf16 matmul ceiling; peak memory = what one step allocates above
    what was allocated before it (saved activations and temporaries).

Implementations:
    peftfast            peftfast.kernels.lora_linear (LoRA folded into the base GEMM's epilogue; dY B once);
                        for NF4, the QLoRA GEMM variant its selection picks (dequant + GEMM unless a tuned
                        table says otherwise)
    peftfast_dequant    (NF4) the same with PEFTFAST_QLORA_GEMM=dequant: dequantize_4bit, then the fused GEMM
    peftfast_inloop     (NF4) the same with PEFTFAST_QLORA_GEMM=inloop: the 4-bit codes decoded in the fused
                        GEMM's K loop (kernels/experimental/qmatmul.py), forward and dX
    peft                Hugging Face PEFT's LoRA layer on nn.Linear (bf16 base) / bitsandbytes Linear4bit (NF4)
    dequant_cublas      (NF4) bnb dequantize_4bit, F.linear, LoRA added by torch.addmm; autograd backward
    plain_addmm         (bf16) F.linear, LoRA added by torch.addmm; autograd backward
    bf16_dense_floor    F.linear on a pre-dequantized bf16 weight, no LoRA (forward + dX)
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.nn.functional as F

from bench_common import (LLAMA3_8B_SHAPES, LORA_ALPHA, LORA_R, Context, derive, free_memory, geomean, headline,
                          import_bnb, import_peft, make_context, measure_ceilings, n_buffers,
                          nf4_bytes, peft_lora_layer, quantize_nf4, rel_err, safe_measure, smoke_threads,
                          speedups, suite_result, unavailable)

NAME = "lora_train"
FULL_MS = (2048, 8192)
SMOKE_SHAPES = ((128, 128), (128, 256))
SMOKE_MS = (32,)
# The headline profile: a training-sized batch through the gate/up shape, on both bases.
HEADLINE_SHAPES = ((4096, 14336),)
HEADLINE_MS = (8192,)
BASES = ("bf16", "nf4")
# The two QLoRA GEMM variants, each forced for one row (kernels/experimental/qmatmul.py; "peftfast" is the default choice).
QLORA_VARIANTS = ("dequant", "inloop")


@contextlib.contextmanager
def qlora_gemm(variant: str):
    """Force peftfast's QLoRA GEMM variant (``PEFTFAST_QLORA_GEMM``) inside the block.

    The kernels read the environment once per process; ``clear_memory_caches`` makes them read it again."""
    from peftfast.kernels.tuning import clear_memory_caches

    old = os.environ.get("PEFTFAST_QLORA_GEMM")
    os.environ["PEFTFAST_QLORA_GEMM"] = variant
    clear_memory_caches()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PEFTFAST_QLORA_GEMM", None)
        else:
            os.environ["PEFTFAST_QLORA_GEMM"] = old
        clear_memory_caches()


def sizes(ctx: Context):
    """``(shapes, Ms)`` of this run: full, headline, or the smoke analogue of either."""
    if ctx.smoke:
        return (SMOKE_SHAPES[:1] if ctx.headline else SMOKE_SHAPES), SMOKE_MS
    return (HEADLINE_SHAPES, HEADLINE_MS) if ctx.headline else (LLAMA3_8B_SHAPES, FULL_MS)


def _params(ctx: Context, k: int, n: int):
    dt, dev = ctx.dtype, ctx.device
    a = (torch.randn(LORA_R, k, device=dev) / k**0.5).to(dt).requires_grad_(True)
    b = (torch.randn(n, LORA_R, device=dev) * 0.02).to(dt).requires_grad_(True)
    return a, b


def _weight_set(ctx: Context, k: int, n: int, base: str, bnb, peft_why: str):
    w = (torch.randn(n, k, device=ctx.device) / k**0.5).to(ctx.dtype)
    a, b = _params(ctx, k, n)
    s = {"w": w, "A": a, "B": b}
    if base == "nf4":
        s["lin"] = quantize_nf4(w, ctx.dtype, nested=True)
        s["weight"] = s["lin"].weight
        base_layer = s["lin"]
    else:
        s["weight"] = w
        base_layer = torch.nn.Linear(k, n, bias=False, device=ctx.device, dtype=ctx.dtype)
        with torch.no_grad():
            base_layer.weight.copy_(w)
        base_layer.weight.requires_grad_(False)
    if not peft_why:
        try:
            s["peft"] = peft_lora_layer(base_layer, a, b, r=LORA_R, alpha=LORA_ALPHA, four_bit=(base == "nf4"))
        except Exception as e:  # noqa: BLE001
            s["peft_error"] = f"error building PEFT's layer: {type(e).__name__}: {e}"
    else:
        s["peft_error"] = peft_why
    return s


def _peft_params(s):
    layer = s.get("peft")
    if layer is None:
        return []
    return [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


@smoke_threads
def run(smoke: Optional[bool] = None, ctx: Optional[Context] = None) -> dict:
    ctx = ctx or make_context(smoke)
    ceilings = ctx.ceilings or measure_ceilings(ctx)
    shapes, ms = sizes(ctx)
    bnb, bnb_why = import_bnb()
    peft, peft_why = import_peft()
    from peftfast.kernels import lora_linear

    scaling = LORA_ALPHA / LORA_R
    ctx.begin(NAME, len(shapes) * len(ms) * len(BASES))
    cases = []
    for base in BASES:
        for k, n in shapes:
            if base == "nf4" and bnb is None:
                for m in ms:
                    impls = {name: unavailable(bnb_why) for name in ("peftfast", "peftfast_dequant",
                                                                     "peftfast_inloop", "peft", "dequant_cublas",
                                                                     "bf16_dense_floor")}
                    cases.append(_case(base, k, n, m, impls, ceilings))
                    ctx.tick(f"{base} {k}->{n} M={m} (unavailable)")
                continue
            torch.manual_seed(0)
            wbytes = nf4_bytes(n, k) if base == "nf4" else 2 * n * k
            n_sets = n_buffers(ctx, wbytes + 2 * min(ms) * (k + n) * 2)
            sets = [_weight_set(ctx, k, n, base, bnb, peft_why) for _ in range(n_sets)]
            for m in ms:
                per_set = 2 * m * (k + n) * 2 + wbytes
                used = sets[:n_buffers(ctx, per_set)]
                xs = [torch.randn(m, k, device=ctx.device).to(ctx.dtype).requires_grad_(True) for _ in used]
                dys = [torch.randn(m, n, device=ctx.device).to(ctx.dtype) for _ in used]
                args = list(zip(used, xs, dys))
                grads = xs + [t for s in used for t in (s["A"], s["B"], *_peft_params(s))]

                def ours(s, x, dy):
                    lora_linear(x, s["weight"], s["A"], s["B"], scaling, backend=ctx.backend).backward(dy)

                def peft_step(s, x, dy):
                    s["peft"](x).backward(dy)

                def plain(s, x, dy):
                    if base == "nf4":
                        wq = s["lin"].weight
                        w = bnb.functional.dequantize_4bit(wq.data, wq.quant_state).to(x.dtype)
                    else:
                        w = s["w"]
                    y = F.linear(x, w)
                    y = torch.addmm(y, x @ s["A"].t(), s["B"].t(), alpha=scaling)
                    y.backward(dy)

                def floor(s, x, dy):
                    F.linear(x, s["w"]).backward(dy)

                impls = {"peftfast": safe_measure(ctx, ours, args, grad_to_none=grads)}
                if base == "nf4":
                    for variant in QLORA_VARIANTS:
                        if ctx.backend != "triton":
                            impls[f"peftfast_{variant}"] = unavailable(
                                f"the {variant} variant is a Triton path; this run uses the {ctx.backend} backend")
                            continue
                        with qlora_gemm(variant):
                            impls[f"peftfast_{variant}"] = safe_measure(ctx, ours, args, grad_to_none=grads)
                if "peft" in sets[0]:
                    impls["peft"] = safe_measure(ctx, peft_step, args, grad_to_none=grads)
                else:
                    impls["peft"] = unavailable(sets[0].get("peft_error", peft_why))
                impls["dequant_cublas" if base == "nf4" else "plain_addmm"] = safe_measure(ctx, plain, args,
                                                                                            grad_to_none=grads)
                dense_args = args[:n_buffers(ctx, 2 * m * (k + n) * 2 + 2 * n * k)]
                impls["bf16_dense_floor"] = safe_measure(ctx, floor, dense_args, grad_to_none=grads)
                case = _case(base, k, n, m, impls, ceilings)
                if base == "nf4" and ctx.backend == "triton":
                    case["check"] = _variant_check(args[0], scaling, ctx.backend)
                cases.append(case)
                ctx.tick(f"{base} {k}->{n} M={m}")
                del xs, dys, args, grads
            del sets
            free_memory(ctx)

    heads = []
    nf4_cases = [c for c in cases if c["shape"]["base"] == "nf4"]
    heads.append(headline("nf4 base: in-loop decode vs dequant + GEMM (geomean of dequant time / in-loop time; "
                          "> 1: in-loop faster)",
                          geomean([_ratio(c["impls"].get("peftfast_dequant"), c["impls"].get("peftfast_inloop"))
                                   for c in nf4_cases])))
    for base, other in (("nf4", "dequant_cublas"), ("bf16", "plain_addmm")):
        sel = [c for c in cases if c["shape"]["base"] == base]
        heads.append(headline(f"{base} base: speedup vs PEFT (geomean)",
                              geomean([c["speedup"].get("peft") for c in sel])))
        heads.append(headline(f"{base} base: speedup vs {other} (geomean)",
                              geomean([c["speedup"].get(other) for c in sel])))
    config = {"shapes_K_N": [list(s) for s in shapes], "M": list(ms), "r": LORA_R, "lora_alpha": LORA_ALPHA,
              "qlora_variants": {f"peftfast_{v}": f"PEFTFAST_QLORA_GEMM={v}" for v in QLORA_VARIANTS},
              "bases": list(BASES), "dtype": str(ctx.dtype), "step": "y = f(x); y.backward(dy); x, A, B get grads",
              "peft_adapter_dtype": "same as peftfast's (bf16): autocast_adapter_dtype=False"}
    return suite_result(NAME, ctx, cases, config=config, headline=heads,
                        notes=["speedup = baseline median / peftfast median (> 1: peftfast faster)"])


def _variant_check(arg_set, scaling: float, backend: str) -> dict:
    """Relative error of the in-loop variant's forward output against the dequant variant's (same inputs)."""
    from peftfast.kernels import lora_linear

    s, x, _ = arg_set
    ys = {}
    try:
        with torch.no_grad():
            for variant in QLORA_VARIANTS:
                with qlora_gemm(variant):
                    ys[variant] = lora_linear(x, s["weight"], s["A"], s["B"], scaling, backend=backend)
    except Exception as e:  # noqa: BLE001 - recorded, as a failed measurement is
        return {"rel_err_inloop_vs_dequant": None, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    return {"rel_err_inloop_vs_dequant": rel_err(ys["inloop"], ys["dequant"])}


def _ratio(num: Optional[dict], den: Optional[dict]) -> Optional[float]:
    """``num median / den median`` when both ran, else None."""
    if not (num and den and "median_ms" in num and "median_ms" in den):
        return None
    return num["median_ms"] / den["median_ms"]


def _case(base, k, n, m, impls, ceilings):
    flops = 4 * m * n * k + 6 * m * LORA_R * (k + n)
    floor_flops = 4 * m * n * k
    for name, res in impls.items():
        derive(res, flops=floor_flops if name == "bf16_dense_floor" else flops, ceilings=ceilings)
    return {"name": f"{base} {k}->{n} M={m}",
            "shape": {"M": m, "K": k, "N": n, "r": LORA_R, "base": base, "dtype": "torch.bfloat16"},
            "flops": flops, "impls": impls, "speedup": speedups(impls)}
