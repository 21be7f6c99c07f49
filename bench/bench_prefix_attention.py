"""Suite ``prefix_attention``: causal attention with a learned prefix (prefix tuning), forward + backward.

Llama-3-8B attention: 32 query heads, 8 KV heads (GQA, 4 query heads per KV head), head_dim 128, bf16.
Sequence N in {512, 1024, 2048, 4096, 8192}, prefix length P in {16, 64, 128}, batch B = 16384 // N
(the same number of tokens in every case). Every query attends to all P prefix keys and causally to the
sequence; q, k, v and the prefix (given once as [H_kv, P, D]) get gradients.

    pairs  = B * H_q * (N*P + N*(N+1)/2)             (query, key) pairs that are not masked
    FLOPs  = 4 * D * pairs (forward) * 3.5 (forward + backward, the backward counted as 2.5x)

Implementations:
    peftfast       peftfast.kernels.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True): the prefix
                   read once per batch (stride 0), online softmax over prefix then causal blocks
    sdpa_flash     torch SDPA on the concatenated K/V (prefix expanded over the batch, KV heads repeated),
                   lower-right causal bias: FlashAttention when eligible (recorded per case)
    peft_path      what PEFT + transformers do: the prefix as a cache concatenated to K/V per batch, KV heads
                   repeated, an explicit [B, 1, N, P+N] boolean mask (prefix ones + causal), SDPA with that mask

Targets: >= 0.9x the speed of sdpa_flash, >= 2x the PEFT path. Peak memory is recorded for each.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from bench_common import (Context, derive, free_memory, geomean, headline, is_available, make_context,
                          measure_ceilings, rel_err, safe_measure, smoke_threads, speedups, suite_result, unavailable)

NAME = "prefix_attention"
FULL = dict(seqs=(512, 1024, 2048, 4096, 8192), prefixes=(16, 64, 128), hq=32, hkv=8, d=128, tokens=16384)
SMOKE = dict(seqs=(32, 64), prefixes=(4, 8), hq=4, hkv=2, d=16, tokens=128)
# The headline profile: one case, sequence 2048 with a 64-token prefix (batch 8).
HEADLINE = dict(FULL, seqs=(2048,), prefixes=(64,))
SMOKE_HEADLINE = dict(SMOKE, seqs=(64,), prefixes=(8,))


def load_kernel():
    """``(prefix_attention, "")`` or ``(None, reason)``: the kernel is imported lazily (it may not exist yet)."""
    try:
        from peftfast.kernels import prefix_attention
    except Exception as e:  # noqa: BLE001
        return None, f"unavailable: kernel not present ({type(e).__name__}: {e})"
    fn = prefix_attention if callable(prefix_attention) else getattr(prefix_attention, "prefix_attention", None)
    if not callable(fn):
        return None, "unavailable: kernel not present (peftfast.kernels.prefix_attention is not callable)"
    return fn, ""


def _expand_prefix(p: torch.Tensor, b: int) -> torch.Tensor:
    return p.unsqueeze(0).expand(b, *p.shape)  # [B, H_kv, P, D]


def _repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def sdpa_concat(q, k, v, pk, pv):
    """SDPA on [prefix; K] with a lower-right causal bias (FlashAttention where eligible)."""
    from torch.nn.attention.bias import causal_lower_right

    b, hq, n, _ = q.shape
    g = hq // k.shape[1]
    kk = _repeat_kv(torch.cat([_expand_prefix(pk, b), k], dim=2), g)
    vv = _repeat_kv(torch.cat([_expand_prefix(pv, b), v], dim=2), g)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=causal_lower_right(n, kk.shape[2]))


def peft_path(q, k, v, pk, pv):
    """PEFT's prefix tuning as transformers runs it: cache concat, repeat_kv, explicit boolean mask."""
    b, hq, n, _ = q.shape
    p = pk.shape[1]
    g = hq // k.shape[1]
    kk = _repeat_kv(torch.cat([_expand_prefix(pk, b), k], dim=2), g)
    vv = _repeat_kv(torch.cat([_expand_prefix(pv, b), v], dim=2), g)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    mask = torch.cat([torch.ones(n, p, dtype=torch.bool, device=q.device), causal], dim=1)
    mask = mask[None, None].expand(b, 1, n, p + n)  # attention mask extended with P ones, as PEFT does
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)


def _flash_eligible(q, kk, vv) -> Optional[bool]:
    """Whether SDPA's FlashAttention kernel accepts these inputs (None where torch cannot say)."""
    if q.device.type != "cuda":
        return False
    try:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention

        try:
            params = SDPAParams(q, kk, vv, None, 0.0, True, False)
        except TypeError:  # torch < 2.5: no enable_gqa argument
            params = SDPAParams(q, kk, vv, None, 0.0, True)
        return bool(can_use_flash_attention(params, False))
    except Exception:  # noqa: BLE001
        return None


