"""The LoRA / QLoRA kernels compile for sm80, sm89 and sm90, and fit their GPU's shared memory.

Runs the default subset of tests/kernels/aot_lora_cases.py (``--all`` is the full sweep, run by hand)
in a subprocess with the interpreter off (see tests/kernels/aot.py). Checks, per launch: it compiled
to a cubin; a config the launch path can pick needs no more shared memory than its GPU has; and for the
GEMM, the autotuner's estimate (``matmul._smem_bytes``) is at least what the compiler allocated, so the
pruner never admits a config that fails at launch with "out of resources".
"""
from __future__ import annotations

import functools
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _why_not() -> str:
    """Why nothing can be compiled for NVIDIA GPUs here, or "" when it can."""
    try:
        import triton  # noqa: F401
        import triton.backends.nvidia as nv
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except Exception as e:  # noqa: BLE001 - no Triton, or one without the NVIDIA backend
        return f"Triton (with its NVIDIA backend) does not import: {type(e).__name__}: {e}"
    if not hasattr(JITFunction, "_pack_args"):
        return f"Triton {triton.__version__} lacks the JITFunction internals tests/kernels/aot.py drives"
    if not os.access(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas"), os.X_OK):
        return "Triton's bundled ptxas is missing: cannot compile for NVIDIA GPUs here"
    return ""


@functools.lru_cache(maxsize=None)
def _run():
    """``(records, None)`` or ``(None, error)``: a failed run is remembered too, so that the four
    tests do not each spend a minute repeating it."""
    from aot import run_in_subprocess

    try:
        return run_in_subprocess(os.path.join(HERE, "aot_lora_cases.py")), None
    except Exception as e:  # noqa: BLE001 - re-raised by every test
        return None, e


def _records() -> list:
    why = _why_not()
    if why:
        pytest.skip(why)
    records, error = _run()
    if error is not None:
        raise error
    return records


def _where(r: dict) -> str:
    return f"{r['kernel']} on {r['arch']}, {r['case']}, config {r['config']}"


def test_every_launch_compiles():
    records = _records()
    assert records, "aot_lora_cases.py compiled nothing"
    failed = [f"{_where(r)}: {r['error']}" for r in records if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(records)} launches failed to compile:\n" + "\n".join(failed)


def test_admitted_configs_fit_shared_memory():
    over = [f"{_where(r)}: {r['shared']} B > {r['limit']} B" for r in _records()
            if r["ok"] and r["admitted"] and not r["fits"]]
    assert not over, "configs the launch path picks need more shared memory than the GPU has:\n" + "\n".join(over)


def test_pruner_estimate_bounds_the_compiler():
    gemm = [r for r in _records() if r["ok"] and r["admitted"] and r["kernel"] == "_matmul_lowrank_kernel"]
    assert gemm, "no GEMM launch compiled"
    missing = [_where(r) for r in gemm if r["estimate"] is None]
    assert not missing, "GEMM launches without an estimate:\n" + "\n".join(missing)
    under = [f"{_where(r)}: estimate {r['estimate']} B < compiled {r['shared']} B" for r in gemm
             if r["estimate"] < r["shared"]]
    assert not under, "matmul._smem_bytes underestimates (the pruner may admit a config that does not fit):\n" \
        + "\n".join(under)


def test_subset_covers_every_kernel_and_arch():
    seen = {(r["kernel"], r["arch"]) for r in _records()}
    for kernel in ("_matmul_lowrank_kernel", "_lowrank_project_kernel", "_lowrank_wgrad_kernel",
                   "_decode_lora_4bit_kernel", "_dequantize_4bit_kernel"):
        for arch in ("sm80", "sm89", "sm90"):
            assert (kernel, arch) in seen, f"the subset compiles no {kernel} for {arch}"
    assert any(r["config"].get("PTX_MUL_RN") for r in _records()), "the mul.rn inline-PTX path was not compiled"
