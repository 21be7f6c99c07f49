"""One declaration per Triton op: its ``torch.library`` custom ops, fakes, autograd and eager fast path.

An op file declares each op once, with :func:`declare`: the inputs (a schema-style list), the outputs,
which inputs get gradients, which inputs and outputs the backward needs, the shape (fake) functions and
the forward / backward bodies. From that this module generates

* the custom op ``peftfast::<name>`` and its backward op ``peftfast::<name>_backward`` (schema strings
  written here, not three hand-kept copies of a 15-argument signature), with their fakes and the
  autograd formula that connects them, so that ``torch.compile`` traces the op as one graph node;
* an eager path that skips the dispatcher: the forward body called directly when no input needs a
  gradient, else a generated ``torch.autograd.Function``. The dispatcher's boxing, schema checks and
  ``setup_context`` cost more host time than a decode kernel runs (issue 20), and eager mode gains
  nothing from them. Both paths run the same bodies, so they give the same numbers.

Inputs are written as in a schema, all tensors before the scalars::

    Tensor x         a tensor                        Tensor? bias   or None
    Weight weight    a base weight: a dense tensor or a Quant4bit (Weight?: or None)
    float scaling    bool causal    int n            scalars

A ``Weight`` travels through Python as one object. Only at the op boundary is it flattened, to its
dense-or-packed tensor in its own place, its five scale tensors after the op's other tensors, then
``int[] meta, str quant_type`` (:func:`.weights.quant_args`); the other side rebuilds it
(:func:`.weights.from_quant_args`). The backward op takes the gradient of the first output, the saved
tensors (a saved ``Weight`` flattened the same way), every scalar input and ``bool[] needs`` (one flag
per entry of ``grads``), and returns one tensor per entry of ``grads``: an empty one where not needed,
since a custom op's outputs may not alias. Outputs after the first are internal products returned only
for the backward (the custom op cannot keep them otherwise); the public call returns the first output.

Example (the shape of a declaration; see lora_triton.py for a real one)::

    SCALE = declare(
        "scale_rows", __name__, "SCALE",
        inputs="Tensor x, Tensor s, float alpha", outputs=("y",), grads=("x", "s"), saved=("x", "s"),
        forward=_fwd, backward=_bwd, fake=lambda x, s, alpha: x.new_empty(x.shape),
        backward_fake=lambda dy, x, s, alpha, needs: (x.new_empty(x.shape), s.new_empty(s.shape)),
    )
    y = SCALE(x, s, 2.0)
"""
from __future__ import annotations

import importlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from .weights import from_quant_args, quant_args

NAMESPACE = "peftfast"
_TENSOR_TYPES = ("Tensor", "Tensor?", "Weight", "Weight?")
_SCALAR_TYPES = ("float", "bool", "int", "str", "bool[]", "int[]")
# A Weight's storage after the op's other tensors, in weights.quant_args order.
_QUANT_EXTRAS = ("absmax", "code", "code2", "absmax2", "offset")


def _parse(inputs: str) -> List[Tuple[str, str]]:
    """``"Tensor x, float s"`` -> ``[("Tensor", "x"), ("float", "s")]``, tensors first, at most one Weight."""
    slots = []
    for part in inputs.split(","):
        typ, name = part.split()
        if typ not in _TENSOR_TYPES + _SCALAR_TYPES:
            raise ValueError(f"unknown input type {typ!r} for {name!r}; use one of {_TENSOR_TYPES + _SCALAR_TYPES}")
        slots.append((typ, name))
    kinds = [t in _TENSOR_TYPES for t, _ in slots]
    if kinds != sorted(kinds, reverse=True):
        raise ValueError(f"declare the tensors before the scalars: {inputs}")
    if sum(t.startswith("Weight") for t, _ in slots) > 1:
        raise ValueError(f"at most one Weight input per op: {inputs}")
    return slots


