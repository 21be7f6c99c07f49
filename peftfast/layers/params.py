"""LoRA on raw ``nn.Parameter`` weights (``LoraConfig.target_parameters``), above all MoE expert stacks.

Hugging Face PEFT's ``ParamWrapper`` semantics, key for key:

* a wrapper replaces the module that owns the parameter and keeps it as ``base_layer``; several targeted
  parameters of one module nest (the first in the module's registration order innermost), so the saved
  keys are ``...experts.base_layer.lora_A.weight`` (first parameter) and ``...experts.lora_A.weight``;
* a 3-D parameter ``[E, D1, D2]`` is read as ``[E, out, in]`` (``F.linear`` per expert, Mixtral/Qwen-MoE) or,
  when the owner sets ``is_transposed`` (gpt-oss), as ``[E, in, out]``; ``lora_A`` is ``[E*r, in]`` with
  expert ``e``'s rows at ``e*r:(e+1)*r`` and ``lora_B`` is ``[out, r*E]`` with expert ``e``'s columns at
  ``e::E`` (PEFT's layout, interleaved); a 2-D parameter ``[out, in]`` is one expert, ``B @ A``;
* the effective weight is ``W + scaling * delta`` with ``delta[e] = B_e @ A_e`` (``(B_e @ A_e)^T`` when
  transposed); merge adds it to the parameter, unmerge subtracts it;
* refused as PEFT refuses them: ``lora_dropout``, ``fan_in_fan_out``, ``lora_bias``, ``use_dora``, a
  parameter of the top-level module, a parameter of a layer that ``target_modules`` also wraps, adapters
  targeting different sets of parameters.

What differs from PEFT is only how the forward computes it. During the owner's forward, the owner's
attribute reads the parameter as a :class:`LoraWeight`, a tensor that *is* the base parameter plus the
low-rank factors. The ops an expert layer applies to its weight are answered without forming ``delta``:

* ``w[e]`` (an expert's slice), ``w[ids]`` (per-token gather), ``transpose``/``mT`` stay lazy;
* ``F.linear(x, w_e)``, ``x @ w_e`` (eager per-expert loops) add ``s * (x @ A_e^T) @ B_e^T`` for the
  routed tokens only;
* ``torch.bmm`` on a gathered ``w[ids]`` (transformers' ``batched_mm``) and ``grouped_mm`` /
  ``_grouped_mm`` / ``transformers.grouped_mm_fallback`` on the whole stack (``grouped_mm``) add
  :func:`peftfast.kernels.grouped_lora.grouped_lora`: each row's own expert, no dense delta;
* shape/dtype/device queries answer from the base parameter;
* any other op sees the materialized ``W + delta`` (PEFT's semantics, exact, just not cheaper).

So the routed-only path covers every experts implementation built from these ops (transformers' eager,
``batched_mm`` and ``grouped_mm`` forms, any family), and everything else is still right.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from ..config import ConfigError
from ..kernels.grouped_lora import expert_ids_from_offsets, grouped_lora
from .linear import AdapterLayer, init_lora_factors

__all__ = ["LoraParamWrapper", "LoraWeight", "find_parameter_targets", "build_parameter_wrappers"]


# --------------------------------------------------------------------------------------------------
# The lazy weight
# --------------------------------------------------------------------------------------------------

class _Term:
    """``scaling * lhs @ rhs`` ([..., D1, r] @ [..., r, D2]); ``ids`` set: row i's matrix is expert ids[i]'s.
    ``backend``: the wrapper's, for the grouped kernel calls this term leads to."""

    __slots__ = ("lhs", "rhs", "scaling", "ids", "backend")

    def __init__(self, lhs, rhs, scaling, ids=None, backend="auto"):
        self.lhs, self.rhs, self.scaling, self.ids, self.backend = lhs, rhs, scaling, ids, backend

    def transposed(self) -> "_Term":
        return _Term(self.rhs.mT, self.lhs.mT, self.scaling, self.ids, self.backend)

    def dense(self) -> torch.Tensor:
        lhs, rhs = (self.lhs, self.rhs) if self.ids is None else (self.lhs[self.ids], self.rhs[self.ids])
        return (lhs @ rhs) * self.scaling


