"""Kernels' fp32 -> bf16 casts round to nearest even, as on a GPU (on CPU: conftest's interpreter fix).

The bf16 kernel tests hold results to twice PyTorch's bf16 error; a truncating cast would bias every
store toward zero and fail them for a reason the GPU does not have.
"""
import torch
import triton
import triton.language as tl

from conftest import DEVICE


@triton.jit
def _cast_kernel(p_x, p_y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(p_y + o, tl.load(p_x + o).to(tl.bfloat16))


def test_fp32_to_bf16_cast_rounds_to_nearest_even():
    one = torch.tensor(1.0)
    ulp = 2.0**-7  # bf16's spacing at 1.0
    ties = torch.stack([one + ulp / 2, one + 3 * ulp / 2, -(one + ulp / 2)])  # exactly halfway: to even
    above = torch.stack([one + ulp * 0.75, -(one + ulp * 0.75)])  # past halfway: away from zero
    x = torch.cat([ties, above, torch.randn(1019) * 100]).to(DEVICE)
    y = torch.full((1024,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    _cast_kernel[(1,)](x, y, N=1024)
    assert y[:3].tolist() == [1.0, 1.0 + 2 * ulp, -1.0]
    assert y[3:5].tolist() == [1.0 + ulp, -(1.0 + ulp)]
    assert torch.equal(y, x.to(torch.bfloat16))
