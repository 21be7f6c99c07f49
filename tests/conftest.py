"""Shared test setup.

Without CUDA, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set before any
kernel module is imported (``triton.jit`` reads it when it decorates). Model-level tests default to the
reference path (``PEFTFAST_BACKEND=reference`` replaces ``backend="auto"``) because the interpreter is
slow; kernel tests and the end-to-end Triton tests ask for ``backend="triton"`` explicitly.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("PEFTFAST_BACKEND", "reference")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def nan_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled tensors so unwritten outputs are caught."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(fn):
        def inner(*args, **kwargs):
            t = fn(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            elif t.dtype in (torch.int32, torch.int64, torch.uint8):
                t.fill_(-1 if t.dtype != torch.uint8 else 255)
            return t
        return inner

    monkeypatch.setattr(torch, "empty", poisoned(real_empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(real_empty_like))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
