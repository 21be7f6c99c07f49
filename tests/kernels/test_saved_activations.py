"""What the Triton LoRA path keeps for the backward (issue 3: "save x only"; "never keep a dequantized
copy of W"; "projections fed by the same x keep one saved x"; no stored dropout mask).

Every tensor autograd saves passes through ``torch.autograd.graph.saved_tensors_hooks``; storages are
told apart by their data pointer, so three ops that save the same x count it once, as the allocator
does. Parameters and a 4-bit weight's quantization state are the model's own memory, not activations.
"""
from __future__ import annotations

import pytest
import torch

from peftfast.kernels.lora import lora_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M, K, N_QKV, R = 37, 64, (48, 16, 16), 4   # q/k/v: GQA-shaped outputs, odd M


def _storage(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _weights(kind: str, n: int, dtype):
    w = torch.randn(n, K, device=DEVICE, dtype=dtype) / K**0.5
    if kind == "dense":
        return w, [w]
    bnb = pytest.importorskip("bitsandbytes")
    w4 = bnb.nn.Params4bit(w.float().cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                           blocksize=64)._quantize("cpu")
    if DEVICE != "cpu":
        w4 = w4.to(DEVICE)
    qs = w4.quant_state
    owned = [w4, qs.absmax, qs.code]
    if qs.nested:
        owned += [qs.state2.absmax, qs.state2.code] + ([qs.offset] if torch.is_tensor(qs.offset) else [])
    return w4, owned


@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_qkv_share_one_saved_x_and_keep_no_dense_weight(kind, dropout_p):
    dtype = torch.float32
    x = torch.randn(2, M, K, device=DEVICE, dtype=dtype, requires_grad=True)
    h = x * 1.0  # a non-leaf activation, as the output of the attention norm is
    model_memory = set()
    projections = []
    for n in N_QKV:
        w, owned = _weights(kind, n, dtype)
        a = (torch.randn(R, K, device=DEVICE) / K**0.5).requires_grad_()
        b = torch.randn(n, R, device=DEVICE).requires_grad_()
        projections.append((w, a, b))
        model_memory |= {_storage(t)[0] for t in (*owned, a, b)}

    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [lora_linear(h, w, a, b, 2.0, dropout_p=dropout_p, backend="triton") for w, a, b in projections]
    assert saved, "nothing was saved: the backward could not run"

    activations = {}
    for t in saved:
        ptr, nbytes = _storage(t)
        if ptr not in model_memory:
            activations[ptr] = (nbytes, tuple(t.shape), t.dtype)
    x_ptr = _storage(h)[0]
    assert x_ptr in activations, "x itself is not saved"
    elt = torch.finfo(dtype).bits // 8
    xa_bytes = 2 * M * R * elt
    small = {p: v for p, v in activations.items() if v[0] <= 64}   # dropout seeds ([1] int64), scalars
    big = {p: v for p, v in activations.items() if v[0] > 64}
    # x once (shared by q/k/v) + one [.., R] projection per op; no mask, no dequantized W, no x copies.
    expected = {x_ptr: 2 * M * K * elt}
    got = {p: v[0] for p, v in big.items()}
    assert got.pop(x_ptr) == expected[x_ptr]
    assert sorted(got.values()) == [xa_bytes] * len(N_QKV), f"unexpected saved activations: {big}"
    assert all(v[1] == (2 * M, R) for p, v in big.items() if p != x_ptr), big  # xa is kept as rows
    if dropout_p > 0:  # the mask is regenerated from a seed: one int64 per op, nothing of x's size
        assert len(small) == len(N_QKV) and all(v[1] == (1,) and v[2] == torch.int64 for v in small.values()), small
    else:
        assert not small, small

    # the saved set is enough: the backward runs and reaches x, A and B
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(a.grad is not None and b.grad is not None for _, a, b in projections)
