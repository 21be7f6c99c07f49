"""The in-loop QLoRA GEMM (kernels/experimental/qmatmul.py) and how lora_triton.py chooses between it and dequant + GEMM.

On CPU the kernel runs in Triton's interpreter with the same fixed blocks as ``matmul_lowrank``, so
the two variants accumulate in the same order there and must agree *bitwise*; on a GPU (different
configs) they agree to the dtype's tolerance. Against the float64 reference every result obeys the
repo's rule (``helpers.dtype_error_bound``: at most twice the same-dtype PyTorch error), bf16 included:
the interpreter's fp32 -> bf16 output store truncates, yet the kernel (fp32 accumulation, one final
rounding) stays within 1.5x of PyTorch's bf16 error (which rounds after each op). bf16 dots run on fp32
copies of the operands in the interpreter (``DOT_F32``), exact for bf16 values. The decoded weight
tile itself is checked bit for bit against ``dequantize_4bit`` through a one-hot X (every output is
one product, exact).

Weights come from bitsandbytes where it is installed (its own quantizer), else from
``peftfast.devtools.tune.random_quant4bit`` (the same layout, random codes): the GPU machines have no bitsandbytes.
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from peftfast.devtools import tune
from peftfast.kernels import launch, lora_triton, weights  # noqa: E402
from peftfast.kernels import matmul as mm
from peftfast.kernels.experimental import qmatmul as qmm
from peftfast.kernels import tuning
from peftfast.kernels.dispatch import interpreting
from peftfast.kernels.lora import lora_linear
from peftfast.kernels.nf4 import Quant4bit, dequantize_4bit, dequantize_4bit_reference, quant4bit_view
from helpers import assert_rel_close, dtype_error_bound, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERP = DEVICE == "cpu"
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [pytest.param(FP32, id="fp32"), pytest.param(FP16, id="fp16"), pytest.param(BF16, id="bf16")]
GPU = "NVIDIA H100 80GB HBM3"
SLUG = "nvidia-h100-80gb-hbm3"

try:
    import bitsandbytes as bnb
except Exception:  # noqa: BLE001 - any broken install: fall back to the pure-PyTorch weight
    bnb = None


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No variant override, own table folder, and no plan carried between tests."""
    monkeypatch.delenv(qmm.ENV_VARIANT, raising=False)
    monkeypatch.delenv("PEFTFAST_TUNING", raising=False)
    monkeypatch.setenv("PEFTFAST_TUNING_TABLES", str(tmp_path / "tables"))
    tuning.clear_memory_caches()
    qmm._WARNED.clear()
    yield
    tuning.clear_memory_caches()


def _quant(n: int, k: int, quant_type="nf4", nested=True, blocksize=64) -> Quant4bit:
    """A 4-bit weight [n, k] (std ~ k^-0.5) on DEVICE."""
    if bnb is not None:
        w = bnb.nn.Params4bit(torch.randn(n, k) / k**0.5, requires_grad=False, quant_type=quant_type,
                              compress_statistics=nested, blocksize=blocksize)._quantize("cpu")
        if DEVICE != "cpu":
            w = w.to(DEVICE)
        return quant4bit_view(w)
    return tune.random_quant4bit(n, k, quant_type=quant_type, blocksize=blocksize, nested=nested, device=DEVICE)


def _args(q: Quant4bit):
    """``(packed, absmax, code, code2, absmax2, offset, meta, quant_type)`` as weights.quant_args gives them."""
    return weights.quant_args(q)[:8]


def _inloop(x, q, left, right, scale, **kw):
    return qmm.matmul_lowrank_4bit(x, weights.kernel_operand(q), left, right, scale, **kw)


def _operands(m, q, r, dtype, layout, *, bias=False, adapter_dtype=None):
    n_w, k_w = q.shape
    k, n = (k_w, n_w) if layout == "nk" else (n_w, k_w)
    ad = adapter_dtype or dtype
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    left = torch.randn(m, r, device=DEVICE, dtype=ad)
    right = (torch.randn(n, r, device=DEVICE, dtype=ad) * 0.1).t() if layout == "nk" else \
        torch.randn(r, n, device=DEVICE, dtype=ad) * 0.1
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    return x, left, right, b


