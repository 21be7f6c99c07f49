"""``peftfast tune``: time the LoRA GEMM's candidate configs on this GPU for a model's linear shapes.

    peftfast tune --model llama-3-8b --dry-run          # the table entries it would tune (no GPU needed)
    peftfast tune --model path/to/config.json           # or a model folder holding config.json, or a Hub id
    peftfast tune --model llama-3-8b --batch-tokens 1,16,2048,8192 --dtype bf16 --passes fwd,bwd
    peftfast tune --model llama-3-8b --shapes 14336x4096,4096x14336 --batch-tokens 8192   # some shapes only

    peftfast tune --model llama-3-8b --weight nf4 --passes fwd,bwd    # QLoRA: in-loop vs dequant + GEMM

For every distinct (N, K) of the model's projections (q/k/v/o, gate/up/down) and every M bucket of
``--batch-tokens`` (see ``kernels/tuning.py``), each candidate config of ``kernels/matmul.py``'s
family list that fits this GPU is checked against a higher-precision reference on random inputs and
timed with ``triton.testing.do_bench`` (median; the inputs rotate over enough copies to exceed the L2
cache). The fastest correct one is merged into ``kernels/configs/<gpu-slug>.json`` (``--out``), which
``matmul_lowrank`` reads on its next first launch. The table is rewritten (atomically) after every
entry, so an interrupted run keeps what it finished.

With ``--weight nf4`` / ``fp4`` (a bitsandbytes 4-bit base; ``--blocksize``, ``--nested``) each entry is
a ``lora_matmul_4bit`` key and both QLoRA GEMM variants are timed on a random 4-bit weight: ``inloop``
(``kernels/qmatmul.py``'s candidates, the weight decoded in the K loop) and ``dequant`` (one
``dequantize_4bit`` launch into a reused workspace, then each of matmul's candidates). The faster
variant and its config are recorded as the entry (``"variant"``); when ``dequant`` wins, its dense
GEMM config is written under that GEMM's own ``lora_matmul`` key too, which is what the dequant path
looks up. M buckets that the decode kernel serves (M <= ``lora_triton.DECODE_MAX_M``) are skipped.
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


WEIGHTS = ("dense", "nf4", "fp4")

# bitsandbytes' 16-entry code tables (bitsandbytes.functional.get_4bit_type): tuning runs where
# bitsandbytes may not be installed, and the timing only needs the real layout, not a real weight.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
FP4_CODE = (0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204,
            0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5,
            -0.1666666716337204, -0.25)


class TuneError(Exception):
    pass


@dataclass(frozen=True)
class QuantSpec:
    """A bitsandbytes 4-bit base: ``quant_type`` ("nf4" | "fp4"), ``blocksize``, nested absmax or not."""

    quant_type: str
    blocksize: int = 64
    nested: bool = True


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
    quant: Optional[QuantSpec] = None   # a 4-bit base: a lora_matmul_4bit entry, both variants timed


# --------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------


def model_dims(spec: str) -> Tuple[str, dict]:
    """``(label, config dict)`` for a built-in name, a config.json file, a folder holding one, or a Hugging
    Face Hub model id (only its config.json is fetched, or read from the Hub cache)."""
    if spec in BUILTIN_MODELS:
        return f"{spec} (built-in)", dict(BUILTIN_MODELS[spec])
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        label = str(path)
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise TuneError(f"cannot read {path}: {e}") from e
        if not isinstance(cfg, dict):
            raise TuneError(f"{path} is not a JSON object")
    else:
        from transformers import AutoConfig

        from ..cli.basemodel import BaseModelError, check_model_spec, load_failure

        try:
            check_model_spec(spec)
        except BaseModelError:
            raise TuneError(f"--model {spec!r} is neither a built-in name ({', '.join(sorted(BUILTIN_MODELS))}) "
                            f"nor a transformers config.json, a folder holding one, or a Hub model id") from None
        try:
            cfg = AutoConfig.from_pretrained(spec).to_dict()
        except (OSError, ValueError) as e:
            raise TuneError(str(load_failure(spec, e))) from None
        label = f"{spec} (Hugging Face Hub)"
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):  # multimodal wrappers
        cfg = cfg["text_config"]
    return label, cfg


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


def select_shapes(shapes: Sequence[LinearShape], spec: Optional[str]) -> List[LinearShape]:
    """The shapes ``spec`` names (``"OUTxIN,..."``), in its order; all of ``shapes`` when ``spec`` is None.

    Args:
        shapes: the model's distinct linear shapes (:func:`linear_shapes`).
        spec: a comma list of ``out x in`` pairs, or None.

    Returns:
        The selected shapes (a headline run tunes the few that matter first).

    Raises:
        TuneError: a malformed pair, or one the model does not have (the error lists those it has).

    Example:
        >>> [s.modules for s in select_shapes(linear_shapes(BUILTIN_MODELS["llama-3-8b"]), "4096x14336")]
        [('down_proj',)]
    """
    if spec is None:
        return list(shapes)
    have = {(s.n, s.k): s for s in shapes}
    listing = ", ".join(f"{s.n}x{s.k} ({','.join(s.modules)})" for s in shapes)
    out: List[LinearShape] = []
    for item in (t.strip() for t in str(spec).split(",")):
        if not item:
            continue
        parts = item.lower().split("x")
        try:
            n, k = (int(p) for p in parts)
        except ValueError:
            raise TuneError(f"--shapes takes OUTxIN pairs such as 14336x4096, got {item!r}") from None
        if (n, k) not in have:
            raise TuneError(f"--shapes {item}: the model has no {n}x{k} linear layer; its shapes are {listing}")
        if have[(n, k)] not in out:
            out.append(have[(n, k)])
    if not out:
        raise TuneError(f"--shapes names no shape; the model's are {listing}")
    return out


def m_buckets(batch_tokens: Sequence[int]) -> List[Tuple[int, Tuple[int, ...]]]:
    """``[(bucket, tokens that fall in it)]`` in increasing bucket order."""
    from peftfast.kernels import tuning

    out: Dict[int, List[int]] = {}
    for t in batch_tokens:
        out.setdefault(tuning.bucket_m(t), []).append(int(t))
    return [(b, tuple(ts)) for b, ts in sorted(out.items())]


def decode_max_m() -> int:
    """The largest M the fused 4-bit decode kernel serves (its buckets have no 4-bit GEMM to tune)."""
    from peftfast.kernels.lora_triton import DECODE_MAX_M

    return DECODE_MAX_M


def plan(shapes: Sequence[LinearShape], batch_tokens: Sequence[int], dtype: str,
         passes: Sequence[str] = ("fwd",), quant: Optional[QuantSpec] = None) -> List[TuneTask]:
    """One task per (pass, shape, M bucket): the table entries a tune run writes.

    With ``quant`` the entries are ``lora_matmul_4bit`` keys, and buckets at or below the decode
    kernel's M (every M in them takes the decode kernel) are left out.
    """
    from peftfast.kernels import tuning

    tasks = []
    for pass_ in passes:
        for s in shapes:
            # Forward: X[M, in] @ W^T, W [out, in] row-major ("nk"). dX: dY[M, out] @ W, W read as [K=out, N=in] ("kn").
            n, k, layout = (s.n, s.k, "nk") if pass_ == "fwd" else (s.k, s.n, "kn")
            if quant is None:
                op, weight = tuning.OP_LORA_MATMUL, f"{dtype}-{layout}"
            else:
                op = tuning.OP_LORA_MATMUL_4BIT
                weight = tuning.weight_format_4bit(quant.quant_type, quant.blocksize, quant.nested, layout)
            for bucket, tokens in m_buckets(batch_tokens):
                if quant is not None and bucket <= decode_max_m():
                    continue
                key = tuning.shape_key(op, bucket, n, k, dtype, weight)
                tasks.append(TuneTask(key, bucket, n, k, dtype, weight, pass_, s.modules, tokens, quant))
    return tasks


def weight_dims(task: TuneTask) -> Tuple[int, int]:
    """(rows, columns) of the base weight ``W`` [out, in] behind a task's GEMM."""
    return (task.n, task.k) if task.pass_ == "fwd" else (task.k, task.n)


