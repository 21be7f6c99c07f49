"""CI for the benchmark suites: every suite in smoke mode (CPU, tiny sizes, reference kernels).

The numbers are not figures; these tests check that the code runs and that its results are well formed:
every case has its shapes, finite positive times (p20 <= median <= p80), speedups wherever both sides
ran, and its accuracy checks within bounds. Each suite runs under pytest-benchmark (one round: the point
is the structure, not the time) when the plugin is installed.

A suite whose implementations need a library that is not installed (bitsandbytes, peft; see NEEDS) is
skipped as a whole, with the reason in the report; a suite that runs must run every implementation but the
Triton-only ones (smoke mode uses the reference backend) and pass every check.
"""
from __future__ import annotations

import json
import math
from typing import Optional

import pytest
import torch

import bench_common
import bench_report

SUITES = bench_common.SUITES


def _run_suite(request, name: str, **options):
    import importlib

    module = importlib.import_module(f"bench_{name}")
    ctx = bench_common.make_context(smoke=True, **options)

    def go():
        return module.run(ctx=ctx)

    try:
        benchmark = request.getfixturevalue("benchmark")
    except pytest.FixtureLookupError:  # pytest-benchmark not installed
        return go()
    return benchmark.pedantic(go, rounds=1, iterations=1)


def _check_timing(res: dict, where: str) -> None:
    if "tokens_per_s" in res:
        assert res["tokens_per_s"] > 0 and math.isfinite(res["tokens_per_s"]), where
        return
    for key in ("median_ms", "p20_ms", "p80_ms"):
        assert key in res, f"{where}: no {key}"
        assert res[key] > 0 and math.isfinite(res[key]), f"{where}: {key}={res[key]}"
    assert res["p20_ms"] <= res["median_ms"] * (1 + 1e-9) and res["median_ms"] <= res["p80_ms"] * (1 + 1e-9), where
    assert res["buffers"] >= 1


_, BNB_WHY = bench_common.import_bnb()
_, PEFT_WHY = bench_common.import_peft()
MISSING = {"bitsandbytes": BNB_WHY, "peft": PEFT_WHY}  # library -> why it is unusable here ("" when it is usable)
# What each suite's implementations need beyond torch and peftfast: NF4 bases are built by bitsandbytes,
# the "peft" / "peft_bnb" rows are Hugging Face PEFT's layers (the prefix suite's peft_path is plain SDPA).
NEEDS = {"ceilings": (), "lora_decode": ("bitsandbytes", "peft"), "lora_train": ("bitsandbytes", "peft"),
         "ia3": ("peft",), "prefix_attention": (), "e2e_qlora": ("bitsandbytes", "peft")}
# Forced QLoRA GEMM variants run only on the Triton path; the smoke run uses the reference backend.
TRITON_ONLY = ("peftfast_dequant", "peftfast_inloop")


def needs(suite: str):
    """Skip marker for a test that runs ``suite``: skipped, naming the library, when one it needs is missing."""
    why = [MISSING[lib] for lib in NEEDS[suite] if MISSING[lib]]
    return pytest.mark.skipif(bool(why), reason=f"bench_{suite} needs " + "; ".join(why))


def test_every_suite_declares_what_it_needs(monkeypatch):
    assert set(NEEDS) == set(SUITES)
    monkeypatch.setitem(MISSING, "peft", "peft not importable (test)")
    mark = needs("ia3")
    assert mark.args == (True,) and mark.kwargs["reason"] == "bench_ia3 needs peft not importable (test)"
    assert needs("prefix_attention").args == (False,)


def allowed_unavailable(suite: str, case: dict, impl: str):
    """The reason ``impl`` may be unavailable in a CPU smoke run, or None when it must run: only the
    Triton-only variants are excused (a missing library skips the whole test instead, see :func:`needs`)."""
    return "is a Triton path" if impl in TRITON_ONLY else None


