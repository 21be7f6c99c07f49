"""The LoRA / QLoRA kernels compile for sm80, sm89 and sm90, and fit their GPU's shared memory.

Runs the default subset of tests/kernels/aot_lora_cases.py in a subprocess with the interpreter off
(see tests/kernels/aot.py), or takes its records from tests/kernels/aot_results/ when they were made
from the same kernel sources, Triton and ptxas (``--aot-recompile`` compiles regardless); the full
sweep (``--all``, ~1,400 compiles) runs under ``pytest -m slow``. Checks, per launch: it compiled
to a cubin; a config the launch path can pick needs no more shared memory than its GPU has; and for the
GEMM, the autotuner's estimate (``launch.gemm_smem_bytes``) is at least what the compiler allocated, so the
pruner never admits a config that fails at launch with "out of resources".
"""
from __future__ import annotations

import os

import pytest

from aot import cached_sweep, run_in_subprocess, unavailable

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "aot_lora_cases.py")
pytestmark = pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "can compile")


@pytest.fixture(scope="module", params=["subset", pytest.param("all", marks=pytest.mark.slow)])
def records(request) -> list:
    # Module scope: one sweep for the four tests (pytest also keeps a failure for the module).
    if request.param == "all":  # the exhaustive run is the ground truth: never from the cache
        return run_in_subprocess(SCRIPT, "--all", "--jobs", str(os.cpu_count() or 1), timeout=4 * 3600)
    return cached_sweep(SCRIPT, recompile=request.config.getoption("--aot-recompile"))[0]


def _where(r: dict) -> str:
    return f"{r['kernel']} on {r['arch']}, {r['case']}, config {r['config']}"


def test_every_launch_compiles(records):
    assert records, "aot_lora_cases.py compiled nothing"
    failed = [f"{_where(r)}: {r['error']}" for r in records if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(records)} launches failed to compile:\n" + "\n".join(failed)


def test_admitted_configs_fit_shared_memory(records):
    over = [f"{_where(r)}: {r['shared']} B > {r['limit']} B" for r in records
            if r["ok"] and r["admitted"] and not r["fits"]]
    assert not over, "configs the launch path picks need more shared memory than the GPU has:\n" + "\n".join(over)


def test_pruner_estimate_bounds_the_compiler(records):
    gemm = [r for r in records if r["ok"] and r["admitted"] and r["kernel"] == "_matmul_lowrank_kernel"]
    assert gemm, "no GEMM launch compiled"
    missing = [_where(r) for r in gemm if r["estimate"] is None]
    assert not missing, "GEMM launches without an estimate:\n" + "\n".join(missing)
    under = [f"{_where(r)}: estimate {r['estimate']} B < compiled {r['shared']} B" for r in gemm
             if r["estimate"] < r["shared"]]
    assert not under, "matmul._smem_bytes underestimates (the pruner may admit a config that does not fit):\n" \
        + "\n".join(under)


def test_subset_covers_every_kernel_and_arch(records):
    seen = {(r["kernel"], r["arch"]) for r in records}
    for kernel in ("_matmul_lowrank_kernel", "_lowrank_project_kernel", "_lowrank_wgrad_kernel",
                   "_decode_lora_4bit_kernel", "_dequantize_4bit_kernel"):
        for arch in ("sm80", "sm89", "sm90"):
            assert (kernel, arch) in seen, f"the subset compiles no {kernel} for {arch}"
    assert any(r["config"].get("PTX_MUL_RN") for r in records), "the mul.rn inline-PTX path was not compiled"