def random_quant4bit(rows: int, cols: int, *, quant_type: str = "nf4", blocksize: int = 64, nested: bool = True,
                     device="cpu", generator=None, std: Optional[float] = None):
    """A bitsandbytes-layout 4-bit weight [rows, cols] with random codes and scales, without bitsandbytes.

    Args:
        rows, cols: the dequantized shape (out, in). quant_type: "nf4" or "fp4" (bitsandbytes' table).
        blocksize: values per absmax block. nested: uint8 absmax with code2 / absmax2 / offset.
        device, generator: where and from what the random bytes and scales come.
        std: the rough standard deviation of the dequantized values (default ``cols ** -0.5``).

    Returns:
        A ``kernels.nf4.Quant4bit`` (compute dtype recorded as bf16).
    """
    import torch

    from peftfast.kernels.nf4 import Quant4bit

    numel = rows * cols
    n_blocks = -(-numel // blocksize)
    std = float(std if std is not None else cols ** -0.5)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), generator=generator, device=device, dtype=torch.uint8)
    code = torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32, device=device)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=device, dtype=torch.float32)

    # Block scales around 2.5 std: a block's absmax spans the codes' [-1, 1] range.
    if not nested:
        absmax = (0.5 + rand(n_blocks)) * 2.5 * std
        return Quant4bit(packed=packed, absmax=absmax, code=code, blocksize=blocksize, shape=(rows, cols),
                         dtype=torch.bfloat16, quant_type=quant_type)
    absmax = torch.randint(0, 256, (n_blocks,), generator=generator, device=device, dtype=torch.uint8)
    code2 = torch.linspace(-1.0, 1.0, 256, device=device, dtype=torch.float32)  # a signed map, like bitsandbytes'
    absmax2 = (0.5 + rand(-(-n_blocks // 256))) * std
    offset = torch.tensor(2.5 * std, device=device, dtype=torch.float32)
    return Quant4bit(packed=packed, absmax=absmax, code=code, blocksize=blocksize, shape=(rows, cols),
                     dtype=torch.bfloat16, quant_type=quant_type, code2=code2, absmax2=absmax2, blocksize2=256,
                     offset=offset)


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def candidates(m: int, elem: int, block_r: int, *, family: str, max_smem: int) -> List[dict]:
    """The family's config list after matmul's own pruning (shared memory, then row blocks vs M)."""
    import torch
    import triton

    from peftfast.kernels import launch, tuning

    configs = [triton.Config({k: e[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")},
                             num_warps=e["num_warps"], num_stages=e["num_stages"])
               for e in launch.gemm_config_table()[family]]
    probe_y = torch.empty(0, dtype={2: torch.bfloat16, 4: torch.float32}.get(elem, torch.bfloat16))
    probe_adapter = torch.empty(0, dtype=torch.float32)  # fp32 adapters, as _make_inputs makes them
    pruned = launch.make_gemm_pruner(max_smem)(configs, {"M": m, "p_y": probe_y, "p_w": probe_y, "p_l": probe_y,
                                                 "p_r": probe_adapter, "BLOCK_R": block_r})
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
    # Adapters are fp32 under a half-precision base (peftfast.layers.adapter_dtype, as PEFT's
    # autocast_adapter_dtype): their tiles are staged at 4 bytes, so time them so.
    if task.pass_ == "fwd":
        wt = randn(n, k, std=k ** -0.5).t()            # W [out, in] row-major, read as W^T
        right = randn(n, rank, std=0.1).float().t()    # lora_B [out, r], read as B^T
    else:
        wt = randn(k, n, std=k ** -0.5)                # W [out=K, in=N] row-major
        right = randn(rank, n, std=0.1).float()        # lora_A [r, in]
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


def _check_and_time(rec: dict, run: Callable[[int], None], n_sets: int, y, ref, tol: float, timer: Callable) -> dict:
    """One candidate: ``run(0)`` with ``y`` poisoned with NaN first (unwritten elements fail), compared
    with ``ref``; if within ``tol``, timed by ``timer`` while rotating over the ``n_sets`` input sets.
    Returns ``rec`` with ``rel_error`` and ``ms``/``ms_p20``/``ms_p80``, or with the ``error`` that
    dropped it (a compile or launch failure, or a wrong result)."""
    import torch

    try:
        y.fill_(float("nan"))
        run(0)
        if y.is_cuda:
            torch.cuda.synchronize()
        err = _rel_error(y, ref)
    except Exception as e:  # noqa: BLE001 - out of resources, compile errors: not a candidate here
        rec["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        return rec
    rec["rel_error"] = err
    if not (err <= tol):  # NaN fails too
        rec["error"] = f"relative error {err:.3g} over {tol:g}"
        return rec
    calls = [0]

    def fn():
        run(calls[0] % n_sets)
        calls[0] += 1

    med, p20, p80 = timer(fn)
    rec.update(ms=med, ms_p20=p20, ms_p80=p80)
    return rec


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

    results = [
        _check_and_time({"config": dict(cfg)}, lambda i, cfg=cfg: mm._launch_config(*launches[i], task.m, task.n, cfg),
                        len(launches), first["y"], ref, tol, timer)
        for cfg in configs
    ]

    timed = [r for r in results if "ms" in r]
    best = None
    if timed:
        win = min(timed, key=lambda r: r["ms"])
        best = {**win["config"], "ms": win["ms"], "ms_p20": win["ms_p20"], "ms_p80": win["ms_p80"],
                "rank": rank, "candidates": len(timed), "triton": tuning.triton_version(),
                "kernel": mm._kernel_hash()}
    return {"best": best, "results": results, "input_sets": n_sets}


def _make_inputs_4bit(task: TuneTask, rank: int, device, gen) -> dict:
    """As :func:`_make_inputs`, with a random 4-bit weight W [out, in] instead of a dense one."""
    import torch

    from peftfast.kernels.experimental import qmatmul as qmm

    dt = _torch_dtype(task.dtype)
    m, n, k = task.m, task.n, task.k
    rows, cols = weight_dims(task)
    spec = task.quant

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dt)

    q = random_quant4bit(rows, cols, quant_type=spec.quant_type, blocksize=spec.blocksize, nested=spec.nested,
                         device=device, generator=gen)
    quant = qmm._prepare_quant(q.packed, q.absmax, q.code, q.code2, q.absmax2, q.offset, torch.device(device))
    x = randn(m, k)
    left = randn(m, rank)
    # fp32 adapters, as _make_inputs makes them.
    right = randn(n, rank, std=0.1).float().t() if task.pass_ == "fwd" else randn(rank, n, std=0.1).float()
    y = torch.empty(m, n, device=device, dtype=dt)
    return {"x": x, "q": q, "quant": quant, "meta": [spec.blocksize, 256, rows, cols], "left": left, "right": right,
            "y": y}


def measure_task_4bit(task: TuneTask, inloop_configs: Sequence[dict], dense_configs: Sequence[dict], *, rank: int,
                      device, timer: Callable, l2_bytes: int = 64 << 20, max_sets: int = 8, seed: int = 0,
                      scale: float = 2.0) -> dict:
    """Check and time both QLoRA GEMM variants of a 4-bit ``task``; the faster correct one wins.

    ``inloop``: each of ``inloop_configs`` of ``qmatmul.matmul_lowrank_4bit``'s kernel. ``dequant``: one
    ``dequantize_4bit`` launch into a workspace reused across calls, then matmul's kernel with each of
    ``dense_configs``; its time includes the dequantization. Every candidate is first checked against a
    float64 product with the weight dequantized by the reference (output poisoned with NaN first).

    Returns:
        ``{"best": entry | None, "dense": (key, entry) | None, "results": [...], "input_sets": int}``:
        ``best`` is the ``lora_matmul_4bit`` table entry (``variant`` + config + times of both variants);
        ``dense`` is the dense GEMM's ``lora_matmul`` entry when ``dequant`` won.
    """
    import torch

    from peftfast.kernels import matmul as mm, tuning
    from peftfast.kernels.experimental import qmatmul as qmm
    from peftfast.kernels.nf4 import dequantize_4bit, dequantize_4bit_reference

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    dt = _torch_dtype(task.dtype)
    layout = "nk" if task.pass_ == "fwd" else "kn"
    rows, cols = weight_dims(task)
    first = _make_inputs_4bit(task, rank, device, gen)

    def set_bytes(s):
        q = s["q"]
        wbytes = q.packed.numel() + q.absmax.numel() * q.absmax.element_size()
        return wbytes + sum(s[name].numel() * s[name].element_size() for name in ("x", "left", "y"))

    n_sets = max(1, min(max_sets, math.ceil(2 * l2_bytes / max(set_bytes(first), 1))))
    sets = [first] + [_make_inputs_4bit(task, rank, device, gen) for _ in range(n_sets - 1)]
    # The dequant variant's reused workspace: written by the dequantization, read by the GEMM right after.
    workspace = torch.empty(rows * cols, device=device, dtype=dt)
    w_view = workspace.view(rows, cols)
    wt = w_view.t() if layout == "nk" else w_view
    inloop_launches, dense_launches = [], []
    for s in sets:
        packed, absmax, code, code2, absmax2, offset = s["quant"]
        inloop_launches.append(qmm._launch_args(s["x"], packed, absmax, code, code2, absmax2, offset, s["meta"],
                                                s["left"], s["right"], scale, None, 0.0, None, s["y"], layout))
        dense_launches.append(mm._launch_args(s["x"], wt, s["left"], s["right"], scale, None, 0.0, None, s["y"]))
    w_ref = dequantize_4bit_reference(first["q"], dt).double()
    ref = (first["x"].double() @ (w_ref.t() if layout == "nk" else w_ref)
           + scale * (first["left"].double() @ first["right"].double()))
    tol = _TOLERANCE[task.dtype]

    def run(variant: str, cfg: dict, i: int) -> None:
        if variant == "inloop":
            qmm._launch_config(*inloop_launches[i], task.m, task.n, cfg)
        else:
            dequantize_4bit(sets[i]["q"], dtype=dt, out=workspace, backend="triton")
            mm._launch_config(*dense_launches[i], task.m, task.n, cfg)

    candidates_ = [("inloop", c) for c in inloop_configs] + [("dequant", c) for c in dense_configs]
    results = [
        _check_and_time({"variant": variant, "config": dict(cfg)},
                        lambda i, variant=variant, cfg=cfg: run(variant, cfg, i), len(sets), first["y"], ref, tol,
                        timer)
        for variant, cfg in candidates_
    ]

    timed = [r for r in results if "ms" in r]
    fastest = {v: min((r for r in timed if r["variant"] == v), key=lambda r: r["ms"], default=None)
               for v in tuning.VARIANTS}
    best = dense = None
    if timed:
        win = min(timed, key=lambda r: r["ms"])
        best = {**win["config"], "variant": win["variant"], "ms": win["ms"], "ms_p20": win["ms_p20"],
                "ms_p80": win["ms_p80"], "rank": rank, "candidates": len(timed),
                "inloop_ms": fastest["inloop"]["ms"] if fastest["inloop"] else None,
                "dequant_ms": fastest["dequant"]["ms"] if fastest["dequant"] else None,
                "triton": tuning.triton_version(),
                "kernel": qmm._kernel_hash() if win["variant"] == "inloop" else mm._kernel_hash()}
        if win["variant"] == "dequant":
            key = tuning.shape_key(tuning.OP_LORA_MATMUL, task.m, task.n, task.k, task.dtype, f"{task.dtype}-{layout}")
            dense = (key, {**win["config"], "ms": win["ms"], "ms_p20": win["ms_p20"], "ms_p80": win["ms_p80"],
                           "ms_includes": "dequantize_4bit", "from": task.key, "rank": rank,
                           "candidates": sum(r["variant"] == "dequant" for r in timed),
                           "triton": tuning.triton_version(), "kernel": mm._kernel_hash()})
    return {"best": best, "dense": dense, "results": results, "input_sets": n_sets}


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="CONFIG_OR_PATH",
                        help=f"a transformers config.json, a folder holding one, a Hugging Face Hub id, or a built-in name "
                             f"({', '.join(sorted(BUILTIN_MODELS))})")
    parser.add_argument("--batch-tokens", default=",".join(map(str, DEFAULT_BATCH_TOKENS)), metavar="M,M,...",
                        help="tokens per GEMM (batch x sequence) to tune for; bucketed, see kernels/configs/README.md "
                             "(default %(default)s)")
    parser.add_argument("--shapes", default=None, metavar="OUTxIN,...",
                        help="tune only these of the model's linear shapes, out_features x in_features (e.g. "
                             "14336x4096,4096x14336 for Llama-3-8B's gate/up and down), in the order given "
                             "(default: every distinct shape)")
    parser.add_argument("--dtype", default="bf16", help="compute dtype: bf16, fp16 or fp32 (default bf16)")
    parser.add_argument("--passes", default="fwd", metavar="fwd,bwd",
                        help="fwd: Y = X W^T (+LoRA); bwd: the dX GEMM dY W (+LoRA) of training (default fwd)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the timed epilogue (default 16)")
    parser.add_argument("--weight", default="dense", metavar="dense|nf4|fp4",
                        help="base weight: dense (in --dtype), or a bitsandbytes 4-bit one, for which both QLoRA "
                             "GEMM variants (in-loop decode, dequant + GEMM) are timed (default dense)")
    parser.add_argument("--blocksize", type=int, default=64, help="4-bit blocksize (default 64, bitsandbytes')")
    parser.add_argument("--nested", action=argparse.BooleanOptionalAction, default=True,
                        help="4-bit weight with nested (double-quantized) absmax (default: nested)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="table to merge into (default kernels/configs/<gpu-slug>.json in the package)")
    parser.add_argument("--warmup", type=float, default=25.0, metavar="MS", help="do_bench warm-up, ms (default 25)")
    parser.add_argument("--rep", type=float, default=100.0, metavar="MS", help="do_bench repetition time, ms (default 100)")
    parser.add_argument("--dry-run", action="store_true", help="list the shapes and table keys; measure nothing")


def _parse_quant(args) -> Optional[QuantSpec]:
    weight = str(getattr(args, "weight", "dense")).lower()
    if weight not in WEIGHTS:
        raise TuneError(f"--weight must be one of {', '.join(WEIGHTS)}, got {args.weight!r}")
    if weight == "dense":
        return None
    from peftfast.kernels.nf4 import BLOCKSIZES

    blocksize = getattr(args, "blocksize", 64)
    if blocksize not in BLOCKSIZES:
        raise TuneError(f"--blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize}")
    return QuantSpec(weight, int(blocksize), bool(getattr(args, "nested", True)))


def _parse(args) -> Tuple[str, List[LinearShape], List[int], str, List[str]]:
    label, cfg = model_dims(args.model)
    shapes = select_shapes(linear_shapes(cfg), getattr(args, "shapes", None))
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


def _print_plan(label, shapes, tokens, dtype, passes, rank, tasks, out=None, quant: Optional[QuantSpec] = None) -> None:
    out = out or sys.stdout
    print(f"model: {label}; dtype {dtype}; rank {rank}; passes {','.join(passes)}", file=out)
    if quant is not None:
        print(f"weight: {quant.quant_type} blocksize {quant.blocksize}, {'nested' if quant.nested else 'plain'} "
              f"absmax; variants timed per entry: inloop, dequant", file=out)
    print(f"{len(shapes)} distinct linear shapes (N x K = out x in):", file=out)
    for s in shapes:
        print(f"  {s.n:>6} x {s.k:<6} {','.join(s.modules)}", file=out)
    buckets = m_buckets(tokens)
    desc = ", ".join(f"{b} (from {','.join(map(str, ts))})" for b, ts in buckets)
    print(f"{len(buckets)} M buckets: {desc}", file=out)
    if quant is not None:
        skipped = [b for b, _ in buckets if b <= decode_max_m()]
        if skipped:
            print(f"skipped M buckets {','.join(map(str, skipped))}: M <= {decode_max_m()} runs the 4-bit decode "
                  f"kernel, not this GEMM", file=out)
    print(f"{len(tasks)} table entries:", file=out)
    for t in tasks:
        note = ""
        if t.quant is not None and (weight_dims(t)[1] % t.quant.blocksize):
            note = "  (dequant only: in_features not a multiple of the blocksize)"
        print(f"  {t.key:<48} {t.pass_}  {','.join(t.modules)}{note}", file=out)


def run_tune(args) -> int:
    try:
        label, shapes, tokens, dtype, passes = _parse(args)
        quant = _parse_quant(args)
    except TuneError as e:
        print(f"peftfast tune: error: {e}", file=sys.stderr)
        return 2
    tasks = plan(shapes, tokens, dtype, passes, quant)
    if args.dry_run:
        _print_plan(label, shapes, tokens, dtype, passes, args.rank, tasks, quant=quant)
        return 0
    if not tasks:
        print(f"peftfast tune: error: no entries to tune (every --batch-tokens bucket is served by the 4-bit "
              f"decode kernel, M <= {decode_max_m()})", file=sys.stderr)
        return 2

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
    return _tune_on_cuda(args, label, shapes, tokens, dtype, passes, tasks, quant)


def _tune_on_cuda(args, label, shapes, tokens, dtype, passes, tasks, quant: Optional[QuantSpec] = None) -> int:
    import torch

    from peftfast.kernels import launch, matmul as mm, tuning
    from peftfast.kernels.experimental import qmatmul as qmm

    dev = torch.cuda.current_device()
    gpu_name = torch.cuda.get_device_name(dev)
    slug = tuning.gpu_slug(gpu_name)
    out = Path(args.out) if args.out else tuning.CONFIG_DIR / f"{slug}.json"
    family = launch.gpu_family(torch.cuda.get_device_capability(dev))
    max_smem = launch.max_shared_memory(dev)
    props = torch.cuda.get_device_properties(dev)
    l2 = int(getattr(props, "L2_cache_size", 0) or (64 << 20))
    elem = torch.empty(0, dtype=_torch_dtype(dtype)).element_size()
    block_r = launch.block_r(args.rank)
    _print_plan(label, shapes, tokens, dtype, passes, args.rank, tasks, quant=quant)
    print(f"GPU: {gpu_name} ({family}, {max_smem} B shared memory per block, L2 {l2 >> 20} MiB) -> {out}")
    meta = {"tuned_by": "peftfast tune", "triton": tuning.triton_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "kernel": mm._kernel_hash(), "model": label}
    if quant is not None:
        meta["kernel_4bit"] = qmm._kernel_hash()
    written = 0
    for i, task in enumerate(tasks, 1):
        cfgs = candidates(task.m, elem, block_r, family=family, max_smem=max_smem)
        timer = cuda_timer(args.warmup, args.rep)
        if task.quant is None:
            res = measure_task(task, cfgs, rank=args.rank, device=torch.device("cuda", dev), timer=timer, l2_bytes=l2)
        else:
            layout = "nk" if task.pass_ == "fwd" else "kn"
            ok, _ = qmm.inloop_supported([task.quant.blocksize, 256, *weight_dims(task)])
            inloop = qmm.candidates(task.m, elem, block_r, family=family, max_smem=max_smem,
                                    blocksize=task.quant.blocksize, nested=task.quant.nested,
                                    layout=layout) if ok else []
            res = measure_task_4bit(task, inloop, cfgs, rank=args.rank, device=torch.device("cuda", dev),
                                    timer=timer, l2_bytes=l2)
        best = res["best"]
        failed = [r for r in res["results"] if "error" in r]
        if best is None:
            print(f"[{i}/{len(tasks)}] {task.key}: no candidate ran correctly "
                  f"({'; '.join(r['error'] for r in failed[:3])})", file=sys.stderr)
            continue
        meta["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        entries = {task.key: best}
        if res.get("dense") is not None:
            entries[res["dense"][0]] = res["dense"][1]
        try:
            tuning.write_table(out, gpu_name, entries, meta)
        except (ValueError, OSError) as e:
            print(f"peftfast tune: error: {e}", file=sys.stderr)
            return 2
        written += 1
        cfg = tuning.config_from_entry(best)
        variant = ""
        if "variant" in best:
            def fmt(v):
                return "-" if v is None else f"{v:.4f} ms"

            variant = (f" variant {best['variant']} (inloop {fmt(best['inloop_ms'])}, "
                       f"dequant+GEMM {fmt(best['dequant_ms'])})")
        print(f"[{i}/{len(tasks)}] {task.key}:{variant} {cfg} median {best['ms']:.4f} ms "
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
