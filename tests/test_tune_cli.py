"""``peftfast tune`` (peftfast/devtools/tune.py): shape planning, CLI refusals, and the measuring loop.

CPU tests list shapes (``--dry-run``), check the no-CUDA refusal, and run the check-and-time loop in
Triton's interpreter with a stand-in timer; the ``gpu`` test tunes one small model for real.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from peftfast import cli
from peftfast.devtools import tune
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
    (["--model", "./no/such/dir"], "neither a built-in name"),
    (["--model", "no-such-model"], "not loadable from the Hugging Face Hub"),  # a Hub id; tests run offline
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
    from peftfast.kernels import plans

    chosen = [plan for k, plan in plans.PLANS.items() if k[:4] == ("matmul_lowrank", 16, 512, 256)]
    want = tuning.config_from_entry(data["entries"][key])
    assert len(chosen) == 1 and chosen[0][0] is None  # a table hit: no autotuner
    assert {f: chosen[0][2][f] for f in want} == want


# --------------------------------------------------------------------------------------------------
# 4-bit bases: both QLoRA GEMM variants per entry
# --------------------------------------------------------------------------------------------------


def _entries_4bit(out: str):
    return re.findall(r"^\s+(lora_matmul_4bit\|\S+)\s+(fwd|bwd)\s+(\S+)(.*)$", out, flags=re.M)


def test_dry_run_nf4_lists_4bit_entries_and_skips_decode_buckets(capsys):
    assert cli.main(["tune", "--model", "llama-3-8b", "--dry-run", "--weight", "nf4", "--passes", "fwd,bwd"]) == 0
    out = capsys.readouterr().out
    assert "weight: nf4 blocksize 64, nested absmax" in out
    assert "skipped M buckets 16: M <= 64 runs the 4-bit decode kernel" in out
    entries = _entries_4bit(out)
    assert len(entries) == 4 * 2 * 2 and not _entries(out)
    keys = {e[0] for e in entries}
    assert "lora_matmul_4bit|2048|4096|4096|bf16|nf4-b64-nested-nk" in keys
    # The dX GEMM of down_proj: dY [M, 4096] @ W [4096, 14336].
    assert "lora_matmul_4bit|8192|14336|4096|bf16|nf4-b64-nested-kn" in keys
    assert not any(e[3].strip() for e in entries)  # Llama's in_features are multiples of 64


def test_dry_run_fp4_options_and_dequant_only_note(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "hidden_size": 192, "intermediate_size": 320}))
    assert cli.main(["tune", "--model", str(tmp_path), "--dry-run", "--weight", "fp4", "--blocksize", "128",
                     "--no-nested", "--batch-tokens", "100,4000", "--dtype", "fp16"]) == 0
    entries = _entries_4bit(capsys.readouterr().out)
    assert {e[0].split("|")[1] for e in entries} == {"128", "4096"}
    assert all(e[0].endswith("|fp16|fp4-b128-nk") for e in entries)
    # in_features 192 and 320 are not multiples of 128: those entries can only time the dequant variant.
    notes = {e[0].split("|")[3]: e[3] for e in entries}
    assert "dequant only" in notes["192"] and "dequant only" in notes["320"]


@pytest.mark.parametrize("argv,msg", [
    (["--weight", "int4"], "--weight"),
    (["--weight", "nf4", "--blocksize", "48"], "--blocksize"),
])
def test_bad_4bit_arguments_exit_2(argv, msg, capsys):
    assert cli.main(["tune", "--model", "llama-3-8b", "--dry-run", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_only_decode_buckets_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.main(["tune", "--model", "llama-3-8b", "--weight", "nf4", "--batch-tokens", "1,64"]) == 2
    assert "decode kernel" in capsys.readouterr().err


def test_random_quant4bit_layout():
    from peftfast.kernels.nf4 import dequantize_4bit, dequantize_4bit_reference

    q = tune.random_quant4bit(6, 64, quant_type="fp4", blocksize=32, nested=True)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == 6 * 64 // 2 and q.absmax.dtype == torch.uint8
    assert q.absmax.numel() == 12 and q.code.tolist() == list(map(float, torch.tensor(tune.FP4_CODE).tolist()))
    w = dequantize_4bit_reference(q, torch.float32)
    assert torch.isfinite(w).all() and w.std() > 0
    assert torch.equal(dequantize_4bit(q, dtype=torch.float32), w)
    plain = tune.random_quant4bit(3, 64, quant_type="nf4", nested=False)
    assert plain.absmax.dtype == torch.float32 and not plain.nested


@pytest.mark.parametrize("times,winner", [((0.1, 0.3), "inloop"), ((0.3, 0.1), "dequant")])
def test_measure_task_4bit_records_the_faster_variant(times, winner):
    """Both variants' candidates are checked then timed; the entry names the winner (and, when it is
    the dequant variant, its dense GEMM config goes under that GEMM's own lora_matmul key)."""
    spec = tune.QuantSpec("nf4", 64, True)
    tasks = tune.plan([tune.LinearShape(48, 128, ("q_proj",))], [100], "fp32", ["fwd", "bwd"], spec)
    assert [t.key for t in tasks] == ["lora_matmul_4bit|128|48|128|fp32|nf4-b64-nested-nk",
                                      "lora_matmul_4bit|128|128|48|fp32|nf4-b64-nested-kn"]
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}
    broken = {**cfg, "BLOCK_K": 0}
    for t in tasks:
        it = iter([(times[0],) * 3, (times[1],) * 3])
        calls = []

        def timer(fn):
            fn()
            calls.append(1)
            return next(it)

        res = tune.measure_task_4bit(t, [cfg], [broken, cfg], rank=4, device="cpu", timer=timer, l2_bytes=64 * 1024)
        assert len(calls) == 2 and res["input_sets"] > 1
        assert [r["variant"] for r in res["results"]] == ["inloop", "dequant", "dequant"]
        assert "error" in res["results"][1]
        assert all(res["results"][i]["rel_error"] < 1e-5 for i in (0, 2))
        best = res["best"]
        assert best["variant"] == winner and tuning.config_from_entry(best) == cfg
        assert best["inloop_ms"] == times[0] and best["dequant_ms"] == times[1] and best["ms"] == min(times)
        if winner == "dequant":
            layout = t.weight.rsplit("-", 1)[1]
            key, entry = res["dense"]
            assert key == f"lora_matmul|128|{t.n}|{t.k}|fp32|fp32-{layout}"
            assert tuning.config_from_entry(entry) == cfg and entry["ms_includes"] == "dequantize_4bit"
        else:
            assert res["dense"] is None