# --------------------------------------------------------------------------------------------------
# the decoded tile is dequantize_4bit's, bit for bit
# --------------------------------------------------------------------------------------------------

BIT_CASES = [pytest.param(qt, nested, bs, dt, id=f"{qt}-{'nested' if nested else 'plain'}-bs{bs}-{name}")
             for qt, nested, bs, dt, name in [
                 ("nf4", True, 64, FP32, "fp32"), ("nf4", True, 64, FP16, "fp16"), ("nf4", True, 64, BF16, "bf16"),
                 ("nf4", True, 32, BF16, "bf16"), ("nf4", False, 64, FP16, "fp16"), ("fp4", True, 64, BF16, "bf16"),
                 ("fp4", False, 128, FP32, "fp32"), ("nf4", True, 256, FP16, "fp16"),
                 ("fp4", True, 1024, BF16, "bf16"), ("nf4", False, 4096, FP16, "fp16")]]


@pytest.mark.parametrize("qt,nested,blocksize,dtype", BIT_CASES)
def test_decoded_weight_is_bit_identical(qt, nested, blocksize, dtype, nan_empty):
    """X one-hot, no LoRA term: each output is one weight value, which must equal dequantize_4bit's."""
    n_w = 24
    k_w = max(128, blocksize)
    q = _quant(n_w, k_w, qt, nested, blocksize)
    w = dequantize_4bit(q, dtype=dtype)
    assert torch.equal(w, dequantize_4bit_reference(q, dtype))
    # Forward (W^T): one-hot rows over a spread of W's columns (all of them when few); dX (W): all rows.
    cols = torch.arange(k_w) if k_w <= 256 else torch.cat([torch.arange(32), torch.randperm(k_w - 32)[:32] + 32])
    for layout, x in (("nk", torch.eye(k_w, device=DEVICE, dtype=dtype)[cols.to(DEVICE)]),
                      ("kn", torch.eye(n_w, device=DEVICE, dtype=dtype))):
        n = n_w if layout == "nk" else k_w
        zeros_l = torch.zeros(x.shape[0], 4, device=DEVICE, dtype=dtype)
        zeros_r = torch.zeros(4, n, device=DEVICE, dtype=dtype)
        y = _inloop(x, q, zeros_l, zeros_r, 1.0, layout=layout)
        want = w[:, cols.to(DEVICE)].t() if layout == "nk" else w
        assert torch.equal(y, want), f"{layout}: {int((y != want).sum())} values differ from dequantize_4bit"


# --------------------------------------------------------------------------------------------------
# against the float64 reference
# --------------------------------------------------------------------------------------------------

REF_CASES = [
    # (M, N_w, K_w, r, quant_type, nested, blocksize, bias, dtype): odd M and N, K tails inside a
    # 64-wide K tile; every dtype on the QLoRA default weight, one each on the others.
    *[pytest.param(67, 53, 128, 5, "nf4", True, 64, True, dt, id=f"67x53x128-nf4-nested-bs64-bias-{name}")
      for dt, name in ((FP32, "fp32"), (FP16, "fp16"), (BF16, "bf16"))],
    pytest.param(70, 40, 96, 3, "fp4", False, 32, False, FP16, id="70x40x96-fp4-plain-bs32-fp16"),
    pytest.param(65, 37, 256, 20, "nf4", False, 128, True, FP32, id="65x37x256-nf4-plain-bs128-r20-fp32"),
    pytest.param(80, 29, 256, 6, "fp4", True, 256, True, BF16, id="80x29x256-fp4-nested-bs256-bf16"),
]


@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("m,n_w,k_w,r,qt,nested,blocksize,bias,dtype", REF_CASES)
def test_matches_fp64_reference(m, n_w, k_w, r, qt, nested, blocksize, bias, dtype, layout, nan_empty):
    q = _quant(n_w, k_w, qt, nested, blocksize)
    x, left, right, b = _operands(m, q, r, dtype, layout, bias=bias)
    scale = 1.75
    y = _inloop(x, q, left, right, scale, bias=b, layout=layout)
    assert y.dtype == dtype and y.shape == (m, right.shape[1])
    w = dequantize_4bit_reference(q, dtype)  # the values both variants multiply with

    def fn(x, w, left, right, b):
        op = w.t() if layout == "nk" else w
        out = x @ op + scale * (left @ right)
        return out if b is None else out + b

    inputs64 = [t if t is None else t.double() for t in (x, w, left, right, b)]
    assert_rel_close(y, fn(*inputs64), dtype_error_bound(fn, inputs64, dtype), f"{layout} {dtype}")


