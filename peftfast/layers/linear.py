"""Thin nn.Module wrappers that replace target layers and call one ``peftfast.kernels`` op each.

Each wrapper keeps the original module as ``base_layer`` (``unpatch`` puts it back untouched) and holds
its adapters in dicts keyed by adapter name, with the attribute names Hugging Face PEFT uses
(``lora_A.<name>.weight``, ``lora_B.<name>.weight``, ``lora_magnitude_vector.<name>.weight``,
``ia3_l.<name>``), so state-dict keys map one to one onto PEFT's checkpoints.

Base weights are read from ``base_layer`` at every call through ``peftfast.layers.base_weight``: FSDP and ZeRO
swap storage. What kind of base a weight is (dense, transposed Conv1D, 4-bit, 8-bit, a ZeRO-3 shard) is
decided once per weight object and revalidated by identity (:meth:`AdapterLayer._kernel_weight`); a
dense weight is then the parameter itself, so a swap of its storage is followed with no new decision.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Optional

import torch
import torch.nn as nn

from .. import kernels
from .base_weight import (
    Conv1D, _bnb_classes, base_4bit_forward_cpu, dense_base_weight, is_zero3_partitioned, kernel_weight,
    stores_transposed, write_dense_base_weight,
)
from ..checkpoint_keys import check_param_names
from ..config import ConfigError
from ..kernels.lora import lora_linear_backend, lora_linear_signature, run_lora_linear
from ..kernels.nf4 import is_4bit_weight
from ..lora_init import init_from_base, is_base_init


def is_linear_like(module: nn.Module) -> bool:
    """Layers the wrappers support: nn.Linear (incl. bitsandbytes 4/8-bit) and transformers' Conv1D."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def layer_features(module: nn.Module) -> tuple:
    """(in_features, out_features) of a supported base layer."""
    if bool(Conv1D) and isinstance(module, Conv1D):
        k, n = module.weight.shape
        return int(k), int(n)
    if isinstance(module, nn.Embedding):
        return int(module.num_embeddings), int(module.embedding_dim)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return int(module.in_channels), int(module.out_channels)
    if isinstance(module, nn.MultiheadAttention):  # its in-projection: [3E, E], as PEFT counts it
        return int(module.embed_dim), 3 * int(module.embed_dim)
    return int(module.in_features), int(module.out_features)


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """fp32 for half-precision and quantized bases (PEFT's autocast_adapter_dtype), else the base dtype."""
    w = base.weight
    if w.dtype in (torch.float32, torch.float64):
        return w.dtype
    return torch.float32