def test_measure_task_4bit_drops_wrong_inloop_results(monkeypatch):
    from peftfast.kernels.experimental import qmatmul as qmm

    real = qmm._launch_config

    def wrong(args, flags, m, n, cfg):
        real(args, flags, m, n, cfg)
        args[11][0, 0] += 1.0  # y: one wrong element

    monkeypatch.setattr(qmm, "_launch_config", wrong)
    task = tune.plan([tune.LinearShape(32, 64, ("q_proj",))], [100], "fp32", quant=tune.QuantSpec("fp4", 32, False))[0]
    cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}
    res = tune.measure_task_4bit(task, [cfg], [cfg], rank=4, device="cpu", timer=lambda fn: (1.0, 1.0, 1.0))
    assert "relative error" in res["results"][0]["error"]
    assert res["best"]["variant"] == "dequant"


@pytest.mark.gpu
def test_tune_nf4_small_model_on_gpu(tmp_path, monkeypatch, capsys):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set")
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(TINY))
    out = tmp_path / "tables" / "t.json"
    rc = cli.main(["tune", "--model", str(cfg_path), "--weight", "nf4", "--batch-tokens", "256", "--passes",
                   "fwd,bwd", "--out", str(out), "--warmup", "5", "--rep", "20"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    entries = json.loads(out.read_text())["entries"]
    four = {k: v for k, v in entries.items() if k.startswith("lora_matmul_4bit|")}
    assert len(four) == 8
    for entry in four.values():
        assert entry["variant"] in ("inloop", "dequant") and entry["ms"] > 0
        assert entry["inloop_ms"] is not None and entry["dequant_ms"] is not None
