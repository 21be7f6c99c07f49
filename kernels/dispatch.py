"""Choosing between the Triton kernels and the pure-PyTorch references.

Every op in this package takes ``backend="auto" | "triton" | "reference"``. ``"auto"`` picks Triton for
CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the
tests); everything else runs the reference. The environment variable ``PEFTFAST_BACKEND`` replaces
``"auto"`` (never an explicit choice), so a whole run can be forced onto one path without code changes.

The environment is read once per process (:func:`settings`), not on every call: a decode step calls
these functions hundreds of times per token. A program that changes ``PEFTFAST_BACKEND``,
``TRITON_INTERPRET`` or another ``PEFTFAST_*`` variable after the first kernel call makes the change
take effect with :func:`peftfast.kernels.tuning.clear_memory_caches` (which also forgets the launch plans
decided under the old values).
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import NamedTuple

import torch

BACKENDS = ("auto", "triton", "reference")


class Settings(NamedTuple):
    """The environment as this process's kernels read it (see the module docstring)."""

    interpret: bool         # TRITON_INTERPRET=1: Triton kernels run in the CPU interpreter
    backend_override: str   # PEFTFAST_BACKEND, lower-cased ("" when unset)
    qlora_gemm: str         # PEFTFAST_QLORA_GEMM (experimental.qmatmul.variant_override checks it)


@functools.lru_cache(maxsize=1)
def settings() -> Settings:
    """The environment, read on first use; :func:`tuning.clear_memory_caches` makes it read again."""
    return Settings(
        interpret=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        backend_override=os.environ.get("PEFTFAST_BACKEND", "").strip().lower(),
        qlora_gemm=os.environ.get("PEFTFAST_QLORA_GEMM", "").strip().lower(),
    )


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return settings().interpret


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``import triton`` works; cached, and it never touches CUDA."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def requested_backend(backend: str = "auto") -> str:
    """The backend asked for, after the ``PEFTFAST_BACKEND`` override of ``"auto"``."""
    check_backend(backend)
    if backend == "auto":
        env = settings().backend_override
        if env:
            if env not in BACKENDS:
                raise ValueError(f"PEFTFAST_BACKEND must be one of {BACKENDS}, got {env!r}; unset it or fix the value")
            backend = env
    return backend


def device_supports_triton(device: torch.device) -> bool:
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and settings().interpret


def resolve_backend(backend: str, device: torch.device, supported: bool = True, why: str = "") -> str:
    """Return ``"triton"`` or ``"reference"`` for one call.

    Args:
        backend: what the caller asked for (``"auto"``, ``"triton"`` or ``"reference"``).
        device: where the operands live.
        supported: whether the Triton kernel handles these operands (dtype, layout, options).
        why: when ``supported`` is False, what the kernel lacks, for the error message.

    Returns:
        The backend to run. ``"auto"`` falls back to the reference quietly; an explicit ``"triton"``
        that cannot run raises, naming the reason.
    """
    if backend == "auto" and not settings().backend_override:
        if supported and device_supports_triton(device):  # the common case, without re-checking the name
            return "triton"
        return "reference"
    backend = requested_backend(backend)
    if backend == "reference":
        return "reference"
    runnable = device_supports_triton(device)
    if backend == "triton":
        if not runnable:
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got device "
                f"{device}; use backend='auto' or 'reference'"
            )
        if not supported:
            raise NotImplementedError(f"the Triton kernel does not support this call ({why}); use backend='auto'")
        return "triton"
    return "triton" if (runnable and supported) else "reference"


@functools.lru_cache(maxsize=None)
def triton_module(name: str):
    """The Triton half of an op (``<package>.<name>``, e.g. ``lora_triton``), or None without Triton.

    The Triton kernels sit at the top level of their own modules, which import Triton; the op's front
    module (API, checks, PyTorch reference) asks for its Triton half here at the end of its own import
    (``nf4`` asks at call time: its Triton half imports its types), so
    ``import peftfast`` works where Triton is not installed (it is a Linux-only dependency) and those
    ops then run their reference path. Importing a Triton module compiles nothing and touches no GPU.

    Args:
        name: the module's name inside this package.

    Returns:
        The imported module, or None when ``import triton`` fails on this platform.

    Example:
        >>> _kernels = triton_module("lora_triton")  # doctest: +SKIP
    """
    if not triton_available():  # pragma: no cover - platforms without Triton
        return None
    return importlib.import_module(f"{__package__}.{name}")