def test_fp32_adapters_on_half_input(nan_empty):
    """fp32 L and R with fp16 X: the LoRA branch runs in X's dtype, as matmul_lowrank's epilogue does."""
    q = _quant(40, 128)
    x, left, right, b = _operands(70, q, 6, FP16, "nk", bias=True, adapter_dtype=FP32)
    y = _inloop(x, q, left, right, 2.0, bias=b)
    w = dequantize_4bit(q, dtype=FP16)
    y_dq = mm.matmul_lowrank(x, w.t(), left, right, 2.0, bias=b)
    _same(y, y_dq, FP16, "fp32 adapters")


def _same(got, want, dtype, what):
    """Bitwise in the interpreter (same blocks, same order); the dtype's rounding on a GPU."""
    if INTERP:
        assert torch.equal(got, want), f"{what}: max diff {(got.double() - want.double()).abs().max().item():.3g}"
    else:
        tol = {FP32: 1e-5, FP16: 2e-3, BF16: 1e-2}[dtype]
        assert rel_err(got, want) < tol, f"{what}: rel err {rel_err(got, want):.3g}"


@pytest.mark.parametrize("layout,dtype", [("nk", FP16), ("kn", FP32)], ids=["nk-fp16", "kn-fp32"])
def test_strided_x(layout, dtype, nan_empty):
    """A transposed, every-other-column view of X is read through its strides."""
    q = _quant(48, 128)
    k = 128 if layout == "nk" else 48
    base = torch.randn(2 * k, 70, device=DEVICE, dtype=dtype)
    x = base[::2].t()  # [70, k], strides (1, 140)
    assert not x.is_contiguous()
    _, left, right, b = _operands(70, q, 4, dtype, layout, bias=True)
    y = _inloop(x, q, left, right, 0.5, bias=b, layout=layout)
    y_contig = _inloop(x.contiguous(), q, left, right, 0.5, bias=b, layout=layout)
    assert torch.equal(y, y_contig)
    w = dequantize_4bit(q, dtype=dtype)
    _same(y, mm.matmul_lowrank(x, w.t() if layout == "nk" else w, left, right, 0.5, bias=b), dtype, "strided")


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_dropout_and_bias_equal_the_dequant_path(dtype, nan_empty):
    """The dX GEMM under dropout: same seed, same keep mask, same output as dequant + matmul_lowrank."""
    q = _quant(40, 128, "nf4", True, 64)
    x, left, right, b = _operands(69, q, 6, dtype, "kn", bias=True)
    seed = torch.tensor([1234], device=DEVICE)
    y = _inloop(x, q, left, right, 1.0, bias=b, dropout_p=0.3, seed=seed, layout="kn")
    w = dequantize_4bit(q, dtype=dtype)
    y_dq = mm.matmul_lowrank(x, w, left, right, 1.0, bias=b, dropout_p=0.3, seed=seed)
    _same(y, y_dq, dtype, "dropout")
    y_other = _inloop(x, q, left, right, 1.0, bias=b, dropout_p=0.3, seed=seed + 1, layout="kn")
    assert not torch.equal(y, y_other)


def test_refuses_weights_it_cannot_decode():
    """Blocks that straddle rows (K_w not a multiple of the blocksize, odd K_w) are refused, clearly."""
    for k_w in (96, 45):
        q = _quant(16, k_w, "nf4", True, 64)
        ok, why = qmm.inloop_supported(_args(q)[6])
        assert not ok and "multiple of the blocksize" in why
        x, left, right, _ = _operands(8, q, 2, FP32, "nk")
        with pytest.raises(ValueError, match="dequant variant"):
            _inloop(x, q, left, right, 1.0)
    q = _quant(16, 128)
    x, left, right, _ = _operands(8, q, 2, FP32, "nk")
    with pytest.raises(ValueError, match="layout"):
        _inloop(x, q, left, right, 1.0, layout="tn")
    with pytest.raises(ValueError, match=r"x \[M, 16\]"):
        _inloop(x, q, left, right, 1.0, layout="kn")


