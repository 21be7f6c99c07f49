"""Shared machinery of the benchmark suites: timing, buffer rotation, ceilings, environment, JSON.

Every module here is named ``bench_*`` so that pytest, which collects ``bench/`` next to ``tests/``
with rootdir-relative ``prepend`` imports, never confuses them with the test helpers (``helpers``,
``models``, ``tiny``). The kernels are imported as ``peftfast.kernels``, never as ``kernels``.

Two modes:

* **full** (CUDA): Llama-3-8B shapes, timed by ``triton.testing.do_bench`` (CUDA events, an L2 flush
  before every call) with quantiles (median, p20, p80), inputs rotated through enough buffer sets to
  exceed twice the L2 size, peak memory from ``torch.cuda.max_memory_allocated``.
* **smoke** (CPU, what CI runs): tiny shapes, the reference backend, a ``time.perf_counter`` timer over
  a few calls. It runs every line of the suites so the code cannot rot, but its numbers are not
  figures: results are never written under ``bench/results``.
"""
from __future__ import annotations

import datetime
import gc
import itertools
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from peftfast.fileio import replace_atomically

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SCHEMA = 1

SUITES = ("ceilings", "lora_decode", "lora_train", "ia3", "prefix_attention", "e2e_qlora")

# Llama-3-8B linear layers (in_features K -> out_features N): q/o, k/v, gate/up, down.
LLAMA3_8B_SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
LORA_R = 16
LORA_ALPHA = 32
# "full": every case of every suite (``peftfast bench``); "headline": the few cases that carry the headline
# ratios, sized so that all suites fit a few minutes of a lent GPU (bench/gpu_session.py).
PROFILES = ("full", "headline")


# ----------------------------------------------------------------------------------------------- context
@dataclass
class Context:
    """What every suite needs to know about the run."""

    smoke: bool
    device: torch.device
    dtype: torch.dtype
    backend: str  # the peftfast kernels' backend for this run: "triton" (CUDA) or "reference" (smoke)
    l2_bytes: int
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    progress: Optional[Callable[[str, int, int, str], None]] = None
    ceilings: Optional[Dict[str, Any]] = None
    options: Dict[str, Any] = field(default_factory=dict)
    _suite: str = ""
    _total: int = 0
    _done: int = 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def headline(self) -> bool:
        """Whether this run measures only the headline cases (``options["profile"] == "headline"``)."""
        return self.options.get("profile") == "headline"

    def begin(self, suite: str, total: int) -> None:
        self._suite, self._total, self._done = suite, total, 0
        if self.progress:
            self.progress(suite, 0, total, "start")

    def tick(self, label: str) -> None:
        self._done += 1
        if self.progress:
            self.progress(self._suite, self._done, max(self._total, self._done), label)


def smoke_threads(fn):
    """Decorator for a suite's ``run``: in smoke mode, run on one CPU thread, then restore the count.

    Tiny CPU ops on a loaded machine are hundreds of times slower with several threads (they spin and
    wait on each other); one thread keeps the smoke run to seconds.
    """
    import functools

    @functools.wraps(fn)
    def wrapper(smoke: Optional[bool] = None, ctx: Optional["Context"] = None, **kw):
        ctx = ctx or make_context(smoke)
        if not ctx.smoke:
            return fn(smoke, ctx, **kw)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(smoke, ctx, **kw)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def make_context(smoke: Optional[bool] = None, progress=None, **options) -> Context:
    """A run context; ``smoke=None`` means smoke exactly when CUDA is unavailable."""
    has_cuda = torch.cuda.is_available()
    if options.get("profile") not in (None, *PROFILES):
        raise ValueError(f"profile must be one of {PROFILES}, got {options['profile']!r}")
    if smoke is None:
        smoke = not has_cuda
    if not smoke and not has_cuda:
        raise RuntimeError("the full benchmark needs a CUDA GPU; use --smoke on a CPU-only machine")
    if smoke:
        # The smoke mode exercises the code on CPU: reference kernels, cheap float32-free bf16 math.
        return Context(smoke=True, device=torch.device("cpu"), dtype=torch.bfloat16, backend="reference",
                       l2_bytes=1 << 20, warmup_ms=0.0, rep_ms=0.0, progress=progress, options=dict(options))
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    return Context(smoke=False, device=torch.device("cuda"), dtype=torch.bfloat16, backend="triton", l2_bytes=l2,
                   progress=progress, options=dict(options))


# ------------------------------------------------------------------------------------------------ timing
def n_buffers(ctx: Context, bytes_per_set: int, cap: int = 64) -> int:
    """How many input sets to rotate through so that together they exceed twice the L2 size."""
    if ctx.smoke:
        return 1
    return int(max(1, min(cap, math.ceil(2 * ctx.l2_bytes / max(1, bytes_per_set)))))


