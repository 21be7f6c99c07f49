"""dequantize_4bit: the Triton kernel (CPU interpreter here, CUDA under the ``gpu`` marker) and the
PyTorch reference against bitsandbytes, bit for bit.

One caveat on "bit for bit": for FP4 code 0b1000 bitsandbytes' native kernels (CUDA, and CPU when the
last dim is even) return -0.0, while its pure-PyTorch path (CPU, odd last dim) and the ``code`` table
it stores give +0.0. Comparisons against bitsandbytes therefore fold -0.0 into +0.0 and are exact in
every other bit; kernel against reference is exact in every bit, zeros included.

bitsandbytes' CPU dequantization is an oracle only where it is right: its native CPU kernel (even last
dim) is wrong when blocks straddle rows (an even K that the blocksize does not divide: 96x96 comes back
~25% off in norm). There the oracle is tests/bnb_oracle.py's independent decode of the layout, and the
comparisons against bitsandbytes keep to shapes where its CPU path is right (on a GPU: every shape).
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from peftfast.kernels import nf4_triton  # noqa: E402
from peftfast.kernels.nf4 import BLOCKSIZES, Quant4bit, dequantize_4bit, dequantize_4bit_reference, quant4bit_view

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except ImportError:  # the GPU images have no bitsandbytes; the synthetic tests still run there
    bnb = bnbF = None

needs_bnb = pytest.mark.skipif(bnb is None, reason="needs bitsandbytes")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STORAGES = [torch.uint8, torch.bfloat16, torch.float32]
ODD_SHAPES = [(37, 75), (5, 3), (1, 135)]  # odd n; byte counts divisible by 4 (quant_storage fp32)
_INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits(t: torch.Tensor, fold_zero_sign: bool) -> torch.Tensor:
    if fold_zero_sign:
        t = t + 0.0  # -0.0 + 0.0 == +0.0 under round-to-nearest; every other value is unchanged
    return t.contiguous().view(_INT_OF[t.dtype])


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "", fold_zero_sign: bool = False):
    """Exact equality of the bit patterns; on failure, name the first differing positions."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = _bits(actual, fold_zero_sign) != _bits(expected, fold_zero_sign)
    if diff.any():
        idx = diff.flatten().nonzero().flatten()[:5].tolist()
        a, e = actual.flatten(), expected.flatten()
        pairs = ", ".join(f"[{i}] {a[i].item()!r} vs {e[i].item()!r}" for i in idx)
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.numel()} values differ; first: {pairs}")


def _weight(shape, seed: int) -> torch.Tensor:
    """Random, never all-zero weights whose rows span ~1e-4..1e2 (so fp16/bf16 rounding is exercised
    at many exponents), with a few exact zeros and outliers (the block maxima)."""
    g = torch.Generator().manual_seed(seed)
    n, k = shape
    row_scale = 10.0 ** (torch.rand(n, 1, generator=g) * 6 - 4)
    w = torch.randn(n, k, generator=g) * row_scale
    w.view(-1)[:: 7] = 0.0
    w.view(-1)[3 :: 11] *= 8.0
    if w.abs().max() == 0:  # pragma: no cover - (5, 3) with an unlucky seed
        w[0, 0] = 1.0
    return w


@functools.lru_cache(maxsize=None)
def _params(shape, qt, nested, bs, storage, seed=0):
    """A quantized Params4bit on CPU (cached: bitsandbytes' quantization is the slow part)."""
    w = _weight(shape, seed)
    p = bnb.nn.Params4bit(
        w, requires_grad=False, quant_type=qt, compress_statistics=nested, blocksize=bs, quant_storage=storage
    )._quantize("cpu")
    assert p.quant_state.nested == nested
    return p


def _bnb_dequant(p, dtype):
    state = copy.copy(p.quant_state)  # QuantState.dtype picks bitsandbytes' output dtype
    state.dtype = dtype
    if p.device.type != "cpu":
        return bnbF.dequantize_4bit(p.data, state)
    # bitsandbytes wraps its pure-PyTorch CPU path in torch.compile(dynamic=False): one Inductor
    # build (~1-2 s) per shape, blocksize and dtype would dominate this file's runtime. Eager runs the
    # same ops (a product, then one cast; nothing to contract), so the oracle's bits are unchanged.
    with torch._dynamo.config.patch(disable=True):
        return bnbF.dequantize_4bit(p.data, state)


