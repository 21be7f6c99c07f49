"""Launch plans: what a launcher decides once per operand signature, kept for the next call of that signature.

A launcher's host work (block sizes, grid, constexpr flags, the tuned config, output shapes and
strides) depends only on the operands' shapes, dtypes, weight format and device, and a decode step
repeats the same few signatures hundreds of times per token. So each launcher computes a small plan
the first time it meets a signature, stores it here under a key naming its op and that signature,
and afterwards only reads the per-call values (pointers, input strides, scalars) and launches.

This is the one per-shape memo of the kernels: :func:`tuning.clear_memory_caches` empties it together
with the tuning tables and the environment snapshot (:func:`dispatch.settings`), as a new process would
start. Plain Python, no Triton, no CUDA.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable

PLANS: Dict[Hashable, Any] = {}


def clear() -> None:
    """Forget every plan (the next call of each signature plans again)."""
    PLANS.clear()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints, without Triton's host helper (a Python call of several µs)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``), as ``triton.next_power_of_2``."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
