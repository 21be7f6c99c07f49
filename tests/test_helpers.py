"""The tolerance rule of tests/helpers.py, which every kernel test's pass or fail rests on."""
import torch

from helpers import FP32_ULPS_FLOOR, dtype_error_bound, rel_err

EPS32 = torch.finfo(torch.float32).eps


def test_bound_has_an_fp32_ulp_floor_when_pytorch_is_exact():
    # Small integers: PyTorch's fp32 sum is exact, so 2x its error is 0 and only the floor is left.
    x = torch.arange(-8, 8, dtype=torch.float64).reshape(4, 4)
    tol = dtype_error_bound(lambda t: t.sum(0), [x], torch.float32)
    assert tol == FP32_ULPS_FLOOR * EPS32
    # A kernel one rounding off in every element stays inside it; one off by 1e-5 does not.
    exact = x.sum(0)
    one_ulp = exact * (1 + EPS32)
    assert rel_err(one_ulp, exact) <= tol < rel_err(exact * (1 + 1e-5), exact)


def test_half_precision_bound_is_twice_pytorchs_error():
    a = torch.randn(33, 47, dtype=torch.float64)
    b = torch.randn(47, 29, dtype=torch.float64)
    for dtype in (torch.float16, torch.bfloat16):
        own = rel_err((a.to(dtype) @ b.to(dtype)), a @ b)
        assert own > 10 * FP32_ULPS_FLOOR * EPS32  # the floor cannot be what decides here
        assert dtype_error_bound(lambda x, y: x @ y, [a, b], dtype) == 2 * own