# --------------------------------------------------------------------------------------------------
# Against bitsandbytes
# --------------------------------------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("storage", STORAGES, ids=str)
@pytest.mark.parametrize("bs", [32, 64, 128, 4096])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_triton_matches_bitsandbytes(qt, nested, bs, storage, shape, nan_empty):
    p = _params(shape, qt, nested, bs, storage)
    q = quant4bit_view(p)
    for dtype in OUT_DTYPES:  # one quantization, three output dtypes
        expected = _bnb_dequant(p, dtype)
        got = dequantize_4bit(p, dtype=dtype, backend="triton")
        assert torch.isfinite(got).all(), "unwritten (NaN-poisoned) output"
        assert_bits_equal(got, expected, f"triton vs bitsandbytes, {dtype}", fold_zero_sign=True)
        assert_bits_equal(got, dequantize_4bit_reference(q, dtype), f"triton vs reference, {dtype}")


@needs_bnb
@pytest.mark.parametrize("storage", STORAGES, ids=str)
@pytest.mark.parametrize("bs", [32, 64, 128])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_straddling_blocks_match_the_independent_decode(qt, nested, bs, storage):
    """Even K not divisible by the blocksize: where bitsandbytes' CPU kernel is wrong, reference and kernel
    equal the independent decode (rounded once from its exact fp64 values, as both compute in fp32)."""
    from bnb_oracle import decode_4bit

    for shape in [(96, 96), (256, 96), (6, 40)]:  # byte counts divisible by 4 (quant_storage fp32)
        if (shape[1] % bs) == 0:
            continue
        p = _params(shape, qt, nested, bs, storage)
        oracle = decode_4bit(p)
        for dtype in OUT_DTYPES:
            expected = oracle.float().to(dtype)
            for backend in ("reference", "triton"):
                got = dequantize_4bit(p, dtype=dtype, backend=backend)
                assert_bits_equal(got, expected, f"{shape} {dtype} {backend}", fold_zero_sign=True)


@needs_bnb
@pytest.mark.parametrize("storage", STORAGES, ids=str)
@pytest.mark.parametrize("bs", [32, 64, 128, 4096])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_reference_matches_bitsandbytes(qt, nested, bs, storage):
    for shape in ODD_SHAPES + [(24, 40)]:  # (24, 40): even last dim, bitsandbytes' native CPU kernel
        p = _params(shape, qt, nested, bs, storage)
        for dtype in OUT_DTYPES:
            got = dequantize_4bit(p, dtype=dtype, backend="reference")
            assert_bits_equal(got, _bnb_dequant(p, dtype), f"{shape} {dtype}", fold_zero_sign=True)


@needs_bnb
@pytest.mark.parametrize("bs", BLOCKSIZES)
def test_every_blocksize_even_shape(bs, nan_empty):
    """All blocksizes bitsandbytes allows, on an even last dim (its native CPU kernel)."""
    p = _params((24, 40), "nf4", True, bs, torch.uint8)
    for dtype in OUT_DTYPES:
        got = dequantize_4bit(p, dtype=dtype, backend="triton")
        assert_bits_equal(got, _bnb_dequant(p, dtype), f"{dtype}", fold_zero_sign=True)


@needs_bnb
@pytest.mark.parametrize("bs", [32, 64])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_many_programs_and_absmax2_blocks(qt, bs, nan_empty):
    """More than one program (with a ragged last one) and more than one absmax2 entry (> 256 blocks)."""
    shape = (129, 257)  # 33153 values: odd, > 16384 values per interpreter program, > 256 * bs
    p = _params(shape, qt, True, bs, torch.uint8, seed=1)
    assert p.quant_state.state2.absmax.numel() > 1
    for dtype in (torch.float32, torch.bfloat16):
        got = dequantize_4bit(p, dtype=dtype, backend="triton")
        assert_bits_equal(got, _bnb_dequant(p, dtype), f"{dtype}", fold_zero_sign=True)


@needs_bnb
@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1e3])
def test_magnitudes(scale, nan_empty):
    """Tiny weights (fp16 subnormals), ordinary ones, and large ones (near fp16's range)."""
    w = torch.randn(19, 33, generator=torch.Generator().manual_seed(3)) * scale
    for qt in ("nf4", "fp4"):
        for nested in (False, True):
            p = bnb.nn.Params4bit(w, requires_grad=False, quant_type=qt, compress_statistics=nested, blocksize=64)
            p = p._quantize("cpu")
            for dtype in OUT_DTYPES:
                got = dequantize_4bit(p, dtype=dtype, backend="triton")
                assert_bits_equal(got, _bnb_dequant(p, dtype), f"{qt} nested={nested} {dtype}", fold_zero_sign=True)


