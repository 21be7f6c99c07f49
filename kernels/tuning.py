"""Per-GPU tuned kernel configs: the shipped tables and their keys.

Tuning is one mechanism with two stages: a CUDA launch takes its config from the **shipped table**
``configs/<gpu-slug>.json`` (written by ``peftfast tune``, one file per GPU model, keyed by
:func:`shape_key`; directories named by ``PEFTFAST_TUNING_TABLES``, ``os.pathsep`` separated, are
searched before the shipped one, so a user can tune into a writable place), and a shape the table
lacks goes to Triton's own ``triton.autotune`` search, whose winner Triton keeps in its on-disk cache
(``cache_results``; keyed on the kernel source, the Triton version, the device and the candidate list,
so a new Triton, an edited kernel or a limited search never reuses a stale winner). The decision is
made once per launch signature and kept in that launcher's plan (:mod:`.plans`).

Ops: ``lora_matmul`` (``matmul.matmul_lowrank``) and ``lora_matmul_4bit`` (the GEMM with a 4-bit base at
training / prefill sizes, :mod:`.experimental.qmatmul`), whose entries may also say which of its two variants runs
(``"variant": "inloop" | "dequant"``; see configs/README.md).

Bucketing (:func:`bucket_m`): M (tokens) rounds up to a power of two, at least 16 and at most 8192.
``tl.dot`` tiles have at least 16 rows, so M = 1..16 run the same tiles (one *decode* bucket), and
past 8192 rows every shape is compute-bound and keeps the 8192 choice. N and K are kept exact: a model
has only a few distinct linear shapes.

Everything here is plain Python and JSON (never pickle): nothing touches CUDA, and files are only read
when a launch first asks for them. Unreadable, corrupt or foreign-format files are skipped with one
warning line each, never raised. ``triton_version`` and ``source_hash`` only annotate table entries.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import re
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TABLE_FORMAT = "peftfast.tuning-table"
FORMAT_VERSION = 1

M_MIN = 16      # the decode bucket: M = 1..16
M_MAX = 8192    # the largest bucket: every M past it uses it

# The launch parameters of a config entry (all positive ints); other fields (``ms``, ...) are notes.
CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")

OP_LORA_MATMUL = "lora_matmul"
# The 4-bit base GEMM of a LoRA linear at M > DECODE_MAX_M (kernels/experimental/qmatmul.py). Its entries may name a
# ``variant``: "inloop" (the weight decoded in the K loop) or "dequant" (one dequantization launch, then
# ``lora_matmul``); their launch fields are that variant's GEMM config.
OP_LORA_MATMUL_4BIT = "lora_matmul_4bit"
VARIANTS = ("inloop", "dequant")

_DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


# --------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------


def bucket_m(m: int) -> int:
    """The M bucket of ``m`` rows: next power of two, clamped to [16, 8192]."""
    m = int(m)
    if m <= M_MIN:
        return M_MIN
    if m >= M_MAX:
        return M_MAX
    return 1 << (m - 1).bit_length()


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (also accepts the short names themselves)."""
    s = str(dtype)
    if s in _DTYPE_NAMES.values():
        return s
    return _DTYPE_NAMES.get(s, s.replace("torch.", ""))


def weight_format(wt) -> str:
    """How the [K, N] base operand of ``matmul_lowrank`` sits in memory: ``"<dtype>-<layout>"``.

    ``nk``: the transpose of a row-major [N, K] ``nn.Linear`` weight (``W.t()``, the forward pass);
    ``kn``: row-major [K, N] (``W`` itself, the dX GEMM of the backward); ``strided``: anything else;
    ``"none"`` when there is no base weight. The layout decides which tile dimension loads coalesce
    along, so the two passes are tuned apart.
    """
    if wt is None:
        return "none"
    if wt.stride(0) == 1:
        layout = "nk"
    elif wt.stride(1) == 1:
        layout = "kn"
    else:
        layout = "strided"
    return f"{dtype_name(wt.dtype)}-{layout}"


