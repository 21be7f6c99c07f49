"""One device call on a lent GPU: correctness, then the headline ratios, then tuning and a training run.

    python3 bench/gpu_session.py [--budget SECONDS] [--dry-run] [--out DIR]     (bench/gpu_session.sh wraps it)

A lent GPU comes with minutes, not hours (15 of device time a session, machine start included; 10 per
command; 8 files back), so one call must return the facts that matter most first, and return them even
if it is cut off. The steps, in priority order, each a child process with its own time cap:

    correctness  pytest -m gpu over the kernel tests (Llama-3-8B shapes, bf16 and fp16, 2x-PyTorch-error
                 rule), then the model-level Triton-vs-reference tests; every autotuner limited to its
                 first PEFTFAST_AUTOTUNE_CONFIGS candidates so that compiling, not searching, is the cost
    ratios       peftfast bench --profile headline: ceilings, NF4+LoRA decode, fwd+bwd at M=8192, dense
                 LoRA, prefix attention, IA3, the end-to-end QLoRA step, each against its baselines
    tune         peftfast tune for the headline shapes (kernels/configs/<gpu>.json)
    train        peftfast train --model DIR --data FILE on a locally built Llama, LoRA then QLoRA (bf16 on
                 a GPU), then peftfast generate with the QLoRA adapter

A step's cap is the smaller of its nominal cap and what the budget has left (less a reserve for packing);
a step that would get less than its minimum is skipped, and a step past its cap is killed with its
process group, keeping whatever it wrote. After every step the staging tree is packed again, so ``--out``
holds at most three files at any time: ``results.tar.gz`` (unpack at the repository root: it holds
``bench/results/<gpu>/`` and ``kernels/configs/<gpu>.json``), ``session.log`` and ``summary.md`` (the
targets, pass or fail, and the performance table generated from the result files).

``--dry-run`` runs the same steps, the same files and the same budget logic on a CPU at tiny sizes (the
kernel tests skip without CUDA, the benchmarks run in smoke mode, tune lists its plan, training is a few
steps of a tiny model): CI runs it (bench/test_gpu_session.py). Its numbers are not figures.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_BUDGET_S = 540.0
# Packing the results and writing the summary after the last step, plus slack before the device tool's own
# limit: a budget of 540 s under timeout_s=600 leaves a minute that nothing here plans to use.
RESERVE_S = 15.0
MAX_OUT_FILES = 8  # the device tool returns at most 8 files from $OUT
KERNEL_TESTS = ("tests/kernels/test_nf4.py", "tests/kernels/test_lora.py", "tests/kernels/test_gpu_headline.py",
                "tests/kernels/test_qmatmul.py", "tests/kernels/test_dora.py", "tests/kernels/test_ia3.py",
                "tests/kernels/test_prefix_attention.py", "tests/test_lora_loftq.py")
MODEL_TESTS = "tests/kernels/test_models_triton.py"
# A CPU dry run runs one model-level case for real (the rest need a GPU's speed), so the step's junit
# file holds a pass that the summary must count.
DRY_MODEL_TESTS = "test_patched_model_triton_matches_reference and lora-dense and M18"
HEADLINE_SHAPES = "14336x4096,4096x14336"  # Llama-3-8B gate/up and down, out x in


@dataclass(frozen=True)
class Step:
    """A step of the session: its name, priority (1 first), nominal cap and the least time worth starting it."""

    name: str
    priority: int
    cap_s: float
    min_s: float
    what: str


STEPS = (
    Step("correctness", 1, 150.0, 30.0, "kernel and model-level tests on the GPU (pytest -m gpu; test_models_triton)"),
    Step("ratios", 2, 240.0, 40.0, "peftfast bench --profile headline"),
    # tune rewrites its table after every entry, so a short cap still leaves the first entries; train is
    # five processes (a model, two trainings, generate), each paying its imports and compiles.
    Step("tune", 3, 60.0, 20.0, "peftfast tune --shapes " + HEADLINE_SHAPES),
    Step("train", 3, 120.0, 30.0, "peftfast train (LoRA, then QLoRA) and peftfast generate on a local Llama"),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def step_cap(step: Step, elapsed_s: float, budget_s: float, cap_s: Optional[float] = None) -> Optional[float]:
    """Seconds ``step`` may run once ``elapsed_s`` of ``budget_s`` are spent, or None to skip it.

    Args:
        step: the step; its ``cap_s`` unless ``cap_s`` overrides it, and its ``min_s``.
        elapsed_s: seconds since the session started (installation included).
        budget_s: the session's whole budget.
        cap_s: an operator's cap for this step (``--caps``), replacing the nominal one.

    Returns:
        ``min(cap, budget - reserve - elapsed)``, or None when that is under the step's minimum.

    Example:
        >>> step_cap(STEPS[0], elapsed_s=20, budget_s=540)
        150.0
    """
    left = budget_s - RESERVE_S - elapsed_s
    cap = step.cap_s if cap_s is None else cap_s
    if left < min(step.min_s, cap):
        return None
    return float(min(cap, left))


# ------------------------------------------------------------------------------------------------ header
def _version(dist: str) -> str:
    try:
        from importlib import metadata

        return metadata.version(dist)
    except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
        return "not installed"


def commit() -> str:
    """The commit under test: ``PEFTFAST_GIT_COMMIT`` (the GPU machine's copy has no .git), else git's."""
    env = os.environ.get("PEFTFAST_GIT_COMMIT", "").strip()
    if env:
        return f"{env} (PEFTFAST_GIT_COMMIT)"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git, no PEFTFAST_GIT_COMMIT)"
    if out.returncode != 0:
        return "unknown (no git, no PEFTFAST_GIT_COMMIT)"
    return out.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")


def gpu_facts() -> Dict[str, str]:
    """GPU name, driver, CUDA and capability, or a CPU's placeholders; asks CUDA only when it is there."""
    import torch

    if not torch.cuda.is_available():
        return {"gpu": "none (CPU dry run)", "driver": "none", "slug": "cpu-smoke"}
    name = torch.cuda.get_device_name(0)
    driver = "unknown"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            driver = out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    cap = ".".join(map(str, torch.cuda.get_device_capability(0)))
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"
    return {"gpu": f"{name} (sm {cap}, CUDA {torch.version.cuda})", "driver": driver, "slug": slug}


def header_lines(facts: Dict[str, str], command: str) -> List[str]:
    """The first lines of every result file: GPU, driver, versions, commit, date, command."""
    versions = ", ".join(f"{d} {_version(d)}" for d in ("torch", "triton", "bitsandbytes", "transformers", "peft",
                                                        "peftfast"))
    return [f"gpu: {facts['gpu']}", f"driver: {facts['driver']}", f"versions: {versions}; python "
            f"{sys.version.split()[0]}", f"commit: {commit()}",
            f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
            f"command: {command}"]


# ------------------------------------------------------------------------------------------------- steps
@dataclass
class Session:
    """Where a session writes: the staging tree (packed into ``out``) and what every step needs to know."""

    out: Path
    stage: Path
    dry_run: bool
    budget_s: float
    t0: float
    facts: Dict[str, str]
    header: List[str]
    jobs: int
    correctness_configs: int
    ratio_configs: int

    @property
    def results(self) -> Path:
        """``bench/results/<gpu>/`` inside the staging tree (unpacked at the repository root later)."""
        return self.stage / "bench" / "results" / self.facts["slug"]

    def log_path(self, step: str) -> Path:
        return self.results / f"{step}.log"


def _py() -> List[str]:
    return [sys.executable]


def _xdist_args(jobs: int) -> List[str]:
    """``-n JOBS`` when pytest-xdist is importable (the GPU image has it): compiles spread over the cores."""
    if jobs <= 1:
        return []
    try:
        import xdist  # noqa: F401
    except ImportError:
        return []
    return ["-n", str(jobs)]


def correctness_commands(s: Session) -> List[List[str]]:
    junit = [str(s.results / "correctness_kernels.xml"), str(s.results / "correctness_models.xml")]
    common = [*_py(), "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *_xdist_args(s.jobs)]
    kernels = [*common, "-m", "gpu", *KERNEL_TESTS, "--junitxml", junit[0]]
    models = [*common, MODEL_TESTS, "--junitxml", junit[1]]
    if s.dry_run:
        models += ["-k", DRY_MODEL_TESTS]
    return [kernels, models]


def ratios_commands(s: Session) -> List[List[str]]:
    cmd = [*_py(), "-m", "peftfast", "bench", "--profile", "headline", "--out", str(s.stage / "bench" / "results")]
    if s.dry_run:
        cmd += ["--smoke", "--no-plots"]
    return [cmd]


def tune_commands(s: Session) -> List[List[str]]:
    table = s.stage / "kernels" / "configs" / f"{s.facts['slug']}.json"
    base = [*_py(), "-m", "peftfast", "tune", "--model", "llama-3-8b", "--shapes", HEADLINE_SHAPES,
            "--batch-tokens", "8192", "--passes", "fwd,bwd", "--out", str(table)]
    if s.dry_run:
        base.append("--dry-run")
    # QLoRA first: the 4-bit GEMM's variant choice is the decision a first table most needs.
    return [base + ["--weight", "nf4"], base]


TRAIN_MODEL = """
import sys
sys.path.insert(0, "tests")
from tiny import byte_chat_tokenizer, tiny_llama_for
hidden, layers, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
tok = byte_chat_tokenizer()
tok.save_pretrained(out)
model = tiny_llama_for(tok, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                       num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                       max_position_embeddings=1024)
model.save_pretrained(out)
print(f"model: {out}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
"""


# The CUDA-graph decode (generate's default on CUDA) against the eager one on the trained adapter: compiled
# bf16 arithmetic may legitimately drift after some tokens, so the agreed prefix is reported and only a
# different first token fails.
GRAPH_DECODE_CHECK = """
import sys, time, torch
from peftfast.cli.generate import generate_ids, graph_decode_kwargs, load_with_adapter
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model = load_with_adapter(None, sys.argv[1], None, device, dtype)["model"]
ids, n = [256, *b"The "], int(sys.argv[2])
# (a CPU dry run checks the static cache only: compiling there would cost the CI half a minute)
kwargs = graph_decode_kwargs() if device == "cuda" else {"cache_implementation": "static"}
t = time.perf_counter(); eager = generate_ids(model, ids, n, None, 256); t_eager = time.perf_counter() - t
graph = generate_ids(model, ids, n, None, 256, decode_kwargs=kwargs)  # compiles and captures
t = time.perf_counter(); graph = generate_ids(model, ids, n, None, 256, decode_kwargs=kwargs)
t_graph = time.perf_counter() - t
agree = next((i for i, (a, b) in enumerate(zip(eager, graph)) if a != b), min(len(eager), len(graph)))
print(f"graph decode: {agree}/{n} tokens agree with eager; eager {t_eager:.3f} s, graph (replay) {t_graph:.3f} s")
sys.exit(0 if agree > 0 else 1)
"""


def train_commands(s: Session) -> List[List[str]]:
    work = s.stage.parent / "train"
    model, lora, qlora = work / "llama", work / "lora", work / "qlora"
    # The dry run keeps the CPU's part small: two QLoRA steps still show whether the loss falls.
    hidden, layers, seq, batch, steps = (64, 2, 32, 2, 2) if s.dry_run else (1024, 8, 256, 8, 60)
    common = ["--model", str(model), "--data", str(REPO_DIR / "peftfast" / "data" / "corpus.txt"),
              "--seq-len", str(seq), "--batch-size", str(batch), "--lr", "1e-3", "--overwrite",
              "--logging-steps", str(max(1, steps // 6))]
    if not s.dry_run:
        common.append("--bf16")
    train = [*_py(), "-m", "peftfast", "train"]
    return [
        [*_py(), "-c", TRAIN_MODEL, str(hidden), str(layers), str(model)],
        # The dense path first (issue 20): LoRA on the bf16 base, then QLoRA on its NF4 quantization.
        [*train, *common, "--method", "lora", "--max-steps", str(max(1, steps // 3)), "--output", str(lora)],
        [*train, *common, "--method", "qlora", "--max-steps", str(steps), "--output", str(qlora)],
        [*_py(), "-m", "peftfast", "generate", "--adapter", str(qlora), "--prompt", "The ", "--max-new-tokens",
         "4" if s.dry_run else "32"],
        [*_py(), "-c", GRAPH_DECODE_CHECK, str(lora), "4" if s.dry_run else "64"],
    ]


def _train_collect(s: Session) -> None:
    qlora = s.stage.parent / "train" / "qlora"
    for name, dest in (("train_log.json", "train_log.json"), ("loss.png", "train_loss.png")):
        if (qlora / name).is_file():
            shutil.copyfile(qlora / name, s.results / dest)


COMMANDS: Dict[str, Callable[[Session], List[List[str]]]] = {
    "correctness": correctness_commands, "ratios": ratios_commands, "tune": tune_commands, "train": train_commands,
}
COLLECT: Dict[str, Callable[[Session], None]] = {"train": _train_collect}


def step_env(s: Session, step: str) -> Dict[str, str]:
    """The environment of a step's commands: the autotuning limit and where tuning state goes."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PEFTFAST_AUTOTUNE_CONFIGS", None)
    # The train step shows that training runs, not how fast: one candidate per search, as correctness.
    limit = {"correctness": s.correctness_configs, "ratios": s.ratio_configs,
             "train": s.correctness_configs}.get(step, 0)
    if limit:
        env["PEFTFAST_AUTOTUNE_CONFIGS"] = str(limit)
    # A fresh Triton cache per session (where autotune keeps its winners since peftfast dropped its own):
    # no winner of an earlier run is reused. Triton keys a winner on the candidates left after pruning, so
    # a limited search (PEFTFAST_AUTOTUNE_CONFIGS) never stands in for a fuller one of a later step.
    env["TRITON_CACHE_DIR"] = str(s.stage.parent / "triton-cache")
    if step == "train":
        # The table the tune step just wrote, if any, is what training launches use.
        env["PEFTFAST_TUNING_TABLES"] = str(s.stage / "kernels" / "configs")
    if s.dry_run:
        # The CPU's defaults: the reference path (tests/conftest.py sets the interpreter up for pytest
        # itself), whatever the calling process set; the interpreter would make training crawl.
        env.pop("TRITON_INTERPRET", None)
        env.pop("PEFTFAST_BACKEND", None)
    return env


def run_commands(commands: Sequence[Sequence[str]], env: Dict[str, str], log: Path,
                 cap_s: float) -> Tuple[str, List[Optional[int]]]:
    """Run ``commands`` one after another, appending to ``log``, within ``cap_s`` seconds in all.

    Returns:
        ``(status, exit codes)``: status is ``"done"``, ``"failed (exit N: command)"`` (later commands still
        run: one failing test file does not stop the others' evidence) or ``"cut off at its cap of N s"``
        (the running command's process group is killed and nothing later starts); one exit code per
        command, None for one killed or never started.
    """
    t_end = time.monotonic() + cap_s
    failures: List[str] = []
    codes: List[Optional[int]] = [None] * len(commands)
    cut = f"cut off at its cap of {cap_s:.0f} s"
    with open(log, "a", encoding="utf-8") as f:
        for i, cmd in enumerate(commands):
            left = t_end - time.monotonic()
            if left <= 0:
                f.write(f"\n== not started (cap reached): {shlex.join(cmd)}\n")
                return cut, codes
            f.write(f"\n== {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(list(cmd), cwd=REPO_DIR, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                codes[i] = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                f.write(f"\n== killed at the step's cap of {cap_s:.0f} s\n")
                return cut, codes
            f.write(f"== exit {codes[i]}\n")
            if codes[i] != 0:
                failures.append(f"exit {codes[i]}: {' '.join(cmd[1:4])}")
    return ("done" if not failures else "failed (" + "; ".join(failures) + ")"), codes


def _kill_group(proc: subprocess.Popen) -> None:
    """End a step's command and every process it started (pytest workers, compilers), TERM then KILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def stamp_junit(path: Path, header: List[str]) -> None:
    """Put the header lines into a junit file as an XML comment after its declaration (it stays valid XML)."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    comment = "<!--\n" + "\n".join(line.replace("--", "- -") for line in header) + "\n-->\n"
    if text.startswith("<?xml"):
        end = text.index("?>") + 2
        text = text[:end] + "\n" + comment + text[end:].lstrip("\n")
    else:
        text = comment + text
    path.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------------ summary
def junit_counts(path: Path) -> Optional[Dict[str, int]]:
    """``{tests, failures, errors, skipped, passed}`` of a junit file, or None when it is missing/unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    return c


def _load(results: Path, suite: str) -> Optional[dict]:
    try:
        return json.loads((results / f"{suite}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _case(result: Optional[dict], **shape) -> Optional[dict]:
    for c in (result or {}).get("cases") or []:
        if all(c.get("shape", {}).get(k) == v for k, v in shape.items()):
            return c
    return None


def _row(target: str, goal: str, value: Optional[float], fmt: str, ok: Optional[bool]) -> List[str]:
    measured = "not measured" if value is None else fmt.format(value)
    verdict = "n/a" if value is None else ("info" if ok is None else ("PASS" if ok else "FAIL"))
    return [target, goal, measured, verdict]


def _speed_rows(label: str, case: Optional[dict], goals: Dict[str, float]) -> List[List[str]]:
    rows = []
    for base, goal in goals.items():
        v = ((case or {}).get("speedup") or {}).get(base)
        rows.append(_row(f"{label}: speedup vs {base}", f">= {goal:g}x", v, "{:.2f}x",
                         None if v is None else v >= goal))
    return rows


def target_rows(s: Session, statuses: Dict[str, dict]) -> List[List[str]]:
    """Every target of the session: ``[target, goal, measured, PASS | FAIL | info | n/a]``."""
    rows = []
    for what, name in (("kernel tests (pytest -m gpu)", "correctness_kernels.xml"),
                       ("model-level Triton vs reference", "correctness_models.xml")):
        c = junit_counts(s.results / name)
        if c is None:
            rows.append([what, "0 failed", "not run", "n/a"])
        else:
            bad = c["failures"] + c["errors"]
            if bad:
                verdict = "FAIL"
            elif c["passed"]:
                verdict = "PASS"
            else:  # nothing ran: on a GPU that is a failure to test, on a CPU the gpu-marked tests skip
                verdict = "n/a (CPU: gpu tests skip)" if s.dry_run else "FAIL (nothing ran)"
            rows.append([what, "0 failed", f"{c['passed']} passed, {bad} failed, {c['skipped']} skipped", verdict])
    ceil = _load(s.results, "ceilings")
    c = (ceil or {}).get("ceilings") or {}
    rows.append(_row("copy bandwidth (ceiling)", "measured", c.get("copy_gbps"), "{:.0f} GB/s", None))
    rows.append(_row("bf16 matmul (ceiling)", "measured", c.get("matmul_bf16_tflops"), "{:.0f} TFLOP/s", None))
    dec = _load(s.results, "lora_decode")
    for k, n in ((4096, 14336), (14336, 4096)) if not s.dry_run else ((128, 128),):
        case = _case(dec, M=1, K=k, N=n)
        pct = ((case or {}).get("impls", {}).get("peftfast") or {}).get("pct_of_hbm_roofline")
        rows.append(_row(f"NF4+LoRA decode M=1 {k}->{n}: % of copy bandwidth", "near the roofline", pct,
                         "{:.0f}%", None))
        rows += _speed_rows(f"NF4+LoRA decode M=1 {k}->{n}", case, {"peft_bnb": 1.0, "dequant_cublas": 1.0})
    tr = _load(s.results, "lora_train")
    k, n, m = (4096, 14336, 8192) if not s.dry_run else (128, 128, 32)
    nf4 = _case(tr, base="nf4", K=k, N=n, M=m)
    rows += _speed_rows(f"NF4+LoRA fwd+bwd M={m} {k}->{n}", nf4, {"peft": 1.0, "dequant_cublas": 1.0})
    floor = ((nf4 or {}).get("speedup") or {}).get("bf16_dense_floor")
    rows.append(_row(f"NF4+LoRA fwd+bwd M={m} {k}->{n}: time of bf16 cuBLAS floor / ours", "report", floor,
                     "{:.2f}x", None))
    dense = _case(tr, base="bf16", K=k, N=n, M=m)
    rows += _speed_rows(f"dense bf16 LoRA fwd+bwd M={m} {k}->{n}", dense, {"peft": 1.0, "plain_addmm": 1.0})
    pre = _load(s.results, "prefix_attention")
    pcase = ((pre or {}).get("cases") or [None])[0]
    rows += _speed_rows("prefix attention fwd+bwd " + ((pcase or {}).get("name") or ""), pcase,
                        {"sdpa_flash": 0.9, "peft_path": 2.0})
    ia3 = _load(s.results, "ia3")
    for case in (ia3 or {}).get("cases") or [{"name": "", "overhead_vs_base_pct": None}]:
        o = case.get("overhead_vs_base_pct")
        rows.append(_row(f"IA3 {case['name']}: overhead vs the plain layer", "<= 3%", o, "{:+.1f}%",
                         None if o is None else o <= 3.0))
    e2e = _load(s.results, "e2e_qlora")
    ecase = ((e2e or {}).get("cases") or [None])[0]
    tps = ((ecase or {}).get("speedup") or {}).get("peft_bnb")
    mem = ((ecase or {}).get("memory_ratio") or {}).get("peft_bnb")
    label = f"e2e QLoRA step ({(ecase or {}).get('name', '')})"
    rows.append(_row(f"{label}: tokens/s vs PEFT+bnb", ">= 2x", tps, "{:.2f}x", None if tps is None else tps >= 2))
    rows.append(_row(f"{label}: peak memory vs PEFT+bnb", "<= 0.5x", mem, "{:.2f}x",
                     None if mem is None else mem <= 0.5))
    table = s.stage / "kernels" / "configs" / f"{s.facts['slug']}.json"
    entries = None
    if table.is_file():
        try:
            entries = len(json.loads(table.read_text()).get("entries") or {})
        except ValueError:
            entries = None
    rows.append(["tuned table entries (headline shapes)", "written", "dry run: plan only" if s.dry_run and
                 entries is None else ("none" if entries is None else str(entries)),
                 "n/a" if entries is None else "info"])
    rows.append(train_row(s, statuses))
    rows.append(graph_decode_row(s))
    return rows


def train_row(s: Session, statuses: Dict[str, dict]) -> List[str]:
    """Whether the QLoRA run's loss fell and ``peftfast generate`` (the train step's last command) exited 0.

    A dry run trains two steps of a tiny model, too few for the loss to fall reliably: there the losses
    must only be finite.
    """
    what = "peftfast train QLoRA + generate"
    goal = "finite losses; generate runs (dry run)" if s.dry_run else "loss falls; generate runs"
    try:
        data = json.loads((s.results / "train_log.json").read_text())
    except (OSError, ValueError):
        return [what, goal, "not run", "n/a"]
    losses = [x for x in data.get("losses") or [] if isinstance(x, (int, float))]
    codes = (statuses.get("train") or {}).get("exit_codes") or []
    generated = len(codes) > 3 and codes[3] == 0  # build, lora, qlora, generate, graph check
    if len(losses) < 2:
        return [what, goal, f"{len(losses)} logged losses", "FAIL"]
    finite = all(math.isfinite(x) for x in losses)
    ok = finite and generated and (s.dry_run or losses[-1] < losses[0])
    return [what, goal, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; generate {'ran' if generated else 'did not run'}",
            "PASS" if ok else "FAIL"]


def graph_decode_row(s: Session) -> List[str]:
    """The CUDA-graph decode check (the train step's last command): its agreed-prefix line from the log."""
    what, goal = "CUDA-graph decode vs eager (tokens agreeing)", "first token agrees"
    try:
        log = s.log_path("train").read_text()
    except OSError:
        log = ""
    found = re.search(r"graph decode: (\d+)/(\d+) tokens agree with eager; (.*)", log)
    if not found:
        return [what, goal, "not run", "n/a"]
    agree, n = int(found.group(1)), int(found.group(2))
    return [what, goal, f"{agree}/{n}; {found.group(3)}", "PASS" if agree > 0 else "FAIL"]


def summary_markdown(s: Session, statuses: Dict[str, dict], final: bool) -> str:
    sys.path.insert(0, str(BENCH_DIR))
    import bench_report

    lines = ["# GPU session summary", "", *[f"    {h}" for h in s.header], ""]
    if s.dry_run:
        lines += ["**DRY RUN on a CPU (tiny sizes, smoke-mode benchmarks): these numbers are not figures; "
                  "PASS/FAIL shows that the plumbing works, nothing about speed.**", ""]
    if not final:
        lines += ["_Interim summary: the session had not finished when this was written._", ""]
    lines += [f"Budget {s.budget_s:.0f} s; {time.time() - s.t0:.0f} s used. Autotuning limits: correctness "
              f"and train {s.correctness_configs or 'full search'}, ratios {s.ratio_configs or 'full search'} "
              f"candidate(s) per search (PEFTFAST_AUTOTUNE_CONFIGS).", "",
              "| step | priority | status | seconds | cap |", "|---|---|---|---|---|"]
    for st in STEPS:
        r = statuses.get(st.name, {"status": "not reached"})
        secs = "" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        cap = "" if r.get("cap") is None else f"{r['cap']:.0f}"
        lines.append(f"| {st.name} | {st.priority} | {r['status']} | {secs} | {cap} |")
    lines += ["", "## Targets", "", "| target | goal | measured | result |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in target_rows(s, statuses)]
    lines += ["", "## Performance table (generated from the result files)", "",
              bench_report.markdown_report(s.stage / "bench" / "results", include_smoke=s.dry_run,
                                           where="bench/results/")]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------ packing
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def pack(s: Session, statuses: Dict[str, dict], final: bool) -> None:
    """Write the summary, then re-pack the staging tree into ``out/results.tar.gz`` (atomically)."""
    summary = summary_markdown(s, statuses, final)
    _write_atomic(s.results / "summary.md", summary)
    (s.results / "steps.json").write_text(json.dumps({"header": s.header, "budget_s": s.budget_s, "steps": statuses,
                                                      "final": final}, indent=1) + "\n")
    tmp = s.out / ".results.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for top in ("bench", "kernels"):
            if (s.stage / top).exists():
                tar.add(s.stage / top, arcname=top)
    os.replace(tmp, s.out / "results.tar.gz")
    _write_atomic(s.out / "summary.md", summary)
    shutil.copyfile(s.results / "session.log", s.out / ".session.log.tmp")
    os.replace(s.out / ".session.log.tmp", s.out / "session.log")


def log_line(s: Session, text: str) -> None:
    line = f"[{time.time() - s.t0:6.1f} s] {text}"
    print(line, flush=True)
    with open(s.results / "session.log", "a", encoding="utf-8") as f:
        f.write(line + "\n")


# ---------------------------------------------------------------------------------------------------- run
def run_session(s: Session, steps: Sequence[Step] = STEPS, caps: Optional[Dict[str, float]] = None,
                commands: Optional[Dict[str, Callable[[Session], List[List[str]]]]] = None) -> Dict[str, dict]:
    """Run ``steps`` in order under the session's budget; pack after each. Returns each step's status.

    Args:
        s: the session (output folder, staging tree, budget and its start time).
        steps: the steps to run, in priority order.
        caps: operator overrides of steps' caps, in seconds.
        commands: the command lists of each step (default :data:`COMMANDS`).

    Returns:
        ``{step: {"status", "seconds", "cap"}}``; status is done, failed (...), cut off at its cap of N s,
        or skipped (N s left, M needed).
    """
    commands = commands or COMMANDS
    statuses: Dict[str, dict] = {}
    for st in steps:
        elapsed = time.time() - s.t0
        cap = step_cap(st, elapsed, s.budget_s, (caps or {}).get(st.name))
        if cap is None:
            left = s.budget_s - RESERVE_S - elapsed
            statuses[st.name] = {"status": f"skipped ({max(0.0, left):.0f} s left, {st.min_s:.0f} needed)",
                                 "seconds": None, "cap": None}
            log_line(s, f"{st.name}: {statuses[st.name]['status']}")
            continue
        log = s.log_path(st.name)
        log.write_text("\n".join(s.header) + f"\nstep: {st.name} (priority {st.priority}): {st.what}; "
                       f"cap {cap:.0f} s\n", encoding="utf-8")
        log_line(s, f"{st.name}: start (cap {cap:.0f} s)")
        t = time.time()
        status, codes = run_commands(commands[st.name](s), step_env(s, st.name), log, cap)
        if st.name in COLLECT:
            COLLECT[st.name](s)
        for xml in s.results.glob(f"{st.name}_*.xml"):
            stamp_junit(xml, s.header)
        statuses[st.name] = {"status": status, "seconds": time.time() - t, "cap": cap, "exit_codes": codes}
        log_line(s, f"{st.name}: {status} in {time.time() - t:.0f} s")
        pack(s, statuses, final=False)
    pack(s, statuses, final=True)
    return statuses


def parse_caps(spec: Optional[str]) -> Dict[str, float]:
    """``"ratios=60,tune=30"`` -> ``{"ratios": 60.0, "tune": 30.0}``; unknown steps or bad numbers raise."""
    caps: Dict[str, float] = {}
    for item in (t.strip() for t in (spec or "").split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        if name not in STEP_NAMES:
            raise ValueError(f"--caps: unknown step {name!r}; the steps are {', '.join(STEP_NAMES)}")
        try:
            caps[name] = float(value)
        except ValueError:
            raise ValueError(f"--caps {item!r}: give STEP=SECONDS, e.g. ratios=120") from None
        if caps[name] <= 0:
            raise ValueError(f"--caps {item!r}: seconds must be positive")
    return caps


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_session.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                   help=f"the whole session, installation included (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same steps, files and budget logic")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-out", metavar="DIR",
                   help="where the (at most 3) result files go (default $OUT, else ./gpu-out)")
    p.add_argument("--work", default=None, metavar="DIR",
                   help="scratch folder for the staging tree, models and caches (default: a fresh temporary one)")
    p.add_argument("--steps", default=",".join(STEP_NAMES), metavar="NAME,...",
                   help=f"steps to run, kept in priority order (default all: {','.join(STEP_NAMES)})")
    p.add_argument("--caps", default=None, metavar="STEP=SECONDS,...", help="override steps' nominal caps")
    p.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                   help="pytest-xdist workers for the correctness step, when xdist is installed "
                        "(default: the cores, at most 16)")
    p.add_argument("--correctness-configs", type=int, default=1, metavar="N",
                   help="autotuning candidates per search in the correctness and train steps (default 1; 0: full "
                        "search)")
    p.add_argument("--ratio-configs", type=int, default=4, metavar="N",
                   help="autotuning candidates per search in the ratios step (default 4; 0: full search)")
    args = p.parse_args(argv)
    t0 = float(os.environ.get("PEFTFAST_SESSION_T0") or time.time())  # gpu_session.sh: installation counts
    try:
        caps = parse_caps(args.caps)
        wanted = [n.strip() for n in args.steps.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in STEP_NAMES]
        if unknown or not wanted:
            raise ValueError(f"--steps: unknown or no step {unknown}; the steps are {', '.join(STEP_NAMES)}")
        if args.budget <= 0 or args.correctness_configs < 0 or args.ratio_configs < 0:
            raise ValueError("--budget must be positive and --*-configs at least 0")
    except ValueError as e:
        print(f"gpu_session: error: {e}", file=sys.stderr)
        return 2
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_session: error: no CUDA GPU here (torch.cuda.is_available() is False); --dry-run runs the same "
              "steps on a CPU at tiny sizes", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clutter = [f.name for f in out.iterdir() if f.name not in ("results.tar.gz", "session.log", "summary.md")]
    if clutter:
        print(f"gpu_session: error: {out} holds other files ({', '.join(sorted(clutter)[:5])}); at most "
              f"{MAX_OUT_FILES} files come back from a device call: give an empty --out", file=sys.stderr)
        return 2
    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="peftfast-gpu-session-"))
    shutil.rmtree(work / "stage", ignore_errors=True)
    facts = gpu_facts()
    command = (os.environ.get("PEFTFAST_SESSION_COMMAND")
               or shlex.join(["bench/gpu_session.py", *(sys.argv[1:] if argv is None else argv)]))
    s = Session(out=out, stage=work / "stage", dry_run=args.dry_run, budget_s=args.budget, t0=t0, facts=facts,
                header=header_lines(facts, command), jobs=args.jobs, correctness_configs=args.correctness_configs,
                ratio_configs=args.ratio_configs)
    s.results.mkdir(parents=True, exist_ok=True)
    (s.results / "session.log").write_text("\n".join(s.header) + "\n", encoding="utf-8")
    log_line(s, f"budget {args.budget:.0f} s, work {work}, out {out}{' (DRY RUN)' if args.dry_run else ''}")
    statuses = run_session(s, [st for st in STEPS if st.name in wanted], caps)
    print((s.out / "summary.md").read_text(encoding="utf-8"))
    return 0 if all(v["status"] == "done" for v in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