def _metadata_funcs() -> set:
    props = ("shape", "dtype", "device", "ndim", "is_cuda", "is_cpu", "is_meta", "layout", "requires_grad",
             "is_leaf", "grad_fn", "is_sparse", "is_quantized", "is_nested", "itemsize", "nbytes", "names")
    methods = ("size", "dim", "ndimension", "stride", "numel", "nelement", "data_ptr", "is_contiguous",
               "is_floating_point", "is_complex", "element_size", "storage_offset", "get_device", "__len__")
    out = set()
    for name in props:
        attr = getattr(torch.Tensor, name, None)
        if attr is not None and hasattr(attr, "__get__"):
            out.add(attr.__get__)
    for name in methods:
        attr = getattr(torch.Tensor, name, None)
        if attr is not None:
            out.add(attr)
    return out


_METADATA = _metadata_funcs()
_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
_TRANSPOSES = {torch.transpose, torch.Tensor.transpose, torch.swapaxes, torch.Tensor.swapaxes, torch.swapdims,
               torch.Tensor.swapdims}
_GROUPED_MM_NAMES = {"grouped_mm", "_grouped_mm", "grouped_mm_fallback"}
# The grouped_mm functions met so far, by identity. Under torch.compile a function's ``__name__`` is not a
# constant to dynamo (an op packet's is a property), so a traced call is recognized by identity alone:
# torch's own at import, transformers' custom op when a wrapper is built (remember_grouped_mm_ops) or
# first recognized by name in an eager call. An unknown one under tracing takes the dense fallback.
_GROUPED_MM_FUNCS: list = [f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f]


def remember_grouped_mm_ops() -> None:
    """Add transformers' ``torch.ops.transformers.grouped_mm_fallback`` if it is registered by now."""
    op = getattr(torch.ops.transformers, "grouped_mm_fallback", None)
    if op is not None and not any(op is f for f in _GROUPED_MM_FUNCS):
        _GROUPED_MM_FUNCS.append(op)


def _is_grouped_mm(func) -> bool:
    if any(func is f for f in _GROUPED_MM_FUNCS):
        return True
    if torch.compiler.is_compiling():
        return False
    name = getattr(func, "__name__", "")
    if isinstance(name, str) and name.rpartition(".")[2] in _GROUPED_MM_NAMES:  # a qualified name too
        _GROUPED_MM_FUNCS.append(func)
        return True
    return False


class LoraWeight(torch.Tensor):
    """A parameter seen through its LoRA adapters: ``base + sum(scaling * lhs @ rhs)``, never formed
    unless an op needs the dense values.

    Its storage and metadata are the base tensor's; ``.base`` keeps the real (autograd-tracked) base and
    ``.terms`` the factors. Built by :class:`LoraParamWrapper` for the duration of one forward.
    """

    @staticmethod
    def __new__(cls, base: torch.Tensor, terms: list):
        self = torch.Tensor._make_subclass(cls, base.detach(), False)
        self._lora_base = base
        self._lora_terms = terms
        return self

    def __repr__(self, *args, **kwargs) -> str:  # noqa: D105 - values of the effective weight
        return f"LoraWeight({self.materialize()!r})"

    def materialize(self) -> torch.Tensor:
        """The dense effective weight ``base + sum(delta)`` in the base's dtype (PEFT's parametrization)."""
        base = self._lora_base
        out = base
        for term in self._lora_terms:
            out = out + term.dense().to(base.dtype)
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        out = _lazy_op(func, args, kwargs)
        if out is not NotImplemented:
            return out
        args, kwargs = tree_map(_dense, (args, kwargs))
        return func(*args, **kwargs)


