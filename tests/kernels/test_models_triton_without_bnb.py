"""tests/kernels/test_models_triton.py on a machine without bitsandbytes (the GPU images, unless its wheel
is carried): the 4-bit cases skip, saying why, instead of erroring; the dense ones still build."""
from __future__ import annotations

import sys

import pytest

import test_models_triton as tmt


@pytest.fixture
def no_bitsandbytes(monkeypatch):
    # A None entry in sys.modules makes `import bitsandbytes` raise ImportError, as an absent package does.
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)


def test_4bit_base_skips_without_bitsandbytes(no_bitsandbytes):
    with pytest.raises(pytest.skip.Exception, match="bitsandbytes"):
        tmt._base("4bit")
    with pytest.raises(pytest.skip.Exception, match="bitsandbytes"):
        tmt._half_model("qlora", tmt.torch.float32, "reference")


def test_dense_base_needs_no_bitsandbytes(no_bitsandbytes):
    assert tmt._base("dense") is not None
