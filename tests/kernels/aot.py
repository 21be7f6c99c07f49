"""Compile the Triton kernels for real GPU targets on a machine without a GPU.

The CPU interpreter checks what a kernel computes, not whether it compiles: ``tl.dot`` operand rules,
layouts, register and shared-memory use are only checked by the real compiler. Triton ships ``ptxas``,
so a kernel can be lowered all the way to a cubin for sm80/sm89/sm90 here, from the very arguments
its launcher would pass. What this gives: the kernel compiles for that GPU, with that config, and the
shared memory it needs (``metadata.shared``) fits the GPU's per-block limit.

Must run in a process where ``TRITON_INTERPRET`` is unset (``triton.jit`` reads it at decoration time,
and the interpreter's functions cannot be compiled): tests call :func:`run_in_subprocess`.

Usage inside such a process::

    with compile_instead_of_launch("sm90") as launches:
        kernel[grid](*args, **kwargs)      # compiles for sm90, launches nothing
    launches[0].shared, launches[0].name

The sweeps' records are cached (:func:`cached_sweep`) in ``tests/kernels/aot_results/``, committed, keyed
on a digest of everything that decides what gets compiled and how: every file of the ``peftfast.kernels``
package the subprocess imports (sources and config tables), the sweep scripts and this file, the
Triton and torch versions, the ptxas binary's bytes, the sweep's arguments and the ``TRITON_*`` /
``PEFTFAST_*`` environment it runs under. Any change there is a miss: the sweep really compiles again
and the file is rewritten (commit it with the kernel change, and CI skips the ~2.5 min of compiling).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# Shared memory one block may use (the opt-in maximum), in bytes: A100 163 KiB, sm86/sm89 99 KiB,
# H100/H200 227 KiB. A config above its GPU's limit fails at launch with "out of resources".
SMEM_LIMIT: Dict[str, int] = {"sm80": 166912, "sm89": 101376, "sm90": 232448}
CAPABILITY: Dict[str, int] = {"sm80": 80, "sm89": 89, "sm90": 90}


@dataclasses.dataclass
class Compiled:
    name: str            # the kernel's function name
    arch: str            # "sm80" | "sm89" | "sm90"
    constexprs: dict     # the constexpr arguments it was specialized on (block sizes, flags)
    num_warps: int
    num_stages: int
    shared: int          # bytes of shared memory per block, from the compiler

    @property
    def fits(self) -> bool:
        return self.shared <= SMEM_LIMIT[self.arch]


def unavailable() -> str:
    """Why kernels cannot be compiled for NVIDIA GPUs on this machine, or ``""`` when they can (the
    tests that compile skip with this reason)."""
    try:
        import triton
        import triton.backends.nvidia as nv
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except Exception as e:  # noqa: BLE001 - no Triton, or one without the NVIDIA backend
        return f"Triton (with its NVIDIA backend) does not import: {type(e).__name__}: {e}"
    if not hasattr(JITFunction, "_pack_args"):
        return f"Triton {triton.__version__} lacks the JITFunction internals tests/kernels/aot.py drives"
    import shutil

    bundled = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    if not (os.environ.get("TRITON_PTXAS_PATH") or os.access(bundled, os.X_OK) or shutil.which("ptxas")):
        return f"no ptxas: Triton ships none in {os.path.dirname(bundled)} and none is on PATH"
    return ""


def _target(arch: str):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", CAPABILITY[arch], 32)


def compile_call(fn, args: tuple, kwargs: dict, arch: str) -> Compiled:
    """Compile ``fn`` (a ``triton.jit`` function) for ``arch`` as ``fn[grid](*args, **kwargs)`` would.

    Argument binding, specialization (``== 1`` ints, 16-byte alignment) and options come from Triton's
    own launch path, so the cubin is the one a launch with these arguments would build.
    """
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_call needs TRITON_INTERPRET unset (see tests/kernels/aot.py)")
    backend = make_backend(_target(arch))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=_target(arch),
                            options=options.__dict__)
    names = [p.name for p in fn.params]
    const = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1 and path[0] < len(names)
             and fn.params[path[0]].is_constexpr}
    return Compiled(name=fn.__name__, arch=arch, constexprs=const, num_warps=kernel.metadata.num_warps,
                    num_stages=kernel.metadata.num_stages, shared=int(kernel.metadata.shared))


@dataclasses.dataclass
class CompileFailed:
    """A launch whose compilation raised (what a GPU user would hit on that launch)."""
    name: str
    arch: str
    constexprs: dict     # the constexpr keyword arguments as launched (block sizes, flags)
    num_warps: int
    num_stages: int
    error: str


@contextlib.contextmanager
def compile_instead_of_launch(arch: str, *, keep_going: bool = False):
    """Within the block, every ``jit_fn[grid](...)`` compiles for ``arch`` and launches nothing.

    Yields the list the :class:`Compiled` records are appended to, in launch order. Launchers can
    then be driven with CPU tensors: nothing reads or writes their memory. With ``keep_going``, a
    launch that fails to compile is recorded as a :class:`CompileFailed` and the launcher goes on (a
    sweep then reports every failure with its kernel and config); otherwise the error propagates.
    """
    from triton.runtime.jit import JITFunction

    launches: list = []
    real_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        try:
            launches.append(compile_call(self, args, kwargs, arch))
        except Exception as e:  # noqa: BLE001 - the error text is the result
            if not keep_going:
                raise
            const = {p.name: kwargs[p.name] for p in self.params if p.is_constexpr and p.name in kwargs}
            launches.append(CompileFailed(name=self.__name__, arch=arch, constexprs=const,
                                          num_warps=int(kwargs.get("num_warps", 4)),
                                          num_stages=int(kwargs.get("num_stages", 3)),
                                          error=f"{type(e).__name__}: {e}"[-2000:]))
        return None

    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = real_run


def _subprocess_env() -> Dict[str, str]:
    """The environment a sweep runs under: this one with the interpreter and the backend override off."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PEFTFAST_BACKEND")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def run_in_subprocess(script: str, *argv: str, timeout: int = 900) -> list:
    """Run ``python script argv...`` with the interpreter off and parse the JSON list it prints last."""
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, env=_subprocess_env(),
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{os.path.basename(script)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# The results cache
# --------------------------------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "aot_results"
# Variables left out of the key: where caches live, what run_in_subprocess removes, and paths whose
# files' bytes are hashed instead (a test's temporary folder of tables would otherwise never hit).
_ENV_IGNORED = ("TRITON_CACHE_DIR", "TRITON_HOME", "TRITON_DUMP_DIR", "TRITON_OVERRIDE_DIR", "TRITON_INTERPRET",
                "TRITON_PTXAS_PATH", "PEFTFAST_BACKEND", "PEFTFAST_CACHE_DIR", "PEFTFAST_TUNING_TABLES")


def kernel_package_dir() -> Path:
    """The folder of the ``peftfast.kernels`` a sweep subprocess imports, found without importing it
    (peftfast's import takes seconds): the editable install maps it to the checkout's ``kernels/``, a
    regular install to site-packages."""
    parent = importlib.util.find_spec("peftfast")
    if parent is None or not parent.submodule_search_locations:
        raise RuntimeError("peftfast is not installed: run `pip install -e .[dev]`")
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        spec = find("peftfast.kernels", list(parent.submodule_search_locations)) if find else None
        if spec is not None and spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0]).resolve()
    import peftfast.kernels  # an unusual finder: pay for the import

    return Path(peftfast.kernels.__file__).resolve().parent