class _Signature:
    """One side of an op boundary: declared slots <-> the flat argument list of the custom op."""

    def __init__(self, slots: Sequence[Tuple[str, str]]):
        self.slots = list(slots)
        self.names = [n for _, n in self.slots]
        self.n_tensors = sum(t in _TENSOR_TYPES for t, _ in self.slots)
        self.weight = next((i for i, (t, _) in enumerate(self.slots) if t.startswith("Weight")), None)

    def schema_args(self) -> str:
        tensors = [("Tensor?" if t.endswith("?") else "Tensor", n) for t, n in self.slots[:self.n_tensors]]
        extras = []
        if self.weight is not None:
            extras = [("Tensor?", n) for n in _QUANT_EXTRAS] + [("int[]", "meta"), ("str", "quant_type")]
        return ", ".join(f"{t} {n}" for t, n in tensors + extras + self.slots[self.n_tensors:])

    def flatten(self, values: Sequence) -> list:
        """Declared values -> the custom op's positional arguments."""
        if self.weight is None:
            return list(values)
        flat = list(values[:self.n_tensors])
        w, *extras = quant_args(values[self.weight])
        flat[self.weight] = w
        return flat + extras + list(values[self.n_tensors:])

    def unflatten(self, flat: Sequence) -> list:
        """The custom op's positional arguments -> declared values (the Weight rebuilt)."""
        if self.weight is None:
            return list(flat)
        n = self.n_tensors
        values = list(flat[:n])
        # Recorded as the first tensor's dtype (x's or dy's): the bitsandbytes compute dtype does not
        # cross the boundary, and every dequantization here names its output dtype.
        dtype = next((t.dtype for i, t in enumerate(values) if t is not None and i != self.weight), None)
        values[self.weight] = from_quant_args(values[self.weight], *flat[n:n + 7], dtype=dtype)
        return values + list(flat[n + 7:])


def _pack(values: Sequence) -> Tuple[tuple, tuple]:
    """The tensors to save (None left out: nothing to keep) and where they go back."""
    return tuple(v for v in values if v is not None), tuple(v is not None for v in values)


def _unpack(saved: Sequence, present: Sequence[bool]) -> list:
    it = iter(saved)
    return [next(it) if p else None for p in present]


