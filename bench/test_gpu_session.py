"""CI for bench/gpu_session.sh: the dry run (CPU, tiny sizes) takes the same steps, writes the same files
and keeps the same budget as a lent GPU's run; a budget that runs out still returns what finished.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import gpu_session as gs

REPO = Path(__file__).resolve().parent.parent
HEADER_KEYS = ("gpu:", "driver:", "versions:", "commit:", "date:", "command:")


def _script(*args, tmp_path: Path, env_extra=None, timeout=400):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    env.update(env_extra or {})
    return subprocess.run([str(REPO / "bench" / "gpu_session.sh"), *args, "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _members(out: Path) -> dict:
    with tarfile.open(out / "results.tar.gz") as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()}


def _assert_header(text: str, where: str) -> None:
    lines = text.splitlines()
    firsts = [line.strip() for line in lines if line.strip()][:len(HEADER_KEYS) + 2]
    for key in HEADER_KEYS:
        assert any(f.startswith(key) for f in firsts), f"{where}: no '{key}' in its first lines: {firsts}"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-session")
    t0 = time.monotonic()
    proc = _script("--dry-run", tmp_path=tmp, env_extra={"PEFTFAST_GIT_COMMIT": "0123456789abcdef"})
    return proc, tmp / "out", time.monotonic() - t0


def test_dry_run_completes_every_step_within_budget(dry_run):
    proc, out, wall = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = json.loads(_members(out)["bench/results/cpu-smoke/steps.json"])
    assert steps["final"] is True and list(steps["steps"]) == list(gs.STEP_NAMES)
    assert all(v["status"] == "done" for v in steps["steps"].values()), steps["steps"]
    assert wall < gs.DEFAULT_BUDGET_S
    assert "| train | 3 | done |" in proc.stdout  # the summary is printed last, for the device reply's tail


def test_dry_run_files_come_back_whole(dry_run):
    _, out, _ = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert files == ["results.tar.gz", "session.log", "summary.md"] and len(files) <= gs.MAX_OUT_FILES
    members = _members(out)
    res = "bench/results/cpu-smoke/"
    expected = {"correctness.log", "correctness_kernels.xml", "correctness_models.xml", "ratios.log", "tune.log",
                "train.log", "train_log.json", "session.log", "summary.md", "steps.json",
                *(f"{suite}.json" for suite in ("ceilings", "lora_decode", "lora_train", "ia3", "prefix_attention",
                                                "e2e_qlora"))}
    missing = {f for f in expected if res + f not in members}
    assert not missing, f"not in results.tar.gz: {sorted(missing)}"
    # Unpacked at the repository root, nothing lands outside bench/results/<gpu>/ and kernels/configs/.
    assert all(m.startswith(("bench/results", "kernels/configs")) or m in ("bench", "kernels") for m in members)


def test_every_result_starts_with_gpu_versions_commit_date_command(dry_run):
    _, out, _ = dry_run
    members = _members(out)
    res = "bench/results/cpu-smoke/"
    for name in ("correctness.log", "ratios.log", "tune.log", "train.log", "session.log", "summary.md"):
        text = members[res + name].decode()
        _assert_header(text, name)
        assert "commit: 0123456789abcdef (PEFTFAST_GIT_COMMIT)" in text, name
    for name in ("correctness_kernels.xml", "correctness_models.xml"):
        text = members[res + name].decode()
        _assert_header(text.split("-->")[0], name)
        ET.fromstring(text.encode())  # still valid XML
    for suite in ("ceilings", "lora_decode", "e2e_qlora"):
        env = json.loads(members[res + f"{suite}.json"])["env"]
        # bench_common asks git first and PEFTFAST_GIT_COMMIT only without it (the GPU machine's copy).
        assert env["git_commit"] and env["date"] and env["command"]
        assert env["versions"]["torch"] and "transformers" in env["versions"] and "gpu" in env
    _assert_header((out / "summary.md").read_text(), "out/summary.md")


def test_dry_run_summary_has_every_target(dry_run):
    _, out, _ = dry_run
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary
    for target in ("kernel tests (pytest -m gpu)", "model-level Triton vs reference", "copy bandwidth",
                   "NF4+LoRA decode M=1", "NF4+LoRA fwd+bwd", "dense bf16 LoRA fwd+bwd", "prefix attention fwd+bwd",
                   "IA3", "e2e QLoRA step", "tuned table entries", "peftfast train QLoRA + generate"):
        assert f"| {target}" in summary, target
    # One real model-level case runs on the CPU, and its pass is counted from the junit file.
    assert "| model-level Triton vs reference | 0 failed | 1 passed, 0 failed, 0 skipped | PASS |" in summary
    train = [line for line in summary.splitlines() if line.startswith("| peftfast train QLoRA + generate |")]
    assert len(train) == 1 and "generate ran" in train[0] and train[0].endswith("| PASS |"), train
    graph = [line for line in summary.splitlines() if line.startswith("| CUDA-graph decode vs eager")]
    assert len(graph) == 1 and "| 4/4; eager" in graph[0] and graph[0].endswith("| PASS |"), graph
    # The performance table is the one bench_report generates from the result files.
    assert "## Performance table (generated from the result files)" in summary and "#### lora_decode" in summary
    assert "Files: `bench/results/cpu-smoke/`" in summary


def test_dry_run_limits_the_correctness_search_and_isolates_the_cache(dry_run):
    _, out, _ = dry_run
    log = _members(out)["bench/results/cpu-smoke/correctness.log"].decode()
    assert "-m gpu" in log and "test_models_triton.py" in log
    s = gs.Session(out=Path("o"), stage=Path("/w/stage"), dry_run=True, budget_s=540, t0=0.0,
                   facts={"slug": "x", "gpu": "", "driver": ""}, header=[], jobs=1, correctness_configs=1,
                   ratio_configs=4)
    assert gs.step_env(s, "correctness")["PEFTFAST_AUTOTUNE_CONFIGS"] == "1"
    assert gs.step_env(s, "ratios")["PEFTFAST_AUTOTUNE_CONFIGS"] == "4"
    assert gs.step_env(s, "train")["PEFTFAST_AUTOTUNE_CONFIGS"] == "1"
    assert "PEFTFAST_AUTOTUNE_CONFIGS" not in gs.step_env(s, "tune")  # tune times every candidate itself
    assert gs.step_env(s, "correctness")["TRITON_CACHE_DIR"] == "/w/triton-cache"


# ------------------------------------------------------------------------------------ budget and cut-off
def test_step_caps_follow_the_budget():
    correctness, ratios, tune, _ = gs.STEPS
    assert gs.step_cap(correctness, 10, 540) == correctness.cap_s
    assert gs.step_cap(ratios, 400, 540) == 540 - gs.RESERVE_S - 400  # what is left, not the nominal cap
    assert gs.step_cap(tune, 540 - gs.RESERVE_S - tune.min_s + 1, 540) is None  # under its minimum: skipped
    assert gs.step_cap(ratios, 0, 540, cap_s=5) == 5  # an operator's cap wins, even under the step's minimum


def _fake_commands(slow_s: float):
    """Steps that write their files at once; ``ratios`` writes one suite's file, then hangs."""
    def write(name, text):
        return [sys.executable, "-c", f"import sys; open(sys.argv[1], 'w').write({text!r})", name]

    def correctness(s):
        return [write(str(s.results / "correctness_kernels.xml"),
                      '<?xml version="1.0"?><testsuite tests="3" failures="0" errors="0" skipped="0"/>')]

    def ratios(s):
        return [write(str(s.results / "ceilings.json"), json.dumps({"suite": "ceilings", "cases": []})),
                [sys.executable, "-c", f"import time; time.sleep({slow_s})"]]

    def nothing(s):
        return [[sys.executable, "-c", "pass"]]

    return {"correctness": correctness, "ratios": ratios, "tune": nothing, "train": nothing}