def _digest_files(paths: List[Tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for name, path in sorted(paths):
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _tree(root: Path, label: str) -> List[Tuple[str, Path]]:
    return [(f"{label}/{p.relative_to(root).as_posix()}", p) for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]


def _ptxas_path(env: Dict[str, str]) -> Optional[str]:
    """The ptxas Triton would run (its own order: TRITON_PTXAS_PATH, the bundled one, PATH)."""
    if env.get("TRITON_PTXAS_PATH"):
        return env["TRITON_PTXAS_PATH"]
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return None
    bundled = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    return bundled if os.access(bundled, os.X_OK) else shutil.which("ptxas")


def sweep_inputs(script: str, argv: Tuple[str, ...], *, kernel_dir: Optional[Path] = None,
                 env: Optional[Dict[str, str]] = None) -> dict:
    """Everything that decides a sweep's records, as a JSON-able dict (its digest is the cache key).

    Args:
        script: the sweep script (``aot_*_cases.py``); it and this file are hashed.
        argv: the script's arguments.
        kernel_dir: the kernels package folder (default: :func:`kernel_package_dir`).
        env: the sweep's environment (default: what :func:`run_in_subprocess` passes).

    Returns:
        ``{"script", "argv", "sources", "triton", "torch", "python", "ptxas", "env"}``.

    Example:
        >>> sweep_inputs(str(HERE / "aot_lora_cases.py"), ())["triton"]  # doctest: +SKIP
        '3.9.0'
    """
    import torch
    import triton

    script_path = Path(script).resolve()
    env = _subprocess_env() if env is None else env
    kernel_dir = kernel_package_dir() if kernel_dir is None else Path(kernel_dir)
    files = _tree(kernel_dir, "kernels")
    # The sweep scripts import nothing of the tests but this file.
    files += [("aot/script", script_path), ("aot/aot.py", Path(__file__).resolve())]
    # Extra tuning tables (kernels/tuning.py reads them beside the shipped ones).
    for i, d in enumerate(p for p in env.get("PEFTFAST_TUNING_TABLES", "").split(os.pathsep) if p):
        if Path(d).is_dir():
            files += _tree(Path(d), f"tables{i}")
    ptxas = _ptxas_path(env)
    return {
        "script": script_path.name,
        "argv": list(argv),
        "sources": _digest_files(files),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": "%d.%d" % sys.version_info[:2],
        "ptxas": _digest_files([("ptxas", Path(ptxas))]) if ptxas and os.path.isfile(ptxas) else None,
        "env": {k: v for k, v in sorted(env.items()) if k.startswith(("TRITON_", "PEFTFAST_")) and k not in _ENV_IGNORED},
    }


def _results_file(script: str, argv: Tuple[str, ...], results_dir: Path) -> Path:
    stem = Path(script).stem + "".join("_" + a.strip("-").replace("/", "_") for a in argv)
    return Path(results_dir) / f"{stem}.json"


def cached_sweep(script: str, *argv: str, timeout: int = 900, results_dir: Path = RESULTS_DIR,
                 recompile: bool = False, inputs: Optional[dict] = None) -> Tuple[list, bool]:
    """A sweep's records: from ``results_dir`` when they were made from these very inputs, else compiled.

    Args:
        script: the sweep script, run by :func:`run_in_subprocess` on a miss.
        *argv: its arguments (part of the key and of the file name).
        timeout: the subprocess's limit in seconds.
        results_dir: where the records are kept, one JSON file per script and arguments.
        recompile: compile even on a hit (pytest's ``--aot-recompile``); the file is rewritten.
        inputs: the key's inputs (default: :func:`sweep_inputs`); tests pass their own.

    Returns:
        ``(records, hit)``; ``hit`` is True when nothing was compiled.

    Example:
        >>> records, hit = cached_sweep(str(HERE / "aot_lora_cases.py"))  # doctest: +SKIP
    """
    inputs = sweep_inputs(script, argv) if inputs is None else inputs
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    path = _results_file(script, argv, results_dir)
    if not recompile and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("digest") == digest and isinstance(saved.get("records"), list):
            return saved["records"], True
    records = run_in_subprocess(script, *argv, timeout=timeout)
    body = json.dumps({"digest": digest, "inputs": inputs, "records": records}, indent=0, sort_keys=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Atomic: concurrent sessions (pytest-xdist, two checkouts) never read half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(body + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; it is a file of the checkout
        os.replace(tmp, path)
    except OSError as e:  # a read-only checkout: the records are still right, only not kept
        warnings.warn(f"could not keep the AOT records in {path}: {e}")
    else:
        try:
            shown = path.relative_to(HERE.parent.parent)
        except ValueError:
            shown = path
        warnings.warn(f"{path.name}: compiled afresh (new inputs, or --aot-recompile); commit {shown} so that CI "
                      "reuses the records")
    return records, False