def check_structure(result: dict, name: str, excused: Optional[dict] = None) -> None:
    """Assert that a suite's result is well formed; ``excused`` maps implementations a test made
    unavailable on purpose to the reason they must give."""
    assert result["suite"] == name
    assert result["smoke"] is True
    assert result["status"] == "ok", result["status"]
    assert result["ceilings"] and result["ceilings"]["copy_gbps"] > 0 and result["ceilings"]["matmul_bf16_tflops"] > 0
    json.dumps(result, allow_nan=False)  # serializable, no NaN/inf anywhere
    assert result["cases"], "no cases"
    assert result["headline"], "no headline"
    for case in result["cases"]:
        where = f"{name}: {case.get('name')}"
        assert case.get("name") and isinstance(case.get("shape"), dict) and case["shape"], where
        impls = case["impls"]
        assert impls, where
        for impl, res in impls.items():
            excuse = (excused or {}).get(impl) or allowed_unavailable(name, case, impl)
            if "unavailable" in res:
                assert excuse is not None, f"{where}/{impl} must run on CPU but is unavailable: {res['unavailable']}"
                assert excuse in res["unavailable"], f"{where}/{impl}: reason {res['unavailable']!r} is not {excuse!r}"
            else:
                _check_timing(res, f"{where}/{impl}")
        if name == "ceilings":
            continue
        assert "peftfast" in impls, where
        speed = case["speedup"]
        for impl, res in impls.items():
            if impl == "peftfast":
                continue
            both = "unavailable" not in res and "unavailable" not in impls["peftfast"]
            if both:
                assert speed[impl] is not None and speed[impl] > 0 and math.isfinite(speed[impl]), f"{where}/{impl}"
            else:
                assert speed[impl] is None, f"{where}/{impl}: a ratio to an unavailable side"


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs(n)) for n in SUITES])
def test_suite_smoke(request, name):
    result = _run_suite(request, name)
    check_structure(result, name)
    if name == "lora_decode":
        for case in result["cases"]:
            res = case["impls"]["peftfast"]
            assert res["pct_of_hbm_roofline"] > 0 and res["gbps"] > 0 and res["tflops"] > 0
            # bf16 output of the same dequantized weight: one rounding apart, ~1e-3 (a wrong scale is 1e-1).
            assert case["check"]["rel_err_peftfast_vs_dequant_cublas"] < 2e-2, case["name"]
            assert case["check"]["rel_err_peft_vs_dequant_cublas"] < 2e-2, case["name"]
    if name == "lora_train":
        assert {c["shape"]["base"] for c in result["cases"]} == {"bf16", "nf4"}
        for case in result["cases"]:
            # Both QLoRA GEMM variants are rows of every NF4 case (unavailable in smoke mode: reference backend).
            forced = {"peftfast_dequant", "peftfast_inloop"} & set(case["impls"])
            assert forced == ({"peftfast_dequant", "peftfast_inloop"} if case["shape"]["base"] == "nf4" else set())
    if name == "prefix_attention":
        for case in result["cases"]:
            # Same attention in bf16 both ways; PEFT's masked path and the kernel agree with SDPA to rounding.
            assert case["check"]["rel_err_peft_path_vs_sdpa"] < 1e-2, case["name"]
            assert case["check"]["rel_err_peftfast_vs_sdpa"] < 1e-2, case["name"]
    if name == "e2e_qlora":
        curves = result["loss_curves"]
        assert set(curves) == {"peftfast", "peft_bnb"}
        steps = result["config"]["loss_steps"]
        assert all(len(v) == steps and all(math.isfinite(x) for x in v) for v in curves.values())
        # Same base, same adapter init, same batches: the two curves agree to float rounding.
        assert result["loss_agreement"]["max_abs_diff"] < 1e-2
        assert {c["shape"]["gradient_checkpointing"] for c in result["cases"]} == {False, True}


def test_bad_result_fails_the_checks():
    """The checks above catch what they are for: an implementation that should run but did not, an
    unavailable one without its reason, and a speedup left out where both sides ran."""
    case = {"name": "c", "shape": {"M": 1, "base": "bf16"}, "flops": 1,
            "impls": {"peftfast": {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "buffers": 1},
                      "plain_addmm": {"unavailable": "error: RuntimeError: boom"}},
            "speedup": {"plain_addmm": None}}
    result = {"suite": "lora_train", "smoke": True, "status": "ok", "cases": [case], "headline": [{"label": "x"}],
              "ceilings": {"copy_gbps": 1.0, "matmul_bf16_tflops": 1.0}}
    with pytest.raises(AssertionError, match="must run on CPU"):
        check_structure(result, "lora_train")
    case["impls"]["plain_addmm"] = {"median_ms": 2.0, "p20_ms": 2.0, "p80_ms": 2.0, "buffers": 1}
    with pytest.raises(AssertionError, match="plain_addmm"):
        check_structure(result, "lora_train")  # both ran, but no ratio recorded
    case["speedup"]["plain_addmm"] = 2.0
    check_structure(result, "lora_train")
    result["status"] = "error: boom"
    with pytest.raises(AssertionError):
        check_structure(result, "lora_train")


