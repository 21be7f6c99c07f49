"""``peftfast tune`` (peftfast/tune.py): shape planning, CLI refusals, and the measuring loop.

CPU tests list shapes (``--dry-run``), check the no-CUDA refusal, and run the check-and-time loop in
Triton's interpreter with a stand-in timer; the ``gpu`` test tunes one small model for real.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from peftfast import cli, tune
from peftfast.kernels import tuning

LLAMA3_8B_SHAPES = {(4096, 4096): "q_proj,o_proj", (1024, 4096): "k_proj,v_proj",
                    (14336, 4096): "gate_proj,up_proj", (4096, 14336): "down_proj"}
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "model_type": "llama"}


def _entries(out: str):
    return re.findall(r"^\s+(lora_matmul\|\S+)\s+(fwd|bwd)\s+(\S+)$", out, flags=re.M)


def test_dry_run_llama_3_8b_lists_four_shapes_times_buckets(capsys):
    assert cli.main(["tune", "--model", "llama-3-8b", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 distinct linear shapes" in out
    for (n, k), mods in LLAMA3_8B_SHAPES.items():
        assert re.search(rf"^\s+{n} x {k}\s+{mods}$", out, flags=re.M), (n, k, out)
    # Default --batch-tokens 1,16,2048,8192: 1 and 16 share the decode bucket.
    assert "3 M buckets: 16 (from 1,16), 2048 (from 2048), 8192 (from 8192)" in out
    entries = _entries(out)
    assert len(entries) == 4 * 3
    want = {f"lora_matmul|{m}|{n}|{k}|bf16|bf16-nk" for (n, k) in LLAMA3_8B_SHAPES for m in (16, 2048, 8192)}
    assert {e[0] for e in entries} == want
    assert all(p == "fwd" for _, p, _ in entries)


def test_dry_run_backward_pass_and_options(capsys):
    assert cli.main(["tune", "--model", "llama-3-8b", "--dry-run", "--passes", "fwd,bwd", "--dtype", "fp16",
                     "--batch-tokens", "64,100"]) == 0
    entries = _entries(capsys.readouterr().out)
    assert len(entries) == 4 * 2 * 2
    keys = {e[0] for e in entries if e[1] == "bwd"}
    # dX = dY @ W: N and K swap and W is read row-major ("kn").
    assert "lora_matmul|128|4096|14336|fp16|fp16-kn" in keys and "lora_matmul|64|14336|4096|fp16|fp16-kn" in keys


def test_model_from_config_file_and_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": TINY}))  # multimodal nesting
    for spec in (str(tmp_path), str(tmp_path / "config.json")):
        assert cli.main(["tune", "--model", spec, "--dry-run", "--batch-tokens", "8"]) == 0
        out = capsys.readouterr().out
        assert "4 distinct linear shapes" in out
        assert {e[0] for e in _entries(out)} == {
            "lora_matmul|16|256|256|bf16|bf16-nk", "lora_matmul|16|128|256|bf16|bf16-nk",
            "lora_matmul|16|512|256|bf16|bf16-nk", "lora_matmul|16|256|512|bf16|bf16-nk"}


@pytest.mark.parametrize("argv,msg", [
    (["--model", "no-such-model"], "neither a built-in name"),
    (["--model", "llama-3-8b", "--batch-tokens", "1,x"], "comma-separated integers"),
    (["--model", "llama-3-8b", "--batch-tokens", "0"], "positive integers"),
    (["--model", "llama-3-8b", "--dtype", "int8"], "--dtype"),
    (["--model", "llama-3-8b", "--passes", "fwd,dw"], "--passes"),
])
def test_bad_arguments_exit_2(argv, msg, capsys):
    assert cli.main(["tune", "--dry-run", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_config_without_sizes_exits_2(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    assert cli.main(["tune", "--model", str(p), "--dry-run"]) == 2
    assert "hidden_size" in capsys.readouterr().err


def test_real_tune_without_cuda_exits_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "t.json"
    assert cli.main(["tune", "--model", "llama-3-8b", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "CUDA GPU" in err and "--dry-run" in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# the measuring loop, in the interpreter with a stand-in timer
# --------------------------------------------------------------------------------------------------


def test_candidates_follow_the_pruner():
    small = tune.candidates(16, 2, 16, family="sm90", max_smem=227 * 1024)
    assert small and all(c["BLOCK_M"] == 16 for c in small)
    large = tune.candidates(8192, 2, 16, family="sm90", max_smem=227 * 1024)
    assert max(c["BLOCK_M"] for c in large) >= 128
    tight = tune.candidates(8192, 2, 16, family="sm90", max_smem=64 * 1024)
    assert len(tight) < len(large)


def test_measure_task_checks_then_times_and_picks_the_fastest():
    task = tune.plan([tune.LinearShape(48, 32, ("q_proj",))], [16], "fp32", ["fwd", "bwd"])
    good1 = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}
    good2 = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}
    broken = {**good1, "BLOCK_N": 0}
    for t in task:
        times = iter([(0.3, 0.29, 0.31), (0.1, 0.09, 0.11)])
        calls = []

        def timer(fn):
            fn()  # the timed function launches (and rotates inputs)
            calls.append(1)
            return next(times)

        res = tune.measure_task(t, [good1, broken, good2], rank=4, device="cpu", timer=timer,
                                l2_bytes=64 * 1024)
        assert len(calls) == 2
        assert res["input_sets"] > 1  # 2 x "L2" of 64 KB over ~20 KB per set
        assert "error" in res["results"][1]
        assert all(r["rel_error"] < 1e-5 for r in (res["results"][0], res["results"][2]))
        best = res["best"]
        assert tuning.config_from_entry(best) == good2 and best["ms"] == 0.1 and best["rank"] == 4


def test_measure_task_drops_wrong_results(monkeypatch):
    from peftfast.kernels import matmul as mm

    real = mm._launch_config

    def wrong(args, flags, m, n, cfg):
        real(args, flags, m, n, cfg)
        args[6][0, 0] += 1.0  # y: one wrong element

    monkeypatch.setattr(mm, "_launch_config", wrong)
    task = tune.plan([tune.LinearShape(32, 32, ("q_proj",))], [16], "fp32")[0]
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}
    res = tune.measure_task(task, [cfg], rank=4, device="cpu", timer=lambda fn: (1.0, 1.0, 1.0))
    assert res["best"] is None and "relative error" in res["results"][0]["error"]


# --------------------------------------------------------------------------------------------------
# GPU: a real tune of a small model, then the launcher uses the table
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_tune_small_model_on_gpu(tmp_path, monkeypatch, capsys):
    from peftfast.kernels import matmul as mm

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set")
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(TINY))
    slug = tuning.gpu_slug(torch.cuda.get_device_name())
    out = tmp_path / "tables" / f"{slug}.json"
    monkeypatch.setenv("PEFTFAST_TUNING_TABLES", str(out.parent))
    monkeypatch.setenv("PEFTFAST_CACHE_DIR", str(tmp_path / "cache"))
    rc = cli.main(["tune", "--model", str(cfg_path), "--batch-tokens", "16", "--out", str(out),
                   "--warmup", "5", "--rep", "20"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    data = json.loads(out.read_text())
    assert data["gpu"] == torch.cuda.get_device_name() and data["format"] == tuning.TABLE_FORMAT
    assert len(data["entries"]) == 4
    for key, entry in data["entries"].items():
        assert tuning.config_from_entry(entry) is not None and entry["ms"] > 0
    # The launcher now takes the table's config for that shape, with no search.
    tuning.clear_memory_caches()
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16) / 16
    left = torch.randn(16, 16, device="cuda", dtype=torch.bfloat16)
    right = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16) / 10
    y = mm.matmul_lowrank(x, w.t(), left, right, 2.0)
    ref = x.float() @ w.float().t() + 2.0 * left.float() @ right.float()
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
    key = tuning.shape_key("lora_matmul", 16, 512, 256, "bf16", "bf16-nk")
    chosen = [v for k, v in mm._SELECTED.items() if k[1:4] == (16, 512, 256)]
    assert chosen == [tuning.config_from_entry(data["entries"][key])]