# --------------------------------------------------------------------------------------------------
# lora_linear: the in-loop variant forced equals the dequant variant, forward and backward
# --------------------------------------------------------------------------------------------------


def _spy(monkeypatch):
    calls = {"inloop": [], "dense_base": 0}
    real_inloop, real_dense = qmm.matmul_lowrank_4bit, weights.dense_base

    def inloop(*args, **kw):
        calls["inloop"].append(kw.get("layout"))
        return real_inloop(*args, **kw)

    def dense(*args, **kw):
        calls["dense_base"] += 1
        return real_dense(*args, **kw)

    monkeypatch.setattr(qmm, "matmul_lowrank_4bit", inloop)
    monkeypatch.setattr(lora_triton, "dense_base", dense)
    return calls


def _train_step(x, w4, a, b, bias, p, seed):
    leaves = [t.detach().requires_grad_() for t in (x, a, b, bias)]
    torch.manual_seed(seed)
    y = lora_linear(leaves[0], w4, leaves[1], leaves[2], 1.5, bias=leaves[3], dropout_p=p, backend="triton")
    y.backward(torch.ones_like(y) + torch.arange(y.shape[-1], device=DEVICE, dtype=y.dtype) / y.shape[-1])
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype,adapter_dtype,p", [
    pytest.param(FP16, FP16, 0.25, id="fp16-dropout"),
    pytest.param(FP32, FP32, 0.0, id="fp32"),
    pytest.param(BF16, FP32, 0.1, id="bf16-fp32-adapters-dropout"),
])
def test_lora_linear_inloop_equals_dequant(dtype, adapter_dtype, p, monkeypatch, nan_empty):
    q = _quant(40, 128, "nf4", True, 64)
    x = torch.randn(3, 25, 128, device=DEVICE, dtype=dtype)  # M = 75 > DECODE_MAX_M
    a = torch.randn(6, 128, device=DEVICE, dtype=adapter_dtype) / 11
    b = torch.randn(40, 6, device=DEVICE, dtype=adapter_dtype)
    bias = torch.randn(40, device=DEVICE, dtype=dtype)
    calls = _spy(monkeypatch)
    monkeypatch.setenv(qmm.ENV_VARIANT, "dequant")
    ref = _train_step(x, q, a, b, bias, p, seed=7)
    assert calls == {"inloop": [], "dense_base": 2}  # forward and dX
    monkeypatch.setenv(qmm.ENV_VARIANT, "inloop")
    got = _train_step(x, q, a, b, bias, p, seed=7)
    assert calls == {"inloop": ["nk", "kn"], "dense_base": 2}
    for name, g, r in zip(("y", "dx", "dA", "dB", "dbias"), got, ref):
        assert g.dtype == r.dtype
        _same(g, r, g.dtype if g.dtype in (FP16, BF16) else FP32, name)


# --------------------------------------------------------------------------------------------------
# which variant runs
# --------------------------------------------------------------------------------------------------


def _key(m, n, k, layout="nk", dtype="fp16", weight=None):
    weight = weight or tuning.weight_format_4bit("nf4", 64, True, layout)
    return tuning.shape_key(tuning.OP_LORA_MATMUL_4BIT, m, n, k, dtype, weight)


CFG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def _variant(m=128, n=40, k=128, layout="nk", dtype=FP16, meta=(64, 256, 40, 128), device=DEVICE):
    return qmm.qlora_gemm_variant(m, n, k, dtype, list(meta), "nf4", True, layout, torch.device(device))


def test_default_is_dequant_and_env_overrides(monkeypatch):
    assert qmm.DEFAULT_VARIANT == "dequant"
    assert _variant(device="cpu") == "dequant"
    assert qmm.select_variant(128, 40, 128, FP16, "nf4-b64-nested-nk", gpu_name=GPU) == ("dequant", "default")
    for value, want in (("inloop", "inloop"), ("dequant", "dequant"), ("auto", "dequant"), (" InLoop ", "inloop")):
        monkeypatch.setenv(qmm.ENV_VARIANT, value)
        assert _variant(device="cpu") == want, value
    monkeypatch.setenv(qmm.ENV_VARIANT, "fast")
    with pytest.raises(ValueError, match="PEFTFAST_QLORA_GEMM must be one of"):
        _variant(device="cpu")