def _full_ctx(profile):
    """A full-size (GPU) context, built without a GPU: only the case selection is asked of it."""
    return bench_common.Context(smoke=False, device=torch.device("cuda"), dtype=torch.bfloat16, backend="triton",
                                l2_bytes=60 << 20, options={"profile": profile})


def test_headline_profile_selects_the_headline_cases():
    import bench_e2e_qlora
    import bench_ia3
    import bench_lora_decode
    import bench_lora_train
    import bench_prefix_attention

    ctx = _full_ctx("headline")
    assert bench_lora_decode.sizes(ctx) == (((4096, 14336), (14336, 4096)), (1,))
    assert bench_lora_train.sizes(ctx) == (((4096, 14336),), (8192,))
    assert bench_ia3.sizes(ctx) == (((4096, 14336),), (("fwd", 8192), ("fwd+bwd", 8192)))
    p = bench_prefix_attention.sizes(ctx)
    assert (p["seqs"], p["prefixes"], p["hq"], p["hkv"], p["d"]) == ((2048,), (64,), 32, 8, 128)
    e = bench_e2e_qlora.sizes(ctx)
    assert (e["layers"], e["seq"], e["batch"], e["hidden"], e["intermediate"]) == (2, 2048, 2, 4096, 14336)
    full = _full_ctx(None)
    assert bench_lora_decode.sizes(full) == (bench_common.LLAMA3_8B_SHAPES, bench_lora_decode.FULL_MS)
    assert bench_e2e_qlora.sizes(full)["checkpointing"] == ("off", "on")
    with pytest.raises(ValueError, match="profile"):
        bench_common.make_context(smoke=True, profile="fast")


@needs("ia3")
def test_headline_profile_is_recorded(request):
    import bench_ia3

    result = bench_ia3.run(ctx=bench_common.make_context(smoke=True, profile="headline"))
    assert result["profile"] == "headline" and len(result["cases"]) == 2
    check_structure(result, "ia3")


@needs("lora_decode")
def test_unavailable_baseline_is_labelled(request, monkeypatch):
    import bench_lora_decode

    monkeypatch.setattr(bench_lora_decode, "import_peft", lambda: (None, "peft not importable (test)"))
    monkeypatch.setattr(bench_lora_decode, "SMOKE_SHAPES", ((128, 128),))
    monkeypatch.setattr(bench_lora_decode, "SMOKE_MS", (1,))
    result = _run_suite(request, "lora_decode")
    check_structure(result, "lora_decode", excused={"peft_bnb": "peft not importable (test)"})
    for case in result["cases"]:
        assert case["impls"]["peft_bnb"] == {"unavailable": "peft not importable (test)"}
        assert case["speedup"]["peft_bnb"] is None
        assert case["speedup"]["dequant_cublas"] is not None


def test_prefix_suite_without_kernel(monkeypatch):
    import bench_prefix_attention as bp

    monkeypatch.setattr(bp, "load_kernel", lambda: (None, "unavailable: kernel not present (test)"))
    result = bp.run(ctx=bench_common.make_context(smoke=True))
    assert result["status"] == "unavailable: kernel not present (test)"
    for case in result["cases"]:
        assert case["impls"]["peftfast"]["unavailable"].startswith("unavailable: kernel not present")
        assert all(v is None for v in case["speedup"].values())
        _check_timing(case["impls"]["sdpa_flash"], case["name"])  # the baselines still run


def test_gpu_slug():
    assert bench_common.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench_common.gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert bench_common.gpu_slug("  ") == "unknown-gpu"


def test_write_json_atomic(tmp_path):
    path = tmp_path / "a" / "x.json"
    bench_common.write_json_atomic(path, {"v": 1})
    assert json.loads(path.read_text()) == {"v": 1}
    with pytest.raises(ValueError):
        bench_common.write_json_atomic(path, {"v": float("nan")})  # refused, and the old file survives
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary left behind


def test_cli_list_and_table(tmp_path, capsys):
    from peftfast.devtools.bench import main

    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in SUITES:
        assert name in out
    assert main(["--table", "--out", str(tmp_path)]) == 0
    assert "No benchmark results committed yet" in capsys.readouterr().out


