"""``PEFTFAST_AUTOTUNE_CONFIGS``: a GPU correctness run times only the first few candidates of each search.

A freshly lent GPU has minutes, and a full search compiles and times every candidate of every kernel at
every shape. These tests build each autotuner the way a CUDA launch does (the CUDA queries stubbed, no
GPU needed) and run its pruner on real launch arguments: with the limit, each search keeps only the first
N candidates its own pruning kept; without it, all of them. A limited search's winner is cached by Triton
under its own key.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import triton

from peftfast.kernels import dora_triton as dora, ia3_triton as ia3, launch, matmul as mm, tuning
from peftfast.kernels.experimental import qmatmul as qmm

# The package exports the op under the module's name; the module holds the autotuner.
pa = importlib.import_module("peftfast.kernels.prefix_attention_triton")

H100_SMEM = 232448
BF16, FP32 = torch.bfloat16, torch.float32


@pytest.fixture
def on_sm90(monkeypatch):
    """Build autotuners as on an H100/H200 (sm90) without a GPU."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    monkeypatch.setattr(launch, "max_shared_memory", lambda *a, **k: H100_SMEM)
    monkeypatch.delenv(tuning.ENV_SEARCH_LIMIT, raising=False)


def _probe(dtype):
    return torch.empty(0, dtype=dtype)


# Launch arguments each kernel's pruner reads, at a training-sized M so that many configs survive it.
def _matmul_args():
    return {"M": 8192, "p_y": _probe(BF16), "p_w": _probe(BF16), "p_l": _probe(FP32), "p_r": _probe(FP32),
            "BLOCK_R": 16}


AUTOTUNERS = {
    "matmul": (lambda: mm._tuned_matmul_lowrank.__wrapped__(0), _matmul_args),
    "qmatmul": (lambda: qmm._tuned_kernel.__wrapped__(0),
                lambda: {"M": 8192, "p_y": _probe(BF16), "BLOCK_R": 16, "BLOCKSIZE": 64, "NESTED": True,
                         "W_NK": True}),
    "ia3": (lambda: ia3._tuned_ia3_matmul.__wrapped__(0),
            lambda: {"M": 8192, "p_a": _probe(BF16), "p_b": _probe(BF16)}),
    "dora": (lambda: dora._tuned_dora_matmul.__wrapped__(0),
             lambda: {"M": 8192, "p_x": _probe(BF16), "p_w": _probe(BF16), "p_l": _probe(FP32),
                      "p_r": _probe(FP32), "BLOCK_R": 16, "MODE": dora._FWD, "DROPOUT": False}),
    "prefix_attention": (lambda: pa._tuned_fwd.__wrapped__(128, 0),
                         lambda: {"p_q": _probe(BF16), "BLOCK_D": 128, "NQ_KEY": 2048}),
}


@pytest.mark.parametrize("name", list(AUTOTUNERS))
def test_every_autotuner_honours_the_limit(name, on_sm90, monkeypatch):
    build, args = AUTOTUNERS[name]
    tuner = build()
    assert isinstance(tuner, triton.runtime.Autotuner)
    full = tuner.early_config_prune(tuner.configs, args())
    assert len(full) >= 2, f"{name}: the pruner keeps {len(full)} config(s) here, so a limit could not show"
    for n in (1, 2):
        monkeypatch.setenv(tuning.ENV_SEARCH_LIMIT, str(n))
        limited = tuner.early_config_prune(tuner.configs, args())
        assert limited == full[:n], f"{name}: PEFTFAST_AUTOTUNE_CONFIGS={n} kept {len(limited)} of {len(full)}"
    monkeypatch.delenv(tuning.ENV_SEARCH_LIMIT)
    assert tuner.early_config_prune(tuner.configs, args()) == full  # read at each search, not at build time


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5"])
def test_bad_limit_is_refused_with_the_fix(raw, monkeypatch):
    monkeypatch.setenv(tuning.ENV_SEARCH_LIMIT, raw)
    with pytest.raises(ValueError, match="PEFTFAST_AUTOTUNE_CONFIGS.*positive integer.*unset"):
        tuning.search_limit()


def test_unset_or_empty_means_no_limit(monkeypatch):
    monkeypatch.delenv(tuning.ENV_SEARCH_LIMIT, raising=False)
    assert tuning.search_limit() is None
    monkeypatch.setenv(tuning.ENV_SEARCH_LIMIT, " ")
    assert tuning.search_limit() is None
    assert tuning.limit_search([1, 2, 3]) == [1, 2, 3]
    monkeypatch.setenv(tuning.ENV_SEARCH_LIMIT, "5")
    assert tuning.limit_search([1, 2, 3]) == [1, 2, 3]


def test_a_limited_search_has_its_own_disk_cache_key():
    """peftfast keeps no cache of search winners: Triton's autotune disk cache does (``cache_results``),
    keyed on the candidates left after pruning (``Autotuner.check_disk_cache(tuning_key, configs, ...)``
    gets the pruned list), so a search cut to N candidates is cached apart from the full search and never
    stands in for it in a later process."""
    import inspect

    from triton.runtime.autotuner import Autotuner

    if "cache_results" not in launch.autotune_options():
        pytest.skip("this Triton keeps no autotune disk cache")
    assert launch.autotune_options() == {"cache_results": True}
    assert list(inspect.signature(Autotuner.check_disk_cache).parameters)[:3] == ["self", "tuning_key", "configs"]
