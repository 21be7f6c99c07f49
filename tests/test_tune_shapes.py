"""``peftfast tune --shapes``: tune only some of a model's linear shapes (a GPU session's headline shapes)."""
from __future__ import annotations

import argparse

import pytest

from peftfast.devtools import tune


def _args(*argv):
    p = argparse.ArgumentParser()
    tune.add_arguments(p)
    return p.parse_args(["--model", "llama-3-8b", *argv])


def test_shapes_select_in_the_order_given(capsys):
    assert tune.run_tune(_args("--shapes", "4096x14336, 14336x4096", "--batch-tokens", "8192",
                               "--passes", "fwd,bwd", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "2 distinct linear shapes" in out
    keys = [line.split()[0] for line in out.splitlines() if line.startswith("  lora_matmul|")]
    # fwd of down (N=4096, K=14336), fwd of gate/up, then their dX GEMMs (N and K swapped).
    assert keys == ["lora_matmul|8192|4096|14336|bf16|bf16-nk", "lora_matmul|8192|14336|4096|bf16|bf16-nk",
                    "lora_matmul|8192|14336|4096|bf16|bf16-kn", "lora_matmul|8192|4096|14336|bf16|bf16-kn"]


def test_without_shapes_every_shape_is_tuned(capsys):
    assert tune.run_tune(_args("--batch-tokens", "8192", "--dry-run")) == 0
    assert "4 distinct linear shapes" in capsys.readouterr().out


@pytest.mark.parametrize("spec,message", [("4096x4097", "has no 4096x4097 linear layer; its shapes are 4096x4096"),
                                          ("4096by4096", "OUTxIN pairs"), (",", "names no shape")])
def test_bad_shapes_are_refused_naming_the_fix(spec, message, capsys):
    assert tune.run_tune(_args("--shapes", spec, "--dry-run")) == 2
    assert message in capsys.readouterr().err