def _dense(a):
    return a.materialize() if isinstance(a, LoraWeight) else a


def _lazy(w) -> bool:
    return isinstance(w, LoraWeight)


def _plain(*tensors) -> bool:
    return all(not isinstance(t, LoraWeight) for t in tensors)


def _lowrank(term: _Term, x: torch.Tensor, left: bool) -> torch.Tensor:
    """``x @ (s lhs rhs)`` (left=True) or ``(s lhs rhs) @ x``, in the wider of x's and the factors' dtypes."""
    ct = torch.promote_types(x.dtype, term.lhs.dtype)
    lhs, rhs, x = term.lhs.to(ct), term.rhs.to(ct), x.to(ct)
    return ((x @ lhs) @ rhs if left else lhs @ (rhs @ x)) * term.scaling


def _lazy_op(func, args, kwargs):
    """The result of ``func`` on a LoraWeight without forming its delta, or NotImplemented."""
    if func is torch.Tensor.__getitem__:
        w, idx = args
        return _index(w, idx) if _lazy(w) else NotImplemented
    if func in _TRANSPOSES or func in (torch.Tensor.mT.__get__, torch.Tensor.t, torch.t, torch.Tensor.T.__get__):
        return _transpose(func, args, kwargs)
    if func is F.linear:
        return _linear(*args, **kwargs)
    if func in _MATMULS or func is torch.Tensor.__rmatmul__:
        if kwargs:
            return NotImplemented
        a, b = args if func is not torch.Tensor.__rmatmul__ else (args[1], args[0])
        return _matmul(a, b, func in (torch.bmm, torch.Tensor.bmm))
    if _is_grouped_mm(func):
        return _grouped(func, args, kwargs)
    return NotImplemented


def _index(w: LoraWeight, idx):
    base = w._lora_base
    if base.dim() != 3 or any(t.ids is not None for t in w._lora_terms):
        return NotImplemented
    if isinstance(idx, torch.Tensor) and not _plain(idx):
        return NotImplemented
    scalar = isinstance(idx, int) or (isinstance(idx, torch.Tensor) and idx.dim() == 0 and not idx.is_floating_point()
                                      and idx.dtype != torch.bool)
    vector = isinstance(idx, torch.Tensor) and idx.dim() == 1 and idx.dtype in (torch.int32, torch.int64)
    if scalar:  # one expert's matrix: [D1, D2]
        return LoraWeight(base[idx], [_Term(t.lhs[idx], t.rhs[idx], t.scaling, None, t.backend)
                                      for t in w._lora_terms])
    if vector:  # one matrix per row: [S, D1, D2]; the factors stay per expert
        return LoraWeight(base[idx], [_Term(t.lhs, t.rhs, t.scaling, idx, t.backend) for t in w._lora_terms])
    return NotImplemented


def _transpose(func, args, kwargs):
    w = args[0]
    if not _lazy(w) or kwargs:
        return NotImplemented
    base = w._lora_base
    if func in _TRANSPOSES:
        if len(args) != 3:
            return NotImplemented
        d0, d1 = (d % base.dim() for d in args[1:])
        if {d0, d1} != {base.dim() - 2, base.dim() - 1}:
            return NotImplemented
    elif func in (torch.Tensor.t, torch.t, torch.Tensor.T.__get__) and base.dim() != 2:
        return NotImplemented
    return LoraWeight(base.mT, [t.transposed() for t in w._lora_terms])


def _linear(x, weight, bias=None):
    if not _lazy(weight) or not _plain(x, bias) or weight.dim() != 2:
        return NotImplemented
    y = F.linear(x, weight._lora_base, bias)
    for term in weight._lora_terms:  # x @ W^T: the transposed term on the right
        y = y + _lowrank(term.transposed(), x, left=True).to(y.dtype)
    return y