@needs("ia3")
def test_cli_smoke_writes_only_where_told(tmp_path, capsys, monkeypatch):
    from peftfast.devtools.bench import main

    results = bench_common.RESULTS_DIR
    smoke_dir = results / "cpu-smoke"
    assert main(["--smoke", "--out", str(results), "ia3"]) == 2  # smoke numbers never go to bench/results
    assert not smoke_dir.exists()
    assert main(["--smoke", "ia3"]) == 0  # no --out: nothing written
    assert not smoke_dir.exists()
    out = capsys.readouterr().out
    assert "SMOKE MODE" in out and "ia3" in out.strip().splitlines()[-1]  # the headline table comes last
    assert main(["--smoke", "--out", str(tmp_path), "--no-plots", "ia3"]) == 0
    data = json.loads((tmp_path / "cpu-smoke" / "ia3.json").read_text())
    check_structure(data, "ia3")
    env = data["env"]
    assert env["command"] == f"peftfast bench ia3 --smoke --out {tmp_path} --no-plots"
    assert env["versions"]["torch"] and env["date"] and "git_commit" in env
    capsys.readouterr()
    # The table skips smoke results unless asked; asked, it renders them, flagged as not figures.
    assert main(["--table", "--out", str(tmp_path)]) == 0
    assert "No benchmark results committed yet" in capsys.readouterr().out
    table = bench_report.markdown_report(tmp_path, include_smoke=True)
    assert "not figures" in table and "| case |" in table and "overhead vs base" in table


def test_plots_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    fake = {"suite": "lora_decode", "smoke": True, "cases": [
        {"name": "a", "shape": {"M": 1}, "impls": {}, "speedup": {"peft_bnb": 1.5, "dequant_cublas": None}}]}
    written = bench_report.plot_suite(fake, tmp_path)
    assert written and all(p.endswith(".png") for p in written)
    e2e = {"suite": "e2e_qlora", "cases": [], "loss_curves": {"peftfast": [3.0, 2.0], "peft_bnb": [3.0, 2.1]},
           "loss_agreement": {"max_abs_diff": 0.1}}
    assert bench_report.plot_suite(e2e, tmp_path)


def test_cli_profile_headline(tmp_path, capsys):
    from peftfast.devtools.bench import main

    assert main(["--smoke", "--profile", "headline", "--out", str(tmp_path), "--no-plots", "prefix_attention"]) == 0
    data = json.loads((tmp_path / "cpu-smoke" / "prefix_attention.json").read_text())
    assert data["profile"] == "headline" and [c["name"] for c in data["cases"]] == ["N=64 P=8 B=2"]
    assert "--profile headline" in data["env"]["command"]


def test_host_overhead_smoke(tmp_path):
    """bench_host_overhead at a few iterations: finite timings for every implementation, launches really
    stubbed (the counter saw them, and the real kernels are back afterwards), the target verdict computed."""
    pytest.importorskip("peft", reason="the ratios are to PEFT's layer")
    import bench_host_overhead as bho
    from triton.runtime.jit import KernelInterface

    from peftfast.kernels import matmul

    result = bho.run(iters=2, repeats=1, sizes=bho.SIZES[:1], dtypes=(torch.float32,), profile_iters=1)
    json.dumps(result, allow_nan=False)
    assert {c["mode"] for c in result["cases"]} == {"no_grad", "grad"}
    expected_bases = {"dense"} | ({"nf4"} if bho.bnb_available() else set())
    assert {c["base"] for c in result["cases"]} == expected_bases
    for case in result["cases"]:
        assert case["host_only"] and case["judged"] is (case["base"] == "dense")
        for impl in bho.IMPLS:
            res = case["impls"][impl]
            assert res["median_us"] > 0 and math.isfinite(res["median_us"]), (case["mode"], impl)
        launches = case["stub_launches_per_call"]
        # A LoRA forward is x@A^T then the fused GEMM (a 4-bit base at M=1: the fused dequant-GEMV); the
        # backward adds g, dX, dA and dB.
        assert launches["matmul._lowrank_project_kernel"] >= 1
        if case["base"] == "nf4":
            assert launches["lora_triton._decode_lora_4bit_kernel"] == 1
        else:
            assert launches["matmul._matmul_lowrank_kernel"] >= 1
        if case["mode"] == "grad":
            assert launches["matmul._lowrank_wgrad_kernel"] >= 1
        assert case["impls"]["triton"]["python_calls_per_call"] > 0
        assert case["target_met"] is (case["ratio_to_peft"]["triton"] <= case["target_triton_vs_peft"])
    assert isinstance(matmul._matmul_lowrank_kernel, KernelInterface)  # the stubs were taken out again
    paths = bho.write(result, tmp_path)
    assert json.loads(paths[0].read_text())["benchmark"] == "host_overhead"
    assert "| K x N |" in paths[1].read_text()
