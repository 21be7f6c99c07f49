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
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from typing import Dict

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


def run_in_subprocess(script: str, *argv: str, timeout: int = 900) -> list:
    """Run ``python script argv...`` with the interpreter off and parse the JSON list it prints last."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PEFTFAST_BACKEND")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{os.path.basename(script)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