def _session(tmp_path: Path, budget_s: float) -> gs.Session:
    facts = {"gpu": "none (test)", "driver": "none", "slug": "cpu-smoke"}
    s = gs.Session(out=tmp_path / "out", stage=tmp_path / "work" / "stage", dry_run=True, budget_s=budget_s,
                   t0=time.time(), facts=facts, header=gs.header_lines(facts, "test"), jobs=1,
                   correctness_configs=1, ratio_configs=4)
    s.out.mkdir(parents=True)
    s.results.mkdir(parents=True)
    (s.results / "session.log").write_text("\n".join(s.header) + "\n")
    return s


def test_tiny_budget_cuts_off_and_still_returns_the_finished_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "RESERVE_S", 1.0)
    s = _session(tmp_path, budget_s=12.0)
    t0 = time.monotonic()
    # Steps shorter than their nominal minimums, as a budget this small needs (the caps say so).
    statuses = gs.run_session(s, caps={"correctness": 2.0, "ratios": 3.0}, commands=_fake_commands(slow_s=120))
    wall = time.monotonic() - t0
    assert statuses["correctness"]["status"] == "done"
    assert statuses["ratios"]["status"].startswith("cut off at its cap")
    assert statuses["tune"]["status"].startswith("skipped") and statuses["train"]["status"].startswith("skipped")
    assert wall < 12.0 + 10.0  # the hung command was killed at the cap (TERM, then KILL), not waited for
    members = _members(s.out)
    assert "bench/results/cpu-smoke/correctness_kernels.xml" in members  # the finished step's file
    assert "bench/results/cpu-smoke/ceilings.json" in members  # what the cut-off step wrote before its cap
    assert len(list(s.out.iterdir())) <= gs.MAX_OUT_FILES
    summary = (s.out / "summary.md").read_text()
    assert "| ratios | 2 | cut off at its cap" in summary and "| tune | 3 | skipped" in summary
    assert "| kernel tests (pytest -m gpu) | 0 failed | 3 passed, 0 failed, 0 skipped | PASS |" in summary


