"""Tuned-config tables (kernels/tuning.py), launch plans (kernels/plans.py) and how matmul_lowrank picks a config.

All CPU: pure-Python keys and files, the selection function the CUDA launcher calls (not a CUDA launch),
and one interpreter launch of an explicit config.
"""
from __future__ import annotations

import json

import pytest
import torch
import triton

from peftfast.kernels import matmul as mm
from peftfast.kernels import launch, tiles  # noqa: E402
from peftfast.kernels import tuning

GPU = "NVIDIA H100 80GB HBM3"
SLUG = "nvidia-h100-80gb-hbm3"
CFG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
CFG2 = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Own table folder; in-memory tables and launch plans forgotten around each test."""
    monkeypatch.setenv("PEFTFAST_TUNING_TABLES", str(tmp_path / "tables"))
    monkeypatch.delenv("PEFTFAST_TUNING", raising=False)
    tuning.clear_memory_caches()
    yield
    tuning.clear_memory_caches()


# --------------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,bucket", [(1, 16), (7, 16), (16, 16), (17, 32), (64, 64), (65, 128), (2048, 2048),
                                      (2049, 4096), (8192, 8192), (8193, 8192), (10 ** 6, 8192)])
def test_bucket_m(m, bucket):
    assert tuning.bucket_m(m) == bucket


def test_shape_key_and_names():
    key = tuning.shape_key("lora_matmul", 1, 4096, 14336, torch.bfloat16, "bf16-nk")
    assert key == "lora_matmul|16|4096|14336|bf16|bf16-nk"
    assert tuning.parse_shape_key(key) == {"op": "lora_matmul", "m": 16, "n": 4096, "k": 14336, "dtype": "bf16",
                                           "weight": "bf16-nk"}
    assert tuning.dtype_name(torch.float16) == "fp16" and tuning.dtype_name("fp32") == "fp32"
    assert tuning.gpu_slug(GPU) == SLUG
    assert tuning.gpu_slug("  ") == "unknown-gpu"


def test_weight_format_layouts():
    w = torch.randn(8, 4, dtype=torch.bfloat16)       # nn.Linear weight [N, K]
    assert tuning.weight_format(w.t()) == "bf16-nk"   # forward passes W^T
    assert tuning.weight_format(w) == "bf16-kn"       # dX = dY @ W
    assert tuning.weight_format(torch.randn(8, 8)[::2, ::2]) == "fp32-strided"
    assert tuning.weight_format(None) == "none"


def test_config_from_entry_validates():
    assert tuning.config_from_entry({**CFG, "ms": 0.1}) == CFG
    assert tuning.config_from_entry({**CFG, "BLOCK_M": 48}) is None      # not a power of two
    assert tuning.config_from_entry({**CFG, "num_stages": "4"}) is None
    assert tuning.config_from_entry({k: v for k, v in CFG.items() if k != "GROUP_M"}) is None
    assert tuning.config_from_entry([1, 2]) is None
    c = triton.Config({k: CFG[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}, num_warps=4, num_stages=4)
    assert tuning.config_to_dict(c) == CFG


# --------------------------------------------------------------------------------------------------
# shipped tables
# --------------------------------------------------------------------------------------------------


def _table_path(tmp_path):
    return tmp_path / "tables" / f"{SLUG}.json"


def test_table_write_merge_lookup(tmp_path):
    k1 = tuning.shape_key("lora_matmul", 16, 4096, 4096, "bf16", "bf16-nk")
    k2 = tuning.shape_key("lora_matmul", 2048, 4096, 4096, "bf16", "bf16-nk")
    path = _table_path(tmp_path)
    tuning.write_table(path, GPU, {k1: {**CFG, "ms": 0.01}}, {"triton": "x"})
    tuning.write_table(path, GPU, {k2: CFG2})  # merges: k1 stays
    data = json.loads(path.read_text())
    assert data["format"] == tuning.TABLE_FORMAT and data["version"] == 1 and data["gpu"] == GPU
    assert set(data["entries"]) == {k1, k2} and data["meta"]["triton"] == "x"
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temporary behind
    tuning.clear_memory_caches()
    assert tuning.lookup_table(SLUG, k1) == CFG
    assert tuning.lookup_table(SLUG, k2) == CFG2
    assert tuning.lookup_table("other-gpu", k1) is None
    assert tuning.lookup_table(SLUG, tuning.shape_key("lora_matmul", 16, 1024, 4096, "bf16", "bf16-nk")) is None


def test_table_refuses_other_gpu_or_corrupt(tmp_path):
    path = _table_path(tmp_path)
    key = tuning.shape_key("lora_matmul", 16, 64, 64, "bf16", "bf16-nk")
    tuning.write_table(path, GPU, {key: CFG})
    with pytest.raises(ValueError, match="holds configs for"):
        tuning.write_table(path, "NVIDIA A100-SXM4-80GB", {key: CFG})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable"):
        tuning.write_table(path, GPU, {key: CFG})


def test_corrupt_or_foreign_table_is_ignored(tmp_path):
    path = _table_path(tmp_path)
    path.parent.mkdir(parents=True)
    key = tuning.shape_key("lora_matmul", 16, 64, 64, "bf16", "bf16-nk")
    path.write_text("{truncated")
    with pytest.warns(RuntimeWarning, match="unreadable table"):
        assert tuning.lookup_table(SLUG, key) is None
    tuning.clear_memory_caches()
    path.write_text(json.dumps({"format": tuning.TABLE_FORMAT, "version": 99, "entries": {key: CFG}}))
    with pytest.warns(RuntimeWarning, match="not a peftfast.tuning-table v1"):
        assert tuning.lookup_table(SLUG, key) is None
    tuning.clear_memory_caches()
    path.write_text(json.dumps({"format": tuning.TABLE_FORMAT, "version": 1, "entries": {key: {**CFG, "BLOCK_N": 0}}}))
    with pytest.warns(RuntimeWarning, match="bad config"):
        assert tuning.lookup_table(SLUG, key) is None


# --------------------------------------------------------------------------------------------------
# source hashes (recorded beside table entries)
# --------------------------------------------------------------------------------------------------


def test_source_hash_follows_the_source():
    def f(x):
        return x + 1

    def g(x):
        return x + 2

    h = tuning.source_hash(mm._matmul_lowrank_kernel, tiles.dot, tiles.dropout_keep, tiles.gemm_tile, tiles.grouped_tile,
                             tiles.load_xw, tiles.lowrank_epilogue, tiles.lowrank_tile)
    assert h == mm._kernel_hash() and len(h) == 16
    assert tuning.source_hash(f) != tuning.source_hash(g)
    assert tuning.source_hash(mm._matmul_lowrank_kernel) != h


# --------------------------------------------------------------------------------------------------
# what the CUDA launcher picks (the selection function; no CUDA launch)
# --------------------------------------------------------------------------------------------------

SEL = dict(gpu_name=GPU, max_smem=227 * 1024, elem=2, block_r=16)


def _key(m=1, n=1024, k=4096):
    return tuning.shape_key("lora_matmul", m, n, k, "bf16", "bf16-nk")


def test_select_takes_the_table_else_searches(tmp_path):
    assert mm.select_matmul_config(1, 1024, 4096, torch.bfloat16, "bf16-nk", **SEL) is None  # untuned: search
    tuning.write_table(_table_path(tmp_path), GPU, {_key(): CFG})
    # M = 1..16 share the decode bucket.
    for m in (1, 5, 16):
        assert mm.select_matmul_config(m, 1024, 4096, torch.bfloat16, "bf16-nk", **SEL) == (CFG, "table")
    # Other buckets, shapes, dtypes, layouts and GPUs are untuned.
    assert mm.select_matmul_config(17, 1024, 4096, torch.bfloat16, "bf16-nk", **SEL) is None
    assert mm.select_matmul_config(1, 1024, 4096, torch.float16, "fp16-nk", **SEL) is None
    assert mm.select_matmul_config(1, 1024, 4096, torch.bfloat16, "bf16-kn", **SEL) is None
    assert mm.select_matmul_config(1, 1024, 4096, torch.bfloat16, "bf16-nk", **{**SEL, "gpu_name": "NVIDIA H200"}) \
        is None


def test_select_passes_over_configs_that_do_not_fit(tmp_path):
    big = {"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}
    tuning.write_table(_table_path(tmp_path), GPU, {_key(m=4096): big})
    assert mm.select_matmul_config(4096, 1024, 4096, torch.bfloat16, "bf16-nk", **SEL) is None  # searched
    assert mm.select_matmul_config(4096, 1024, 4096, torch.bfloat16, "bf16-nk",
                                   **{**SEL, "max_smem": 1 << 30}) == (big, "table")


def test_tuning_can_be_switched_off(tmp_path, monkeypatch):
    tuning.write_table(_table_path(tmp_path), GPU, {_key(): CFG})
    monkeypatch.setenv("PEFTFAST_TUNING", "off")
    assert mm.select_matmul_config(1, 1024, 4096, torch.bfloat16, "bf16-nk", **SEL) is None
    monkeypatch.setenv("PEFTFAST_TUNING", "table")
    assert mm.select_matmul_config(1, 1024, 4096, torch.bfloat16, "bf16-nk", **SEL) == (CFG, "table")


def test_explicit_config_launch_matches_reference():
    """The launch a table hit makes (here in the interpreter): explicit blocks, warps and stages."""
    m, n, k, r = 20, 40, 24, 4
    x, w = torch.randn(m, k), torch.randn(n, k)
    left, right = torch.randn(m, r), torch.randn(r, n)
    y = torch.full((m, n), float("nan"))
    args, flags = mm._launch_args(x, w.t(), left, right, 0.5, None, 0.0, None, y)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
    mm._launch_config(args, flags, m, n, cfg)
    ref = x.double() @ w.double().t() + 0.5 * left.double() @ right.double()
    assert torch.isfinite(y).all()
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-5


# --------------------------------------------------------------------------------------------------
# lora_matmul_4bit entries: weight formats and the "variant" field (kernels/qmatmul.py)
# --------------------------------------------------------------------------------------------------


def test_weight_format_4bit():
    assert tuning.weight_format_4bit("nf4", 64, True, "nk") == "nf4-b64-nested-nk"
    assert tuning.weight_format_4bit("FP4", 128, False, "kn") == "fp4-b128-kn"
    key = tuning.shape_key(tuning.OP_LORA_MATMUL_4BIT, 3000, 4096, 14336, torch.bfloat16, "nf4-b64-nested-kn")
    assert key == "lora_matmul_4bit|4096|4096|14336|bf16|nf4-b64-nested-kn"
    assert tuning.parse_shape_key(key)["weight"] == "nf4-b64-nested-kn"
    with pytest.raises(ValueError):
        tuning.weight_format_4bit("int4", 64, True, "nk")
    with pytest.raises(ValueError):
        tuning.weight_format_4bit("nf4", 64, True, "tn")


def test_table_variant_round_trip(tmp_path):
    k4 = tuning.shape_key(tuning.OP_LORA_MATMUL_4BIT, 2048, 4096, 4096, "bf16", "nf4-b64-nested-nk")
    k2 = tuning.shape_key(tuning.OP_LORA_MATMUL, 2048, 4096, 4096, "bf16", "bf16-nk")
    path = _table_path(tmp_path)
    tuning.write_table(path, GPU, {k4: {**CFG, "variant": "inloop", "inloop_ms": 1.0, "dequant_ms": 1.2}, k2: CFG2})
    tuning.clear_memory_caches()
    assert tuning.lookup_table(SLUG, k4) == CFG  # the launch fields only, as before
    assert tuning.lookup_table_variant(SLUG, k4) == "inloop"
    assert tuning.lookup_table_variant(SLUG, k2) is None  # entries without one (every dense entry)
    assert tuning.lookup_table_variant(SLUG, "lora_matmul_4bit|16|1|1|bf16|x") is None
    with pytest.raises(ValueError, match="bad variant"):
        tuning.write_table(path, GPU, {k4: {**CFG, "variant": "fused"}})


def test_table_entry_with_bad_variant_is_ignored(tmp_path):
    path = _table_path(tmp_path)
    path.parent.mkdir(parents=True)
    key = tuning.shape_key(tuning.OP_LORA_MATMUL_4BIT, 2048, 64, 64, "bf16", "nf4-b64-nested-nk")
    path.write_text(json.dumps({"format": tuning.TABLE_FORMAT, "version": 1,
                                "entries": {key: {**CFG, "variant": "fast"}}}))
    with pytest.warns(RuntimeWarning, match="variant 'fast'"):
        assert tuning.lookup_table(SLUG, key) is None
    assert tuning.lookup_table_variant(SLUG, key) is None


def test_select_config_variant_filter(tmp_path):
    key = tuning.shape_key(tuning.OP_LORA_MATMUL_4BIT, 2048, 64, 64, "bf16", "nf4-b64-nested-nk")
    sel = dict(gpu_name=GPU)
    tuning.write_table(_table_path(tmp_path), GPU, {key: {**CFG, "variant": "dequant"}})
    assert tuning.select_config(key, **sel) == (CFG, "table")  # no filter: as before
    assert tuning.select_config(key, **sel, variant="inloop") is None
    assert tuning.select_config(key, **sel, variant="dequant") == (CFG, "table")
    tuning.write_table(_table_path(tmp_path), GPU, {key: CFG2})  # unlabelled: taken by any variant
    assert tuning.select_config(key, **sel, variant="inloop") == (CFG2, "table")


def test_cuda_plan_selects_by_the_staged_widths(monkeypatch):
    """matmul_lowrank's CUDA plan (built here with the device parts stubbed): the table lookup is told the
    main-loop and epilogue widths, and a table hit plans that config's grid and launch keywords with no
    autotuner."""
    from peftfast.kernels import plans

    seen = []
    monkeypatch.setattr(launch, "device_info", lambda index: ("NVIDIA H100 80GB HBM3", 232448))
    monkeypatch.setattr(mm, "select_matmul_config",
                        lambda *a, **kw: seen.append((kw["elem"], kw["lr_elem"])) or (CFG, "table"))
    dev = torch.device("cuda", 0)
    wt = torch.empty(64, 32, dtype=torch.bfloat16).t()
    left16, right16 = torch.empty(100, 16, dtype=torch.bfloat16), torch.empty(16, 64, dtype=torch.bfloat16)
    right32 = torch.empty(16, 64, dtype=torch.float32)
    for right in (right32, right16):
        tuned, grid, kwargs, m_key = mm._matmul_plan(100, 64, 32, 16, torch.bfloat16, wt, left16, right, False,
                                                     False, dev)
        assert tuned is None and m_key == 128
        assert grid == (plans.cdiv(100, CFG["BLOCK_M"]) * plans.cdiv(64, CFG["BLOCK_N"]),)
        assert {k: kwargs[k] for k in CFG} == CFG
    assert seen == [(2, 4), (2, 2)]
    b16, f32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.float32)
    assert launch.tile_widths(b16, b16, b16, f32) == (2, 4) and launch.tile_widths(b16, f32, b16, b16) == (4, 4)
