"""LoRA on ``nn.MultiheadAttention`` (reference path, PEFT's layout).

torch's attention reads ``in_proj_weight`` (a bare Parameter, [3E, E] for q, k, v) and ``out_proj.weight``
directly; it never calls a Linear's forward. So, as PEFT does, LoRA here changes those *weights*:

    W_in'  = W_in  + s * B_in  @ A_in       (lora_A [r, E], lora_B [3E, r] on the wrapper)
    W_out' = W_out + s * B_out @ A_out      (a LoraLayer at ``base_layer.out_proj``)

and the attention runs on them. PEFT swaps the merged weights in and out around every call; here they
are passed to the base module with ``torch.func.functional_call`` (nothing on the module changes, and
the gradients reach A and B through the sums). State-dict keys are PEFT's: ``<mha>.lora_A.<name>.weight``,
``<mha>.base_layer.out_proj.lora_A.<name>.weight``, ``<mha>.base_layer.in_proj_weight``.

As in PEFT: query, key and value must share the embedding size (``kdim == vdim == embed_dim``), DoRA is
not available, and ``lora_dropout`` cannot apply (there is no input to drop out before a weight sum;
peftfast warns). ``lora_bias`` is refused: PEFT keeps an in_proj LoRA bias that nothing reads.

PEFT 0.21 adds the out_proj update twice (``W_out + 2 s B A``, huggingface/peft#3774: its merge
writes the sum and then calls the out_proj layer's own merge); peftfast adds it once, as LoRA is defined.
An MHA adapter trained with such a PEFT gives the same outputs here after doubling its out_proj ``lora_B``.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
from torch.func import functional_call

from ..config import ConfigError
from .linear import AdapterLayer, LoraLayer, adapter_dtype, init_lora_factors

OUT_PROJ = "out_proj"


def is_mha(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention)


def bare_out_projections(model: nn.Module, targets: list) -> list:
    """Targets that are the ``out_proj`` of an ``nn.MultiheadAttention`` not itself targeted: torch's
    attention never calls that layer's forward, so a LoRA there would train nothing (PEFT warns of this
    in its docs and applies it anyway)."""
    chosen = set(targets)
    bad = []
    for name in targets:
        parent, _, attr = name.rpartition(".")
        if attr == OUT_PROJ and parent not in chosen and is_mha(model.get_submodule(parent) if parent else model):
            bad.append(name)
    return bad


class LoraMultiheadAttention(AdapterLayer):
    """LoRA over an ``nn.MultiheadAttention``: its in-projection here, its out-projection in a
    :class:`~peftfast.layers.LoraLayer` placed at ``base_layer.out_proj`` when the model is patched.

    Example:
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
        >>> layer = LoraMultiheadAttention(mha)
        >>> layer.add_adapter("default", r=2, alpha=4); layer.set_active(["default"])
        >>> tuple(layer.lora_B["default"].weight.shape)
        (24, 2)
    """

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.MultiheadAttention, backend: str = "auto"):
        if not base_layer._qkv_same_embed_dim:
            raise ConfigError(
                f"LoRA on nn.MultiheadAttention needs query, key and value of the same size (kdim={base_layer.kdim}, "
                f"vdim={base_layer.vdim}, embed_dim={base_layer.embed_dim}): PEFT supports only that case too; "
                "exclude this module from target_modules"
            )
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise ConfigError(f"LoRA on nn.MultiheadAttention needs its out_proj to be an nn.Linear, got "
                             f"{type(base_layer.out_proj).__name__}; exclude this module from target_modules")
        super().__init__(base_layer, backend)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict = {}
        self.lora_alpha: dict = {}
        self.scaling: dict = {}
        # Not a submodule of the wrapper: it lives at base_layer.out_proj once installed (PEFT's keys), and
        # registering it here as well would put its parameters in the state dict twice.
        self.__dict__["out_proj_lora"] = LoraLayer(base_layer.out_proj, backend=backend)

    def nested_installs(self, name: str) -> list:
        """What ``patch`` installs besides this wrapper: (module path, original module, wrapper)."""
        return [(f"{name}.base_layer.{OUT_PROJ}", self.out_proj_lora.base_layer, self.out_proj_lora)]

    def __getattr__(self, name: str):
        # Code that holds the attention module reads its settings (batch_first, embed_dim, num_heads, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "base_layer" not in self._modules or name.startswith("_") and name != "_qkv_same_embed_dim":
                raise
            return getattr(self._modules["base_layer"], name)

    def add_adapter(self, name: str, r: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
                    use_dora: bool = False, init: object = True, lora_bias: bool = False) -> None:
        if r <= 0:
            raise ConfigError(f"LoRA rank must be positive, got r={r}")
        if use_dora:
            raise ConfigError("DoRA on nn.MultiheadAttention is not supported (PEFT refuses it too); set use_dora=False "
                             "or exclude this module from target_modules")
        if lora_bias:
            raise ConfigError(
                "lora_bias=True on nn.MultiheadAttention is not supported: PEFT gives its in-projection a LoRA bias "
                "that nothing reads; set lora_bias=False or exclude this module from target_modules"
            )
        if dropout:
            warnings.warn(
                f"lora_dropout={dropout} does not apply to nn.MultiheadAttention: its LoRA changes the projection "
                "weights torch's attention reads, with no input to drop out (PEFT ignores it there too)",
                UserWarning, stacklevel=3,
            )
        w = self.base_layer.in_proj_weight
        kw = dict(device=w.device, dtype=adapter_dtype(self.out_proj_lora.base_layer))
        a = nn.Linear(self.in_features, r, bias=False, **kw)
        b = nn.Linear(r, self.out_features, bias=False, **kw)
        init_lora_factors(a, b, init, r)
        self.out_proj_lora.add_adapter(name, r, alpha, use_rslora=use_rslora, init=init)
        self.lora_A[name], self.lora_B[name] = a, b
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def set_active(self, names: list, trainable: bool = True) -> None:
        super().set_active(names, trainable)
        self.out_proj_lora.set_active(names, trainable)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.out_proj_lora.delete_adapter(name)
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B @ A`` for the in-projection, [3E, E] fp32."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    def _adapted(self, weight: torch.Tensor, layer, names: list) -> torch.Tensor:
        """``weight + sum_names s * B @ A`` in the weight's dtype, differentiable in A and B."""
        out = weight
        for name in names:
            # [3E, r] @ [r, E] -> [3E, E] (or [E, r] @ [r, E] for out_proj)
            delta = (layer.lora_B[name].weight @ layer.lora_A[name].weight) * layer.scaling[name]
            out = out + delta.to(weight.dtype)
        return out

    def forward(self, query: torch.Tensor, *args, **kwargs):
        if self._use_base_only():
            if self.disabled and self.merged and not self._restore_original():
                self.unmerge()
            return self.base_layer(query, *args, **kwargs)
        base, out_lora = self.base_layer, self.out_proj_lora
        weights = {"in_proj_weight": self._adapted(base.in_proj_weight, self, self.active_adapters)}
        if not out_lora.merged:
            out_names = [n for n in self.active_adapters if n in out_lora.lora_A]
            # installed (patch): the LoraLayer sits at out_proj; a bare wrapper still has the plain Linear
            path = f"{OUT_PROJ}.base_layer.weight" if base.out_proj is out_lora else f"{OUT_PROJ}.weight"
            weights[path] = self._adapted(out_lora.base_layer.weight, out_lora, out_names)
        return functional_call(base, weights, (query,) + args, kwargs, strict=False)

    # merge / unmerge move both projections, so the base module's own forward (used once merged, or
    # with adapters disabled) always sees a consistent pair
    def merge(self, names: Optional[list] = None) -> None:
        names = [n for n in (names or self.active_adapters) if n not in self.merged_adapters and n in self.lora_A]
        if not names:
            return
        with torch.no_grad():
            w = self.base_layer.in_proj_weight
            for name in names:
                w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
                self.merged_adapters.append(name)
        self.out_proj_lora.merge(names)

    def unmerge(self) -> None:
        with torch.no_grad():
            w = self.base_layer.in_proj_weight
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                w.copy_((w.float() - self.delta_weight(name)).to(w.dtype))
        if not self.out_proj_lora._restore_original():
            self.out_proj_lora.unmerge()

    def _keep_original(self) -> None:
        if self.merged_adapters:
            return
        self.__dict__["_original"] = self.base_layer.in_proj_weight.detach().clone()

    def _restore_original(self) -> bool:
        kept = self.__dict__.pop("_original", None)
        if kept is None or not self.merged_adapters:
            return False
        with torch.no_grad():
            self.base_layer.in_proj_weight.copy_(kept)
        self.merged_adapters.clear()
        if not self.out_proj_lora._restore_original():
            self.out_proj_lora.unmerge()
        return True

    def extra_repr(self) -> str:
        return f"embed_dim={self.in_features}, adapters={self.adapter_names}, r={self.r}"
