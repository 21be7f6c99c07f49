"""``peftfast tune``: time the LoRA GEMM's candidate configs on this GPU for a model's linear shapes.

    peftfast tune --model llama-3-8b --dry-run          # the table entries it would tune (no GPU needed)
    peftfast tune --model path/to/config.json           # or a model folder holding config.json
    peftfast tune --model llama-3-8b --batch-tokens 1,16,2048,8192 --dtype bf16 --passes fwd,bwd

For every distinct (N, K) of the model's projections (q/k/v/o, gate/up/down) and every M bucket of
``--batch-tokens`` (see ``kernels/tuning.py``), each candidate config of ``kernels/matmul.py``'s
family list that fits this GPU is checked against a higher-precision reference on random inputs and
timed with ``triton.testing.do_bench`` (median; the inputs rotate over enough copies to exceed the L2
cache). The fastest correct one is merged into ``kernels/configs/<gpu-slug>.json`` (``--out``), which
``matmul_lowrank`` reads on its next first launch. The table is rewritten (atomically) after every
entry, so an interrupted run keeps what it finished.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# Public figures of Meta's Llama 3 8B (its config.json): the shapes only, no weights needed.
BUILTIN_MODELS: Dict[str, dict] = {
    "llama-3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "head_dim": 128},
}
DEFAULT_BATCH_TOKENS = (1, 16, 2048, 8192)
PASSES = ("fwd", "bwd")
_DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
           "fp32": "fp32", "float32": "fp32", "float": "fp32"}
# Relative Frobenius error a correct candidate stays under against the fp32/fp64 reference
# (METHOD.md: bf16 operands land between 1e-3 and 1e-2; fp32 with IEEE dots far under 1e-3).
_TOLERANCE = {"bf16": 1e-2, "fp16": 5e-3, "fp32": 1e-4}


class TuneError(Exception):
    pass


@dataclass(frozen=True)
class LinearShape:
    n: int             # out_features
    k: int             # in_features
    modules: Tuple[str, ...]


@dataclass(frozen=True)
class TuneTask:
    key: str
    m: int             # the M bucket (also the M it is timed at)
    n: int
    k: int
    dtype: str
    weight: str
    pass_: str         # "fwd": Y = X W^T (+ LoRA); "bwd": dX = dY W (+ LoRA)
    modules: Tuple[str, ...]
    tokens: Tuple[int, ...]   # the --batch-tokens values that fall in this bucket


# --------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------


def model_dims(spec: str) -> Tuple[str, dict]:
    """``(label, config dict)`` for a built-in name, a config.json file or a folder holding one."""
    if spec in BUILTIN_MODELS:
        return f"{spec} (built-in)", dict(BUILTIN_MODELS[spec])
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise TuneError(f"--model {spec!r} is neither a built-in name ({', '.join(sorted(BUILTIN_MODELS))}) "
                        f"nor a transformers config.json or a folder holding one")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TuneError(f"cannot read {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise TuneError(f"{path} is not a JSON object")
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):  # multimodal wrappers
        cfg = cfg["text_config"]
    return str(path), cfg


def linear_shapes(cfg: dict) -> List[LinearShape]:
    """The distinct (out, in) shapes of a Llama-style decoder layer's projections, in module order."""
    def need(name):
        v = cfg.get(name)
        if not isinstance(v, int) or v <= 0:
            raise TuneError(f"the model config lacks a positive integer {name!r} (dense Llama-style "
                            f"decoders are supported: hidden_size, intermediate_size, num_attention_heads)")
        return v

    hidden = need("hidden_size")
    inter = need("intermediate_size")
    heads = need("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    q_out, kv_out = heads * head_dim, kv * head_dim
    named = [("q_proj", q_out, hidden), ("k_proj", kv_out, hidden), ("v_proj", kv_out, hidden),
             ("o_proj", hidden, q_out), ("gate_proj", inter, hidden), ("up_proj", inter, hidden),
             ("down_proj", hidden, inter)]
    order: Dict[Tuple[int, int], List[str]] = {}
    for name, n, k in named:
        order.setdefault((int(n), int(k)), []).append(name)
    return [LinearShape(n, k, tuple(mods)) for (n, k), mods in order.items()]


def m_buckets(batch_tokens: Sequence[int]) -> List[Tuple[int, Tuple[int, ...]]]:
    """``[(bucket, tokens that fall in it)]`` in increasing bucket order."""
    from peftfast.kernels import tuning

    out: Dict[int, List[int]] = {}
    for t in batch_tokens:
        out.setdefault(tuning.bucket_m(t), []).append(int(t))
    return [(b, tuple(ts)) for b, ts in sorted(out.items())]


def plan(shapes: Sequence[LinearShape], batch_tokens: Sequence[int], dtype: str,
         passes: Sequence[str] = ("fwd",)) -> List[TuneTask]:
    """One task per (pass, shape, M bucket): the table entries a tune run writes."""
    from peftfast.kernels import tuning

    tasks = []
    for pass_ in passes:
        for s in shapes:
            # Forward: X[M, in] @ W^T, W [out, in] row-major ("nk"). dX: dY[M, out] @ W, W read as [K=out, N=in] ("kn").
            n, k, layout = (s.n, s.k, "nk") if pass_ == "fwd" else (s.k, s.n, "kn")
            weight = f"{dtype}-{layout}"
            for bucket, tokens in m_buckets(batch_tokens):
                key = tuning.shape_key(tuning.OP_LORA_MATMUL, bucket, n, k, dtype, weight)
                tasks.append(TuneTask(key, bucket, n, k, dtype, weight, pass_, s.modules, tokens))
    return tasks


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def candidates(m: int, elem: int, block_r: int, *, family: str, max_smem: int) -> List[dict]:
    """The family's config list after matmul's own pruning (shared memory, then row blocks vs M)."""
    import torch
    import triton

    from peftfast.kernels import matmul as mm, tuning

    configs = [triton.Config({k: e[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")},
                             num_warps=e["num_warps"], num_stages=e["num_stages"])
               for e in mm._config_table()[family]]
    probe_y = torch.empty(0, dtype={2: torch.bfloat16, 4: torch.float32}.get(elem, torch.bfloat16))
    pruned = mm._make_pruner(max_smem)(configs, {"M": m, "p_y": probe_y, "p_w": probe_y, "BLOCK_R": block_r})
    return [tuning.config_to_dict(c) for c in pruned]


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _make_inputs(task: TuneTask, rank: int, device, gen) -> dict:
    """Random operands laid out as the LoRA forward / dX backward pass them (never zeros)."""
    import torch

    dt = _torch_dtype(task.dtype)
    m, n, k = task.m, task.n, task.k

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dt)

    x = randn(m, k)
    left = randn(m, rank)
    if task.pass_ == "fwd":
        wt = randn(n, k, std=k ** -0.5).t()            # W [out, in] row-major, read as W^T
        right = randn(n, rank, std=0.1).t()            # lora_B [out, r], read as B^T
    else:
        wt = randn(k, n, std=k ** -0.5)                # W [out=K, in=N] row-major
        right = randn(rank, n, std=0.1)                # lora_A [r, in]
    y = torch.empty(m, n, device=device, dtype=dt)
    return {"x": x, "wt": wt, "left": left, "right": right, "y": y}


def _rel_error(out, ref) -> float:
    import torch

    diff = torch.linalg.vector_norm((out.double() - ref).flatten())
    return float(diff / torch.linalg.vector_norm(ref.flatten()).clamp_min(1e-30))


def cuda_timer(warmup_ms: float, rep_ms: float) -> Callable:
    """``fn -> (median, p20, p80)`` ms through ``triton.testing.do_bench`` (events, L2 flushed per run)."""
    def timer(fn):
        import triton.testing

        r = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        r = list(r) if isinstance(r, (list, tuple)) else [float(r)] * 3
        return tuple(float(v) for v in r[:3])

    return timer


def measure_task(task: TuneTask, configs: Sequence[dict], *, rank: int, device, timer: Callable,
                 l2_bytes: int = 64 << 20, max_sets: int = 8, seed: int = 0, scale: float = 2.0) -> dict:
    """Check and time every config on ``task``; returns ``{"best": entry | None, "results": [...]}``.

    Each config's output is first compared with a higher-precision reference (output poisoned with NaN
    beforehand, so unwritten elements fail); configs that fail to compile or to match are dropped. The
    timed function rotates over enough input sets that together exceed twice ``l2_bytes``.
    """
    import torch

    from peftfast.kernels import matmul as mm, tuning

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    first = _make_inputs(task, rank, device, gen)
    set_bytes = sum(t.numel() * t.element_size() for t in first.values())
    n_sets = max(1, min(max_sets, math.ceil(2 * l2_bytes / max(set_bytes, 1))))
    sets = [first] + [_make_inputs(task, rank, device, gen) for _ in range(n_sets - 1)]
    launches = []
    for s in sets:
        args, flags = mm._launch_args(s["x"], s["wt"], s["left"], s["right"], scale, None, 0.0, None, s["y"])
        launches.append((args, flags))
    ref_dtype = torch.float64 if task.dtype == "fp32" else torch.float32
    ref = (first["x"].to(ref_dtype) @ first["wt"].to(ref_dtype)
           + scale * (first["left"].to(ref_dtype) @ first["right"].to(ref_dtype))).double()
    tol = _TOLERANCE[task.dtype]

    results = []
    for cfg in configs:
        rec = {"config": dict(cfg)}
        try:
            first["y"].fill_(float("nan"))
            mm._launch_config(*launches[0], task.m, task.n, cfg)
            if first["y"].is_cuda:
                torch.cuda.synchronize()
            err = _rel_error(first["y"], ref)
        except Exception as e:  # noqa: BLE001 - out of resources, compile errors: not a candidate here
            rec["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            results.append(rec)
            continue
        rec["rel_error"] = err
        if not (err <= tol):  # NaN fails too
            rec["error"] = f"relative error {err:.3g} over {tol:g}"
            results.append(rec)
            continue
        state = [0]

        def fn(cfg=cfg):
            i = state[0] % len(launches)
            state[0] += 1
            mm._launch_config(*launches[i], task.m, task.n, cfg)

        med, p20, p80 = timer(fn)
        rec.update(ms=med, ms_p20=p20, ms_p80=p80)
        results.append(rec)

    timed = [r for r in results if "ms" in r]
    best = None
    if timed:
        win = min(timed, key=lambda r: r["ms"])
        best = {**win["config"], "ms": win["ms"], "ms_p20": win["ms_p20"], "ms_p80": win["ms_p80"],
                "rank": rank, "candidates": len(timed), "triton": tuning.triton_version(),
                "kernel": mm._kernel_hash()}
    return {"best": best, "results": results, "input_sets": n_sets}


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="CONFIG_OR_PATH",
                        help=f"a transformers config.json, a folder holding one, or a built-in name "
                             f"({', '.join(sorted(BUILTIN_MODELS))})")
    parser.add_argument("--batch-tokens", default=",".join(map(str, DEFAULT_BATCH_TOKENS)), metavar="M,M,...",
                        help="tokens per GEMM (batch x sequence) to tune for; bucketed, see kernels/configs/README.md "
                             "(default %(default)s)")
    parser.add_argument("--dtype", default="bf16", help="compute dtype: bf16, fp16 or fp32 (default bf16)")
    parser.add_argument("--passes", default="fwd", metavar="fwd,bwd",
                        help="fwd: Y = X W^T (+LoRA); bwd: the dX GEMM dY W (+LoRA) of training (default fwd)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the timed epilogue (default 16)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="table to merge into (default kernels/configs/<gpu-slug>.json in the package)")
    parser.add_argument("--warmup", type=float, default=25.0, metavar="MS", help="do_bench warm-up, ms (default 25)")
    parser.add_argument("--rep", type=float, default=100.0, metavar="MS", help="do_bench repetition time, ms (default 100)")
    parser.add_argument("--dry-run", action="store_true", help="list the shapes and table keys; measure nothing")


def _parse(args) -> Tuple[str, List[LinearShape], List[int], str, List[str]]:
    label, cfg = model_dims(args.model)
    shapes = linear_shapes(cfg)
    try:
        tokens = [int(t) for t in str(args.batch_tokens).split(",") if t.strip()]
    except ValueError as e:
        raise TuneError(f"--batch-tokens must be comma-separated integers, got {args.batch_tokens!r}") from e
    if not tokens or any(t <= 0 for t in tokens):
        raise TuneError(f"--batch-tokens needs positive integers, got {args.batch_tokens!r}")
    dtype = _DTYPES.get(str(args.dtype).lower())
    if dtype is None:
        raise TuneError(f"--dtype must be bf16, fp16 or fp32, got {args.dtype!r}")
    passes = [p.strip() for p in str(args.passes).split(",") if p.strip()]
    if not passes or any(p not in PASSES for p in passes):
        raise TuneError(f"--passes takes fwd and/or bwd, got {args.passes!r}")
    if args.rank <= 0:
        raise TuneError("--rank must be positive")
    return label, shapes, tokens, dtype, passes


def _print_plan(label, shapes, tokens, dtype, passes, rank, tasks, out=None) -> None:
    out = out or sys.stdout
    print(f"model: {label}; dtype {dtype}; rank {rank}; passes {','.join(passes)}", file=out)
    print(f"{len(shapes)} distinct linear shapes (N x K = out x in):", file=out)
    for s in shapes:
        print(f"  {s.n:>6} x {s.k:<6} {','.join(s.modules)}", file=out)
    buckets = m_buckets(tokens)
    desc = ", ".join(f"{b} (from {','.join(map(str, ts))})" for b, ts in buckets)
    print(f"{len(buckets)} M buckets: {desc}", file=out)
    print(f"{len(tasks)} table entries:", file=out)
    for t in tasks:
        print(f"  {t.key:<48} {t.pass_}  {','.join(t.modules)}", file=out)


def run_tune(args) -> int:
    try:
        label, shapes, tokens, dtype, passes = _parse(args)
    except TuneError as e:
        print(f"peftfast tune: error: {e}", file=sys.stderr)
        return 2
    tasks = plan(shapes, tokens, dtype, passes)
    if args.dry_run:
        _print_plan(label, shapes, tokens, dtype, passes, args.rank, tasks)
        return 0

    import torch

    if not torch.cuda.is_available():
        print("peftfast tune: error: tuning times kernels on a CUDA GPU and none is available here "
              "(torch.cuda.is_available() is False); --dry-run lists the shapes it would tune", file=sys.stderr)
        return 2
    from peftfast.kernels.dispatch import interpreting

    if interpreting():
        print("peftfast tune: error: TRITON_INTERPRET is set, so kernels would run in the CPU interpreter; "
              "unset it to tune", file=sys.stderr)
        return 2
    return _tune_on_cuda(args, label, shapes, tokens, dtype, passes, tasks)


def _tune_on_cuda(args, label, shapes, tokens, dtype, passes, tasks) -> int:
    import torch

    from peftfast.kernels import matmul as mm, tuning

    dev = torch.cuda.current_device()
    gpu_name = torch.cuda.get_device_name(dev)
    slug = tuning.gpu_slug(gpu_name)
    out = Path(args.out) if args.out else tuning.CONFIG_DIR / f"{slug}.json"
    family = mm._family(torch.cuda.get_device_capability(dev))
    max_smem = mm._max_shared_memory(dev)
    props = torch.cuda.get_device_properties(dev)
    l2 = int(getattr(props, "L2_cache_size", 0) or (64 << 20))
    elem = torch.empty(0, dtype=_torch_dtype(dtype)).element_size()
    block_r = mm._block_r(args.rank)
    _print_plan(label, shapes, tokens, dtype, passes, args.rank, tasks)
    print(f"GPU: {gpu_name} ({family}, {max_smem} B shared memory per block, L2 {l2 >> 20} MiB) -> {out}")
    meta = {"tuned_by": "peftfast tune", "triton": tuning.triton_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "kernel": mm._kernel_hash(), "model": label}
    written = 0
    for i, task in enumerate(tasks, 1):
        cfgs = candidates(task.m, elem, block_r, family=family, max_smem=max_smem)
        res = measure_task(task, cfgs, rank=args.rank, device=torch.device("cuda", dev),
                           timer=cuda_timer(args.warmup, args.rep), l2_bytes=l2)
        best = res["best"]
        failed = [r for r in res["results"] if "error" in r]
        if best is None:
            print(f"[{i}/{len(tasks)}] {task.key}: no candidate ran correctly "
                  f"({'; '.join(r['error'] for r in failed[:3])})", file=sys.stderr)
            continue
        meta["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        try:
            tuning.write_table(out, gpu_name, {task.key: best}, meta)
        except (ValueError, OSError) as e:
            print(f"peftfast tune: error: {e}", file=sys.stderr)
            return 2
        written += 1
        cfg = tuning.config_from_entry(best)
        print(f"[{i}/{len(tasks)}] {task.key}: {cfg} median {best['ms']:.4f} ms "
              f"(p20 {best['ms_p20']:.4f}, p80 {best['ms_p80']:.4f}; {best['candidates']} candidates timed, "
              f"{len(failed)} dropped, {res['input_sets']} input sets)")
    print(f"wrote {written} of {len(tasks)} entries to {out}")
    return 0 if written == len(tasks) else 1


def main(argv: Optional[list] = None) -> int:  # pragma: no cover - convenience
    p = argparse.ArgumentParser(prog="peftfast tune")
    add_arguments(p)
    return run_tune(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
