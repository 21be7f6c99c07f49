"""Launch plans (kernels/plans.py): made once per operand signature, per-call values still read per call,
forgotten with the environment snapshot by ``tuning.clear_memory_caches``. CPU, Triton's interpreter."""
from __future__ import annotations

import os

import pytest
import torch
import triton

from peftfast.kernels import dispatch, plans, tuning
from peftfast.kernels import matmul as mm


@pytest.fixture(autouse=True)
def _fresh():
    tuning.clear_memory_caches()
    yield
    tuning.clear_memory_caches()


@pytest.mark.parametrize("n", [1, 2, 3, 15, 16, 17, 63, 64, 65, 1000, 4096, 4097])
def test_integer_helpers_match_triton(n):
    assert plans.next_power_of_2(n) == triton.next_power_of_2(n)
    for d in (1, 16, 64, 128):
        assert plans.cdiv(n, d) == triton.cdiv(n, d)


def test_a_signature_is_planned_once_and_strides_are_read_per_call(monkeypatch):
    built = []
    real = mm._matmul_plan
    monkeypatch.setattr(mm, "_matmul_plan", lambda *a: built.append(a[:4]) or real(*a))
    gen = torch.Generator().manual_seed(0)
    m, n, k, r = 5, 24, 40, 4
    w = torch.randn(n, k, generator=gen)
    left, right = torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen)
    x = torch.randn(m, k, generator=gen)
    x_strided = torch.randn(k, m, generator=gen).t()  # same shape and dtypes, other strides
    for xi in (x, x_strided, x):
        y = mm.matmul_lowrank(xi, w.t(), left, right, 0.5)
        ref = xi.double() @ w.double().t() + 0.5 * left.double() @ right.double()
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-5
    assert built == [(m, n, k, r)]
    mm.matmul_lowrank(x[:3], w.t(), left[:3], right, 0.5)  # another M: another plan
    assert built == [(m, n, k, r), (3, n, k, r)]
    tuning.clear_memory_caches()
    mm.matmul_lowrank(x, w.t(), left, right, 0.5)
    assert len(built) == 3


def test_project_plan_follows_input_strides():
    gen = torch.Generator().manual_seed(1)
    at = torch.randn(48, 8, generator=gen)
    for x in (torch.randn(3, 48, generator=gen), torch.randn(48, 3, generator=gen).t()):
        out = mm.lowrank_project(x, at, scale=2.0)
        ref = 2.0 * x.double() @ at.double()
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-5
    assert sum(1 for key in plans.PLANS if key[0] == "lowrank_project") == 1


def test_environment_is_read_once_and_again_after_clearing():
    old = os.environ.get("PEFTFAST_BACKEND")
    try:
        os.environ["PEFTFAST_BACKEND"] = "reference"
        tuning.clear_memory_caches()
        assert dispatch.resolve_backend("auto", torch.device("cpu")) == "reference"
        os.environ["PEFTFAST_BACKEND"] = "triton"
        # Read once: the running process keeps what it read until told to read again.
        assert dispatch.resolve_backend("auto", torch.device("cpu")) == "reference"
        mm.lowrank_project(torch.randn(2, 16), torch.randn(16, 4))
        assert plans.PLANS
        tuning.clear_memory_caches()
        assert not plans.PLANS
        assert dispatch.requested_backend("auto") == "triton"
    finally:
        if old is None:
            os.environ.pop("PEFTFAST_BACKEND", None)
        else:
            os.environ["PEFTFAST_BACKEND"] = old


def test_monkeypatched_environment_reaches_the_kernels(monkeypatch):
    """tests/conftest.py's monkeypatch clears the kernels' caches on every env change (and at undo)."""
    monkeypatch.setenv("PEFTFAST_BACKEND", "reference")
    assert dispatch.settings().backend_override == "reference"
    monkeypatch.setenv("PEFTFAST_BACKEND", "triton")
    assert dispatch.settings().backend_override == "triton"


def _patched_linear(k: int = 24, n: int = 20, r: int = 4):
    """One ``nn.Linear`` patched with a random (non-zero B) LoRA adapter; the LoRA wrapper and its parent."""
    import peftfast

    gen = torch.Generator().manual_seed(3)
    holder = torch.nn.Sequential(torch.nn.Linear(k, n))
    peftfast.patch(holder, peftfast.LoraConfig(r=r, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    layer = holder[0]
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return holder, layer


def test_layer_decides_its_backend_once_and_again_when_the_operands_change(monkeypatch):
    """The LoRA wrapper keeps its backend decision per operand signature: the checks run once while the
    call repeats, and again (with the new answer) after a grad-mode change on an unfrozen base, a dtype
    change the kernels refuse (float64), or a new environment snapshot."""
    from peftfast.kernels import lora as lora_mod

    monkeypatch.delenv("PEFTFAST_BACKEND", raising=False)  # the suite's default; "auto" here means Triton
    tuning.clear_memory_caches()
    holder, layer = _patched_linear()
    decided, ran = [], []
    real_backend, real_triton = lora_mod.lora_linear_backend, lora_mod._triton_lora_linear
    monkeypatch.setattr("peftfast.layers.linear.lora_linear_backend",
                        lambda *a, **kw: decided.append(1) or real_backend(*a, **kw))
    monkeypatch.setattr(lora_mod, "_triton_lora_linear", lambda *a, **kw: ran.append(1) or real_triton(*a, **kw))
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(4))

    def expected(inp):
        with torch.no_grad():
            base = layer.base_layer
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            return base(inp) + (inp @ a.t() @ b.t()) * layer.scaling["default"]

    with torch.no_grad():
        for _ in range(3):
            y = holder(x)
    assert (len(decided), len(ran)) == (1, 3)
    torch.testing.assert_close(y, expected(x), rtol=1e-5, atol=1e-5)

    # An unfrozen base weight: the Triton path computes no dW, so with grad enabled the choice is the
    # reference (auto), without grad it is Triton again, each decided once more.
    layer.base_layer.weight.requires_grad_(True)
    y = holder(x)
    assert (len(decided), len(ran)) == (2, 3)
    y.sum().backward()
    assert layer.base_layer.weight.grad is not None  # the reference path gave the base its gradient
    with torch.no_grad():
        holder(x)
    assert (len(decided), len(ran)) == (3, 4)

    # float64 (layer and input): no Triton kernel takes it, so the memo must not say "triton".
    holder.double()
    x64 = x.double()
    with torch.no_grad():
        y64 = holder(x64)
    assert (len(decided), len(ran)) == (4, 4)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, expected(x64), rtol=1e-10, atol=1e-10)

    # A new environment snapshot (PEFTFAST_BACKEND=reference) is a new signature.
    holder.float()
    monkeypatch.setenv("PEFTFAST_BACKEND", "reference")
    tuning.clear_memory_caches()
    with torch.no_grad():
        holder(x)
    assert (len(decided), len(ran)) == (5, 4)


def test_layer_memo_still_raises_for_a_wrong_input_width():
    """A bad input is not hidden by a remembered decision: its signature differs, so the checks run."""
    holder, _ = _patched_linear()
    with torch.no_grad():
        holder(torch.randn(2, 24))
        with pytest.raises((ValueError, RuntimeError)):
            holder(torch.randn(2, 23))