# --------------------------------------------------------------------------------------------------
# Synthetic storage: every nibble, random code tables and scales (no quantizer in the loop)
# --------------------------------------------------------------------------------------------------


def _synthetic(shape, blocksize, nested, device=DEVICE, seed=0) -> Quant4bit:
    """Uniformly random bytes, tables and scales. Random code2/absmax2/offset make a fused
    multiply-add in the nested scale show up as last-bit differences."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1]
    n_blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g)
    code = torch.randn(16, generator=g)
    kw = {}
    if nested:
        absmax = torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, generator=g)
        kw = dict(
            code2=torch.randn(256, generator=g),
            absmax2=torch.rand(-(-n_blocks // 256), generator=g) * 3 + 0.1,
            offset=torch.rand((), generator=g) * 0.3,
        )
    else:
        absmax = torch.rand(n_blocks, generator=g) * 3 + 1e-3
    q = Quant4bit(packed=packed, absmax=absmax, code=code, blocksize=blocksize, shape=tuple(shape),
                  dtype=torch.float16, quant_type="nf4", **kw)
    return Quant4bit(**{f: (getattr(q, f).to(device) if torch.is_tensor(getattr(q, f)) else getattr(q, f))
                        for f in q.__dataclass_fields__})


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("shape,bs", [((3, 7), 32), ((41, 99), 64), ((2, 4097), 4096)])
def test_synthetic_matches_reference(shape, bs, nested, nan_empty):
    q = _synthetic(shape, bs, nested)
    for dtype in OUT_DTYPES:
        got = dequantize_4bit(q, dtype=dtype, backend="triton")
        assert_bits_equal(got, dequantize_4bit_reference(q, dtype), f"{dtype}")


# --------------------------------------------------------------------------------------------------
# API: out= workspace, defaults, errors, one launch
# --------------------------------------------------------------------------------------------------


@needs_bnb
def test_out_workspace_is_written_in_place(nan_empty):
    p1 = _params((37, 75), "nf4", True, 64, torch.uint8)
    p2 = _params((75, 37), "fp4", False, 32, torch.bfloat16)
    workspace = torch.full((37 * 75,), float("nan"), dtype=torch.bfloat16)
    for p in (p1, p2, p1):  # reused across weights of the same size, as the LoRA kernel does
        got = nf4_triton.triton_dequantize(quant4bit_view(p), torch.bfloat16, out=workspace)
        assert got.data_ptr() == workspace.data_ptr()
        assert got.shape == tuple(p.quant_state.shape)
        assert_bits_equal(got, _bnb_dequant(p, torch.bfloat16), "workspace", fold_zero_sign=True)
    # The public function takes the same workspace, on both backends; dtype defaults to out's.
    for backend in ("triton", "reference"):
        workspace.fill_(float("nan"))
        got = dequantize_4bit(p1, out=workspace, backend=backend)
        assert got.data_ptr() == workspace.data_ptr() and got.dtype == torch.bfloat16
        assert_bits_equal(got, _bnb_dequant(p1, torch.bfloat16), backend, fold_zero_sign=True)


@needs_bnb
def test_out_workspace_is_checked():
    p = _params((37, 75), "nf4", True, 64, torch.uint8)
    q = quant4bit_view(p)
    with pytest.raises(ValueError, match="dtype"):
        nf4_triton.triton_dequantize(q, torch.float16, out=torch.empty(37 * 75, dtype=torch.float32))
    with pytest.raises(ValueError, match="elements"):
        dequantize_4bit(p, out=torch.empty(37 * 75 + 1, dtype=torch.float16), backend="triton")
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_4bit(p, out=torch.empty(75, 37, dtype=torch.float16).t(), backend="triton")


@needs_bnb
def test_default_dtype_and_quant4bit_input():
    p = _params((5, 3), "nf4", False, 64, torch.uint8)
    got = dequantize_4bit(p, backend="triton")
    assert got.dtype == p.quant_state.dtype
    assert_bits_equal(got, bnbF.dequantize_4bit(p.data, p.quant_state), "default dtype", fold_zero_sign=True)
    assert_bits_equal(dequantize_4bit(quant4bit_view(p), backend="triton"), got, "Quant4bit input")


@needs_bnb
def test_one_launch_per_call(monkeypatch):
    grids = []
    real = nf4_triton._dequantize_4bit_kernel

    class Counting:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(nf4_triton, "_dequantize_4bit_kernel", Counting())
    dequantize_4bit(_params((129, 257), "nf4", True, 32, torch.uint8, seed=1), dtype=torch.float16, backend="triton")
    assert len(grids) == 1 and grids[0][0] > 1


@needs_bnb
@pytest.mark.parametrize("nested", [False, True])
def test_view_is_kept_per_weight_and_follows_storage_swaps(nested):
    """quant4bit_view keeps one view per weight (a decode step reads each weight once per token) and
    reads afresh whenever what it viewed changed: new storage (FSDP/ZeRO swaps, a reload), freed and
    regrown storage, new scales. Each time the view decodes exactly what bitsandbytes decodes."""
    p = copy.deepcopy(_params((64, 96), "nf4", nested, 64, torch.uint8, seed=5))
    other = _params((64, 96), "nf4", nested, 64, torch.uint8, seed=6)
    first = quant4bit_view(p)
    assert quant4bit_view(p) is first

    def decodes_like_bnb():
        got = dequantize_4bit_reference(quant4bit_view(p), torch.float32)
        assert torch.equal(got, _bnb_dequant(p, torch.float32))
        return got

    before = decodes_like_bnb()
    p.data = other.data.clone()  # new storage, old scales: a different weight
    assert quant4bit_view(p) is not first
    assert not torch.equal(decodes_like_bnb(), before)

    # Freed and regrown in place (FSDP's resize_ of the unsharded storage), then refilled.
    view = quant4bit_view(p)
    storage = p.untyped_storage()
    nbytes = storage.nbytes()
    storage.resize_(0)
    with pytest.raises(ValueError, match="freed"):
        quant4bit_view(p)
    storage.resize_(nbytes)
    p.data.copy_(_params((64, 96), "nf4", nested, 64, torch.uint8, seed=5).data)
    decodes_like_bnb()
    assert quant4bit_view(p).packed.data_ptr() == p.data_ptr()

    # New scales (a requantization writing another quant_state's tensors in).
    p.quant_state = copy.deepcopy(other.quant_state)
    assert quant4bit_view(p) is not view
    decodes_like_bnb()


@needs_bnb
def test_rejects_non_4bit_weight():
    with pytest.raises(TypeError, match="quant_state"):
        dequantize_4bit(torch.randn(4, 4), backend="triton")
    with pytest.raises(TypeError, match="quant_state"):
        dequantize_4bit(torch.nn.Parameter(torch.randn(4, 4)), backend="reference")
    unquantized = bnb.nn.Params4bit(torch.randn(4, 64), requires_grad=False, quant_type="nf4")
    with pytest.raises(TypeError, match="quant_state"):
        dequantize_4bit(unquantized, backend="triton")


@needs_bnb
def test_rejects_bad_dtype_and_backend():
    p = _params((5, 3), "nf4", False, 64, torch.uint8)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        dequantize_4bit(p, dtype=torch.int8, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        dequantize_4bit(p, backend="cuda")


# --------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): Llama-3-8B shapes, bit for bit
# --------------------------------------------------------------------------------------------------

LLAMA3_8B = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # q/o, k/v, gate/up, down


@pytest.mark.gpu
@pytest.mark.parametrize("shape", LLAMA3_8B, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_cuda_synthetic_matches_reference(shape, nested):
    """Needs no bitsandbytes (the GPU images lack it). Random code2/absmax2/offset: an FMA in the
    nested scale would flip last bits here."""
    q = _synthetic(shape, 64, nested, device="cuda")
    for dtype in OUT_DTYPES:
        got = dequantize_4bit(q, dtype=dtype, backend="triton")
        assert_bits_equal(got, dequantize_4bit_reference(q, dtype), f"{dtype}")


@needs_bnb
@pytest.mark.gpu
@pytest.mark.parametrize("shape", LLAMA3_8B, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("qt,nested,bs", [("nf4", True, 64), ("nf4", False, 64), ("fp4", True, 128),
                                          ("nf4", True, 4096)])
def test_cuda_matches_bitsandbytes(shape, qt, nested, bs):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float16, device="cuda") * 0.02
    p = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type=qt, compress_statistics=nested, blocksize=bs)
    p = p.to("cuda")
    for dtype in OUT_DTYPES:
        got = dequantize_4bit(p, dtype=dtype, backend="triton")
        assert_bits_equal(got, _bnb_dequant(p, dtype), f"{qt} nested={nested} bs={bs} {dtype}", fold_zero_sign=True)
