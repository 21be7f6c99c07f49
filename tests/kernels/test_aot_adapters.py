"""The IA3, DoRA and prefix-attention kernels compile for sm80/sm89/sm90 and fit shared memory.

The CPU interpreter never runs Triton's compiler, so a config that fails to lower, or needs more shared
memory than a GPU has, would only show on that GPU ("out of resources" at launch). Here the launch paths
are compiled to cubins with Triton's bundled ptxas (tests/kernels/aot.py) from the arguments and configs
their CUDA branches pick, in a subprocess with the interpreter off: the representative subset of
``aot_adapter_cases.py`` (the largest admissible configs, the widest heads, the fp32 backward), or its
records from tests/kernels/aot_results/ when they were made from the same kernel sources, Triton and
ptxas (``--aot-recompile`` compiles regardless). ``pytest -m slow`` runs the full sweep (``--all``).
"""
from __future__ import annotations

import os

import pytest

from aot import CAPABILITY, cached_sweep, run_in_subprocess, unavailable

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "aot_adapter_cases.py")

# Kernels each arch must have compiled at least once in the subset (a case that silently launched
# nothing would otherwise pass).
EXPECTED = ("_ia3_matmul_kernel", "_dora_matmul_kernel", "_dora_norm_kernel", "_prefix_attn_fwd_kernel",
            "_bwd_delta_kernel", "_prefix_attn_bwd_dkdv_kernel", "_prefix_attn_bwd_dq_kernel")


pytestmark = pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "can compile")


def _describe(r) -> str:
    cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
    est = f", pruner estimate {r['estimate']}" if r.get("estimate") is not None else ""
    return f"{r['kernel']} on {r['arch']} [{r['case']}] ({cfg}): shared {r['shared']} / {r['limit']}{est}: {r['error']}"


@pytest.fixture(scope="module", params=["subset", pytest.param("all", marks=pytest.mark.slow)])
def records(request):
    if request.param == "all":  # the exhaustive run is the ground truth: never from the cache
        return run_in_subprocess(SCRIPT, "--all", "--jobs", str(os.cpu_count() or 1), timeout=4 * 3600)
    return cached_sweep(SCRIPT, recompile=request.config.getoption("--aot-recompile"))[0]


def test_every_kernel_compiled_on_every_arch(records):
    seen = {(r["kernel"], r["arch"]) for r in records if r["shared"] is not None}
    missing = [f"{k} on {a}" for a in CAPABILITY for k in EXPECTED if (k, a) not in seen]
    assert not missing, "nothing compiled for: " + "; ".join(missing)


def test_all_compile(records):
    failed = [_describe(r) for r in records if r["shared"] is None]
    assert not failed, "compile failures:\n" + "\n".join(failed)


def test_all_fit_shared_memory(records):
    over = [_describe(r) for r in records if r["shared"] is not None and r["shared"] > r["limit"]]
    assert not over, "configs the launch path can pick that exceed the GPU's shared memory:\n" + "\n".join(over)


def test_pruner_estimates_cover_compiled_size(records):
    # An estimate below the real size lets a pruner admit a config that does not fit.
    low = [_describe(r) for r in records
           if r["shared"] is not None and r.get("estimate") is not None and r["estimate"] < r["shared"]]
    assert not low, "pruner estimates below the compiler's shared memory:\n" + "\n".join(low)