def weight_format_4bit(quant_type: str, blocksize: int, nested: bool, layout: str) -> str:
    """The weight field of a ``lora_matmul_4bit`` key: ``"<nf4|fp4>-b<blocksize>[-nested]-<nk|kn>"``.

    ``nk``: the forward ``X @ W^T``; ``kn``: the dX GEMM ``dY @ W`` (as in :func:`weight_format`). The
    blocksize and the nesting change the decoding work per tile, so they are tuned apart.
    """
    qt = str(quant_type).lower()
    if qt not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if layout not in ("nk", "kn"):
        raise ValueError(f"layout must be 'nk' or 'kn', got {layout!r}")
    return f"{qt}-b{int(blocksize)}{'-nested' if nested else ''}-{layout}"


def shape_key(op: str, m: int, n: int, k: int, dtype, weight: str) -> str:
    """``"op|M bucket|N|K|dtype|weight format"``, e.g. ``"lora_matmul|16|4096|4096|bf16|bf16-nk"``."""
    return f"{op}|{bucket_m(m)}|{int(n)}|{int(k)}|{dtype_name(dtype)}|{weight}"


def parse_shape_key(key: str) -> dict:
    op, m, n, k, dtype, weight = key.split("|")
    return {"op": op, "m": int(m), "n": int(n), "k": int(k), "dtype": dtype, "weight": weight}


def gpu_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (as bench/ names its result folders)."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")
    return slug or "unknown-gpu"


