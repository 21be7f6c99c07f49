"""Suite ``ceilings``: the two measured limits every other figure is a percentage of.

* copy bandwidth: ``dst.copy_(src)`` of a 1 GiB bf16 buffer of random values; bytes = read + written.
* bf16 matmul: ``torch.mm`` of two random normal 8192 x 8192 bf16 matrices; FLOPs = 2 * 8192^3.

Datasheet rates are leads, not ceilings: these are measured in the same run as the suites.
"""
from __future__ import annotations

from typing import Optional

from bench_common import smoke_threads, Context, headline, make_context, measure_ceilings, suite_result

NAME = "ceilings"


@smoke_threads
def run(smoke: Optional[bool] = None, ctx: Optional[Context] = None) -> dict:
    ctx = ctx or make_context(smoke)
    ctx.begin(NAME, 2)
    c = measure_ceilings(ctx)
    ctx.tick("copy")
    ctx.tick("matmul")
    cases = [
        {"name": "device-to-device copy", "shape": {"bytes": c["copy"]["bytes"]}, "bytes": c["copy"]["bytes"],
         "impls": {"torch.copy_": dict(c["copy"], gbps=c["copy_gbps"])}},
        {"name": "bf16 matmul", "shape": {"flops": c["matmul"]["flops"]}, "flops": c["matmul"]["flops"],
         "impls": {"torch.mm": dict(c["matmul"], tflops=c["matmul_bf16_tflops"])}},
    ]
    heads = [headline("copy bandwidth", c["copy_gbps"], "GB/s"),
             headline("bf16 matmul", c["matmul_bf16_tflops"], "TFLOP/s")]
    return suite_result(NAME, ctx, cases, config={"smoke": ctx.smoke}, headline=heads)