def sizes(ctx: Context) -> dict:
    """The case grid of this run: full, headline, or the smoke analogue of either."""
    if ctx.smoke:
        return SMOKE_HEADLINE if ctx.headline else SMOKE
    return HEADLINE if ctx.headline else FULL


@smoke_threads
def run(smoke: Optional[bool] = None, ctx: Optional[Context] = None) -> dict:
    ctx = ctx or make_context(smoke)
    ceilings = ctx.ceilings or measure_ceilings(ctx)
    cfg = sizes(ctx)
    kernel, why = load_kernel()
    hq, hkv, d = cfg["hq"], cfg["hkv"], cfg["d"]
    ctx.begin(NAME, len(cfg["seqs"]) * len(cfg["prefixes"]))
    cases = []
    for n in cfg["seqs"]:
        b = max(1, cfg["tokens"] // n)
        for p in cfg["prefixes"]:
            torch.manual_seed(0)
            dev, dt = ctx.device, ctx.dtype

            def rnd(*shape):
                return torch.randn(*shape, device=dev).to(dt).requires_grad_(True)

            q, k, v = rnd(b, hq, n, d), rnd(b, hkv, n, d), rnd(b, hkv, n, d)
            pk, pv = rnd(hkv, p, d), rnd(hkv, p, d)
            do = torch.randn(b, hq, n, d, device=dev).to(dt)
            leaves = [q, k, v, pk, pv]
            args = [(q, k, v, pk, pv)]

            def step(fn):
                return lambda *a: fn(*a).backward(do)

            impls = {}
            if kernel is None:
                impls["peftfast"] = unavailable(why)
            else:
                impls["peftfast"] = safe_measure(
                    ctx, step(lambda *a: kernel(*a, causal=True, backend=ctx.backend)), args, grad_to_none=leaves)
            impls["sdpa_flash"] = safe_measure(ctx, step(sdpa_concat), args, grad_to_none=leaves)
            impls["peft_path"] = safe_measure(ctx, step(peft_path), args, grad_to_none=leaves)
            pairs = b * hq * (n * p + n * (n + 1) // 2)
            flops = 4 * d * pairs * 3.5
            for res in impls.values():
                derive(res, flops=flops, ceilings=ceilings)
            check = {}
            with torch.no_grad():
                ref = sdpa_concat(q, k, v, pk, pv) if is_available(impls["sdpa_flash"]) else None
                if ref is not None and is_available(impls["peft_path"]):
                    check["rel_err_peft_path_vs_sdpa"] = rel_err(peft_path(q, k, v, pk, pv), ref)
                if ref is not None and is_available(impls["peftfast"]):
                    check["rel_err_peftfast_vs_sdpa"] = rel_err(kernel(q, k, v, pk, pv, causal=True,
                                                                       backend=ctx.backend), ref)
                kk = _repeat_kv(torch.cat([_expand_prefix(pk, b), k], dim=2), hq // hkv)
                flash = _flash_eligible(q, kk, kk)
                del kk, ref
            cases.append({
                "name": f"N={n} P={p} B={b}",
                "shape": {"B": b, "N": n, "P": p, "Hq": hq, "Hkv": hkv, "D": d, "causal": True, "dtype": str(dt)},
                "flops": flops, "impls": impls, "speedup": speedups(impls), "check": check,
                "sdpa_flash_eligible": flash,
            })
            ctx.tick(f"N={n} P={p}")
            del q, k, v, pk, pv, do, leaves, args
            free_memory(ctx)
    heads = [headline("speedup vs SDPA on concatenated K/V (geomean)",
                      geomean([c["speedup"].get("sdpa_flash") for c in cases]), "x", target=">= 0.9x"),
             headline("speedup vs PEFT path (geomean)", geomean([c["speedup"].get("peft_path") for c in cases]), "x",
                      target=">= 2x")]
    mems = [(c["impls"]["peftfast"].get("peak_mem_bytes"), c["impls"]["peft_path"].get("peak_mem_bytes"))
            for c in cases if is_available(c["impls"]["peftfast"]) and is_available(c["impls"]["peft_path"])]
    mems = [a / bb for a, bb in mems if a and bb]
    heads.append(headline("peak memory vs PEFT path (geomean)", geomean(mems), "x"))
    config = dict(cfg, causal=True, dtype=str(ctx.dtype), backend=ctx.backend)
    return suite_result(NAME, ctx, cases, config=config, headline=heads,
                        status="ok" if kernel is not None else why,
                        notes=["speedup = baseline median / peftfast median (> 1: peftfast faster)",
                               "baselines are measured even when the kernel is absent"])
