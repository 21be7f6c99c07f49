"""Host-side helpers that every Triton op file shares: launch flags, GPU facts, config tables, pruning.

Only the Triton op modules import this one (it imports Triton); the op files' front ends reach them
through :func:`dispatch.triton_module`. The device-side building blocks are in :mod:`.tiles`.

* launch flags: :func:`dot_flags`, :func:`block_r`, :func:`num_sms`, :data:`INTERPRET_CONFIG`;
  :func:`launch_tiled_gemm` (the CUDA-or-interpreter launch of the IA3 and DoRA GEMMs);
* GPU facts, asked on first launch and never at import: :func:`gpu_family`, :func:`device_family`,
  :func:`max_shared_memory`, :func:`device_info`;
* the X-by-W tile loop's configs (``configs/lora_matmul.json``, shared by the LoRA, IA3 and DoRA GEMMs),
  its shared-memory model (:func:`gemm_smem_bytes`) and autotune pruning (:func:`make_gemm_pruner`,
  :func:`keep_rows_fitting`), :func:`autotune_options`;
* :func:`config_kwargs` (a table entry as launch keywords).

These run when a launcher builds a plan (:mod:`.plans`), once per operand signature, not per call.
The ``torch.library`` registration of the ops is :mod:`.ops`.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton

from .dispatch import settings
from .plans import next_power_of_2

_GEMM_CONFIG_FILE = os.path.join(os.path.dirname(__file__), "configs", "lora_matmul.json")


# One fixed config in the interpreter: big blocks keep the Python-level loop short, and a sweep would
# only time the interpreter.
INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}


def dot_flags(dtype: torch.dtype) -> dict:
    """The ``DOT_F32`` / ``IEEE`` constexprs of :func:`tiles.dot` for a compute dtype."""
    return {"DOT_F32": settings().interpret and dtype == torch.bfloat16, "IEEE": dtype == torch.float32}


def block_r(r: int) -> int:
    """``BLOCK_R`` of the low-rank loops for rank ``r``."""
    # tl.dot needs every dimension >= 16; ranks above 64 loop in chunks rather than grow registers.
    return max(16, min(64, next_power_of_2(r)))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere): how many programs fill it."""
    if device.type != "cuda":
        return 1
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def config_kwargs(cfg: dict) -> dict:
    """A config entry (:data:`tuning.CONFIG_FIELDS`) as the launch keywords of an X-by-W tile loop."""
    return {f: cfg[f] for f in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")}


@functools.lru_cache(maxsize=None)
def gemm_config_table() -> Dict[str, List[dict]]:
    """``configs/lora_matmul.json``: the X-by-W tile loop's candidate configs per GPU family."""
    with open(_GEMM_CONFIG_FILE) as f:
        return json.load(f)


def gpu_family(capability: tuple) -> str:
    """The config-table key for a CUDA capability.

    sm86/sm87 share sm89's ~100 KB of shared memory per block, so they use its list; anything older
    than sm80 gets sm80's, which the shared-memory pruning then trims.
    """
    major, minor = capability
    if major >= 9:
        return "sm90"
    if major == 8 and minor != 0:
        return "sm89"
    return "sm80"


def max_shared_memory(device_index: int) -> int:
    """Shared memory per block (opt-in maximum) of a CUDA device, in bytes."""
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        return int(props["max_shared_mem"])
    except Exception:  # older Triton drivers: fall back to PyTorch's view of the device
        props = torch.cuda.get_device_properties(device_index)
        return int(getattr(props, "shared_memory_per_block_optin", 99 * 1024))


@functools.lru_cache(maxsize=None)
def device_info(device_index: int) -> Tuple[str, int]:
    """(GPU name, shared memory per block) of a CUDA device; asked on first launch, never at import."""
    return torch.cuda.get_device_name(device_index), max_shared_memory(device_index)


def gemm_smem_bytes(kw: dict, num_stages: int, elem_bytes: int, block_r: int, lr_elem_bytes: Optional[int] = None) -> int:
    """Shared memory a config needs: the larger of the main loop's ``num_stages`` X and W tiles and the
    epilogue's L and R tiles (that loop is not pipelined; see the kernel). The L and R tiles are staged
    at their stored width, ``lr_elem_bytes`` (default ``elem_bytes``; see :func:`staged_widths`): fp32
    adapters under a bf16 GEMM took 80 KB where counting them at 2 bytes said 72 KB. Checked against the
    compiler for every config of every family by tests/kernels/aot_lora_cases.py."""
    main = num_stages * (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * elem_bytes
    epilogue = (kw["BLOCK_M"] * block_r + block_r * kw["BLOCK_N"]) * (lr_elem_bytes or elem_bytes)
    return max(main, epilogue)


def tile_widths(a: torch.Tensor, w: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> Tuple[int, int]:
    """Element sizes of the tiles a low-rank-epilogue GEMM stages in shared memory: the main loop's
    (the wider of ``a``'s and W's dtypes: a wider W is staged before its in-kernel cast), and the
    epilogue's L and R tiles (the widest of that and both adapters' dtypes)."""
    elem = max(a.element_size(), w.element_size())
    return elem, max(elem, left.element_size(), right.element_size())


def staged_widths(named_args: dict, main: Tuple[str, str] = ("p_y", "p_w")) -> Tuple[int, int]:
    """:func:`tile_widths` of a launch's named arguments, the main loop's two operands named ``main``."""
    return tile_widths(named_args[main[0]], named_args[main[1]], named_args["p_l"], named_args["p_r"])


def make_gemm_pruner(max_smem: int):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        m = int(args["M"])
        elem, lr_elem = staged_widths(args)
        block_r = int(args["BLOCK_R"])

        def need(c):
            return gemm_smem_bytes(c.kwargs, c.num_stages, elem, block_r, lr_elem)

        fits = [c for c in configs if need(c) <= max_smem]
        fits = fits or [min(configs, key=need)]
        return keep_rows_fitting(fits, m)

    return prune


def keep_rows_fitting(configs: list, rows: int) -> list:
    """The configs whose ``BLOCK_M`` is at most ``rows`` (rounded up to a power of two, at least 16), or
    those with the shortest ``BLOCK_M`` if none is: row blocks far taller than the problem (decode,
    short prompts) only multiply padding."""
    cap = max(16, next_power_of_2(int(rows)))
    short = [c for c in configs if c.kwargs["BLOCK_M"] <= cap]
    if short:
        return short
    lowest = min(c.kwargs["BLOCK_M"] for c in configs)
    return [c for c in configs if c.kwargs["BLOCK_M"] == lowest]


def as_triton_configs(entries: List[dict]) -> list:
    """Config-table entries (``configs/*.json``) as ``triton.Config`` objects."""
    return [triton.Config({k: e[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")},
                          num_warps=e["num_warps"], num_stages=e["num_stages"])
            for e in entries]


def gemm_configs(family: str) -> list:
    """The autotuning candidates of the X-by-W tile loop (this GEMM's, and IA3's and DoRA's, which share
    its main loop) for one GPU family (``"sm80"``, ``"sm89"``, ``"sm90"``)."""
    return as_triton_configs(gemm_config_table()[family])


def device_family(device_index: int) -> str:
    return gpu_family(torch.cuda.get_device_capability(device_index))


def autotune_options() -> dict:
    """Options every ``triton.autotune`` here gets: Triton >= 3.2 keeps each winner in its on-disk
    cache (JSON, not pickle) across processes, keyed on the kernel, the device and the pruned candidate
    list. This is the only cache of search winners: a shape the shipped table lacks is searched once per
    machine, and a search limited by ``PEFTFAST_AUTOTUNE_CONFIGS`` gets its own key."""
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}




def launch_tiled_gemm(tuned: Callable, kernel, device: torch.device, m: int, n: int, args: tuple, flags: dict) -> None:
    """Launches a grouped-tile GEMM kernel (one program per [BLOCK_M, BLOCK_N] output tile).

    Args:
        tuned: ``device_index -> autotuned kernel`` (CUDA); kernel: the plain ``@triton.jit`` kernel,
            run at :data:`INTERPRET_CONFIG` off CUDA. m, n: the output's shape. args, flags: the
            kernel's positional arguments and constexpr flags, all but the tile config.

    Example:
        >>> launch_tiled_gemm(_tuned_ia3_matmul, _ia3_matmul_kernel, x.device, m, n, args, flags)  # doctest: +SKIP
    """
    if device.type == "cuda":
        tuned_kernel = tuned(device.index if device.index is not None else torch.cuda.current_device())
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        tuned_kernel[grid](*args, **flags)
    else:
        cfg = INTERPRET_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        kernel[grid](*args, **flags, **cfg)