def test_table_entry_variant_picks_the_path(tmp_path, monkeypatch):
    """A table entry's variant decides per (M bucket, N, K, dtype, format); the env still overrides it."""
    path = tmp_path / "tables" / f"{SLUG}.json"
    tuning.write_table(path, GPU, {_key(128, 40, 128): {**CFG, "variant": "inloop"},
                                   _key(128, 128, 40, "kn"): {**CFG, "variant": "dequant"}})
    assert qmm.select_variant(100, 40, 128, FP16, "nf4-b64-nested-nk", gpu_name=GPU) == ("inloop", "table")
    assert qmm.select_variant(100, 128, 40, FP16, "nf4-b64-nested-kn", gpu_name=GPU) == ("dequant", "table")
    # Other buckets, dtypes, formats and GPUs are untuned: the default.
    assert qmm.select_variant(300, 40, 128, FP16, "nf4-b64-nested-nk", gpu_name=GPU)[1] == "default"
    assert qmm.select_variant(100, 40, 128, FP32, "nf4-b64-nested-nk", gpu_name=GPU)[1] == "default"
    assert qmm.select_variant(100, 40, 128, FP16, "nf4-b64-nk", gpu_name=GPU)[1] == "default"
    assert qmm.select_variant(100, 40, 128, FP16, "nf4-b64-nested-nk", gpu_name="NVIDIA H200")[1] == "default"
    monkeypatch.setenv(qmm.ENV_VARIANT, "dequant")
    assert qmm.select_variant(100, 40, 128, FP16, "nf4-b64-nested-nk", gpu_name=GPU) == ("dequant", "env")
    monkeypatch.setenv("PEFTFAST_TUNING", "off")
    monkeypatch.delenv(qmm.ENV_VARIANT)
    assert qmm.select_variant(100, 40, 128, FP16, "nf4-b64-nested-nk", gpu_name=GPU) == ("dequant", "default")


def test_table_drives_lora_linear(tmp_path, monkeypatch, nan_empty):
    """End to end: with this process's device mapped to a tuned GPU, the table's variant runs."""
    monkeypatch.setattr(qmm, "_gpu_name", lambda device: GPU)
    tuning.write_table(tmp_path / "tables" / f"{SLUG}.json", GPU,
                       {_key(128, 40, 128): {**CFG, "variant": "inloop"},      # forward: in-loop
                        _key(128, 128, 40, "kn"): {**CFG, "variant": "dequant"}})  # dX: dequant
    q = _quant(40, 128)
    calls = _spy(monkeypatch)
    x = torch.randn(75, 128, device=DEVICE, dtype=FP16)
    a = torch.randn(4, 128, device=DEVICE, dtype=FP16) / 11
    b = torch.randn(40, 4, device=DEVICE, dtype=FP16)
    _train_step(x, q, a, b, torch.zeros(40, device=DEVICE, dtype=FP16), 0.0, seed=0)
    assert calls == {"inloop": ["nk"], "dense_base": 1}


def test_small_m_and_undecodable_weights_never_run_inloop(monkeypatch):
    monkeypatch.setenv(qmm.ENV_VARIANT, "inloop")
    q = _quant(40, 128, "nf4", False, 64)
    assert not lora_triton._qlora_inloop(lora_triton.DECODE_MAX_M, 40, 128, FP16, q, "kn", torch.device(DEVICE))
    assert lora_triton._qlora_inloop(lora_triton.DECODE_MAX_M + 1, 40, 128, FP16, q, "nk", torch.device(DEVICE))
    assert not lora_triton._qlora_inloop(lora_triton.DECODE_MAX_M + 1, 40, 128, FP16, None, "nk", torch.device(DEVICE))
    with pytest.warns(RuntimeWarning, match="straddle"):
        assert _variant(meta=(64, 256, 40, 96), k=96) == "dequant"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per reason, not per call
        assert _variant(meta=(64, 256, 40, 96), k=96) == "dequant"
    monkeypatch.delenv(qmm.ENV_VARIANT)
    monkeypatch.setattr(qmm, "_gpu_name", lambda device: GPU)
    monkeypatch.setattr(tuning, "lookup_table_variant", lambda slug, key: "inloop")
    assert _variant(meta=(64, 256, 40, 96), k=96) == "dequant"  # even a table cannot force it