def source_hash(*fns) -> str:
    """SHA-256 (first 16 hex digits) of the Python source of the given (``triton.jit``) functions.

    Works on ``JITFunction`` and on the interpreter's wrapper alike (both keep the Python function as
    ``.fn``); the source is used rather than Triton's ``cache_key``, which also hashes line numbers.
    """
    h = hashlib.sha256()
    for fn in fns:
        py = getattr(fn, "fn", fn)
        try:
            src = inspect.getsource(py)
        except (OSError, TypeError):
            src = getattr(py, "__qualname__", repr(py))
        h.update(src.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def triton_version() -> str:
    try:
        import triton

        return str(triton.__version__)
    except Exception:  # noqa: BLE001 - no Triton: such keys are never used for a launch
        return "none"


# --------------------------------------------------------------------------------------------------
# Config entries
# --------------------------------------------------------------------------------------------------


def config_from_entry(entry) -> Optional[dict]:
    """The launch parameters of a table/cache entry, or None unless all are positive ints.

    Block sizes must be powers of two (``tl.arange``); anything else is a broken entry, not a config.
    """
    if not isinstance(entry, dict):
        return None
    out = {}
    for f in CONFIG_FIELDS:
        v = entry.get(f)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            return None
        out[f] = v
    if any(out[f] & (out[f] - 1) for f in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")):
        return None
    return out


def config_to_dict(config) -> dict:
    """A ``triton.Config`` (or a dict) as a plain dict of :data:`CONFIG_FIELDS`."""
    if isinstance(config, dict):
        return {f: int(config[f]) for f in CONFIG_FIELDS}
    kw = dict(config.kwargs)
    kw["num_warps"] = config.num_warps
    kw["num_stages"] = config.num_stages
    return {f: int(kw[f]) for f in CONFIG_FIELDS}


def _warn(msg: str) -> None:
    warnings.warn(f"peftfast tuning: {msg}", RuntimeWarning, stacklevel=3)


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (:func:`peftfast.fileio.replace_atomically`), creating its folder."""
    from ..fileio import replace_atomically  # the one atomic writer; imported late, kernels load first

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(path, text=True) as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------------------------------
# Shipped tables
# --------------------------------------------------------------------------------------------------


def table_dirs() -> List[Path]:
    extra = [Path(p) for p in os.environ.get("PEFTFAST_TUNING_TABLES", "").split(os.pathsep) if p]
    return extra + [CONFIG_DIR]


def read_table(path) -> Optional[dict]:
    """A table file's ``{shape key: entry}``; None (with a warning) when unreadable or foreign."""
    path = Path(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        _warn(f"ignoring unreadable table {path}: {type(e).__name__}: {e}".splitlines()[0])
        return None
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or data.get("version") != FORMAT_VERSION:
        _warn(f"ignoring {path}: not a {TABLE_FORMAT} v{FORMAT_VERSION} file")
        return None
    entries = data.get("entries")
    if not isinstance(entries, dict):
        _warn(f"ignoring {path}: no 'entries' object")
        return None
    return data


@functools.lru_cache(maxsize=None)
def _load_table_entries(slug: str, dirs: Tuple[str, ...]) -> Dict[str, Tuple[dict, Optional[str]]]:
    """``{key: (config, variant or None)}`` merged over ``dirs`` (earlier folders win)."""
    merged: Dict[str, Tuple[dict, Optional[str]]] = {}
    # Later dirs have lower priority: fill from the last so earlier ones overwrite.
    for d in reversed(dirs):
        data = read_table(Path(d) / f"{slug}.json")
        if data is None:
            continue
        for key, entry in data["entries"].items():
            cfg = config_from_entry(entry)
            if cfg is None:
                _warn(f"ignoring entry {key!r} of {Path(d) / (slug + '.json')}: bad config {entry!r}"[:300])
                continue
            variant = entry.get("variant")
            if variant is not None and variant not in VARIANTS:
                _warn(f"ignoring entry {key!r} of {Path(d) / (slug + '.json')}: variant {variant!r} is not one "
                      f"of {VARIANTS}"[:300])
                continue
            merged[key] = (cfg, variant)
    return merged


@functools.lru_cache(maxsize=None)
def _load_tables(slug: str, dirs: Tuple[str, ...]) -> Dict[str, dict]:
    return {key: cfg for key, (cfg, _) in _load_table_entries(slug, dirs).items()}


def lookup_table(slug: str, key: str) -> Optional[dict]:
    """The tuned config for ``key`` on the GPU ``slug``, or None. Files are read once per process."""
    return _load_tables(slug, tuple(str(d) for d in table_dirs())).get(key)


def lookup_table_variant(slug: str, key: str) -> Optional[str]:
    """The ``variant`` a table entry for ``key`` names (``"inloop"`` / ``"dequant"``), or None."""
    hit = _load_table_entries(slug, tuple(str(d) for d in table_dirs())).get(key)
    return None if hit is None else hit[1]


def write_table(path, gpu_name: str, entries: Dict[str, dict], meta: Optional[dict] = None) -> dict:
    """Merge ``entries`` into the table at ``path`` (created if missing) and write it atomically.

    Raises ValueError when ``path`` exists but is not a table of this format, or belongs to another GPU:
    a shipped file is never clobbered silently.
    """
    path = Path(path)
    data = {"format": TABLE_FORMAT, "version": FORMAT_VERSION, "gpu": gpu_name, "entries": {}, "meta": {}}
    if path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            old = read_table(path)
        if old is None:
            raise ValueError(f"{path} exists but is not a readable {TABLE_FORMAT} v{FORMAT_VERSION} file; "
                             f"move it away or pick another --out")
        if old.get("gpu") not in (None, gpu_name):
            raise ValueError(f"{path} holds configs for {old.get('gpu')!r}, not {gpu_name!r}; pick another --out")
        data.update({k: v for k, v in old.items() if k in ("entries", "meta")})
    data["entries"] = dict(data["entries"])
    for key, entry in entries.items():
        parse_shape_key(key)  # raises on a malformed key
        if config_from_entry(entry) is None:
            raise ValueError(f"bad config for {key}: {entry!r}")
        if entry.get("variant") is not None and entry["variant"] not in VARIANTS:
            raise ValueError(f"bad variant for {key}: {entry['variant']!r} (one of {VARIANTS})")
        data["entries"][key] = dict(entry)
    data["meta"] = {**(data.get("meta") or {}), **(meta or {})}
    _write_json_atomic(path, data)
    clear_memory_caches()
    return data


def clear_memory_caches() -> None:
    """Forget what this process read or decided, as a new process would: the tables, the launch plans
    (:mod:`.plans`) and the environment snapshot (:func:`.dispatch.settings`).

    Call it after changing ``PEFTFAST_BACKEND``, ``TRITON_INTERPRET``, ``PEFTFAST_TUNING``,
    ``PEFTFAST_TUNING_TABLES`` or ``PEFTFAST_QLORA_GEMM`` in a running process; :func:`write_table` calls it.
    """
    from . import dispatch, plans

    _load_tables.cache_clear()
    _load_table_entries.cache_clear()
    plans.clear()
    dispatch.settings.cache_clear()


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------


def select_config(key: str, *, gpu_name: str, fits=None, variant: Optional[str] = None) -> Optional[Tuple[dict, str]]:
    """The shipped table's config for ``key``: ``(config, "table")``, or None (the caller autotunes).

    ``fits(config) -> bool`` rejects configs that this call cannot run (e.g. too much shared memory for
    a larger rank than the one tuned). With ``variant``, an entry naming another variant is passed over
    (its launch fields are another kernel's); entries naming none are taken. None as well when
    ``PEFTFAST_TUNING=off`` (:func:`table_enabled`).
    """
    if not table_enabled():
        return None
    slug = gpu_slug(gpu_name)
    cfg = lookup_table(slug, key)
    if cfg is not None and variant is not None and lookup_table_variant(slug, key) not in (None, variant):
        cfg = None
    if cfg is not None and (fits is None or fits(cfg)):
        return cfg, "table"
    return None


def table_enabled() -> bool:
    """Whether launches consult the tables: ``PEFTFAST_TUNING`` unset/``all``/``table`` (yes) or ``off``.

    ``off`` (also ``0``, ``none``, ``search``) leaves Triton's autotuning search alone; its winners are
    kept by Triton's own on-disk cache (``cache_results``, see :func:`launch.autotune_options`).
    """
    mode = os.environ.get("PEFTFAST_TUNING", "all").strip().lower() or "all"
    return mode not in ("off", "0", "none", "search")


# How many candidates a fallback search may time (``PEFTFAST_AUTOTUNE_CONFIGS=N``: the first N that survive
# each kernel's pruning). A correctness run on a freshly lent GPU sets it to keep compile and benchmark
# time out of its budget; unset (the default) searches every candidate.
ENV_SEARCH_LIMIT = "PEFTFAST_AUTOTUNE_CONFIGS"


def search_limit() -> Optional[int]:
    """The ``PEFTFAST_AUTOTUNE_CONFIGS`` limit on a search's candidates, or None for no limit.

    Returns:
        A positive int, or None when the variable is unset or empty.

    Raises:
        ValueError: the variable is set to anything but a positive integer.

    Example:
        >>> os.environ["PEFTFAST_AUTOTUNE_CONFIGS"] = "1"; search_limit()
        1
    """
    raw = os.environ.get(ENV_SEARCH_LIMIT, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n <= 0:
        raise ValueError(f"{ENV_SEARCH_LIMIT}={raw!r}: give a positive integer (how many autotuning candidates "
                         f"each search may time), or unset it to search them all")
    return n


def limit_search(configs: list) -> list:
    """The first :func:`search_limit` entries of an already pruned candidate list (all of them if unset).

    Args:
        configs: the candidates a kernel's pruner kept, best-first in its table's order.

    Returns:
        A new list; never empty when ``configs`` is not.

    Example:
        >>> limit_search([c1, c2, c3])   # PEFTFAST_AUTOTUNE_CONFIGS=2
        [c1, c2]
    """
    n = search_limit()
    return list(configs) if n is None else list(configs)[:n]


def limited_pruner(prune):
    """Wrap an autotuner's ``early_config_prune`` so that :func:`limit_search` applies after it.

    Args:
        prune: ``prune(configs, named_args, **kwargs) -> configs``, the kernel's own pruner.

    Returns:
        A pruner of the same signature; the limit is read at each search, not when the kernel is built.
    """
    def pruned(configs, named_args, **kwargs):
        return limit_search(prune(configs, named_args, **kwargs))

    pruned.__wrapped__ = prune
    return pruned