def _sync(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def measure(
    ctx: Context,
    fn: Callable[..., Any],
    arg_sets: Sequence[Sequence[Any]] = ((),),
    *,
    grad_to_none: Optional[Sequence[torch.Tensor]] = None,
) -> Dict[str, Any]:
    """Time ``fn(*args)`` with ``args`` rotating through ``arg_sets``.

    Returns ``median_ms``, ``p20_ms``, ``p80_ms``, ``buffers`` (how many sets were rotated),
    ``peak_mem_bytes`` (peak memory one call allocates above what was allocated before it; CUDA only)
    and ``timer``.
    """
    sets = list(arg_sets) or [()]
    cycle = itertools.cycle(sets)

    def call():
        return fn(*next(cycle))

    # One call first compiles/autotunes (kept out of every number); a second one measures peak memory.
    peak = None
    if ctx.cuda:
        for measured in (False, True):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            _sync(ctx)
            gc.collect()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = call()
            _sync(ctx)
            if measured:
                peak = int(torch.cuda.max_memory_allocated() - before)
            del out
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        import triton.testing

        q = triton.testing.do_bench(call, warmup=ctx.warmup_ms, rep=ctx.rep_ms, grad_to_none=grad_to_none,
                                    quantiles=[0.5, 0.2, 0.8])
        median, p20, p80 = (float(v) for v in q)
        timer = f"triton.testing.do_bench(warmup={ctx.warmup_ms}, rep={ctx.rep_ms}, quantiles=[0.5, 0.2, 0.8])"
    else:
        call()  # warm-up
        times = []
        for _ in range(3):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        median = statistics.median(times)
        p20, p80 = _quantile(times, 0.2), _quantile(times, 0.8)
        timer = "smoke: time.perf_counter, 1 warm-up + 3 calls (not a figure)"
    if grad_to_none:
        for t in grad_to_none:
            t.grad = None
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "buffers": len(sets), "peak_mem_bytes": peak,
            "timer": timer}


