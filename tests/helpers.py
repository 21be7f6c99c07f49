"""Comparison helpers used across tests."""
from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error ||a - e|| / ||e|| in float64 (0 when both are zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Fail with the relative error and the first mismatching entries when ``rel_err > tol``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in the result (unwritten output?)"
    err = rel_err(actual, expected)
    if err > tol:
        d = (actual.detach().double() - expected.detach().double()).abs().flatten()
        idx = d.topk(min(5, d.numel())).indices
        pairs = ", ".join(
            f"[{i}] {actual.flatten()[i].item():.6g} vs {expected.flatten()[i].item():.6g}" for i in idx.tolist()
        )
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e}; worst: {pairs}")


def dtype_error_bound(fn, inputs_fp64, dtype: torch.dtype, factor: float = 2.0, floor: float = 1e-7) -> float:
    """flash-attention's rule: ``factor`` x the error of ``fn`` run by PyTorch in ``dtype``, both
    measured against ``fn`` in float64. Returns the tolerance for a kernel's relative error."""
    ref64 = fn(*inputs_fp64)
    same_dtype = fn(*[t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs_fp64])
    return max(factor * rel_err(same_dtype, ref64), floor)
