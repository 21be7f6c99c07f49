"""GPU: the LoRA linear at the shapes and batch sizes behind the headline benchmarks.

``lora_linear`` forward and backward on a dense and an NF4 (nested absmax) base, bf16 and fp16, through
Llama-3-8B's MLP shapes (gate/up 4096 -> 14336, down 14336 -> 4096) at M = 1 and 16 (the decode kernel)
and 8192 (the training GEMM), fp32 adapters as peftfast trains them. Every output and gradient is held
to flash-attention's rule against the float64 reference (test_lora's ``_check_against_reference``): at
most twice the error of the same computation in PyTorch at the test dtype.
"""
from __future__ import annotations

import pytest
import torch

from peftfast.kernels.weights import dense_weight
from test_lora import _check_against_reference

MLP_SHAPES = [pytest.param(4096, 14336, id="gate_up-4096x14336"), pytest.param(14336, 4096, id="down-14336x4096")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 16, 8192], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("k,n", MLP_SHAPES)
@pytest.mark.parametrize("weight", ["dense", "nf4"])
def test_gpu_lora_linear_headline_shapes(weight, k, n, m, dtype):
    if weight == "nf4":
        bnb = pytest.importorskip("bitsandbytes")
        w32 = torch.randn(n, k) / k**0.5
        w = bnb.nn.Params4bit(w32, requires_grad=False, quant_type="nf4", compress_statistics=True,
                              blocksize=64).to("cuda")
        wd = dense_weight(w, torch.float32, backend="reference")
    else:
        w = wd = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    a = torch.randn(16, k, device="cuda", dtype=torch.float32) / k**0.5
    b = torch.randn(n, 16, device="cuda", dtype=torch.float32)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    _check_against_reference(x, w, wd, a, b, bias, dtype=dtype, what=f"{weight} {m}x{k}x{n}")