def _quantile(sorted_values: List[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def safe_measure(ctx: Context, fn, arg_sets=((),), **kw) -> Dict[str, Any]:
    """``measure``, but a failure is recorded as ``{"unavailable": "error: ..."}`` instead of raised."""
    try:
        return measure(ctx, fn, arg_sets, **kw)
    except Exception as e:  # noqa: BLE001 - a benchmark records what failed and goes on
        if ctx.cuda:
            torch.cuda.empty_cache()
        return unavailable(f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")


def unavailable(reason: str) -> Dict[str, str]:
    return {"unavailable": reason}


def is_available(result: Optional[dict]) -> bool:
    return bool(result) and "unavailable" not in result and "median_ms" in result


# ---------------------------------------------------------------------------------------- derived figures
def derive(result: dict, *, flops: Optional[float] = None, bytes_moved: Optional[float] = None,
           ceilings: Optional[dict] = None) -> dict:
    """Add TFLOP/s, GB/s and percentages of the measured ceilings to a timing (in place)."""
    if not is_available(result):
        return result
    sec = result["median_ms"] * 1e-3
    if flops:
        result["tflops"] = flops / sec / 1e12
        if ceilings and ceilings.get("matmul_bf16_tflops"):
            result["pct_of_matmul_ceiling"] = 100.0 * result["tflops"] / ceilings["matmul_bf16_tflops"]
    if bytes_moved:
        result["gbps"] = bytes_moved / sec / 1e9
        if ceilings and ceilings.get("copy_gbps"):
            # The HBM roofline: the time the bytes take at the measured copy bandwidth, over the time taken.
            result["pct_of_hbm_roofline"] = 100.0 * result["gbps"] / ceilings["copy_gbps"]
    return result


def speedups(impls: Dict[str, dict], ours: str = "peftfast") -> Dict[str, Optional[float]]:
    """``baseline median / ours median`` for every other implementation (> 1: peftfast is faster).

    None where either side is unavailable.
    """
    out: Dict[str, Optional[float]] = {}
    mine = impls.get(ours)
    for name, res in impls.items():
        if name == ours:
            continue
        if is_available(mine) and is_available(res):
            out[name] = res["median_ms"] / mine["median_ms"]
        else:
            out[name] = None
    return out


def geomean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


def free_memory(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ ceilings
_CEILINGS_CACHE: Dict[str, dict] = {}


def measure_ceilings(ctx: Context) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and bf16 matmul TFLOP/s on random data.

    Measured once per process and device and shared by every suite of the run.
    """
    key = f"{ctx.device}-{ctx.smoke}"
    if key in _CEILINGS_CACHE:
        ctx.ceilings = _CEILINGS_CACHE[key]
        return ctx.ceilings
    if ctx.smoke:
        n_copy, n_mm = 1 << 18, 128
    else:
        n_copy, n_mm = 1 << 30, 8192  # 1 GiB each way; an 8192^3 product
    src = torch.randn(n_copy // 2, device=ctx.device, dtype=torch.bfloat16)  # random, never zeros
    dst = torch.empty_like(src)
    copy = measure(ctx, lambda: dst.copy_(src))
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    a = torch.randn(n_mm, n_mm, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n_mm, n_mm, device=ctx.device, dtype=torch.bfloat16)
    mm = measure(ctx, lambda: torch.mm(a, b))
    del a, b
    free_memory(ctx)
    copy_gbps = copy_bytes / (copy["median_ms"] * 1e-3) / 1e9
    tflops = 2 * n_mm**3 / (mm["median_ms"] * 1e-3) / 1e12
    ceilings = {
        "copy_gbps": copy_gbps,
        "matmul_bf16_tflops": tflops,
        "copy": dict(copy, bytes=copy_bytes, what=f"dst.copy_(src), {copy_bytes // 2} bytes each way, bf16 random"),
        "matmul": dict(mm, flops=2 * n_mm**3, what=f"torch.mm bf16 {n_mm}x{n_mm}x{n_mm}, random normal inputs"),
    }
    _CEILINGS_CACHE[key] = ceilings
    ctx.ceilings = ceilings
    return ceilings


# ------------------------------------------------------------------------------------- optional libraries
def import_bnb():
    """``(bitsandbytes, "")`` or ``(None, reason)``."""
    try:
        import bitsandbytes as bnb  # noqa: F401

        bnb.nn.Params4bit  # noqa: B018 - a broken install fails here
        return bnb, ""
    except Exception as e:  # noqa: BLE001
        return None, f"bitsandbytes not importable ({type(e).__name__}: {e})"


def import_peft():
    try:
        import peft  # noqa: F401

        return peft, ""
    except Exception as e:  # noqa: BLE001
        return None, f"peft not importable ({type(e).__name__}: {e})"


def quantize_nf4(weight: torch.Tensor, compute_dtype: torch.dtype, nested: bool = True):
    """A bitsandbytes ``Linear4bit`` (NF4, nested absmax by default) holding ``weight`` [N, K], on its device."""
    bnb, why = import_bnb()
    if bnb is None:
        raise RuntimeError(why)
    n, k = weight.shape
    kw = dict(bias=False, compute_dtype=compute_dtype, compress_statistics=nested, quant_type="nf4",
              quant_storage=torch.uint8)
    try:  # on "meta" the placeholder dense weight costs nothing; it is replaced below
        lin = bnb.nn.Linear4bit(k, n, device="meta", **kw)
    except Exception:  # noqa: BLE001 - older bitsandbytes
        lin = bnb.nn.Linear4bit(k, n, device="cpu", **kw)
    p = bnb.nn.Params4bit(weight.detach().contiguous(), requires_grad=False, quant_type="nf4",
                          compress_statistics=nested, quant_storage=torch.uint8)
    lin.weight = p._quantize(weight.device) if hasattr(p, "_quantize") else p.to(weight.device)
    return lin


def nf4_bytes(n: int, k: int, blocksize: int = 64, nested: bool = True) -> int:
    """Bytes of one NF4 weight as the fused kernel reads it: codes, block scales and (nested) their scales."""
    numel = n * k
    blocks = math.ceil(numel / blocksize)
    codes = math.ceil(numel / 2)
    if nested:
        return codes + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16 + 4
    return codes + 4 * blocks + 4 * 16


class _One(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def peft_lora_layer(base_layer: torch.nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, *, r: int, alpha: int,
                    four_bit: bool):
    """Hugging Face PEFT's own LoRA layer around ``base_layer`` (bitsandbytes ``Linear4bit`` or ``nn.Linear``).

    Built through ``peft.get_peft_model`` (PEFT picks its bnb 4-bit LoRA class from the module type), with
    the given adapter weights copied in, in their dtype (the same precision as peftfast's; PEFT's own
    default would upcast bf16 adapters to fp32, which is slower).
    """
    peft, why = import_peft()
    if peft is None:
        raise RuntimeError(why)
    holder = _One(base_layer)
    if four_bit:
        holder.is_loaded_in_4bit = True  # how PEFT learns that the model is 4-bit (as transformers sets it)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0, init_lora_weights=False)
    pm = peft.get_peft_model(holder, cfg, autocast_adapter_dtype=False)
    layer = pm.base_model.model.proj
    with torch.no_grad():
        la, lb = layer.lora_A["default"], layer.lora_B["default"]
        la.weight = torch.nn.Parameter(lora_A.detach().clone().to(lora_A.device), requires_grad=True)
        lb.weight = torch.nn.Parameter(lora_B.detach().clone().to(lora_B.device), requires_grad=True)
    return layer


# ------------------------------------------------------------------------------------------- environment
def gpu_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-gpu"


def _version(dist: str, module: Optional[str] = None) -> Optional[str]:
    try:
        from importlib import metadata

        return metadata.version(dist)
    except Exception:  # noqa: BLE001
        pass
    try:
        import importlib

        return getattr(importlib.import_module(module or dist), "__version__", None)
    except Exception:  # noqa: BLE001
        return None


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
    except Exception:  # noqa: BLE001
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        pass
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v
    except Exception:  # noqa: BLE001
        return None


def environment(ctx: Context, command: str, argv: Optional[List[str]] = None) -> dict:
    """GPU, driver, library versions, git commit, date and the exact command of this run."""
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
               "multiprocessors": props.multi_processor_count, "memory_bytes": props.total_memory,
               "l2_bytes": ctx.l2_bytes, "driver": _driver_version(), "cuda": torch.version.cuda}
    else:
        gpu = {"name": None, "driver": None, "cpu": platform.processor() or platform.machine()}
    status = _git("status", "--porcelain", "--untracked-files=no")
    commit, commit_source = _git("rev-parse", "HEAD"), "git rev-parse HEAD"
    if commit is None and os.environ.get("PEFTFAST_GIT_COMMIT"):
        # A copy of the working tree without .git (a remote GPU machine): the caller passes the commit.
        commit, commit_source = os.environ["PEFTFAST_GIT_COMMIT"].strip(), "PEFTFAST_GIT_COMMIT"
    return {
        "gpu": gpu,
        "slug": result_slug(ctx),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "bitsandbytes": _version("bitsandbytes"),
            "peft": _version("peft"),
            "transformers": _version("transformers"),
            "peftfast": _version("peftfast") or _peftfast_version(),
        },
        "git_commit": commit,
        "git_commit_source": commit_source if commit else None,
        "git_dirty": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "argv": list(argv if argv is not None else sys.argv),
        # Everything that changes what runs: a limited autotuning search (PEFTFAST_AUTOTUNE_CONFIGS) or a forced
        # QLoRA GEMM variant measures something else than the defaults do.
        "env": {k: os.environ[k] for k in ("PEFTFAST_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES",
                                           "PEFTFAST_GIT_COMMIT", "PEFTFAST_AUTOTUNE_CONFIGS",
                                           "PEFTFAST_QLORA_GEMM", "PEFTFAST_TUNING", "PEFTFAST_TUNING_TABLES")
                if k in os.environ},
        "smoke": ctx.smoke,
        "backend": ctx.backend,
    }


def _peftfast_version() -> Optional[str]:
    try:
        import peftfast

        return peftfast.__version__
    except Exception:  # noqa: BLE001
        return None


def result_slug(ctx: Context) -> str:
    if ctx.cuda:
        return gpu_slug(torch.cuda.get_device_name(0))
    return "cpu-smoke"


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["peftfast", "bench", *argv])


# -------------------------------------------------------------------------------------------------- files
def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write JSON next to ``path`` in a temporary file, then rename it over ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(path, text=True) as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=_json_default, allow_nan=False)
        f.write("\n")
    return path


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def finite_or_none(x: Optional[float]) -> Optional[float]:
    return x if (x is not None and math.isfinite(x)) else None


def inside(path: Path, parent: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(parent).resolve())
        return True
    except ValueError:
        return False


def suite_result(name: str, ctx: Context, cases: List[dict], *, config: dict, headline: List[dict],
                 status: str = "ok", notes: Optional[List[str]] = None, extra: Optional[dict] = None) -> dict:
    """The dict every suite's ``run`` returns (the CLI adds ``env`` before writing it)."""
    out = {
        "suite": name,
        "schema": SCHEMA,
        "status": status,
        "smoke": ctx.smoke,
        "profile": ctx.options.get("profile") or "full",
        "device": str(ctx.device),
        "backend": ctx.backend,
        "ceilings": {k: ctx.ceilings[k] for k in ("copy_gbps", "matmul_bf16_tflops")} if ctx.ceilings else None,
        "config": config,
        "cases": cases,
        "headline": headline,
        "notes": notes or [],
    }
    if extra:
        out.update(extra)
    return out


def headline(label: str, value: Optional[float], unit: str = "x", target: Optional[str] = None) -> dict:
    return {"label": label, "value": finite_or_none(value), "unit": unit, "target": target}