def test_a_budget_too_small_for_any_step_still_returns_a_summary(tmp_path):
    proc = _script("--dry-run", "--budget", "20", tmp_path=tmp_path, timeout=120)
    assert proc.returncode == 1  # nothing was done
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "session.log", "summary.md"]
    summary = (out / "summary.md").read_text()
    for name in gs.STEP_NAMES:
        assert f"| {name} |" in summary and "skipped" in summary.split(f"| {name} |")[1].splitlines()[0]


def test_bad_arguments_are_refused_with_the_fix(tmp_path, capsys):
    assert gs.main(["--dry-run", "--caps", "ratio=3", "--out", str(tmp_path / "o")]) == 2
    assert "unknown step 'ratio'; the steps are correctness, ratios, tune, train" in capsys.readouterr().err
    assert gs.main(["--dry-run", "--steps", "bench", "--out", str(tmp_path / "o")]) == 2
    assert "--steps" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.txt").write_text("x")
    assert gs.main(["--dry-run", "--out", str(full)]) == 2
    assert "give an empty --out" in capsys.readouterr().err and (full / "old.txt").read_text() == "x"
    if not __import__("torch").cuda.is_available():
        assert gs.main(["--out", str(tmp_path / "o2")]) == 2
        assert "--dry-run runs the same steps" in capsys.readouterr().err


# ------------------------------------------------------------------------------- what a GPU would run
def _gpu_session(tmp_path: Path) -> gs.Session:
    facts = {"gpu": "NVIDIA H200 (sm 9.0, CUDA 13.0)", "driver": "580", "slug": "nvidia-h200"}
    return gs.Session(out=tmp_path / "out", stage=tmp_path / "work" / "stage", dry_run=False, budget_s=540,
                      t0=0.0, facts=facts, header=[], jobs=16, correctness_configs=1, ratio_configs=4)


def test_gpu_commands(tmp_path):
    """The commands a lent GPU runs (the dry run exercises their CPU twins): full sizes, no dry-run flags."""
    s = _gpu_session(tmp_path)
    kernels, models = gs.correctness_commands(s)
    assert "-m" in kernels and "gpu" in kernels and all(t in kernels for t in gs.KERNEL_TESTS)
    assert gs.MODEL_TESTS in models and "-k" not in models  # every model-level case, not the dry run's one
    (ratios,) = gs.ratios_commands(s)
    assert ratios[-4:] == ["--profile", "headline", "--out", str(s.stage / "bench" / "results")]
    nf4, dense = gs.tune_commands(s)
    for cmd in (nf4, dense):
        assert "--dry-run" not in cmd and cmd[cmd.index("--out") + 1].endswith("kernels/configs/nvidia-h200.json")
        assert cmd[cmd.index("--shapes") + 1] == gs.HEADLINE_SHAPES
    assert nf4[-2:] == ["--weight", "nf4"] and "--weight" not in dense
    build, lora, qlora, generate, graph = gs.train_commands(s)
    # The dense LoRA run comes before QLoRA (issue 20), both in bf16 on the GPU; generate uses QLoRA's adapter.
    assert lora[lora.index("--method") + 1] == "lora" and qlora[qlora.index("--method") + 1] == "qlora"
    assert "--bf16" in lora and "--bf16" in qlora
    assert generate[generate.index("--adapter") + 1] == qlora[qlora.index("--output") + 1]
    assert graph[2] == gs.GRAPH_DECODE_CHECK and graph[3] == lora[lora.index("--output") + 1] and graph[4] == "64"
    assert build[-3:-1] == ["1024", "8"]
    env = gs.step_env(s, "train")
    assert env["PEFTFAST_TUNING_TABLES"] == str(s.stage / "kernels" / "configs")  # the table tune just wrote


def test_pytest_runs_across_the_cores_when_xdist_is_there(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "xdist", types.ModuleType("xdist"))
    assert gs._xdist_args(16) == ["-n", "16"]
    assert gs._xdist_args(1) == []
    monkeypatch.setitem(sys.modules, "xdist", None)  # not installed: serial, the step still runs
    assert gs._xdist_args(16) == []
