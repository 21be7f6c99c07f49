"""Suite ``ia3``: an IA3-scaled linear layer against the plain base layer it wraps.

IA3 adds one elementwise scale: ``y = (x W^T) * l`` (attention projections) or ``y = (x * l) W^T``
(feed-forward ``down_proj``, PEFT's ``feedforward_modules``). Fused into the GEMM's epilogue / prologue
it should cost almost nothing: the target is **within 3% of the base layer** (overhead_pct <= 3).

Shapes: Llama-3-8B's linear layers, bf16 dense base, output scaling for 4096->{4096, 1024, 14336},
input scaling for 14336->4096. Modes: forward at M=16 and M=8192, forward + backward at M=8192
(x and l get gradients, W frozen).

Implementations:
    peftfast          peftfast.kernels.ia3_linear (records which backend ran: the Triton kernel, or the
                      reference where no Triton IA3 kernel exists yet)
    peft              Hugging Face PEFT's IA3 layer on nn.Linear
    base_layer        F.linear(x, W): the layer without IA3 (the target)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from bench_common import (LLAMA3_8B_SHAPES, Context, derive, free_memory, headline, import_peft,
                          make_context, measure_ceilings, n_buffers, safe_measure, smoke_threads, speedups,
                          suite_result, unavailable)

NAME = "ia3"
FULL_MODES = (("fwd", 16), ("fwd", 8192), ("fwd+bwd", 8192))
SMOKE_SHAPES = ((128, 128), (256, 128))
SMOKE_MODES = (("fwd", 4), ("fwd+bwd", 32))
# The headline profile: the gate/up shape at a training-sized batch, forward and forward + backward.
HEADLINE_SHAPES = ((4096, 14336),)
HEADLINE_MODES = (("fwd", 8192), ("fwd+bwd", 8192))
TARGET_OVERHEAD_PCT = 3.0


def _peft_ia3(base_layer, l, feedforward: bool):
    peft, why = import_peft()
    if peft is None:
        raise RuntimeError(why)
    from bench_common import _One

    cfg = peft.IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if feedforward else [],
                         init_ia3_weights=False)
    pm = peft.get_peft_model(_One(base_layer), cfg, autocast_adapter_dtype=False)
    layer = pm.base_model.model.proj
    layer.ia3_l["default"] = torch.nn.Parameter(l.detach().clone().reshape(layer.ia3_l["default"].shape),
                                                requires_grad=True)
    return layer


def sizes(ctx: Context):
    """``(shapes, modes)`` of this run: full, headline, or the smoke analogue of either."""
    if ctx.smoke:
        return (SMOKE_SHAPES[:1] if ctx.headline else SMOKE_SHAPES), SMOKE_MODES
    return (HEADLINE_SHAPES, HEADLINE_MODES) if ctx.headline else (LLAMA3_8B_SHAPES, FULL_MODES)


@smoke_threads
def run(smoke: Optional[bool] = None, ctx: Optional[Context] = None) -> dict:
    ctx = ctx or make_context(smoke)
    ceilings = ctx.ceilings or measure_ceilings(ctx)
    shapes, modes = sizes(ctx)
    _, peft_why = import_peft()
    from peftfast.kernels import ia3 as ia3_mod
    from peftfast.kernels import ia3_linear

    backend = ctx.backend
    backend_note = backend
    if backend == "triton" and getattr(ia3_mod, "_triton_ia3_linear", None) is None:
        backend, backend_note = "reference", "reference (no Triton IA3 kernel in this build)"
    ctx.begin(NAME, len(shapes) * len(modes))
    cases = []
    for k, n in shapes:
        feedforward = k > n  # down_proj (14336 -> 4096) is PEFT's feed-forward module for Llama
        torch.manual_seed(0)
        max_m = max(m for _, m in modes)
        n_sets = n_buffers(ctx, 2 * n * k + 2 * max_m * (k + n))
        sets = []
        for _ in range(n_sets):
            w = (torch.randn(n, k, device=ctx.device) / k**0.5).to(ctx.dtype)
            l_shape = (1, k) if feedforward else (n, 1)
            l = (1 + 0.1 * torch.randn(l_shape, device=ctx.device)).to(ctx.dtype).requires_grad_(True)
            s = {"w": w, "l": l}
            if not peft_why:
                lin = torch.nn.Linear(k, n, bias=False, device=ctx.device, dtype=ctx.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w)
                lin.weight.requires_grad_(False)
                try:
                    s["peft"] = _peft_ia3(lin, l, feedforward)
                except Exception as e:  # noqa: BLE001
                    s["peft_error"] = f"error building PEFT's layer: {type(e).__name__}: {e}"
            else:
                s["peft_error"] = peft_why
            sets.append(s)
        for mode, m in modes:
            train = mode == "fwd+bwd"
            per_set = 2 * n * k + 2 * m * (k + n)
            used = sets[:n_buffers(ctx, per_set)]
            xs = [torch.randn(m, k, device=ctx.device).to(ctx.dtype).requires_grad_(train) for _ in used]
            dys = [torch.randn(m, n, device=ctx.device).to(ctx.dtype) for _ in used]
            args = list(zip(used, xs, dys))
            grads = (xs + [s["l"] for s in used]
                     + [p for s in used if "peft" in s for p in s["peft"].ia3_l.parameters()]) if train else None

            def finish(y, dy):
                if train:
                    y.backward(dy)
                return y

            def ours(s, x, dy):
                return finish(ia3_linear(x, s["w"], s["l"], feedforward=feedforward, backend=backend), dy)

            def peft_fn(s, x, dy):
                return finish(s["peft"](x), dy)

            def base_fn(s, x, dy):
                return finish(F.linear(x, s["w"]), dy)

            with torch.set_grad_enabled(train):
                impls = {"peftfast": safe_measure(ctx, ours, args, grad_to_none=grads)}
                impls["peft"] = (safe_measure(ctx, peft_fn, args, grad_to_none=grads) if "peft" in used[0]
                                 else unavailable(used[0].get("peft_error", peft_why)))
                impls["base_layer"] = safe_measure(ctx, base_fn, args, grad_to_none=grads)
            flops = (4 if train else 2) * m * n * k
            bytes_moved = 2 * (n * k + m * k + m * n) * (2 if train else 1)
            for res in impls.values():
                derive(res, flops=flops, bytes_moved=bytes_moved, ceilings=ceilings)
            sp = speedups(impls)
            ratio = sp.get("base_layer")
            overhead = (1.0 / ratio - 1.0) * 100.0 if ratio else None
            cases.append({
                "name": f"{k}->{n} {mode} M={m}",
                "shape": {"M": m, "K": k, "N": n, "mode": mode, "feedforward": feedforward, "base": "bf16",
                          "dtype": str(ctx.dtype)},
                "flops": flops, "bytes": bytes_moved, "impls": impls, "speedup": sp,
                "overhead_vs_base_pct": overhead, "backend": backend_note,
            })
            ctx.tick(f"{k}->{n} {mode} M={m}")
            del xs, dys, args
        del sets
        free_memory(ctx)
    overheads = [c["overhead_vs_base_pct"] for c in cases if c["overhead_vs_base_pct"] is not None]
    within = sum(o <= TARGET_OVERHEAD_PCT for o in overheads)
    heads = [headline("peftfast overhead vs base layer, worst case", max(overheads) if overheads else None, "%",
                      target=f"<= {TARGET_OVERHEAD_PCT}%"),
             headline(f"cases within {TARGET_OVERHEAD_PCT}% of the base layer", within, f"of {len(cases)}")]
    config = {"shapes_K_N": [list(s) for s in shapes], "modes": [list(mm) for mm in modes], "dtype": str(ctx.dtype),
              "peftfast_backend": backend_note, "target_overhead_pct": TARGET_OVERHEAD_PCT}
    return suite_result(NAME, ctx, cases, config=config, headline=heads,
                        notes=["overhead_vs_base_pct = (peftfast median / base_layer median - 1) * 100"])