class AdapterLayer(nn.Module):
    """Common state of the wrappers: the base layer, active adapters, merged adapters, the on/off switch."""

    # The per-adapter dict attributes, each a row of peftfast.checkpoint_keys.ADAPTER_PARAMS (which says how
    # PEFT's checkpoints name them); checked when a subclass is defined.
    adapter_param_names: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_param_names(cls.__name__, cls.adapter_param_names)

    def __init__(self, base_layer: nn.Module, backend: str = "auto"):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_features(base_layer)
        self.backend = backend
        self.active_adapters: list = []
        self.merged_adapters: list = []
        self.disabled = False
        # Follow the base layer's train/eval mode: a wrapper put into an eval model (load_adapter for
        # inference) must not apply dropout.
        self.training = bool(base_layer.training)

    @property
    def weight(self):
        """The base layer's weight, as PEFT's tuner layers expose it (T5 reads ``self.wo.weight.dtype``)."""
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def adapter_names(self) -> list:
        return list(getattr(self, self.adapter_param_names[0]).keys())

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def set_active(self, names: list, trainable: bool = True) -> None:
        """Activate the adapters in ``names`` present here; active ones train, the others are frozen."""
        self.active_adapters = [n for n in names if n in self.adapter_names]
        for attr in self.adapter_param_names:
            for name, holder in getattr(self, attr).items():
                for p in ([holder] if isinstance(holder, nn.Parameter) else holder.parameters()):
                    p.requires_grad_(trainable and name in self.active_adapters)

    def delete_adapter(self, name: str) -> None:
        for attr in self.adapter_param_names:
            holder = getattr(self, attr)
            if name in holder:
                del holder[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def _use_base_only(self) -> bool:
        return self.disabled or not self.active_adapters or self.merged

    def _keep_original(self) -> None:
        """Copy the dense base weight (and bias) before a merge, so :meth:`_restore_original` can put it back
        exactly (``w + d - d`` in floating point is not ``w``). A layer already merged keeps what it has (its
        weight is no longer the original)."""
        if self.merged_adapters:
            return
        w = self.base_layer.weight
        if type(w) not in (nn.Parameter, torch.Tensor):  # bitsandbytes 4-/8-bit: requantized anyway
            raise ConfigError(f"merge(keep_original=True) keeps dense weights only; this layer's base weight is a "
                             f"{type(w).__name__} (quantized), whose merge requantizes and cannot be undone exactly")
        bias = self.base_layer.bias
        self.__dict__["_original"] = (w.detach().clone(), None if bias is None else bias.detach().clone())

    def _restore_original(self) -> bool:
        """Unmerge by putting back the weight kept by :meth:`_keep_original`; False when none was kept."""
        kept = self.__dict__.pop("_original", None)
        if kept is None or not self.merged_adapters:
            return False
        with torch.no_grad():
            self.base_layer.weight.copy_(kept[0])
            if kept[1] is not None:
                self.base_layer.bias.copy_(kept[1])
        self.merged_adapters.clear()
        getattr(self, "_dora_norm_cache", {}).clear()
        return True

    def _kernel_weight(self):
        """:func:`base_weight.kernel_weight` of the base layer, and whether it is a 4-bit weight.

        The decision (dense / transposed dense / 4-bit / anything else) is kept per weight *object* (a
        weak reference, so a weight an engine frees is not kept alive) and reused while ``base_layer.weight``
        is that same object and not ZeRO-3-partitioned. The answer is the parameter itself (or its
        ``.t()``), taken fresh each call, so storage swapped in place (``.data``) is followed; a 4-bit
        ``Params4bit`` is read by ``quant4bit_view`` at each call, which follows bitsandbytes' in-place CPU
        repack and a swapped quant state; a new parameter object (FSDP's unsharded view, a reload) is
        decided anew; 8-bit bases, ZeRO-3 shards and a 4-bit state recovered around an FSDP-swapped tensor
        always take the full path.
        """
        base = self.base_layer
        w = base.weight
        hit = self.__dict__.get("_weight_kind")
        if hit is not None and hit[0]() is w and not hasattr(w, "ds_id"):  # (ZeRO-3 partitions in place)
            if hit[1] == "dense":
                return w, False
            if hit[1] == "4bit":
                return w, True
            if hit[1] == "dense_t":
                return w.t(), False
        view = kernel_weight(base)
        four_bit = is_4bit_weight(view)
        if view is None:
            kind = "other"
        elif four_bit:
            kind = "4bit" if view is w else "other"  # not a Params4bit rebuilt around an FSDP-swapped tensor
        elif view is w:
            kind = "dense"
        elif stores_transposed(base):
            kind = "dense_t"
        else:
            kind = "other"
        try:
            self.__dict__["_weight_kind"] = (weakref.ref(w), kind)
        except TypeError:  # an object without weak references: decide every call
            pass
        return view, four_bit

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and self.merged:
            self.unmerge()
        if x.device.type == "cpu" and isinstance(self.base_layer, _bnb_classes()[0]):
            return base_4bit_forward_cpu(self.base_layer, x)
        return self.base_layer(x)


def _with_lora_bias(bias: Optional[torch.Tensor], lora_b_bias: torch.Tensor, scaling: float,
                    x: torch.Tensor) -> torch.Tensor:
    """``bias + scaling * lora_B.bias``: PEFT scales lora_B's whole output, its bias included, so the
    LoRA bias folds into the base bias the GEMM epilogue adds already (the fused path stays one GEMM,
    and the kernel's dbias is lora_B.bias's gradient up to the scaling)."""
    term = (lora_b_bias * scaling).to(x.dtype if x.is_floating_point() else lora_b_bias.dtype)
    return term if bias is None else bias.to(term.dtype) + term


def init_lora_factors(a: nn.Module, b: nn.Module, init: object, r: int) -> None:
    """PEFT's ``init_lora_weights`` for a fresh (A, B) pair, whatever their layer type (Linear, Conv):
    ``True`` Kaiming-uniform A and zero B, ``"gaussian"`` N(0, 1/r) A and zero B (either way the adapter
    starts as a no-op; a B bias starts at zero too), ``False`` the layers' own random init for both (B
    non-zero, so the adapter is not a no-op). Other values (PiSSA, OLoRA, LoftQ) are set from the base
    weight afterwards (``peftfast.lora_init``)."""
    with torch.no_grad():
        if init is True:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        elif init == "gaussian":
            nn.init.normal_(a.weight, std=1.0 / r)
            nn.init.zeros_(b.weight)
        if init is not False and b.bias is not None:
            nn.init.zeros_(b.bias)


class LoraLayer(AdapterLayer):
    """LoRA / rsLoRA / DoRA over a linear-like base layer; several adapters, the active ones summed."""

    adapter_param_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, backend: str = "auto"):
        super().__init__(base_layer, backend)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict = {}
        self.lora_alpha: dict = {}
        self.scaling: dict = {}
        self.lora_dropout_p: dict = {}
        self._dora_norm_cache: dict = {}

    @property
    def adapter_names(self) -> list:
        return list(self.lora_A.keys())

    def add_adapter(
        self, name: str, r: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
        use_dora: bool = False, init: object = True, lora_bias: bool = False, loftq_config: Optional[dict] = None,
    ) -> None:
        if r <= 0:
            raise ConfigError(f"LoRA rank must be positive, got r={r}")
        if lora_bias and use_dora:
            raise ConfigError("lora_bias=True is not supported with DoRA (as in PEFT); set use_dora=False")
        if lora_bias and self.base_layer.bias is None:
            warnings.warn(
                f"lora_bias=True on a {type(self.base_layer).__name__} without a bias: it trains, but merging this "
                "adapter will be impossible (PEFT's rule)", stacklevel=3,
            )
        base_w = self.base_layer.weight
        device = base_w.device
        dtype = adapter_dtype(self.base_layer)
        a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        b = nn.Linear(r, self.out_features, bias=bool(lora_bias), device=device, dtype=dtype)
        init_lora_factors(a, b, init, r)
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout_p[name] = float(dropout)
        if is_base_init(init):  # PiSSA / OLoRA / LoftQ: A and B from the base weight, which changes
            init_from_base(self, name, init, loftq_config)
        if use_dora:
            mag = _Magnitude(self.out_features, device=device, dtype=dtype)
            with torch.no_grad():
                w = dense_base_weight(self.base_layer, torch.float32)
                mag.weight.copy_(kernels.dora_weight_norm(w, a.weight.float(), b.weight.float(), self.scaling[name]))
            self.lora_magnitude_vector[name] = mag

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_dropout_p, self._dora_norm_cache,
                  self.__dict__.get("_lora_backend", {})):
            d.pop(name, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._use_base_only():
            return self._base_forward(x)
        base = self.base_layer
        weight, four_bit = self._kernel_weight()
        bias = base.bias
        result = None
        if weight is None:  # the kernels cannot read this base (8-bit): let it compute its own output
            result = base(x)
        compute_dtype = getattr(base, "compute_dtype", None) if four_bit else None
        x_in = x.to(compute_dtype) if (compute_dtype is not None and x.dtype != compute_dtype
                                       and x.is_floating_point()) else x
        for name in self.active_adapters:
            lora_b = self.lora_B[name]
            a, b = self.lora_A[name].weight, lora_b.weight
            s, p = self.scaling[name], self.lora_dropout_p[name]
            if name in self.lora_magnitude_vector:
                if weight is None:
                    if is_zero3_partitioned(base.weight):
                        raise NotImplementedError(
                            "DoRA under DeepSpeed ZeRO-3 is not supported by peftfast (the weight norm needs the "
                            "whole base weight); use ZeRO-2, FSDP2, or LoRA without use_dora"
                        )
                    w_dense = dense_base_weight(base, x.dtype)
                else:
                    w_dense = weight
                result = kernels.dora_linear(
                    x_in, w_dense, a, b, s, self.lora_magnitude_vector[name].weight, bias=bias,
                    base_output=result, dropout_p=p, training=self.training, backend=self.backend,
                )
            elif result is None:
                lb = lora_b.bias
                result = self._lora_linear(name, x_in, weight, a, b, s,
                                           bias if lb is None else _with_lora_bias(bias, lb, s, x_in), p)
            else:
                lb = lora_b.bias
                result = result + self._lora_linear(
                    name, x_in, None, a, b, s, None if lb is None else _with_lora_bias(None, lb, s, x_in), p,
                ).to(result.dtype)
        # (a cast to the same dtype is a no-op that still costs a dispatch per layer and token)
        return result if result.dtype == x.dtype else result.to(x.dtype)

    def _lora_linear(self, name: str, x: torch.Tensor, weight, a: torch.Tensor, b: torch.Tensor, scaling: float,
                     bias: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
        """``kernels.lora_linear`` for adapter ``name``, its operand checks and backend choice made once per
        :func:`kernels.lora.lora_linear_signature` (the layer's parameters repeat it at every call; a
        ``.to()``, a new weight object, a grad-mode, training or environment change makes a new one)."""
        if torch.compiler.is_compiling():  # the tracer specializes on all of this once per graph anyway
            return kernels.lora_linear(x, weight, a, b, scaling, bias=bias, dropout_p=dropout_p,
                                       training=self.training, backend=self.backend)
        p = dropout_p if self.training else 0.0
        sig = lora_linear_signature(x, weight, a, b, bias, p, self.backend)
        memo = self.__dict__.setdefault("_lora_backend", {})
        hit = memo.get(name)
        if hit is not None and hit[0] == sig:
            chosen = hit[1]
        else:
            chosen = lora_linear_backend(x, weight, a, b, bias=bias, dropout_p=p, backend=self.backend)
            memo[name] = (sig, chosen)
        return run_lora_linear(chosen, x, weight, a, b, scaling, bias=bias, dropout_p=p, backend=self.backend)

    def _with_lora_bias(self, bias: Optional[torch.Tensor], name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``bias + scaling * lora_B.bias`` for adapter ``name`` (see :func:`_with_lora_bias`)."""
        lora_b = self.lora_B[name].bias
        return bias if lora_b is None else _with_lora_bias(bias, lora_b, self.scaling[name], x)

    def _merge_lora_bias(self, name: str, sign: float) -> None:
        lora_b = self.lora_B[name].bias
        if lora_b is None:
            return
        bias = self.base_layer.bias
        bias.data.copy_((bias.float() + sign * self.scaling[name] * lora_b.float()).to(bias.dtype))

    def _check_mergeable(self, names: list) -> None:
        if self.base_layer.bias is None and any(self.lora_B[n].bias is not None for n in names):
            raise ConfigError(
                "cannot merge a LoRA adapter with lora_bias=True into a layer without a bias (as in PEFT); keep "
                "it unmerged, or train it with lora_bias=False"
            )

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` as a dense [N, K] fp32 tensor."""
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        return (b @ a) * self.scaling[name]

    def merge(self, names: Optional[list] = None) -> None:
        names = [n for n in (names or self.active_adapters) if n not in self.merged_adapters and n in self.lora_A]
        if not names:
            return
        self._check_mergeable(names)
        with torch.no_grad():
            w = dense_base_weight(self.base_layer, torch.float32)
            orig_dtype = w.dtype
            for name in names:
                delta = self.delta_weight(name)
                self._merge_lora_bias(name, 1.0)
                if name in self.lora_magnitude_vector:
                    norm = torch.linalg.norm(w + delta, dim=1)
                    factor = self.lora_magnitude_vector[name].weight.float() / norm
                    self._dora_norm_cache[name] = norm
                    w = factor.view(-1, 1) * (w + delta)
                else:
                    w = w + delta
                self.merged_adapters.append(name)
            write_dense_base_weight(self.base_layer, w.to(orig_dtype))

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        with torch.no_grad():
            w = dense_base_weight(self.base_layer, torch.float32)
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                delta = self.delta_weight(name)
                self._merge_lora_bias(name, -1.0)
                if name in self.lora_magnitude_vector:
                    norm = self._dora_norm_cache.pop(name)
                    factor = self.lora_magnitude_vector[name].weight.float() / norm
                    w = w / factor.view(-1, 1) - delta
                else:
                    w = w - delta
            write_dense_base_weight(self.base_layer, w)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={self.adapter_names}, r={self.r}"


class _Magnitude(nn.Module):
    """DoRA's per-output-row magnitude; a module so the state-dict key ends in ``.weight`` like PEFT's."""

    def __init__(self, n: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, device=device, dtype=dtype))


class IA3Layer(AdapterLayer):
    """IA3 over a linear-like base: output scaling, or input scaling for feed-forward layers."""

    adapter_param_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, feedforward: bool, backend: str = "auto"):
        super().__init__(base_layer, backend)
        self.is_feedforward = feedforward
        self.ia3_l = nn.ParameterDict()

    @property
    def adapter_names(self) -> list:
        return list(self.ia3_l.keys())

    def add_adapter(self, name: str, init: bool = True) -> None:
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        device = self.base_layer.weight.device
        value = torch.ones(shape) if init else torch.randn(shape)
        self.ia3_l[name] = nn.Parameter(value.to(device=device, dtype=adapter_dtype(self.base_layer)))

    def _scale(self) -> torch.Tensor:
        scale = None
        for name in self.active_adapters:
            scale = self.ia3_l[name] if scale is None else scale * self.ia3_l[name]
        return scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._use_base_only():
            return self._base_forward(x)
        base = self.base_layer
        scale = self._scale()
        weight = kernel_weight(base)
        if weight is None:  # 8-bit base: scale around the base module's own matmul
            if self.is_feedforward:
                return base((x * scale.flatten()).to(x.dtype))
            out = base(x)
            return (out * scale.flatten()).to(out.dtype)
        return kernels.ia3_linear(
            x, weight, scale, feedforward=self.is_feedforward, bias=base.bias, backend=self.backend
        ).to(x.dtype)

    def merge(self, names: Optional[list] = None) -> None:
        names = [n for n in (names or self.active_adapters) if n not in self.merged_adapters and n in self.ia3_l]
        if not names:
            return
        with torch.no_grad():
            w = dense_base_weight(self.base_layer, torch.float32)
            bias = self.base_layer.bias
            for name in names:
                l = self.ia3_l[name].float()
                w = w * (l.view(1, -1) if self.is_feedforward else l.view(-1, 1))
                if bias is not None and not self.is_feedforward:
                    bias.data.copy_((bias.float() * l.flatten()).to(bias.dtype))
                self.merged_adapters.append(name)
            write_dense_base_weight(self.base_layer, w)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        with torch.no_grad():
            w = dense_base_weight(self.base_layer, torch.float32)
            bias = self.base_layer.bias
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                l = self.ia3_l[name].float() + 1e-8  # PEFT divides by l + 1e-8
                w = w / (l.view(1, -1) if self.is_feedforward else l.view(-1, 1))
                if bias is not None and not self.is_feedforward:
                    bias.data.copy_((bias.float() / l.flatten()).to(bias.dtype))
            write_dense_base_weight(self.base_layer, w)


class ModulesToSave(nn.Module):
    """A trainable copy of a whole module (e.g. a classification head), per adapter, as PEFT keeps it."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list = []
        self.disabled = False

    @property
    def adapter_names(self) -> list:
        return list(self.modules_to_save.keys())

    def add_adapter(self, name: str) -> None:
        import copy

        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def set_active(self, names: list, trainable: bool = True) -> None:
        present = [n for n in names if n in self.modules_to_save]
        self.active_adapters = present[:1]
        for name, mod in self.modules_to_save.items():
            for p in mod.parameters():
                p.requires_grad_(trainable and name in self.active_adapters)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def forward(self, *args, **kwargs):
        if self.disabled or not self.active_adapters:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapters[0]](*args, **kwargs)

    def __getattr__(self, name):
        # Code outside the model (generation utils, heads' users) reads attributes such as .weight or
        # .out_features of the module it knows; answer from the module in use.
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self._modules
            if "original_module" not in modules:
                raise
            if modules["modules_to_save"] is not None and self.__dict__.get("active_adapters"):
                return getattr(modules["modules_to_save"][self.__dict__["active_adapters"][0]], name)
            return getattr(modules["original_module"], name)