def test_unsupported_weight_falls_back_in_lora_linear(monkeypatch, nan_empty):
    """K_w % blocksize != 0 with the in-loop variant forced: lora_linear runs the dequant path, correctly."""
    q = _quant(40, 96, "nf4", True, 64)
    monkeypatch.setenv(qmm.ENV_VARIANT, "inloop")
    calls = _spy(monkeypatch)
    x = torch.randn(70, 96, device=DEVICE)
    a, b = torch.randn(4, 96, device=DEVICE) / 10, torch.randn(40, 4, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="dequant variant"):
        y = lora_linear(x, q, a, b, 2.0, backend="triton")
    assert calls == {"inloop": [], "dense_base": 1}
    ref = x.double() @ dequantize_4bit_reference(q, FP32).double().t() + 2.0 * (x.double() @ a.double().t()) @ \
        b.double().t()
    assert_rel_close(y, ref, 1e-5, "fallback")


def test_inloop_config_selection_respects_the_variant(tmp_path):
    """Only an in-loop (or unlabelled) entry's config launches the in-loop kernel; a dequant entry holds
    the dense GEMM's config and is passed over; so is one that does not fit in shared memory."""
    sel = dict(gpu_name=GPU, max_smem=227 * 1024, elem=2, block_r=16, blocksize=64, nested=True, layout="nk")
    weight = tuning.weight_format_4bit("nf4", 64, True, "nk")
    key = tuning.shape_key(tuning.OP_LORA_MATMUL_4BIT, 2048, 1024, 4096, "bf16", weight)
    path = tmp_path / "tables" / f"{SLUG}.json"
    assert qmm.select_inloop_config(2048, 1024, 4096, BF16, weight, **sel) is None
    tuning.write_table(path, GPU, {key: {**CFG, "variant": "dequant"}})
    assert qmm.select_inloop_config(2048, 1024, 4096, BF16, weight, **sel) is None
    tuning.write_table(path, GPU, {key: {**CFG, "variant": "inloop"}})
    assert qmm.select_inloop_config(2048, 1024, 4096, BF16, weight, **sel) == (CFG, "table")
    huge = {**CFG, "BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 128, "num_stages": 4}
    tuning.write_table(path, GPU, {key: {**huge, "variant": "inloop"}})
    assert qmm.select_inloop_config(2048, 1024, 4096, BF16, weight, **sel) is None  # searched


# --------------------------------------------------------------------------------------------------
# GPU: Llama-3-8B shapes, both layouts, against float64 and against the dequant variant
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("m,n_w,k_w,blocksize", [
    pytest.param(2048, 4096, 4096, 64, id="q-2048x4096x4096"),
    pytest.param(2048, 14336, 4096, 64, id="gate-2048x14336x4096"),
    pytest.param(333, 1000, 1024, 128, id="odd-333x1000x1024-bs128"),
])
def test_gpu_shapes(m, n_w, k_w, blocksize, layout, dtype):
    q = _quant(n_w, k_w, "nf4", True, blocksize)
    x, left, right, b = _operands(m, q, 16, dtype, layout, bias=True, adapter_dtype=FP32)
    seed = torch.tensor([5], device=DEVICE)
    p = 0.1 if layout == "kn" else 0.0
    y = _inloop(x, q, left, right, 2.0, bias=b, layout=layout, dropout_p=p, seed=seed if p else None)
    w = dequantize_4bit(q, dtype=dtype)
    wt = w.t() if layout == "nk" else w
    y_dq = mm.matmul_lowrank(x, wt, left, right, 2.0, bias=b, dropout_p=p, seed=seed if p else None)
    _same(y, y_dq, dtype, f"{layout} vs dequant")
    if p == 0:
        def fn(x, wt, left, right, b):
            return x @ wt + 2.0 * (left @ right.to(left.dtype)) + b

        inputs64 = [t.double() for t in (x, wt, left.to(dtype), right.to(dtype), b)]
        assert_rel_close(y, fn(*inputs64), dtype_error_bound(fn, inputs64, dtype), f"{layout} vs fp64")


@pytest.mark.gpu
def test_gpu_lora_linear_inloop_forced(monkeypatch):
    q = _quant(4096, 4096, "nf4", True, 64)
    x = torch.randn(4, 512, 4096, device=DEVICE, dtype=BF16)
    a = torch.randn(16, 4096, device=DEVICE, dtype=FP32) / 64
    b = torch.randn(4096, 16, device=DEVICE, dtype=FP32)
    bias = torch.randn(4096, device=DEVICE, dtype=BF16)
    calls = _spy(monkeypatch)
    monkeypatch.setenv(qmm.ENV_VARIANT, "dequant")
    ref = _train_step(x, q, a, b, bias, 0.1, seed=3)
    monkeypatch.setenv(qmm.ENV_VARIANT, "inloop")
    got = _train_step(x, q, a, b, bias, 0.1, seed=3)
    assert calls["inloop"] == ["nk", "kn"]
    for name, g, r in zip(("y", "dx", "dA", "dB", "dbias"), got, ref):
        assert rel_err(g, r) < 1e-2, name


# --------------------------------------------------------------------------------------------------
# configs, pruning, and compiling for real GPUs
# --------------------------------------------------------------------------------------------------

SMEM = {"sm80": 166912, "sm89": 101376, "sm90": 232448}


@pytest.mark.parametrize("family", ["sm80", "sm89", "sm90"])
def test_config_lists_and_pruner(family):
    table = qmm._config_table()
    assert set(table) == {"sm80", "sm89", "sm90"}
    for layout in ("nk", "kn"):
        for bs, nested in ((64, True), (32, False), (4096, True)):
            big = qmm.candidates(8192, 2, 16, family=family, max_smem=SMEM[family], blocksize=bs, nested=nested,
                                 layout=layout)
            assert big and max(c["BLOCK_M"] for c in big) >= 128
            assert all(qmm.smem_bytes(c, c["num_stages"], 2, 16, blocksize=bs, nested=nested,
                                      w_nk=layout == "nk") <= SMEM[family] for c in big)
            small = qmm.candidates(65, 2, 16, family=family, max_smem=SMEM[family], blocksize=bs, nested=nested,
                                   layout=layout)
            assert small and all(c["BLOCK_M"] <= 128 for c in small)
            for c in big:
                assert tuning.config_from_entry(c) == c


def test_interpreter_config_matches_matmul():
    """The bitwise comparisons above rely on both variants running the same blocks in the interpreter."""
    assert qmm._INTERPRET_CONFIG == launch.INTERPRET_CONFIG


@pytest.mark.parametrize("sweep", ["subset", pytest.param("all", marks=pytest.mark.slow)])
def test_compiles_for_gpus_and_fits_shared_memory(sweep, request):
    """Every config the pruner admits (default: the one nearest the limit, sm80 forward, sm89 dX, sm90
    both, its records from tests/kernels/aot_results/ when made from the same inputs; ``pytest -m slow``:
    the full sweep, always compiled) compiles for sm80/sm89/sm90 in bf16, within the arch's shared
    memory and within qmatmul.smem_bytes's estimate."""
    import aot

    if aot.unavailable():
        pytest.skip(aot.unavailable())

    script = os.path.join(os.path.dirname(__file__), "aot_qmatmul_cases.py")
    if sweep == "all":
        records = aot.run_in_subprocess(script, "--all", timeout=4 * 3600)
    else:
        records, _ = aot.cached_sweep(script, timeout=3600, recompile=request.config.getoption("--aot-recompile"))
    assert records
    archs = {r["arch"] for r in records}
    assert archs == {"sm80", "sm89", "sm90"}
    bad = [r for r in records if "error" in r or not r["fits"] or r["shared"] > r["estimate"]]
    assert not bad, json.dumps(bad[:3], indent=1)