def _matmul(a, b, batched: bool):
    if _lazy(a) == _lazy(b):
        return NotImplemented
    w, x, left = (b, a, True) if _lazy(b) else (a, b, False)
    if not _plain(x):
        return NotImplemented
    base = w._lora_base
    y = torch.bmm(x, base) if batched and left else torch.bmm(base, x) if batched else (
        x @ base if left else base @ x)
    for term in w._lora_terms:
        if term.ids is None:
            lora = _lowrank(term, x, left)
        elif x.dim() == 3 and left and x.shape[1] == 1:  # bmm(x[S, 1, D1], w[ids]) (batched_mm, transposed)
            lora = grouped_lora(x[:, 0], term.lhs, term.rhs, term.ids, term.scaling, backend=term.backend).unsqueeze(1)
        elif x.dim() == 3 and not left and x.shape[2] == 1:  # bmm(w[ids], x[S, D2, 1]) (batched_mm)
            lora = grouped_lora(x[..., 0], term.rhs.mT, term.lhs.mT, term.ids, term.scaling,
                                backend=term.backend).unsqueeze(2)
        else:
            return NotImplemented
        y = y + lora.to(y.dtype)
    return y


def _grouped(func, args, kwargs):
    """``grouped_mm(x [S, D1], w [E, D1, D2], offs=...)``: the base op plus each row's expert's LoRA term."""
    kwargs = dict(kwargs)
    if len(args) > 3 or len(args) < 2:
        return NotImplemented
    x, w = args[0], args[1]
    offs = args[2] if len(args) == 3 else kwargs.get("offs")
    if (not _lazy(w) or w.dim() != 3 or offs is None or not _plain(x, offs) or x.dim() != 2
            or any(t.ids is not None for t in w._lora_terms) or kwargs.get("bias") is not None):
        return NotImplemented
    y = func(x, w._lora_base, *args[2:], **kwargs)
    ids = expert_ids_from_offsets(offs, x.shape[0])
    for term in w._lora_terms:
        y = y + grouped_lora(x, term.lhs, term.rhs, ids, term.scaling, backend=term.backend).to(y.dtype)
    return y


# --------------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------------

def _owner(module: nn.Module) -> nn.Module:
    while isinstance(module, LoraParamWrapper):
        module = module.base_layer
    return module