class Op:
    """A declared op (see the module docstring); call it with the declared inputs, in order.

    Attributes:
        op, backward_op: the ``torch.library`` custom ops (``torch.ops.peftfast.<name>`` and ``..._backward``).
        function: the eager ``torch.autograd.Function``.
    """

    def __init__(self, name: str, *, inputs: str, outputs: Sequence[str], grads: Sequence[str],
                 saved: Sequence[str], forward: Callable, backward: Callable, fake: Callable,
                 backward_fake: Callable):
        slots = _parse(inputs)
        self.name = name
        self.inputs = _Signature(slots)
        self.outputs = tuple(outputs)
        self.single = len(self.outputs) == 1
        self.forward = forward
        self.backward = backward
        by_name = dict((n, t) for t, n in slots)
        for n in (*grads, *saved):
            if n not in by_name and n not in self.outputs:
                raise ValueError(f"{name}: {n!r} is neither an input nor an output")
        self.grad_index = tuple(self.inputs.names.index(g) for g in grads)
        # Saved values come from the declared inputs (index >= 0) or the outputs (index -1 - i).
        self.saved_index = tuple(self.inputs.names.index(n) if n in by_name else -1 - self.outputs.index(n)
                                 for n in saved)
        self.scalar_index = tuple(range(self.inputs.n_tensors, len(slots)))
        saved_slots = [(by_name.get(n, "Tensor"), n) for n in saved]
        scalar_slots = slots[self.inputs.n_tensors:]
        self.saved = _Signature(saved_slots)
        self.backward_sig = _Signature([("Tensor", "d" + self.outputs[0])] + saved_slots + scalar_slots
                                       + [("bool[]", "needs")])
        self.op, self.backward_op = self._register(fake, backward_fake)
        self.function = self._make_function()

    # -- torch.library -------------------------------------------------------------------------------

    def _register(self, fake, backward_fake):
        out = "Tensor" if self.single else "(" + ", ".join("Tensor" for _ in self.outputs) + ")"
        grads_out = "(" + ", ".join("Tensor" for _ in self.grad_index) + ")"
        fwd_sig, bwd_sig = self.inputs, self.backward_sig
        forward, backward = self.forward, self.backward

        op = torch.library.custom_op(f"{NAMESPACE}::{self.name}", lambda *a: forward(*fwd_sig.unflatten(a)),
                                     mutates_args=(), schema=f"({fwd_sig.schema_args()}) -> {out}")
        op.register_fake(lambda *a: fake(*fwd_sig.unflatten(a)))
        backward_op = torch.library.custom_op(
            f"{NAMESPACE}::{self.name}_backward", lambda *a: _as_op_grads(a[0], backward(*bwd_sig.unflatten(a))),
            mutates_args=(), schema=f"({bwd_sig.schema_args()}) -> {grads_out}")
        backward_op.register_fake(lambda *a: backward_fake(*bwd_sig.unflatten(a)))

        def setup_context(ctx, inputs, output):
            values = fwd_sig.unflatten(inputs)
            outs = (output,) if self.single else output
            self._save(ctx, values, outs)

        n_flat = len(fwd_sig.slots) + (7 if fwd_sig.weight is not None else 0)

        def op_backward(ctx, *grad_outputs):
            # Gradients of outputs after the first are ignored: those are internal products. The declared
            # positions of the tensors are also their flat ones (a Weight's extras come after them).
            needs = self._needs(ctx.needs_input_grad)
            saved = self._saved(ctx)
            grads = backward_op(*bwd_sig.flatten([grad_outputs[0], *saved, *ctx.scalars, needs]))
            return self._place(grads, needs, ctx.grad_dtypes, n_flat)

        op.register_autograd(op_backward, setup_context=setup_context)
        return op, backward_op

    # -- shared by both autograd paths -----------------------------------------------------------------

    def _save(self, ctx, values: Sequence, outs: Sequence) -> None:
        picked = [values[i] if i >= 0 else outs[-1 - i] for i in self.saved_index]
        flat = self.saved.flatten(picked)
        if self.saved.weight is not None:  # a Weight's meta and quant_type are no tensors
            flat, ctx.weight_meta = flat[:-2], flat[-2:]
        tensors, ctx.present = _pack(flat)
        ctx.save_for_backward(*tensors)
        ctx.scalars = [values[i] for i in self.scalar_index]
        ctx.grad_dtypes = tuple(None if values[i] is None else values[i].dtype for i in self.grad_index)

    def _saved(self, ctx) -> list:
        """The saved values, in ``saved`` order (a Weight rebuilt); the inverse of :meth:`_save`."""
        flat = _unpack(ctx.saved_tensors, ctx.present)
        if self.saved.weight is not None:
            flat += ctx.weight_meta
        return self.saved.unflatten(flat)

    def _needs(self, needs_input_grad) -> List[bool]:
        return [bool(needs_input_grad[i]) for i in self.grad_index]

    def _place(self, grads: Sequence, needs: Sequence[bool], dtypes: Sequence, n_inputs: int) -> tuple:
        """The backward's gradients at their inputs' positions, in their inputs' dtypes (dbias comes
        back in fp32), None where not needed."""
        result = [None] * n_inputs
        for g, i, dt, need in zip(grads, self.grad_index, dtypes, needs):
            if need:
                result[i] = g if g.dtype == dt else g.to(dt)
        return tuple(result)

    # -- eager ---------------------------------------------------------------------------------------

    def _make_function(self):
        decl = self

        def forward(ctx, *values):
            outs = decl.forward(*values)
            outs = (outs,) if decl.single else outs
            decl._save(ctx, values, outs)
            return outs[0]

        @once_differentiable
        def backward(ctx, grad):
            needs = decl._needs(ctx.needs_input_grad)
            saved = decl._saved(ctx)
            grads = decl.backward(grad, *saved, *ctx.scalars, needs)
            return decl._place(grads, needs, ctx.grad_dtypes, len(decl.inputs.slots))

        # LoraLinear etc.: autograd names the graph node LoraLinearBackward.
        cls_name = "".join(p.capitalize() for p in self.name.split("_"))
        return type(cls_name, (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def call_op(self, *values):
        """The op through the ``torch.library`` dispatcher (what ``torch.compile`` traces); first output."""
        out = self.op(*self.inputs.flatten(values))
        return out if self.single else out[0]

    def __call__(self, *values):
        """Run the op on the declared inputs; returns its first output."""
        if torch.compiler.is_compiling() or not _plain(values[0]):
            # Tracing (torch.compile, export, fake tensors, subclasses): the custom op, whose fake the
            # tracer understands and which stays one node of the graph.
            return self.call_op(*values)
        if torch.is_grad_enabled() and any(
                values[i] is not None and values[i].requires_grad for i in self.grad_index):
            return self.function.apply(*values)
        out = self.forward(*values)
        return out if self.single else out[0]


def dropout_seed(x: torch.Tensor, dropout_p: float) -> Optional[torch.Tensor]:
    """The seed an op's kernels regenerate its dropout mask from: int64 [1] drawn from PyTorch's generator
    of x's device (``torch.manual_seed`` reproduces the mask); None when ``dropout_p == 0``, which draws
    nothing and compiles no dropout code."""
    if dropout_p > 0:
        return torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
    return None


def as_rows(t: torch.Tensor, width: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``t`` as [rows, width], in ``dtype`` when given: a view whenever the leading dims merge (the kernels
    take any 2-D strides), a copy only for a dtype change (dY in another dtype than x)."""
    t2 = t if t.dim() == 2 else t.reshape(-1, width)
    return t2 if dtype is None or t2.dtype == dtype else t2.to(dtype)


def _as_op_grads(like: torch.Tensor, grads: Sequence) -> tuple:
    """A backward body's results as a custom op returns them: an empty [0] tensor for each None (distinct:
    a custom op's outputs may not alias one another). A body returns None for a gradient it was not asked
    for; the eager path drops those, so eager backward allocates nothing for them."""
    return tuple(like.new_empty(0) if g is None else g for g in grads)


def fake_grads(needs: Sequence[bool], like: torch.Tensor, *grads) -> tuple:
    """A backward fake's result: per gradient an empty tensor shaped as its spec (a tensor, or a
    ``(shape, dtype)`` pair) where ``needs`` says so, else an empty [0] one (what the real backward returns).

    Example:
        >>> fake_grads(needs, x, x, lora_A, ((n,), torch.float32))  # doctest: +SKIP
    """
    out = []
    for need, g in zip(needs, grads):
        shape, dtype = (g.shape, g.dtype) if torch.is_tensor(g) else g
        out.append(like.new_empty(shape, dtype=dtype) if need else like.new_empty(0))
    return tuple(out)


def _plain(t) -> bool:
    """A tensor eager mode runs as is (not a fake, functional or other subclass tensor)."""
    return type(t) is torch.Tensor or type(t) is torch.nn.Parameter


def declare(name: str, module_name: str, attr: str, **spec) -> Op:
    """Declare the op ``peftfast::<name>`` once per process (see :class:`Op` for ``spec``).

    With the repository root on ``sys.path`` an op file can also be imported as the top-level
    ``kernels.<op>`` (transformers probes for a ``kernels`` package). A second registration would
    replace the first with that copy's functions and globals, so such a copy reuses the op of
    ``peftfast.kernels.<op>`` (fetched by module name: the package attribute may be a function of the
    same name).

    Args:
        name: the op's name in the ``peftfast`` namespace.
        module_name: the declaring module's ``__name__``.
        attr: the attribute under which that module keeps the op.
        **spec: the keyword arguments of :class:`Op`.

    Returns:
        The :class:`Op`.
    """
    canonical = "peftfast.kernels." + module_name.rsplit(".", 1)[-1]
    if module_name != canonical:
        try:
            return getattr(importlib.import_module(canonical), attr)
        except ImportError:  # the directory used on its own, without the peftfast package
            pass
    return Op(name, **spec)
