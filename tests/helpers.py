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


# The kernels accumulate in fp32 in their own order (K blocks, split-K partials, fused epilogues). An
# fp32 result whose every element is within a rounding or two of exact still has a relative RMS error
# of ~1-2 fp32 eps (measured: up to 1.9 eps across the LoRA/IA3/DoRA fp32 tests), however accurate
# PyTorch's order happens to be on that shape: on a 1x45x53 LoRA, PyTorch's dB is 0.7 eps off, so
# 2x that (1.4 eps) rejected a kernel at 1.42 eps. So the bound never drops below 3 fp32 ulps of the
# output's magnitude. For fp16/bf16 outputs the floor is far below the output's own rounding
# (>= 0.2 eps of fp16 ~ 2e-4), which the same-dtype PyTorch run already carries: the 2x rule decides.
FP32_ULPS_FLOOR = 3.0


def dtype_error_bound(fn, inputs_fp64, dtype: torch.dtype, factor: float = 2.0,
                      floor_ulps: float = FP32_ULPS_FLOOR) -> float:
    """flash-attention's rule: ``factor`` x the error of ``fn`` run by PyTorch in ``dtype``, both
    measured against ``fn`` in float64, but never below ``floor_ulps`` fp32 ulps (relative).

    Args:
        fn: the computation, called with ``inputs_fp64`` or with them cast to ``dtype``.
        inputs_fp64: its arguments; floating tensors in float64 (others are passed as they are).
        dtype: the dtype the kernel under test computes in.
        factor: how many times PyTorch's own error in ``dtype`` the kernel may have.
        floor_ulps: the least tolerance, in units of ``torch.finfo(torch.float32).eps``.

    Returns:
        The tolerance for the kernel's relative RMS error (see :func:`rel_err`).

    Example:
        >>> tol = dtype_error_bound(lambda a, b: a @ b, [a64, b64], torch.float16)
    """
    ref64 = fn(*inputs_fp64)
    same_dtype = fn(*[t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs_fp64])
    return max(factor * rel_err(same_dtype, ref64), floor_ulps * torch.finfo(torch.float32).eps)


def train_side_by_side(theirs: torch.nn.Module, ours: torch.nn.Module, loss_of, tol: float, steps: int = 3,
                       lr: float = 1e-2) -> None:
    """``steps`` AdamW steps on both models from the same start; each step's losses must agree to ``tol``.

    Args:
        theirs, ours: the oracle's model (PEFT's) and peftfast's, holding the same adapter.
        loss_of: ``model -> scalar loss`` on fixed inputs.
    """
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr) for m in (theirs, ours)]
    for _ in range(steps):
        losses = [loss_of(m) for m in (theirs, ours)]
        assert_rel_close(losses[1].detach(), losses[0].detach(), tol, "loss")
        for opt, loss in zip(opts, losses):
            opt.zero_grad()
            loss.backward()
            opt.step()