class LoraParamWrapper(AdapterLayer):
    """LoRA on one ``nn.Parameter`` of ``base_layer`` (PEFT's ``lora.ParamWrapper``); nests for several.

    Args:
        base_layer: the module owning the parameter (or another LoraParamWrapper around it).
        parameter_name: the attribute name on the owner, e.g. ``"gate_up_proj"``.
        backend: kernel backend of the grouped LoRA term.

    Example:
        >>> w = LoraParamWrapper(model.model.layers[0].mlp.experts, "down_proj")  # doctest: +SKIP
        >>> w.add_adapter("default", r=8, alpha=16)  # doctest: +SKIP
    """

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, parameter_name: str, backend: str = "auto"):
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        self.backend = backend
        self.active_adapters: list = []
        self.merged_adapters: list = []
        self.disabled = False
        self.training = bool(base_layer.training)
        param = self.get_param()
        if param.dim() == 3:
            self.num_experts = int(param.shape[0])
            # PEFT: [E, out, in] unless the owner declares [E, in, out] (is_transposed, gpt-oss).
            self.transposed = bool(getattr(_owner(base_layer), "is_transposed", False))
            d1, d2 = int(param.shape[1]), int(param.shape[2])
            self.in_features, self.out_features = (d1, d2) if self.transposed else (d2, d1)
        elif param.dim() == 2:
            self.num_experts, self.transposed = 1, False
            self.in_features, self.out_features = int(param.shape[1]), int(param.shape[0])
        else:
            raise ConfigError(f"target_parameters: {parameter_name!r} has {param.dim()} dimensions; LoRA on a "
                              "parameter needs a 2-D [out, in] or a 3-D [experts, ., .] one (as in PEFT)")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict = {}
        self.lora_alpha: dict = {}
        self.scaling: dict = {}

    def get_param(self) -> nn.Parameter:
        """The wrapped parameter, on the innermost (real) module (the registered one: never a LoraWeight
        left in the owner's ``__dict__`` by a traced forward that raised)."""
        owner = _owner(self.base_layer)
        param = owner._parameters.get(self.parameter_name)
        return param if param is not None else getattr(owner, self.parameter_name)

    @property
    def weight(self):
        return self.get_param()

    @property
    def bias(self):
        return None

    @property
    def adapter_names(self) -> list:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, r: int, alpha: float, *, use_rslora: bool = False, init: object = True) -> None:
        """Add adapter ``name``: ``lora_A [E*r, in]``, ``lora_B [out, r*E]`` (PEFT's shapes and init)."""
        if not isinstance(r, int) or r <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got r={r!r}")
        param = self.get_param()
        dtype = param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32
        a = nn.Linear(self.in_features, r * self.num_experts, bias=False, device=param.device, dtype=dtype)
        b = nn.Linear(r * self.num_experts, self.out_features, bias=False, device=param.device, dtype=dtype)
        init_lora_factors(a, b, init, r)
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name, None)

    def factors(self, name: str) -> tuple:
        """``(lhs, rhs, scaling)`` with ``delta = scaling * lhs @ rhs`` in the parameter's shape:
        ``[E, D1, r] @ [E, r, D2]`` for a 3-D parameter, ``[out, r] @ [r, in]`` for a 2-D one."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        s = self.scaling[name]
        if self.get_param().dim() == 2:
            return b, a, s
        e = self.num_experts
        a_e = a.reshape(e, -1, a.shape[-1])  # [E, r, in]: expert e's rows are e*r:(e+1)*r
        b_e = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # [E, out, r]: expert e's columns are e::E
        if self.transposed:  # [E, in, out]
            return a_e.transpose(1, 2), b_e.transpose(1, 2), s
        return b_e, a_e, s

    def delta_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scaling * lhs @ rhs`` in ``dtype``, the parameter's shape."""
        lhs, rhs, s = self.factors(name)
        return (lhs.to(dtype) @ rhs.to(dtype)) * s

    def _merge_dtype(self) -> torch.dtype:
        # fp32 at least (half-precision experts), float64 stays float64.
        return torch.promote_types(self.get_param().dtype, torch.float32)

    def forward(self, *args, **kwargs):
        owner = _owner(self.base_layer)
        if self._use_base_only():
            owner.__dict__.pop(self.parameter_name, None)  # see the traced branch below
            if self.disabled and self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        param = self.get_param()
        terms = [_Term(*self.factors(n), backend=self.backend) for n in self.active_adapters]
        # An instance attribute shadows the registered parameter for plain attribute reads (nn.Module looks in
        # _parameters only when normal lookup fails), while state_dict(), named_parameters() and the optimizer
        # still see the parameter itself. Removed again whatever the forward does.
        owner.__dict__[self.parameter_name] = LoraWeight(param, terms)
        if torch.compiler.is_compiling():
            # Dynamo cannot resume after a graph break inside try/finally, and the owner may break (transformers'
            # eager experts loop calls nonzero): the whole wrapper would then run uncompiled. Without the finally,
            # a traced forward that raises leaves the attribute; get_param ignores it and this wrapper's next
            # call replaces or removes it.
            out = self.base_layer(*args, **kwargs)
            owner.__dict__.pop(self.parameter_name, None)
            return out
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            owner.__dict__.pop(self.parameter_name, None)

    def merge(self, names: Optional[list] = None) -> None:
        names = [n for n in (names or self.active_adapters) if n not in self.merged_adapters and n in self.lora_A]
        if not names:
            return
        param = self.get_param()
        with torch.no_grad():
            w = param.data.to(self._merge_dtype())
            for name in names:
                w = w + self.delta_weight(name, w.dtype)
                self.merged_adapters.append(name)
            param.data.copy_(w.to(param.dtype))

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        param = self.get_param()
        with torch.no_grad():
            w = param.data.to(self._merge_dtype())
            while self.merged_adapters:
                w = w - self.delta_weight(self.merged_adapters.pop(), w.dtype)
            param.data.copy_(w.to(param.dtype))

    def _keep_original(self) -> None:
        if self.merged_adapters:
            return
        self.__dict__["_original"] = (self.get_param().detach().clone(), None)

    def _restore_original(self) -> bool:
        kept = self.__dict__.pop("_original", None)
        if kept is None or not self.merged_adapters:
            return False
        with torch.no_grad():
            self.get_param().copy_(kept[0])
        self.merged_adapters.clear()
        return True

    def __getattr__(self, name):
        # Code outside the experts module reads its attributes (num_experts, config, is_transposed): answer
        # from the wrapped module, as if it were still in place. Not the wrapped parameter: read from outside
        # the owner's forward it would be the base weight, silently without the adapter.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "base_layer" not in self._modules:
                raise
            wrapper = self
            while isinstance(wrapper, LoraParamWrapper):
                if name == wrapper.__dict__.get("parameter_name"):
                    raise AttributeError(
                        f"{name!r} is adapted by target_parameters; read through the wrapper it would be the base "
                        "weight without LoRA (the adapter applies inside the owner's forward). Use "
                        f"wrapper.get_param() for the base parameter, or merge() to fold the adapter in") from None
                wrapper = wrapper._modules["base_layer"]
            return getattr(self._modules["base_layer"], name)

    def extra_repr(self) -> str:
        return (f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, in={self.in_features}, "
                f"out={self.out_features}, adapters={self.adapter_names}, r={self.r}")


