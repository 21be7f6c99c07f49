"""Tuned-config tables and the search-winner cache (kernels/tuning.py) and how matmul_lowrank picks a config.

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
    """Own cache and table folders; in-memory tables, cache reads and launch memos forgotten around each test."""
    monkeypatch.setenv("PEFTFAST_CACHE_DIR", str(tmp_path / "cache"))
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
# cache of search winners
# --------------------------------------------------------------------------------------------------

KEY = "lora_matmul|2048|1024|4096|bf16|bf16-nk"


def test_cache_dir_location(tmp_path, monkeypatch):
    assert tuning.cache_dir() == tmp_path / "cache" / "tuning"
    monkeypatch.delenv("PEFTFAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.cache_dir() == tmp_path / "xdg" / "peftfast" / "tuning"


def test_cache_round_trip_across_processes(tmp_path):
    path = tuning.cache_write(GPU, "abc123", KEY, CFG, 0.25, triton_ver="3.6.0")
    assert path is not None and path.is_file() and path.parent.name == SLUG
    data = json.loads(path.read_text())  # plain JSON, nothing pickled
    assert data["config"] == CFG and data["ms"] == 0.25 and data["shape"] == KEY
    tuning.clear_memory_caches()  # a new process: nothing in memory, only the file
    assert tuning.cache_read(GPU, "abc123", KEY, triton_ver="3.6.0") == {"config": CFG, "ms": 0.25}
    # An overwrite (a later search) replaces the file atomically.
    tuning.cache_write(GPU, "abc123", KEY, CFG2, None, triton_ver="3.6.0")
    tuning.clear_memory_caches()
    assert tuning.cache_read(GPU, "abc123", KEY, triton_ver="3.6.0") == {"config": CFG2, "ms": None}
    assert not list(path.parent.glob("*.tmp"))


def test_cache_key_changes_with_kernel_source_and_triton():
    base = tuning.cache_path(GPU, "3.6.0", "abc123", KEY)
    assert tuning.cache_path(GPU, "3.6.0", "abc124", KEY) != base       # edited kernel
    assert tuning.cache_path(GPU, "3.7.0", "abc123", KEY) != base       # other Triton
    assert tuning.cache_path("NVIDIA H200", "3.6.0", "abc123", KEY) != base
    assert tuning.cache_path(GPU, "3.6.0", "abc123", KEY.replace("|2048|", "|4096|")) != base
    tuning.cache_write(GPU, "abc123", KEY, CFG, 0.1, triton_ver="3.6.0")
    tuning.clear_memory_caches()
    assert tuning.cache_read(GPU, "abc124", KEY, triton_ver="3.6.0") is None
    assert tuning.cache_read(GPU, "abc123", KEY, triton_ver="3.7.0") is None
    assert tuning.cache_read(GPU, "abc123", KEY, triton_ver="3.6.0") is not None


def test_source_hash_follows_the_source():
    def f(x):
        return x + 1

    def g(x):
        return x + 2

    h = tuning.source_hash(mm._matmul_lowrank_kernel, tiles.dot, tiles.dropout_keep, tiles.grouped_tile, tiles.lowrank_tile)
    assert h == mm._kernel_hash() and len(h) == 16
    assert tuning.source_hash(f) != tuning.source_hash(g)
    assert tuning.source_hash(mm._matmul_lowrank_kernel) != h


@pytest.mark.parametrize("content,match", [
    ("{oops", "corrupt cache file"),
    (json.dumps({"format": tuning.CACHE_FORMAT, "version": 2, "config": CFG}), "not a peftfast.tuning-cache v1"),
    (json.dumps([1, 2, 3]), "not a peftfast.tuning-cache v1"),
])
def test_corrupt_or_foreign_cache_file_is_ignored(content, match):
    path = tuning.cache_path(GPU, "3.6.0", "abc123", KEY)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match=match):
        assert tuning.cache_read(GPU, "abc123", KEY, triton_ver="3.6.0") is None
    # The next search's winner replaces the bad file.
    tuning.cache_write(GPU, "abc123", KEY, CFG, 0.1, triton_ver="3.6.0")
    tuning.clear_memory_caches()
    assert tuning.cache_read(GPU, "abc123", KEY, triton_ver="3.6.0")["config"] == CFG


def test_cache_file_with_another_key_is_ignored():
    path = tuning.cache_write(GPU, "abc123", KEY, CFG, 0.1, triton_ver="3.6.0")
    data = json.loads(path.read_text())
    data["key"] = data["key"].replace("3.6.0", "3.5.0")
    path.write_text(json.dumps(data))
    tuning.clear_memory_caches()
    with pytest.warns(RuntimeWarning, match="another key"):
        assert tuning.cache_read(GPU, "abc123", KEY, triton_ver="3.6.0") is None


def test_unwritable_cache_warns_once_and_goes_on(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("PEFTFAST_CACHE_DIR", str(blocker))  # a file where the folder should be
    with pytest.warns(RuntimeWarning, match="cannot write tuning cache"):
        assert tuning.cache_write(GPU, "abc123", KEY, CFG, 0.1) is None


# --------------------------------------------------------------------------------------------------
# what the CUDA launcher picks (the selection function; no CUDA launch)
# --------------------------------------------------------------------------------------------------

SEL = dict(gpu_name=GPU, max_smem=227 * 1024, elem=2, block_r=16)


def _key(m=1, n=1024, k=4096):
    return tuning.shape_key("lora_matmul", m, n, k, "bf16", "bf16-nk")


def test_select_prefers_table_then_cache_then_search(tmp_path):
    assert mm.select_matmul_config(1, 1024, 4096, torch.bfloat16, "bf16-nk", **SEL) is None  # untuned: search
    tuning.cache_write(GPU, mm._kernel_hash(), _key(), CFG2, 0.2)
    tuning.clear_memory_caches()
    assert mm.select_matmul_config(1, 1024, 4096, torch.bfloat16, "bf16-nk", **SEL) == (CFG2, "cache")
    tuning.write_table(_table_path(tmp_path), GPU, {_key(): CFG})
    # M = 1..16 share the decode bucket; the table beats the cache.
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
    assert mm.select_matmul_config(4096, 1024, 4096, torch.bfloat16, "bf16-nk", **SEL) is None
    tuning.cache_write(GPU, mm._kernel_hash(), _key(m=4096), CFG, 0.3)
    assert mm.select_matmul_config(4096, 1024, 4096, torch.bfloat16, "bf16-nk", **SEL) == (CFG, "cache")


def test_tuning_can_be_switched_off(tmp_path, monkeypatch):
    tuning.write_table(_table_path(tmp_path), GPU, {_key(): CFG})
    tuning.cache_write(GPU, mm._kernel_hash(), _key(), CFG2, 0.2)
    monkeypatch.setenv("PEFTFAST_TUNING", "off")
    assert mm.select_matmul_config(1, 1024, 4096, torch.bfloat16, "bf16-nk", **SEL) is None
    monkeypatch.setenv("PEFTFAST_TUNING", "cache")
    assert mm.select_matmul_config(1, 1024, 4096, torch.bfloat16, "bf16-nk", **SEL) == (CFG2, "cache")


class _FakeAutotuner:
    """What a Triton 3.x Autotuner exposes after a run: ``best_config`` and ``configs_timings``."""

    def __init__(self, best, timings):
        self.best_config = best
        self.configs_timings = timings


def _triton_config(d):
    return triton.Config({k: d[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")},
                         num_warps=d["num_warps"], num_stages=d["num_stages"])


def test_search_winner_is_cached_with_its_time():
    best, other = _triton_config(CFG), _triton_config(CFG2)
    kernel = _FakeAutotuner(best, {best: [0.5, 0.4, 0.6], other: [0.9, 0.8, 1.0]})
    assert launch.record_search_winner(kernel, None, GPU, _key(), mm._kernel_hash()) == CFG
    tuning.clear_memory_caches()
    assert tuning.cache_read(GPU, mm._kernel_hash(), _key()) == {"config": CFG, "ms": 0.5}
    # A run that did not benchmark (Triton's own cache, or one config left) keeps the old timings dict:
    # the winner is still recorded, without a time.
    stale = kernel.configs_timings
    key2 = _key(m=2048)
    assert launch.record_search_winner(kernel, stale, GPU, key2, mm._kernel_hash()) == CFG
    tuning.clear_memory_caches()
    assert tuning.cache_read(GPU, mm._kernel_hash(), key2) == {"config": CFG, "ms": None}
    # Another kernel's search (the in-loop 4-bit GEMM) is cached under that kernel's source hash.
    key3 = _key(m=4096)
    assert launch.record_search_winner(kernel, None, GPU, key3, "0123456789abcdef") == CFG
    tuning.clear_memory_caches()
    assert tuning.cache_read(GPU, "0123456789abcdef", key3) == {"config": CFG, "ms": 0.5}
    assert tuning.cache_read(GPU, mm._kernel_hash(), key3) is None


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


def test_cache_variant_round_trip():
    key = tuning.shape_key(tuning.OP_LORA_MATMUL_4BIT, 2048, 64, 64, "bf16", "nf4-b64-nested-nk")
    tuning.cache_write(GPU, "h", key, CFG, 0.5, triton_ver="3.6.0", variant="dequant")
    assert tuning.cache_read(GPU, "h", key, triton_ver="3.6.0") == {"config": CFG, "ms": 0.5, "variant": "dequant"}
    tuning.clear_memory_caches()  # from the file, as a new process
    assert tuning.cache_read(GPU, "h", key, triton_ver="3.6.0") == {"config": CFG, "ms": 0.5, "variant": "dequant"}
    with pytest.raises(ValueError):
        tuning.cache_write(GPU, "h", key, CFG, 0.5, variant="fast")
    path = tuning.cache_path(GPU, "3.6.0", "h", key)
    data = json.loads(path.read_text())
    data["variant"] = "fast"
    path.write_text(json.dumps(data))
    tuning.clear_memory_caches()
    with pytest.warns(RuntimeWarning, match="variant 'fast'"):
        assert tuning.cache_read(GPU, "h", key, triton_ver="3.6.0") is None


def test_select_config_variant_filter(tmp_path):
    key = tuning.shape_key(tuning.OP_LORA_MATMUL_4BIT, 2048, 64, 64, "bf16", "nf4-b64-nested-nk")
    sel = dict(gpu_name=GPU, kernel_hash="h")
    tuning.write_table(_table_path(tmp_path), GPU, {key: {**CFG, "variant": "dequant"}})
    assert tuning.select_config(key, **sel) == (CFG, "table")  # no filter: as before
    assert tuning.select_config(key, **sel, variant="inloop") is None
    assert tuning.select_config(key, **sel, variant="dequant") == (CFG, "table")
    tuning.cache_write(GPU, "h", key, CFG2, 0.1)  # unlabelled: taken by any variant
    assert tuning.select_config(key, **sel, variant="inloop") == (CFG2, "cache")


def test_cuda_launch_selects_by_the_staged_widths(monkeypatch):
    """matmul_lowrank's CUDA branch (run here with the device parts stubbed): the table lookup is told the
    main-loop and epilogue widths, an fp32-adapter call is memoized apart from a bf16-adapter one, and
    the selected config is launched."""
    from types import SimpleNamespace

    seen, launched = [], []
    monkeypatch.setattr(launch, "device_info", lambda index: ("NVIDIA H100 80GB HBM3", 232448))
    monkeypatch.setattr(mm, "select_matmul_config",
                        lambda *a, **kw: seen.append((kw["elem"], kw["lr_elem"])) or (CFG, "table"))
    monkeypatch.setattr(mm, "_launch_config", lambda args, flags, m, n, cfg: launched.append(cfg))
    monkeypatch.setattr(mm, "_SELECTED", {})
    y = SimpleNamespace(device=SimpleNamespace(index=0))
    wt = torch.empty(64, 32, dtype=torch.bfloat16).t()
    for widths in ((2, 4), (2, 4), (2, 2)):
        mm._launch_cuda((), {"BLOCK_R": 16}, 100, 64, 32, torch.bfloat16, wt, y, widths)
    assert seen == [(2, 4), (2, 2)] and launched == [CFG] * 3
    b16, f32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.float32)
    assert launch.tile_widths(b16, b16, b16, f32) == (2, 4) and launch.tile_widths(b16, f32, b16, b16) == (4, 4)
