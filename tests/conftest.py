"""Shared test setup.

Without CUDA, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set before any
kernel module is imported (``triton.jit`` reads it when it decorates). Model-level tests default to the
reference path (``PEFTFAST_BACKEND=reference`` replaces ``backend="auto"``) because the interpreter is
slow; kernel tests and the end-to-end Triton tests ask for ``backend="triton"`` explicitly.
"""
import os

import torch

# Tests never reach the network: a Hub model id resolves from the local cache or fails at once (CI has no
# network; without this, huggingface_hub would retry each lookup). Read when huggingface_hub is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("PEFTFAST_BACKEND", "reference")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _round_bf16_to_nearest_in_the_interpreter() -> None:
    """Make the interpreter's fp32 -> bf16 cast round to nearest even, as the GPU's ``cvt.rn.bf16.f32``.

    Triton's interpreter (3.x) truncates that cast (``InterpreterBuilder.cast_impl`` converts without a
    rounding mode), so every bf16 store or operand cast of a kernel is biased toward zero by up to an
    ulp on CPU, and bf16 results cannot be held to the 2x-PyTorch-error rule there. Test-only: the
    library never patches Triton (kernels that need bit-exact bf16 in the interpreter round themselves,
    see kernels/nf4.py ``_to_bf16_rtne``). Skipped, leaving the truncation, if Triton's internals moved.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return
    builder = getattr(interp, "InterpreterBuilder", None)
    truncating = getattr(builder, "cast_impl", None)
    if truncating is None or getattr(truncating, "_rounds_bf16", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.asarray(src.data, dtype=np.float32)
            rounded = torch.from_numpy(data.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interp.TensorHandle(rounded, dst_type.scalar)
        return truncating(self, src, dst_type)

    cast_impl._rounds_bf16 = True
    builder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _round_bf16_to_nearest_in_the_interpreter()


def pytest_addoption(parser):
    parser.addoption("--aot-recompile", action="store_true",
                     help="compile the ahead-of-time sweeps (tests/kernels/test_aot_*.py, test_qmatmul.py) even "
                          "where tests/kernels/aot_results/ holds records made from the same inputs")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class _EnvAwareMonkeyPatch(pytest.MonkeyPatch):
    """``monkeypatch`` whose environment changes reach the kernels: they read the environment once per
    process (``kernels.dispatch.settings``) and plan launches under it, so every ``setenv`` / ``delenv``
    (and the undo at teardown) is followed by ``kernels.tuning.clear_memory_caches``, the documented way
    for a running program to change those variables."""

    def setenv(self, *args, **kwargs):
        super().setenv(*args, **kwargs)
        _clear_kernel_caches()

    def delenv(self, *args, **kwargs):
        super().delenv(*args, **kwargs)
        _clear_kernel_caches()

    def undo(self):
        super().undo()
        _clear_kernel_caches()


def _clear_kernel_caches() -> None:
    from peftfast.kernels import tuning

    tuning.clear_memory_caches()


@pytest.fixture
def monkeypatch():
    mp = _EnvAwareMonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture
def nan_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled tensors so unwritten outputs are caught."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(fn):
        def inner(*args, **kwargs):
            t = fn(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            elif t.dtype in (torch.int32, torch.int64, torch.uint8):
                t.fill_(-1 if t.dtype != torch.uint8 else 255)
            return t
        return inner

    monkeypatch.setattr(torch, "empty", poisoned(real_empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(real_empty_like))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