# --------------------------------------------------------------------------------------------------
# Matching and building (called by patching._patch inside its transaction)
# --------------------------------------------------------------------------------------------------

def _unwrapped_name(name: str) -> str:
    while ".base_layer" in name:
        prefix, _, suffix = name.rpartition(".base_layer")
        name = prefix + suffix
    return name


def find_parameter_targets(model: nn.Module, cfg) -> list:
    """``(owner module name, parameter name, full key)`` for every parameter ``cfg.target_parameters``
    names (PEFT's rule: the full key, or a dotted suffix of it), in model order and, within one module,
    in registration order (the nesting order PEFT uses)."""
    wanted = list(cfg.target_parameters or [])
    found = []
    for module_name, module in model.named_modules():
        if isinstance(module, LoraParamWrapper):
            continue
        if any(part in ("lora_A", "lora_B") for part in module_name.split(".")):
            continue
        owner_name = _unwrapped_name(module_name)
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{owner_name}.{pname}" if owner_name else pname
            if key in wanted or any(key.endswith("." + t) for t in wanted):
                found.append((module_name, pname, key))
    return found


def check_parameter_config(cfg) -> None:
    """PEFT's ParamWrapper refusals, as ConfigErrors naming the option."""
    bad = []
    if cfg.lora_dropout:
        bad.append(f"lora_dropout={cfg.lora_dropout} (dropout cannot be factored out of x @ (W + BA))")
    if cfg.fan_in_fan_out:
        bad.append("fan_in_fan_out=True")
    if cfg.lora_bias:
        bad.append("lora_bias=True")
    if cfg.use_dora:
        bad.append("use_dora=True")
    if bad:
        raise ConfigError(f"target_parameters does not work with {', '.join(bad)} (as in PEFT); set those to their "
                          "defaults, or target the layers with target_modules instead")


