"""LoRA on ``nn.Embedding`` and on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (reference path, PEFT's layout).

* Embedding: ``y = E[x] + scaling * A^T[x] @ B^T`` with ``lora_embedding_A`` [r, num_embeddings] and
  ``lora_embedding_B`` [dim, r] (parameters, not modules: PEFT's keys ``...lora_embedding_A``). A
  starts at zero and B normal, the reverse of linear LoRA, so the lookup of A is what learns first.
* Convolution: ``lora_A`` is a conv like the base (same kernel, stride and padding, r output
  channels), ``lora_B`` a 1x1 conv to the output channels; ``y = conv(x) + scaling * B(A(dropout(x)))``.

These layers are small next to the linear projections (patch embeddings, token embeddings, UNet
convs), so they run as PyTorch ops; the fused kernels are for the linear layers.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import AdapterLayer, adapter_dtype

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_lora_extra(module: nn.Module) -> bool:
    """Layers LoRA wraps besides the linear ones."""
    return isinstance(module, (nn.Embedding,) + CONV_TYPES)


def _check_options(kind: str, use_dora: bool) -> None:
    if use_dora:
        raise ValueError(f"DoRA on {kind} layers is not supported by peftfast; leave {kind} layers out of target_modules")


class LoraEmbedding(AdapterLayer):
    """LoRA over an ``nn.Embedding``."""

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding, backend: str = "auto"):
        super().__init__(base_layer, backend)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.r: dict = {}
        self.lora_alpha: dict = {}
        self.scaling: dict = {}

    def add_adapter(self, name: str, r: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
                    use_dora: bool = False, init: object = True, lora_bias: bool = False) -> None:
        _check_options("embedding", use_dora)
        if lora_bias:
            raise ValueError(
                "lora_bias=True is not supported on nn.Embedding (PEFT refuses it too); set lora_bias=False or leave "
                "embeddings out of target_modules"
            )
        base = self.base_layer
        kw = dict(device=base.weight.device, dtype=adapter_dtype(base))
        a = torch.randn(r, base.num_embeddings, **kw)
        b = torch.randn(base.embedding_dim, r, **kw)
        if init is not False:  # PEFT: A zero, B normal for every truthy init
            nn.init.zeros_(a)
            nn.init.normal_(b)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name, None)

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._use_base_only():
            return self._base_forward(x)
        result = self.base_layer(x)
        for name in self.active_adapters:
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            # [..., r] @ [r, dim] -> [..., dim]
            result = result + (self._lookup(x, a.t()) @ b.t()) * self.scaling[name]
        return result.to(self.base_layer.weight.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """[num_embeddings, dim] fp32."""
        return (self.lora_embedding_B[name].float() @ self.lora_embedding_A[name].float()).t() * self.scaling[name]

    def merge(self, names: Optional[list] = None) -> None:
        names = [n for n in (names or self.active_adapters) if n not in self.merged_adapters and n in self.r]
        with torch.no_grad():
            w = self.base_layer.weight
            for name in names:
                w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            w = self.base_layer.weight
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                w.copy_((w.float() - self.delta_weight(name)).to(w.dtype))


class LoraConv(AdapterLayer):
    """LoRA over an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``, grouped ones included.

    With ``groups > 1`` PEFT's layout is kept: A is an ungrouped conv to r channels and B a grouped 1x1
    conv (r divisible by groups). Their product mixes every input channel into every group, which a
    grouped base kernel cannot hold, so such an adapter trains and saves but does not merge (as in PEFT).
    """

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, backend: str = "auto"):
        super().__init__(base_layer, backend)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict = {}
        self.lora_alpha: dict = {}
        self.scaling: dict = {}
        self.lora_dropout_p: dict = {}

    def add_adapter(self, name: str, r: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
                    use_dora: bool = False, init: object = True, lora_bias: bool = False) -> None:
        _check_options("convolution", use_dora)
        base = self.base_layer
        if r % base.groups:
            raise ValueError(
                f"LoRA on a {type(base).__name__} with groups={base.groups} needs a rank divisible by the groups "
                f"(PEFT's rule), got r={r}; choose r as a multiple of {base.groups} (rank_pattern can set it for "
                "this layer alone) or exclude the layer from target_modules"
            )
        conv = type(base)
        kw = dict(device=base.weight.device, dtype=adapter_dtype(base))
        ones = (1,) * (base.weight.dim() - 2)
        # PEFT's layout: A repeats the base's kernel, stride and padding (not its dilation); B is 1x1.
        a = conv(self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False, **kw)
        # lora_bias: B's bias, scaled with B's output (PEFT's layout); merging adds it to the base bias.
        b = conv(r, self.out_features, ones, ones, groups=base.groups, bias=bool(lora_bias), **kw)
        with torch.no_grad():
            if init is True:
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
                nn.init.zeros_(b.weight)
            elif init == "gaussian":
                nn.init.normal_(a.weight, std=1.0 / r)
                nn.init.zeros_(b.weight)
            if init is not False and b.bias is not None:
                nn.init.zeros_(b.bias)
        self.lora_A[name], self.lora_B[name] = a, b
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout_p[name] = float(dropout)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_dropout_p):
            d.pop(name, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._use_base_only():
            return self._base_forward(x)
        result = self.base_layer(x)
        for name in self.active_adapters:
            a, b = self.lora_A[name], self.lora_B[name]
            h = F.dropout(x, self.lora_dropout_p[name], self.training) if self.lora_dropout_p[name] else x
            result = result + b(a(h.to(a.weight.dtype))) * self.scaling[name]
        return result.to(x.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The change of the base kernel, [out, in, *kernel] fp32 (ungrouped bases only)."""
        a = self.lora_A[name].weight.float()  # [r, in, *k]
        b = self.lora_B[name].weight.float()  # [out, r, *1]
        # B(A(x)) with a 1x1 B is a conv with kernel sum_r B[o, r] * A[r, i, *k].
        return torch.einsum("or,ri...->oi...", b.flatten(1), a) * self.scaling[name]

    def _merge_bias(self, name: str, sign: float) -> None:
        lora_b = self.lora_B[name].bias
        if lora_b is not None:
            bias = self.base_layer.bias
            bias.copy_((bias.float() + sign * self.scaling[name] * lora_b.float()).to(bias.dtype))

    def merge(self, names: Optional[list] = None) -> None:
        names = [n for n in (names or self.active_adapters) if n not in self.merged_adapters and n in self.r]
        if names and self.base_layer.groups > 1:
            raise ValueError(
                f"cannot merge LoRA into a {type(self.base_layer).__name__} with groups={self.base_layer.groups}: the "
                "adapter's product spans all input channels, which a grouped kernel cannot hold (PEFT does not merge "
                "it either); keep the adapter unmerged"
            )
        if self.base_layer.bias is None and any(self.lora_B[n].bias is not None for n in names):
            raise ValueError(
                "cannot merge a LoRA adapter with lora_bias=True into a convolution without a bias (as in PEFT); "
                "keep it unmerged, or train it with lora_bias=False"
            )
        with torch.no_grad():
            w = self.base_layer.weight
            for name in names:
                w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
                self._merge_bias(name, 1.0)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            w = self.base_layer.weight
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                w.copy_((w.float() - self.delta_weight(name)).to(w.dtype))
                self._merge_bias(name, -1.0)