def build_parameter_wrappers(model: nn.Module, cfg, adapter_name: str, backend: str, module_targets: list,
                             other_configs: dict, pattern_value) -> tuple:
    """Create (without installing) the wrappers for ``cfg.target_parameters``.

    Args:
        model: the model being patched.
        cfg: the LoraConfig (``target_parameters`` non-empty).
        adapter_name: the new adapter.
        backend: the kernels' backend.
        module_targets: names that ``target_modules`` wraps in the same patch (may not overlap).
        other_configs: the adapters already on the model (they must target the same parameters).
        pattern_value: ``patching._pattern_value``, for rank_pattern / alpha_pattern by parameter key.

    Returns:
        ``(installs, undo, keys)``: ``(name, old module, new wrapper)`` to install in order, the steps that
        undo adapters added to existing wrappers, and the matched parameter keys.
    """
    check_parameter_config(cfg)
    remember_grouped_mm_ops()
    mine = set(cfg.target_parameters)
    for other_name, other in other_configs.items():
        theirs = getattr(other, "target_parameters", None)
        if theirs and set(theirs) != mine:
            raise ConfigError(
                f"all adapters that use target_parameters must target the same parameters (as in PEFT): adapter "
                f"{other_name!r} has {sorted(theirs)}, the new one {sorted(mine)}"
            )
    found = find_parameter_targets(model, cfg)
    installs, undo, keys = [], [], []
    current: dict = {}  # module name -> the module that will sit there after the installs so far
    for module_name, pname, key in found:
        if not module_name:
            raise ConfigError(f"target_parameters: {pname!r} belongs to the top-level module, which cannot be "
                              "wrapped (as in PEFT); target a parameter of a submodule")
        owner_name = _unwrapped_name(module_name)
        wrapped = [t for t in module_targets if t == owner_name or owner_name.startswith(t + ".")]
        live = current.get(owner_name, model.get_submodule(owner_name))
        if wrapped or (isinstance(live, AdapterLayer) and not isinstance(live, LoraParamWrapper)):
            raise ConfigError(
                f"target_parameters matches {key!r}, a parameter of {owner_name!r}, which target_modules also "
                "wraps; a layer is adapted one way (as in PEFT): drop it from target_modules (target_modules=[] "
                "targets no modules) or from target_parameters"
            )
        existing = live
        while isinstance(existing, LoraParamWrapper) and existing.parameter_name != pname:
            existing = existing.base_layer
        r = pattern_value(cfg.rank_pattern, key, cfg.r)
        alpha = pattern_value(cfg.alpha_pattern, key, cfg.lora_alpha)
        if isinstance(existing, LoraParamWrapper):  # a previous adapter wraps this parameter already
            existing.add_adapter(adapter_name, r, alpha, use_rslora=cfg.use_rslora, init=cfg.init_lora_weights)
            undo.append(lambda w=existing: w.delete_adapter(adapter_name))
        else:
            wrapper = LoraParamWrapper(live, pname, backend=backend)
            wrapper.add_adapter(adapter_name, r, alpha, use_rslora=cfg.use_rslora, init=cfg.init_lora_weights)
            installs.append((owner_name, live, wrapper))
            current[owner_name] = wrapper
        keys.append(key)
    return installs, undo, keys


def warn_unmatched(cfg, keys: list, module_targets: list) -> None:
    """PEFT's outcome when target_parameters matches nothing: an error if no module matched either, else a
    warning (the adapter trains only the modules)."""
    if keys:
        return
    if not module_targets:
        raise ConfigError(
            f"target_parameters={cfg.target_parameters} matched no parameter of this model and target_modules "
            "matched no module; give parameter names as they appear in model.named_parameters() (a full name or "
            "a dotted suffix, e.g. 'experts.gate_up_proj')"
        )
    warnings.warn(f"target_parameters={cfg.target_parameters} matched no parameter; only the target_modules are "
                  "adapted", RuntimeWarning, stacklevel=4)
